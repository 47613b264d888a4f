//! `check`: YAML policy -> [`Policy`] plus diagnostics.

use std::collections::HashMap;
use std::net::IpAddr;

use enforcer_common::SocketKind;

use ipnet::{IpNet, Ipv4Net};

use super::cgroup_attr::{CgroupAttr, K8S_KEY, label_atom, label_key_problem, label_value_problem};
use super::yaml::{self, Kind, Node};
use super::{
    Action, Diagnostic, Identity, MatchEntry, Mode, Policy, Protocol, Rule, Severity, Timing,
    default_spiffe_id,
};

const TOP_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "trustDomain",
    "mode",
    "unattested",
    "scope",
    "reportAllow",
    "maxGrant",
    "revokeConnections",
    "identities",
    "rules",
];
const IDENTITY_KEYS: &[&str] = &["name", "spiffeId", "match", "sockets"];
const MATCH_KEYS: &[&str] = &[
    "binarySha256",
    "binaryPath",
    "cgroup",
    "systemdUnit",
    "uid",
    K8S_KEY,
    "preload",
];
/// Keys of a match entry's `k8s` mapping (the `k8s` attributes of [`CgroupAttr`]).
const K8S_KEYS: &[&str] = &["namespace", "serviceAccount", "podLabels", "container"];
const RULE_KEYS: &[&str] = &["identity", "egress", "deny"];
const ENTRY_KEYS: &[&str] = &["to", "expires", "notBefore", "reason"];
const TO_KEYS: &[&str] = &["cidr", "ports", "protocol", "identity"];

/// Maximum number of `scope` entries (the kernel's `ENF_SCOPES` capacity).
const MAX_SCOPE: usize = enforcer_common::MAX_SCOPES as usize;

/// Parse and check a YAML policy. `Ok` when there is no error (warnings are returned
/// alongside); `Err` with every diagnostic, errors and warnings, in source order, otherwise.
pub fn check(source: &str) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    check_at(source, super::wall_now_ns())
}

/// [`check`] as of the wall-clock instant `now` (Unix ns): what has expired by then is warned.
pub fn check_at(source: &str, now: i64) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut c = Checker {
        now,
        ..Checker::default()
    };
    let policy = match yaml::parse(source) {
        Err(e) => {
            c.diag(e.line, e.col, Severity::Error, e.message);
            None
        }
        Ok(None) => {
            c.diag(
                1,
                1,
                Severity::Error,
                "the policy is empty; start it with `apiVersion: enforcer/v1` and `kind: Policy`"
                    .into(),
            );
            None
        }
        Ok(Some(root)) => c.policy(&root),
    };
    let mut diags = c.diags;
    diags.sort_by_key(|d| (d.line, d.col));
    let failed = diags.iter().any(|d| d.severity == Severity::Error);
    match policy {
        Some(p) if !failed => Ok((p, diags)),
        _ => Err(diags),
    }
}

/// Fields of a mapping, after the unknown-key and duplicate checks.
struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

#[derive(Default)]
struct Checker {
    diags: Vec<Diagnostic>,
    /// The wall clock (Unix ns) when the check started: entries expired by then are warned.
    now: i64,
}

fn list_keys(keys: &[&str]) -> String {
    keys.join(", ")
}

impl Checker {
    fn diag(&mut self, line: usize, col: usize, severity: Severity, message: String) {
        self.diags.push(Diagnostic {
            line,
            col,
            severity,
            message,
        });
    }

    fn err(&mut self, at: &Node, message: String) {
        self.diag(at.line, at.col, Severity::Error, message);
    }

    fn warn(&mut self, at: &Node, message: String) {
        self.diag(at.line, at.col, Severity::Warning, message);
    }

    /// A mapping with only `allowed` keys and all `required` ones.
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
        required: &[&str],
    ) -> Option<Fields<'n>> {
        let Kind::Map(pairs) = &node.kind else {
            self.err(
                node,
                format!(
                    "{what} must be a mapping with keys {}, not {}",
                    list_keys(allowed),
                    node.type_name()
                ),
            );
            return None;
        };
        let mut entries: Vec<(&'n str, &'n Node)> = Vec::new();
        let mut first_seen: HashMap<&str, usize> = HashMap::new();
        for (k, v) in pairs {
            let Kind::Scalar { value: key, .. } = &k.kind else {
                self.err(
                    k,
                    format!(
                        "{what} has a key that is {}; keys must be plain names ({})",
                        k.type_name(),
                        list_keys(allowed)
                    ),
                );
                continue;
            };
            if !allowed.contains(&key.as_str()) {
                let hint = allowed
                    .iter()
                    .find(|a| a.eq_ignore_ascii_case(key))
                    .map(|a| format!(" (did you mean `{a}`?)"))
                    .unwrap_or_default();
                self.err(
                    k,
                    format!(
                        "unknown key `{key}` in {what}{hint}; allowed keys: {}",
                        list_keys(allowed)
                    ),
                );
                continue;
            }
            if let Some(line) = first_seen.get(key.as_str()) {
                self.err(
                    k,
                    format!(
                        "duplicate key `{key}` in {what} (first given on line {line}); keep one"
                    ),
                );
                continue;
            }
            first_seen.insert(key, k.line);
            entries.push((key, v));
        }
        for r in required {
            if !first_seen.contains_key(r) {
                self.err(node, format!("{what} is missing the required key `{r}`"));
            }
        }
        Some(Fields { entries })
    }

    /// A non-empty string scalar.
    fn string(&mut self, node: &Node, what: &str, example: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { value, .. } if !node.is_null() && !value.is_empty() => {
                Some(value.clone())
            }
            _ => {
                self.err(
                    node,
                    format!(
                        "{what} must be a non-empty string, not {}; write e.g. {example}",
                        node.type_name()
                    ),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.kind {
            Kind::Scalar {
                value,
                quoted: false,
            } if value == "true" || value == "false" => Some(value == "true"),
            _ => {
                self.err(
                    node,
                    format!("{what} must be true or false, not {}", describe(node)),
                );
                None
            }
        }
    }

    fn list<'n>(&mut self, node: &'n Node, what: &str, example: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.err(
                    node,
                    format!(
                        "{what} must be a list, not {}; write e.g. {example}",
                        node.type_name()
                    ),
                );
                None
            }
        }
    }

    fn policy(&mut self, root: &Node) -> Option<Policy> {
        let f = self.fields(
            root,
            "the policy",
            TOP_KEYS,
            &["apiVersion", "kind", "trustDomain"],
        )?;
        let mut ok = true;
        if let Some(n) = f.get("apiVersion") {
            match self.string(n, "apiVersion", "`apiVersion: enforcer/v1`") {
                Some(v) if v == "enforcer/v1" => {}
                Some(v) => {
                    self.err(
                        n,
                        format!(
                            "unknown apiVersion {v:?}; this agent reads `apiVersion: enforcer/v1`"
                        ),
                    );
                    ok = false;
                }
                None => ok = false,
            }
        }
        if let Some(n) = f.get("kind") {
            match self.string(n, "kind", "`kind: Policy`") {
                Some(v) if v == "Policy" => {}
                Some(v) => {
                    self.err(n, format!("unknown kind {v:?}; write `kind: Policy`"));
                    ok = false;
                }
                None => ok = false,
            }
        }
        let trust_domain = f.get("trustDomain").and_then(|n| {
            let td = self.string(n, "trustDomain", "`trustDomain: prod.example.org`")?;
            if td.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            }) {
                Some(td)
            } else {
                self.err(
                    n,
                    format!(
                        "trustDomain {td:?} is not a SPIFFE trust domain; use lower-case letters, digits, '.', '-' and '_' only (e.g. prod.example.org)"
                    ),
                );
                None
            }
        });
        let mode = match f.get("mode") {
            None => Some(Mode::Enforce),
            Some(n) => match scalar(n) {
                Some("enforce") => Some(Mode::Enforce),
                Some("audit") => Some(Mode::Audit),
                _ => {
                    self.err(
                        n,
                        format!("mode must be `enforce` or `audit`, not {}", describe(n)),
                    );
                    None
                }
            },
        };
        let unattested = match f.get("unattested") {
            None => Some(Action::Allow),
            Some(n) => match scalar(n) {
                Some("allow") => Some(Action::Allow),
                Some("audit") => Some(Action::Audit),
                Some("deny") => Some(Action::Deny),
                _ => {
                    self.err(
                        n,
                        format!(
                            "unattested must be `allow`, `audit` or `deny`, not {}",
                            describe(n)
                        ),
                    );
                    None
                }
            },
        };
        let scope = match f.get("scope") {
            None => Some(vec!["/".to_string()]),
            Some(n) => self.scope(n),
        };
        let report_allow = match f.get("reportAllow") {
            None => Some(false),
            Some(n) => self.boolean(n, "reportAllow"),
        };
        let max_grant_secs = match f.get("maxGrant") {
            None => Some(super::DEFAULT_MAX_GRANT_SECS),
            Some(n) => self.duration(n, "maxGrant", "`maxGrant: 4h`"),
        };
        let revoke_connections = match f.get("revokeConnections") {
            None => Some(true),
            Some(n) => self.boolean(n, "revokeConnections"),
        };
        let (identities, ids_ok, names) = match f.get("identities") {
            None => (Vec::new(), true, HashMap::new()),
            Some(n) => self.identities(n, trust_domain.as_deref()),
        };
        let rules = match f.get("rules") {
            None => Some(Vec::new()),
            Some(n) => self.rules(n, &names),
        };
        self.overlaps(&identities);
        if !ok || !ids_ok {
            return None;
        }
        Some(Policy {
            trust_domain: trust_domain?,
            mode: mode?,
            unattested: unattested?,
            scope: scope?,
            report_allow: report_allow?,
            revoke_connections: revoke_connections?,
            identities: identities.into_iter().map(|i| i.identity).collect(),
            rules: rules?,
            max_grant_secs: max_grant_secs?,
        })
    }

    fn scope(&mut self, node: &Node) -> Option<Vec<String>> {
        let items = self.list(node, "scope", "`scope: [\"/\"]`")?;
        if items.is_empty() {
            self.err(
                node,
                "scope is empty, so nothing would be enforced; write `scope: [\"/\"]` for the whole node".into(),
            );
            return None;
        }
        if items.len() > MAX_SCOPE {
            self.err(
                node,
                format!(
                    "scope has {} entries, at most {MAX_SCOPE} are supported; use common parent cgroups",
                    items.len()
                ),
            );
        }
        let mut out = Vec::new();
        let mut ok = items.len() <= MAX_SCOPE;
        for item in items {
            let Some(s) = self.string(item, "a scope entry", "\"/system.slice\"") else {
                ok = false;
                continue;
            };
            if !s.starts_with('/') {
                self.err(
                    item,
                    format!("scope entry {s:?} must start with \"/\" (a cgroup v2 path relative to the cgroup2 root, e.g. \"/system.slice\")"),
                );
                ok = false;
            } else if s.split('/').any(|seg| seg == ".." || seg == ".") {
                self.err(
                    item,
                    format!("scope entry {s:?} must not contain \".\" or \"..\" segments; write the plain path"),
                );
                ok = false;
            } else if s.contains('*') {
                self.err(
                    item,
                    format!("scope entry {s:?} is a cgroup path, not a glob; remove the \"*\" (a scope covers its whole subtree)"),
                );
                ok = false;
            } else {
                out.push(s);
            }
        }
        ok.then_some(out)
    }

    fn identities(
        &mut self,
        node: &Node,
        trust_domain: Option<&str>,
    ) -> (Vec<CheckedIdentity>, bool, HashMap<String, u32>) {
        let Some(items) = self.list(
            node,
            "identities",
            "`identities: [{name: api, match: [...]}]`",
        ) else {
            return (Vec::new(), false, HashMap::new());
        };
        let mut numbers: HashMap<String, u32> = HashMap::new();
        let mut out: Vec<CheckedIdentity> = Vec::new();
        let mut ok = true;
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        let mut seen_ids: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let what = format!("identities[{i}]");
            let Some(f) = self.fields(item, &what, IDENTITY_KEYS, &["name", "match"]) else {
                ok = false;
                continue;
            };
            let name_node = f.get("name");
            let name = name_node.and_then(|n| {
                let name = self.string(n, "name", "`name: payments-api`")?;
                if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                {
                    self.err(
                        n,
                        format!("identity name {name:?} may hold only letters, digits, '.', '-' and '_'; set `spiffeId` for any other SPIFFE path"),
                    );
                    return None;
                }
                if let Some(line) = seen_names.get(&name) {
                    self.err(
                        n,
                        format!("duplicate identity name {name:?} (first defined on line {line}); give each identity its own name"),
                    );
                    return None;
                }
                seen_names.insert(name.clone(), n.line);
                numbers.insert(name.clone(), index_to_ident(i));
                Some(name)
            });
            let matches = f.get("match").and_then(|n| self.matches(n));
            let spiffe_id = match (f.get("spiffeId"), &name, trust_domain, &matches) {
                (Some(n), _, td, _) => self.spiffe_id(n, td),
                (None, Some(name), Some(td), Some((m, _))) => Some(default_spiffe_id(td, name, m)),
                _ => None,
            };
            if let (Some(id), Some(n)) = (&spiffe_id, name_node) {
                if let Some(line) = seen_ids.get(id) {
                    self.warn(
                        f.get("spiffeId").unwrap_or(n),
                        format!("SPIFFE ID {id} is also given to the identity on line {line}; merge the two identities' match lists into one identity"),
                    );
                } else {
                    seen_ids.insert(id.clone(), n.line);
                }
            }
            let sockets = match f.get("sockets") {
                Some(n) => self.sockets(n),
                None => Some(0),
            };
            match (name, spiffe_id, matches, sockets) {
                (Some(name), Some(spiffe_id), Some((matches, nodes)), Some(sockets)) => {
                    out.push(CheckedIdentity {
                        identity: Identity {
                            name,
                            spiffe_id,
                            matches,
                            sockets,
                        },
                        entry_nodes: nodes,
                    });
                }
                _ => ok = false,
            }
        }
        (out, ok, numbers)
    }

    /// `sockets: [raw, icmp, ...]`: the mask of [`SocketKind`] bits.
    fn sockets(&mut self, node: &Node) -> Option<u32> {
        let names = || {
            SocketKind::ALL
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let items = self.list(node, "sockets", "`sockets: [icmp]`")?;
        let mut mask = 0;
        let mut ok = true;
        for item in items {
            let kind = scalar(item).and_then(|v| SocketKind::ALL.iter().find(|k| k.name() == v));
            match kind {
                Some(k) => mask |= k.bit(),
                None => {
                    self.err(
                        item,
                        format!(
                            "unknown socket kind {}; write one of: {} (TCP, UDP and MPTCP need no entry: their connects are judged by the rules)",
                            describe(item),
                            names()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(mask)
    }

    fn spiffe_id(&mut self, node: &Node, trust_domain: Option<&str>) -> Option<String> {
        let id = self.string(
            node,
            "spiffeId",
            "`spiffeId: spiffe://prod.example.org/ns/x/sa/y`",
        )?;
        let td = trust_domain?;
        let prefix = format!("spiffe://{td}/");
        let Some(path) = id.strip_prefix(&prefix) else {
            self.err(
                node,
                format!("spiffeId {id:?} must be in this policy's trust domain: write spiffe://{td}/<path>"),
            );
            return None;
        };
        let bad_seg = path
            .split('/')
            .find(|s| s.is_empty() || *s == "." || *s == "..");
        let bad_char = path
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')));
        if bad_seg.is_some() || bad_char.is_some() {
            self.err(
                node,
                format!("spiffeId {id:?} has an invalid path; write spiffe://{td}/<segments> with non-empty segments of letters, digits, '.', '-' and '_' (no trailing \"/\", \".\" or \"..\")"),
            );
            return None;
        }
        Some(id)
    }

    fn matches(&mut self, node: &Node) -> Option<(Vec<MatchEntry>, Vec<Node>)> {
        let items = self.list(
            node,
            "match",
            "`match: [{binarySha256: [\"<64 hex digits>\"]}]`",
        )?;
        if items.is_empty() {
            self.err(
                node,
                "match is empty, so this identity could never be given; add at least one entry, e.g. `- binarySha256: [\"<sha256 of the executable>\"]`".into(),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut nodes = Vec::new();
        let mut ok = true;
        for (j, item) in items.iter().enumerate() {
            match self.match_entry(item, j) {
                Some(e) => {
                    out.push(e);
                    nodes.push(item.clone());
                }
                None => ok = false,
            }
        }
        ok.then_some((out, nodes))
    }

    /// The non-empty list of globs on a cgroup attribute, each checked, into the entry;
    /// false when any is wrong (each reported where it stands).
    fn globs(&mut self, node: &Node, attr: CgroupAttr, entry: &mut MatchEntry) -> bool {
        let (key, example) = (attr.key(), attr.example());
        let Some(items) = self.nonempty_list(node, key, &format!("[{example}]")) else {
            return false;
        };
        let mut ok = true;
        for it in items {
            match self.string(it, &format!("a {key} entry"), example) {
                Some(g) => match attr.problem(&g) {
                    None => attr.globs_mut(entry).push(g),
                    Some(msg) => {
                        self.err(it, msg);
                        ok = false;
                    }
                },
                None => ok = false,
            }
        }
        ok
    }

    fn match_entry(&mut self, node: &Node, j: usize) -> Option<MatchEntry> {
        let what = format!("match[{j}]");
        let f = self.fields(node, &what, MATCH_KEYS, &[])?;
        if f.entries.is_empty() {
            self.err(
                node,
                format!("{what} is empty; an entry never matches everything: give binarySha256, binaryPath, cgroup, systemdUnit, k8s and/or uid"),
            );
            return None;
        }
        let mut ok = true;
        let mut entry = MatchEntry::default();
        if let Some(n) = f.get("binarySha256") {
            match self.nonempty_list(n, "binarySha256", "[\"9f86d081...\"]") {
                Some(items) => {
                    for it in items {
                        match self.sha256(it, "binarySha256") {
                            Some(h) => entry.binary_sha256.push(h),
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            }
        }
        if let Some(n) = f.get("binaryPath") {
            match self.nonempty_list(n, "binaryPath", "[\"/opt/app/bin/api\"]") {
                Some(items) => {
                    for it in items {
                        match self.string(it, "a binaryPath entry", "\"/opt/app/bin/api\"") {
                            Some(p) if p.starts_with('/') => entry.binary_path.push(p),
                            Some(p) => {
                                self.err(
                                    it,
                                    format!("binaryPath {p:?} must be an absolute path (starting with \"/\")"),
                                );
                                ok = false;
                            }
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            }
        }
        for attr in CgroupAttr::ALL {
            if let (None, key) = attr.yaml_key()
                && let Some(n) = f.get(key)
            {
                ok &= self.globs(n, attr, &mut entry);
            }
        }
        if let Some(n) = f.get(K8S_KEY) {
            ok &= self.k8s(n, &what, &mut entry);
        }
        if let Some(n) = f.get("uid") {
            match self.nonempty_list(n, "uid", "[1000]") {
                Some(items) => {
                    for it in items {
                        match scalar_int(it) {
                            Some(u) if (0..i64::from(u32::MAX)).contains(&u) => {
                                entry.uid.push(u32::try_from(u).unwrap_or(0));
                            }
                            _ => {
                                self.err(
                                    it,
                                    format!(
                                        "uid must be a number from 0 to {}, not {}",
                                        u32::MAX - 1,
                                        describe(it)
                                    ),
                                );
                                ok = false;
                            }
                        }
                    }
                }
                None => ok = false,
            }
        }
        if let Some(n) = f.get("preload") {
            match self.nonempty_list(n, "preload", "[\"9f86d081...\"]") {
                Some(items) => {
                    for it in items {
                        match self.sha256(it, "preload") {
                            Some(h) => entry.preload.push(h),
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            }
            if ok && f.entries.len() == 1 {
                self.err(
                    node,
                    format!("{what} has only preload:, which selects nothing (it grants preloads to the processes the entry selects); add binarySha256, binaryPath, cgroup, systemdUnit, k8s and/or uid"),
                );
                ok = false;
            }
        }
        if ok
            && entry.binary_sha256.is_empty()
            && !entry.binary_path.is_empty()
            && let Some(n) = f.get("binaryPath")
        {
            self.warn(
                n,
                "binaryPath trusts a path; prefer binarySha256: [\"<sha256 of the file>\"] (get it with `enforcer-agent attest --pid PID`): any file written to that path gets this identity".into(),
            );
        }
        ok.then_some(entry)
    }

    /// The `k8s` mapping of a match entry: its selectors into the entry; false when any is
    /// wrong (each reported where it stands).
    fn k8s(&mut self, node: &Node, what: &str, entry: &mut MatchEntry) -> bool {
        let what = format!("{what}.{K8S_KEY}");
        let Some(f) = self.fields(node, &what, K8S_KEYS, &[]) else {
            return false;
        };
        if matches!(&node.kind, Kind::Map(pairs) if pairs.is_empty()) {
            self.err(
                node,
                format!("{what} is empty, so it selects nothing; give namespace, serviceAccount, podLabels and/or container, e.g. `k8s: {{namespace: [payments], serviceAccount: [api]}}`, or remove it"),
            );
            return false;
        }
        let mut ok = true;
        for attr in CgroupAttr::ALL {
            let (Some(_), key) = attr.yaml_key() else {
                continue;
            };
            let Some(n) = f.get(key) else { continue };
            ok &= if attr == CgroupAttr::K8sPodLabels {
                self.pod_labels(n, entry)
            } else {
                self.globs(n, attr, entry)
            };
        }
        ok
    }

    /// `podLabels: {KEY: GLOB}`: exact label keys, globs on their values.
    fn pod_labels(&mut self, node: &Node, entry: &mut MatchEntry) -> bool {
        let attr = CgroupAttr::K8sPodLabels;
        let (key, example) = (attr.key(), attr.example());
        let Kind::Map(pairs) = &node.kind else {
            self.err(
                node,
                format!(
                    "{key} must be a mapping of label keys to values, not {}; write e.g. podLabels: {example}",
                    node.type_name()
                ),
            );
            return false;
        };
        if pairs.is_empty() {
            self.err(
                node,
                format!("{key} is empty, so it selects nothing; give at least one label, e.g. podLabels: {example}, or remove the key"),
            );
            return false;
        }
        let mut ok = true;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (k, v) in pairs {
            let label = match &k.kind {
                Kind::Scalar { value, .. } if !k.is_null() => value.as_str(),
                _ => {
                    self.err(
                        k,
                        format!(
                            "a {key} key must be a label key such as app, not {}",
                            k.type_name()
                        ),
                    );
                    ok = false;
                    continue;
                }
            };
            if let Some(msg) = label_key_problem(label) {
                self.err(k, msg);
                ok = false;
                continue;
            }
            if let Some(line) = seen.get(label) {
                self.err(
                    k,
                    format!("duplicate label key {label:?} in {key} (first given on line {line}); keep one"),
                );
                ok = false;
                continue;
            }
            seen.insert(label, k.line);
            let value = match &v.kind {
                Kind::Scalar { value, .. } if !v.is_null() => value.as_str(),
                _ => {
                    self.err(
                        v,
                        format!("the {key} value of {label:?} must be a string, not {}; write e.g. {label}: web, or {label}: \"*\" for any value", v.type_name()),
                    );
                    ok = false;
                    continue;
                }
            };
            match label_value_problem(label, value) {
                None => entry.k8s_pod_labels.push(label_atom(label, value)),
                Some(msg) => {
                    self.err(v, msg);
                    ok = false;
                }
            }
        }
        ok
    }

    fn nonempty_list<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        example: &str,
    ) -> Option<&'n [Node]> {
        let items = self.list(node, what, example)?;
        if items.is_empty() {
            self.err(
                node,
                format!("{what} is an empty list, so this entry could never match; give at least one value, e.g. {example}, or remove the key"),
            );
            return None;
        }
        Some(items)
    }

    fn sha256(&mut self, node: &Node, key: &str) -> Option<[u8; 32]> {
        let s = scalar(node).unwrap_or_default();
        let mut out = [0u8; 32];
        if s.len() == 64 && hex::decode_to_slice(s, &mut out).is_ok() {
            return Some(out);
        }
        self.err(
            node,
            format!(
                "{key} entry {} is not a sha256: write the 64 hex digits of the file's hash (`sha256sum FILE`)",
                describe(node)
            ),
        );
        None
    }

    fn rules(&mut self, node: &Node, names: &HashMap<String, u32>) -> Option<Vec<Rule>> {
        let items = self.list(node, "rules", "`rules: [{identity: api, egress: [...]}]`")?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let what = format!("rules[{i}]");
            let Some(f) = self.fields(item, &what, RULE_KEYS, &["identity"]) else {
                ok = false;
                continue;
            };
            let ident = f.get("identity").and_then(|n| {
                let name = self.string(n, "identity", "`identity: payments-api`")?;
                self.known_identity(n, &name, names).map(|id| (name, id))
            });
            if f.get("egress").is_none() && f.get("deny").is_none() {
                self.warn(
                    item,
                    format!("{what} has neither egress nor deny, so it changes nothing; add `egress:` entries or remove it"),
                );
            }
            for (key, deny) in [("egress", false), ("deny", true)] {
                let Some(n) = f.get(key) else { continue };
                let Some(entries) = self.list(n, key, "`- to: {cidr: 10.0.0.0/8, ports: [443]}`")
                else {
                    ok = false;
                    continue;
                };
                for (j, e) in entries.iter().enumerate() {
                    let label = ident
                        .as_ref()
                        .map(|(name, _)| format!("{name} {key}[{j}]"))
                        .unwrap_or_default();
                    match self.rule_entry(e, &format!("{what}.{key}[{j}]"), names) {
                        Some((dests, timing)) => {
                            if let Some((_, id)) = &ident {
                                for d in dests {
                                    out.push(Rule {
                                        ident: *id,
                                        deny,
                                        text: format!(
                                            "{label}: {}{}",
                                            d.describe(),
                                            timing_text(&timing)
                                        ),
                                        cidr: d.cidr,
                                        to_ident: d.to_ident,
                                        ports: d.ports.clone(),
                                        protocol: d.protocol,
                                        line: e.line,
                                        timing: timing.clone(),
                                    });
                                }
                            }
                        }
                        None => ok = false,
                    }
                }
            }
            if ident.is_none() {
                ok = false;
            }
        }
        ok.then_some(out)
    }

    fn known_identity(
        &mut self,
        node: &Node,
        name: &str,
        names: &HashMap<String, u32>,
    ) -> Option<u32> {
        match names.get(name) {
            Some(id) => Some(*id),
            None => {
                let mut known: Vec<&str> = names.keys().map(String::as_str).collect();
                known.sort_unstable();
                let known = if known.is_empty() {
                    "none are defined".to_string()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                self.err(
                    node,
                    format!("unknown identity {name:?}; name one from `identities` ({known}) or define it there"),
                );
                None
            }
        }
    }

    /// One egress/deny entry: the destinations it compiles to (none for identity destinations).
    fn rule_entry(
        &mut self,
        node: &Node,
        what: &str,
        names: &HashMap<String, u32>,
    ) -> Option<(Vec<Dest>, Timing)> {
        let f = self.fields(node, what, ENTRY_KEYS, &["to"])?;
        let timing = self.timing(&f, what)?;
        let dests = self.destination(&f, what, names)?;
        Some((dests, timing))
    }

    /// `expires:`, `notBefore:` and `reason:` of an egress/deny entry.
    fn timing(&mut self, f: &Fields<'_>, what: &str) -> Option<Timing> {
        let mut ok = true;
        let mut instant = |c: &mut Self, key: &str| -> Option<(i64, &Node)> {
            let n = f.get(key)?;
            match c.instant(n, key) {
                Some(t) => Some((t, n)),
                None => {
                    ok = false;
                    None
                }
            }
        };
        let expires = instant(self, "expires");
        let not_before = instant(self, "notBefore");
        let reason = match f.get("reason") {
            None => None,
            Some(n) => match self.string(n, "reason", "`reason: \"INC-1234 break-glass\"`") {
                Some(r) => Some(r),
                None => {
                    ok = false;
                    None
                }
            },
        };
        if let (Some((b, _)), Some((e, en))) = (not_before, expires)
            && b >= e
        {
            self.err(
                en,
                format!(
                    "{what}: expires ({}) is not after notBefore ({}); the entry would never hold",
                    super::rfc3339(e),
                    super::rfc3339(b)
                ),
            );
            ok = false;
        }
        if let Some((e, en)) = expires
            && e <= self.now
        {
            self.warn(
                en,
                format!(
                    "{what} expired at {} (it is {} now): the kernel will never honour it; remove it or move `expires` forward",
                    super::rfc3339(e),
                    super::rfc3339(self.now)
                ),
            );
        }
        ok.then_some(Timing {
            not_before: not_before.map(|(t, _)| t),
            expires: expires.map(|(t, _)| t),
            reason,
            grant: None,
        })
    }

    /// An RFC 3339 instant with an explicit offset (`2026-12-01T18:00:00Z`), as Unix ns.
    fn instant(&mut self, node: &Node, what: &str) -> Option<i64> {
        let text = match &node.kind {
            Kind::Scalar { value, .. } if !node.is_null() => value.clone(),
            _ => {
                self.err(
                    node,
                    format!(
                        "{what} must be an RFC 3339 instant such as 2026-12-01T18:00:00Z, not {}",
                        node.type_name()
                    ),
                );
                return None;
            }
        };
        match text.parse::<jiff::Timestamp>() {
            Ok(t) => match i64::try_from(t.as_nanosecond()) {
                Ok(ns) if ns > 0 => Some(ns),
                _ => {
                    self.err(
                        node,
                        format!("{what} {text:?} is out of range (1970 to 2262)"),
                    );
                    None
                }
            },
            Err(e) => {
                self.err(
                    node,
                    format!(
                        "{what} {text:?} is not an RFC 3339 instant ({e}); write e.g. 2026-12-01T18:00:00Z or 2026-12-01T19:00:00+01:00"
                    ),
                );
                None
            }
        }
    }

    /// A duration such as `30m`, `4h`, `1h30m` (or ISO 8601 `PT4H`), in whole seconds > 0.
    fn duration(&mut self, node: &Node, what: &str, example: &str) -> Option<u64> {
        let text = scalar(node).unwrap_or_default().to_string();
        match parse_duration_secs(&text) {
            Ok(secs) => Some(secs),
            Err(e) => {
                self.err(
                    node,
                    format!("{what} {text:?} is not a duration ({e}); write e.g. {example}"),
                );
                None
            }
        }
    }

    /// The destination (`to:`) of an egress/deny entry.
    fn destination(
        &mut self,
        f: &Fields<'_>,
        what: &str,
        names: &HashMap<String, u32>,
    ) -> Option<Vec<Dest>> {
        let to = f.get("to")?;
        let t = self.fields(to, &format!("{what}.to"), TO_KEYS, &[])?;
        let mut ok = true;
        let protocol = match t.get("protocol") {
            None => Protocol::Any,
            Some(n) => match scalar(n) {
                Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                Some("any") => Protocol::Any,
                _ => {
                    self.err(
                        n,
                        format!(
                            "protocol must be `tcp`, `udp` or `any`, not {}",
                            describe(n)
                        ),
                    );
                    ok = false;
                    Protocol::Any
                }
            },
        };
        let ports = match t.get("ports") {
            None => Vec::new(),
            Some(n) => match self.ports(n) {
                Some(p) => p,
                None => {
                    ok = false;
                    Vec::new()
                }
            },
        };
        let cidrs = match t.get("cidr") {
            None => vec![IpNet::V4(Ipv4Net::default()), "::/0".parse().ok()?],
            Some(n) => match self.cidr(n) {
                Some(c) => vec![c],
                None => {
                    ok = false;
                    Vec::new()
                }
            },
        };
        if let Some(n) = t.get("identity") {
            if let Some(c) = t.get("cidr") {
                self.err(
                    c,
                    "a destination is either a cidr or an identity; split this entry into two"
                        .into(),
                );
                return None;
            }
            let name = self.string(n, "identity", "`identity: payments-db`")?;
            self.known_identity(n, &name, names)?;
            let to_ident = *names.get(&name)?;
            return ok.then(|| {
                vec![Dest {
                    cidr: IpNet::V4(Ipv4Net::default()),
                    to_ident,
                    ports,
                    protocol,
                    to_name: Some(name),
                }]
            });
        }
        if !ok {
            return None;
        }
        Some(
            cidrs
                .into_iter()
                .map(|cidr| Dest {
                    cidr,
                    to_ident: 0,
                    ports: ports.clone(),
                    protocol,
                    to_name: None,
                })
                .collect(),
        )
    }

    fn cidr(&mut self, node: &Node) -> Option<IpNet> {
        let Some(s) = scalar(node).filter(|s| !s.is_empty()) else {
            self.err(
                node,
                format!(
                    "cidr must be a string such as \"10.0.0.0/8\" or \"2001:db8::/32\", not {}",
                    node.type_name()
                ),
            );
            return None;
        };
        let net = match s.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match s.parse::<IpAddr>() {
                Ok(a) => IpNet::from(a),
                Err(_) => {
                    self.err(
                        node,
                        format!("{s:?} is not a CIDR; write an address and prefix length such as \"10.0.0.0/8\" or \"2001:db8::/32\""),
                    );
                    return None;
                }
            },
        };
        if net.trunc() != net {
            self.err(
                node,
                format!(
                    "cidr {s:?} has host bits set; write the network address {}",
                    net.trunc()
                ),
            );
            return None;
        }
        // IPv4-mapped IPv6: destinations are judged as the IPv4 address they carry.
        if let IpNet::V6(v6) = net
            && let Some(v4) = v6.addr().to_ipv4_mapped()
            && v6.prefix_len() >= 96
        {
            return Ipv4Net::new(v4, v6.prefix_len() - 96).ok().map(IpNet::V4);
        }
        Some(net)
    }

    fn ports(&mut self, node: &Node) -> Option<Vec<(u16, u16)>> {
        let items = self.list(node, "ports", "`ports: [443, \"8000-8100\"]`")?;
        let mut out = Vec::new();
        let mut ok = true;
        for it in items {
            match self.port_item(it) {
                Some(r) => out.push(r),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn port_item(&mut self, node: &Node) -> Option<(u16, u16)> {
        let bad = |c: &mut Self, msg: String| {
            c.err(node, msg);
            None
        };
        let one = |c: &mut Self, v: i64| -> Option<u16> {
            match u16::try_from(v) {
                Ok(p) if p >= 1 => Some(p),
                _ => {
                    c.err(
                        node,
                        format!("port {v} is out of range; ports are 1 to 65535 (leave `ports` out for all ports)"),
                    );
                    None
                }
            }
        };
        match &node.kind {
            Kind::Scalar { value, .. } => {
                let v = value.trim();
                if let Some((a, b)) = v.split_once('-').filter(|(a, _)| !a.is_empty()) {
                    let (Ok(a), Ok(b)) = (a.trim().parse::<i64>(), b.trim().parse::<i64>()) else {
                        return bad(
                            self,
                            format!(
                                "port range {v:?} is not of the form \"A-B\"; write e.g. \"8000-8100\""
                            ),
                        );
                    };
                    let a = one(self, a)?;
                    let b = one(self, b)?;
                    if a > b {
                        return bad(
                            self,
                            format!("port range {v:?} is backwards; write \"{b}-{a}\""),
                        );
                    }
                    Some((a, b))
                } else if let Ok(p) = v.parse::<i64>() {
                    one(self, p).map(|p| (p, p))
                } else {
                    bad(
                        self,
                        format!(
                            "port {} is not a number or a range; write a port such as 443 or a range such as \"8000-8100\"",
                            describe(node)
                        ),
                    )
                }
            }
            _ => bad(
                self,
                format!(
                    "a port must be a number or a \"A-B\" range, not {}",
                    node.type_name()
                ),
            ),
        }
    }

    /// Static overlap: two identities of which some entries can both hold for one process.
    fn overlaps(&mut self, ids: &[CheckedIdentity]) {
        for (b_i, b) in ids.iter().enumerate() {
            'pair: for (a_i, a) in ids.iter().enumerate().take(b_i) {
                for (b_j, be) in b.identity.matches.iter().enumerate() {
                    for (a_j, ae) in a.identity.matches.iter().enumerate() {
                        if let Some(why) = entries_overlap(ae, be) {
                            let Some(at) = b.entry_nodes.get(b_j) else {
                                continue;
                            };
                            let a_line = a.entry_nodes.get(a_j).map_or(0, |n| n.line);
                            self.err(
                                at,
                                format!(
                                    "identities[{b_i}] {:?} match[{b_j}] can match the same process as identities[{a_i}] {:?} match[{a_j}] (line {a_line}): {why}; make them disjoint with different binarySha256, cgroup, k8s or uid selectors",
                                    b.identity.name, a.identity.name
                                ),
                            );
                            continue 'pair;
                        }
                    }
                }
            }
        }
    }
}

struct CheckedIdentity {
    identity: Identity,
    entry_nodes: Vec<Node>,
}

struct Dest {
    cidr: IpNet,
    to_ident: u32,
    ports: Vec<(u16, u16)>,
    protocol: Protocol,
    to_name: Option<String>,
}

impl Dest {
    fn describe(&self) -> String {
        let ports = if self.ports.is_empty() {
            "all ports".to_string()
        } else {
            format!("ports {}", format_ports(&self.ports))
        };
        match &self.to_name {
            Some(name) => format!("{} identity {name} {ports}", self.protocol.as_str()),
            None => format!("{} {} {ports}", self.protocol.as_str(), self.cidr),
        }
    }
}

/// `5432,8000-8100`
/// A duration such as `30m`, `4h`, `1h30m` or `PT4H` in whole seconds, at least one second.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let d: jiff::SignedDuration = text.trim().parse().map_err(|e| format!("{e}"))?;
    if d.is_negative() || d.as_secs() < 1 {
        return Err("it must be at least one second".into());
    }
    u64::try_from(d.as_secs()).map_err(|e| e.to_string())
}

/// ` (expires ...)` etc. for the description of a time-bound entry.
fn timing_text(t: &Timing) -> String {
    let mut s = String::new();
    if let Some(b) = t.not_before {
        s.push_str(&format!(" from {}", super::rfc3339(b)));
    }
    if let Some(e) = t.expires {
        s.push_str(&format!(" until {}", super::rfc3339(e)));
    }
    s
}

pub(crate) fn format_ports(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn index_to_ident(i: usize) -> u32 {
    u32::try_from(i + 1).unwrap_or(u32::MAX)
}

fn scalar(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { value, .. } => Some(value),
        _ => None,
    }
}

fn scalar_int(node: &Node) -> Option<i64> {
    match &node.kind {
        Kind::Scalar {
            value,
            quoted: false,
        } => value.parse().ok(),
        _ => None,
    }
}

/// `"x"` for scalars, the type name otherwise.
fn describe(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar { value, .. } if !node.is_null() => format!("{value:?}"),
        _ => node.type_name().to_string(),
    }
}

fn intersects<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.iter().any(|x| b.contains(x))
}

/// Why one process can satisfy both entries, if it can be seen statically.
///
/// Binary: two hash lists must share a hash; two path lists must share a path. A hash on one
/// side against only a path on the other is not a static overlap (the file at the path may
/// have another hash; at run time the hash wins). An entry without binary selector overlaps
/// any binary. Cgroup glob lists must have intersecting globs; uid lists a common uid; a
/// missing selector is unconstrained.
pub(crate) fn entries_overlap(a: &MatchEntry, b: &MatchEntry) -> Option<String> {
    let mut why = Vec::new();
    let (ash, bsh) = (!a.binary_sha256.is_empty(), !b.binary_sha256.is_empty());
    let (ap, bp) = (!a.binary_path.is_empty(), !b.binary_path.is_empty());
    if ash && bsh {
        let common = a
            .binary_sha256
            .iter()
            .find(|h| b.binary_sha256.contains(h))?;
        why.push(format!("both accept binarySha256 {}", hex::encode(common)));
    }
    if ap && bp {
        let common = a.binary_path.iter().find(|p| b.binary_path.contains(p))?;
        why.push(format!("both accept binaryPath {common}"));
    }
    if (ash && !bsh && bp && !ap) || (bsh && !ash && ap && !bp) {
        return None;
    }
    if (!ash && !ap) || (!bsh && !bp) {
        why.push("one has no binary selector".into());
    }
    // Each cgroup attribute on its own (a cgroup glob against a unit glob, or a namespace,
    // is not compared: conservatively, they may overlap).
    for attr in CgroupAttr::ALL {
        let (ga, gb) = (attr.globs(a), attr.globs(b));
        let key = attr.key();
        match (ga.is_empty(), gb.is_empty()) {
            (false, false) => {
                let (x, y) = attr.lists_compatible(ga, gb)?;
                if attr.all_must_hold() {
                    why.push(format!("no {key} of one contradicts the other's"));
                } else {
                    why.push(format!("{key} {x:?} and {y:?} overlap"));
                }
            }
            (true, true) if attr == CgroupAttr::Path => {
                why.push("neither constrains the cgroup".into());
            }
            (true, true) => {}
            _ => why.push(format!("one does not constrain {key}")),
        }
    }
    if !a.uid.is_empty() && !b.uid.is_empty() {
        if !intersects(&a.uid, &b.uid) {
            return None;
        }
        why.push("they share a uid".into());
    }
    Some(why.join(", "))
}

#[cfg(test)]
pub(crate) mod tests;

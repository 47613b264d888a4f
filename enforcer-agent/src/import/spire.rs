//! `import spire`: SPIRE registration entries into policy identities.
//!
//! The input is what `spire-server entry show -output json` prints: the protojson form of
//! `entry.v1.ListEntriesResponse` (`{"entries": [...], "next_page_token": ""}`, field names in
//! snake_case, `spiffe_id` and `parent_id` as `{"trust_domain", "path"}`, 64-bit integers
//! such as `expires_at` as strings). The `entry create -data` file form (SPIFFE IDs as URI
//! strings) is read too.
//!
//! Semantics kept from SPIRE: the selectors of one entry must all hold (AND), so an entry is
//! one `match` entry with all its keys; entries of one SPIFFE ID are one identity whose
//! `match` entries are alternatives (OR). An entry that cannot be enforced exactly as SPIRE
//! means it (a selector this agent does not attest, a node registration, an expiry, two
//! values of a selector that holds one value) is skipped and reported: dropping a selector
//! would widen the entry.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::policy::{self, Diagnostic, Severity};

/// Errors that stop an import (nothing is written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpireError {
    #[error(
        "the input is not JSON ({0}); pass the output of `spire-server entry show -output json`"
    )]
    NotJson(String),
    #[error(
        "the input is not SPIRE's list of registration entries ({0}); pass the output of `spire-server entry show -output json` (an object with an \"entries\" list)"
    )]
    NotEntries(String),
    #[error(
        "the entries are in several trust domains ({}); a policy has one: pick it with --trust-domain (entries of the others are skipped)",
        .0.join(", ")
    )]
    SeveralTrustDomains(Vec<String>),
    #[error(
        "no entry has a SPIFFE ID, so there is no trust domain to import into; pass a non-empty `spire-server entry show -output json`, or name the trust domain with --trust-domain"
    )]
    NoTrustDomain,
    #[error(
        "trust domain {0:?} cannot be a policy's trustDomain: use lower-case letters, digits, '.', '-' and '_' only"
    )]
    BadTrustDomain(String),
}

/// Options of [`import`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The trust domain to import; required when the entries name several.
    pub trust_domain: Option<String>,
}

/// One imported SPIRE entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub entry_id: String,
    pub spiffe_id: String,
    /// The identity's `name` in the written policy.
    pub identity: String,
    /// The entry's `parent_id` (the nodes SPIRE issues it on), not translated.
    pub parent_id: String,
}

/// One skipped SPIRE entry and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub entry_id: String,
    /// The entry's SPIFFE ID as written (empty when it has none).
    pub spiffe_id: String,
    pub reason: String,
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Import {
    /// The policy (YAML), identities only, in audit mode.
    pub yaml: String,
    pub trust_domain: String,
    /// Sorted by SPIFFE ID, then entry id.
    pub imported: Vec<Imported>,
    /// In input order.
    pub skipped: Vec<Skipped>,
    /// What `policy check` says of [`Import::yaml`]: warnings (`binaryPath`), and errors when
    /// two imported identities can match the same process (SPIRE would issue both SVIDs; a
    /// process has one identity here).
    pub diagnostics: Vec<Diagnostic>,
}

impl Import {
    /// True when [`Import::yaml`] passes `policy check` (warnings allowed).
    pub fn passes_check(&self) -> bool {
        !self
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }
}

#[derive(Deserialize)]
struct EntryList {
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(default)]
    id: String,
    #[serde(default)]
    spiffe_id: Option<RawId>,
    #[serde(default)]
    parent_id: Option<RawId>,
    #[serde(default)]
    selectors: Vec<RawSelector>,
    #[serde(default)]
    expires_at: Option<Int64>,
}

/// A SPIFFE ID: protojson `{"trust_domain", "path"}`, or a URI string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawId {
    Parts {
        trust_domain: String,
        #[serde(default)]
        path: String,
    },
    Uri(String),
}

/// protojson writes int64 as a string and reads either.
#[derive(Deserialize)]
#[serde(untagged)]
enum Int64 {
    Num(i64),
    Str(String),
}

#[derive(Deserialize)]
struct RawSelector {
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

impl RawId {
    /// (trust domain, path with its leading "/", or empty).
    fn split(&self) -> Option<(String, String)> {
        match self {
            RawId::Parts { trust_domain, path } => Some((trust_domain.clone(), path.clone())),
            RawId::Uri(uri) => {
                let rest = uri.strip_prefix("spiffe://")?;
                let (td, path) = match rest.find('/') {
                    Some(i) => rest.split_at(i),
                    None => (rest, ""),
                };
                Some((td.to_string(), path.to_string()))
            }
        }
    }

    fn text(&self) -> String {
        match self {
            RawId::Parts { trust_domain, path } => format!("spiffe://{trust_domain}{path}"),
            RawId::Uri(uri) => uri.clone(),
        }
    }
}

/// The keys of one `match` entry: each SPIRE selector holds one value of its kind for a
/// workload, except pod labels (one per key).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Match {
    sha256: Option<String>,
    path: Option<String>,
    uid: Option<u32>,
    unit: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    labels: BTreeMap<String, String>,
    container: Option<String>,
}

/// One entry translated, before the check.
struct Translated {
    entry_id: String,
    spiffe_id: String,
    path: String,
    parent_id: String,
    selectors: String,
    m: Match,
}

const ATTESTED: &str = "this agent attests a process's executable (unix:sha256, unix:path), uid (unix:uid), systemd unit (systemd:id) and pod (k8s:ns, k8s:sa, k8s:pod-label, k8s:container-name)";

/// Reads `spire-server entry show -output json` and writes the identities it can enforce.
pub fn import(json: &[u8], opts: &Options) -> Result<Import, SpireError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| SpireError::NotJson(e.to_string()))?;
    if value.get("entries").is_none() {
        return Err(SpireError::NotEntries(
            "it has no \"entries\" key".to_string(),
        ));
    }
    let list: EntryList =
        serde_json::from_value(value).map_err(|e| SpireError::NotEntries(e.to_string()))?;

    let trust_domain = match &opts.trust_domain {
        Some(td) => td.clone(),
        None => {
            let tds: BTreeSet<String> = list
                .entries
                .iter()
                .filter_map(|e| e.spiffe_id.as_ref()?.split())
                .map(|(td, _)| td)
                .collect();
            match tds.len() {
                0 => return Err(SpireError::NoTrustDomain),
                1 => tds.into_iter().next().unwrap_or_default(),
                _ => return Err(SpireError::SeveralTrustDomains(tds.into_iter().collect())),
            }
        }
    };
    if trust_domain.is_empty()
        || !trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err(SpireError::BadTrustDomain(trust_domain));
    }

    let mut skipped = Vec::new();
    let mut by_id: BTreeMap<String, Vec<Translated>> = BTreeMap::new();
    for e in &list.entries {
        match translate(e, &trust_domain) {
            Ok(t) => {
                // Each entry alone must pass the checker (names Kubernetes accepts, a unit
                // name, an absolute path...): a bad one is skipped, not the whole import.
                let alone = render(&trust_domain, &[group("x", &t.spiffe_id, &[&t])]);
                match policy::check(&alone) {
                    Ok(_) => by_id.entry(t.spiffe_id.clone()).or_default().push(t),
                    Err(diags) => skipped.push(Skipped {
                        entry_id: t.entry_id,
                        spiffe_id: t.spiffe_id,
                        reason: diags
                            .iter()
                            .filter(|d| d.severity == Severity::Error)
                            .map(|d| d.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    }),
                }
            }
            Err(reason) => skipped.push(Skipped {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.as_ref().map(RawId::text).unwrap_or_default(),
                reason,
            }),
        }
    }

    let mut names = BTreeSet::new();
    let mut groups = Vec::new();
    let mut imported = Vec::new();
    for (spiffe_id, mut entries) in by_id {
        entries.sort_by(|a, b| (&a.entry_id, &a.selectors).cmp(&(&b.entry_id, &b.selectors)));
        let name = unique_name(entries.first().map_or("", |t| t.path.as_str()), &mut names);
        for t in &entries {
            imported.push(Imported {
                entry_id: t.entry_id.clone(),
                spiffe_id: spiffe_id.clone(),
                identity: name.clone(),
                parent_id: t.parent_id.clone(),
            });
        }
        let refs: Vec<&Translated> = entries.iter().collect();
        groups.push(group(&name, &spiffe_id, &refs));
    }
    let yaml = render(&trust_domain, &groups);
    let diagnostics = match policy::check(&yaml) {
        Ok((_, warnings)) => warnings,
        Err(diags) => diags,
    };
    Ok(Import {
        yaml,
        trust_domain,
        imported,
        skipped,
        diagnostics,
    })
}

/// One entry into a [`Translated`], or why it is skipped.
fn translate(e: &RawEntry, trust_domain: &str) -> Result<Translated, String> {
    let id = e
        .spiffe_id
        .as_ref()
        .ok_or("it has no spiffe_id (not a registration entry)")?;
    let spiffe_id = id.text();
    let (td, path) = id
        .split()
        .ok_or_else(|| format!("its SPIFFE ID {spiffe_id:?} does not start with spiffe://"))?;
    if path.is_empty() {
        return Err(format!(
            "its SPIFFE ID {spiffe_id:?} has no path (it is the trust domain's own ID)"
        ));
    }
    if !path.starts_with('/') {
        return Err(format!(
            "its SPIFFE ID path {path:?} does not start with \"/\""
        ));
    }
    if td != trust_domain {
        return Err(format!(
            "it is in trust domain {td:?}, not the imported {trust_domain:?}"
        ));
    }
    let parent = e.parent_id.as_ref().map(RawId::text).unwrap_or_default();
    if e.parent_id
        .as_ref()
        .and_then(RawId::split)
        .is_some_and(|(_, p)| p == "/spire/server")
    {
        return Err(format!(
            "it is a node registration (its parent is the SPIRE server {parent}): it names SPIRE agents' nodes, not workloads"
        ));
    }
    let expires = match &e.expires_at {
        None => 0,
        Some(Int64::Num(n)) => *n,
        Some(Int64::Str(s)) => s
            .parse()
            .map_err(|_| format!("its expires_at {s:?} is not a number"))?,
    };
    if expires != 0 {
        return Err(format!(
            "it expires (expires_at {expires}, Unix seconds) and a policy identity does not: imported, it would outlive the entry; add it by hand if that is meant"
        ));
    }
    if e.selectors.is_empty() {
        return Err("it has no selectors".to_string());
    }
    let mut m = Match::default();
    for s in &e.selectors {
        selector(&mut m, &s.kind, &s.value)?;
    }
    Ok(Translated {
        entry_id: e.id.clone(),
        spiffe_id: format!("spiffe://{td}{path}"),
        path,
        parent_id: parent,
        selectors: e
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.kind, s.value))
            .collect::<Vec<_>>()
            .join(" "),
        m,
    })
}

/// Adds one selector to the entry's keys, or says why the entry cannot be enforced.
fn selector(m: &mut Match, kind: &str, value: &str) -> Result<(), String> {
    let sel = format!("{kind}:{value}");
    if value.contains('*') {
        return Err(format!(
            "selector {sel:?} has a '*', which SPIRE compares literally but a policy reads as a glob (it would match more)"
        ));
    }
    let (key, v) = value.split_once(':').unwrap_or((value, ""));
    let unsupported = |why: &str| {
        Err(format!(
            "selector {sel:?} cannot be enforced here ({why}); dropping it would widen the entry"
        ))
    };
    match (kind, key) {
        ("unix", "uid") => {
            let uid = v
                .parse::<u32>()
                .ok()
                .filter(|u| *u < u32::MAX)
                .ok_or_else(|| format!("selector {sel:?} is not a uid"))?;
            set(&mut m.uid, uid, &sel)
        }
        ("unix", "sha256") => {
            if v.len() != 64 || !v.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
                return Err(format!(
                    "selector {sel:?} is not a sha256 as SPIRE writes it (64 lower-case hex digits), so SPIRE never matches it"
                ));
            }
            set(&mut m.sha256, v.to_string(), &sel)
        }
        ("unix", "path") => set(&mut m.path, v.to_string(), &sel),
        ("unix", "user" | "group" | "supplementary_group") => {
            unsupported("names are resolved on each node; write the entry with unix:uid")
        }
        ("unix", "gid" | "supplementary_gid") => {
            unsupported("this agent does not select on groups")
        }
        ("k8s", "ns") => set(&mut m.namespace, v.to_string(), &sel),
        ("k8s", "sa") => set(&mut m.service_account, v.to_string(), &sel),
        ("k8s", "container-name") => set(&mut m.container, v.to_string(), &sel),
        ("k8s", "pod-label") => {
            let Some((label, val)) = v.split_once(':') else {
                return Err(format!(
                    "selector {sel:?} is not k8s:pod-label:KEY:VALUE, so SPIRE never matches it"
                ));
            };
            match m.labels.get(label) {
                Some(prev) if prev != val => Err(format!(
                    "it can never match: it requires pod label {label:?} to be both {prev:?} and {val:?}"
                )),
                _ => {
                    m.labels.insert(label.to_string(), val.to_string());
                    Ok(())
                }
            }
        }
        ("systemd", "id") => set(&mut m.unit, v.to_string(), &sel),
        ("unix" | "k8s" | "systemd", _) => unsupported(ATTESTED),
        _ => unsupported(&format!(
            "{ATTESTED}; the {kind:?} attestor's selectors are not attested"
        )),
    }
}

/// A selector that holds one value per workload: a second, different value can never hold
/// together with the first (SPIRE ANDs them), and a list here would mean OR.
fn set<T: PartialEq + std::fmt::Debug>(
    slot: &mut Option<T>,
    value: T,
    sel: &str,
) -> Result<(), String> {
    match slot {
        Some(prev) if *prev != value => Err(format!(
            "it can never match: {sel:?} and another selector of the same kind ({prev:?}) must both hold"
        )),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// `/ns/payments/sa/api` -> `ns-payments-sa-api`, made unique with `-2`, `-3`, ...
fn unique_name(path: &str, used: &mut BTreeSet<String>) -> String {
    let base = path
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let base = if base.is_empty() {
        "spire".to_string()
    } else {
        base
    };
    let mut name = base.clone();
    let mut n = 2;
    while used.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    used.insert(name.clone());
    name
}

/// An identity to render: name, SPIFFE ID, and its match entries (identical ones merged),
/// each with the SPIRE entries it comes from.
struct Group {
    name: String,
    spiffe_id: String,
    matches: Vec<(Match, Vec<String>)>,
}

fn group(name: &str, spiffe_id: &str, entries: &[&Translated]) -> Group {
    let mut matches: Vec<(Match, Vec<String>)> = Vec::new();
    for t in entries {
        let source = format!(
            "SPIRE entry {} (parent {}): {}",
            comment(&t.entry_id),
            comment(&t.parent_id),
            comment(&t.selectors)
        );
        match matches.iter_mut().find(|(m, _)| *m == t.m) {
            Some((_, sources)) => sources.push(source),
            None => matches.push((t.m.clone(), vec![source])),
        }
    }
    Group {
        name: name.to_string(),
        spiffe_id: spiffe_id.to_string(),
        matches,
    }
}

/// Text from the input made safe for a YAML comment (one line).
fn comment(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect()
}

/// A YAML double-quoted string (JSON's escapes are YAML's).
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn render(trust_domain: &str, groups: &[Group]) -> String {
    let mut y = String::new();
    y.push_str(
        "# Identities imported from SPIRE registration entries by `enforcer-agent import spire`.\n\
         # The selectors of one SPIRE entry all hold: they are the keys of one match entry; the\n\
         # entries of one SPIFFE ID are the identity's match entries (any one holds). A SPIRE\n\
         # entry's parent_id (the nodes it is issued on) is not translated: this policy holds on\n\
         # every node it is given to.\n\
         # Next: write each identity's egress under `rules:`, run `enforcer-agent policy check`,\n\
         # then set `mode: enforce` and narrow `scope`.\n\
         apiVersion: enforcer/v1\n\
         kind: Policy\n",
    );
    y.push_str(&format!("trustDomain: {}\n", q(trust_domain)));
    y.push_str(
        "mode: audit            # no rules yet: enforced, every imported identity would be denied every connect\n\
         unattested: allow\n\
         scope: [\"/\"]\n",
    );
    if groups.is_empty() {
        y.push_str("identities: []\n");
    } else {
        y.push_str("identities:\n");
    }
    for g in groups {
        y.push_str(&format!("  - name: {}\n", q(&g.name)));
        y.push_str(&format!("    spiffeId: {}\n", q(&g.spiffe_id)));
        y.push_str("    match:\n");
        for (m, sources) in &g.matches {
            for s in sources {
                y.push_str(&format!("      # {s}\n"));
            }
            for (i, line) in match_lines(m).iter().enumerate() {
                let lead = if i == 0 { "      - " } else { "        " };
                y.push_str(&format!("{lead}{line}\n"));
            }
        }
    }
    y.push_str(
        "rules: []              # e.g. - identity: NAME\n\
         #                               egress: [{to: {cidr: 10.0.0.0/8, ports: [443], protocol: tcp}}]\n",
    );
    y
}

/// The keys of one match entry, one line each (the `k8s` keys indented under it).
fn match_lines(m: &Match) -> Vec<String> {
    let mut l = Vec::new();
    if let Some(h) = &m.sha256 {
        l.push(format!("binarySha256: [{}]", q(h)));
    }
    if let Some(p) = &m.path {
        l.push(format!("binaryPath: [{}]", q(p)));
    }
    if let Some(u) = m.uid {
        l.push(format!("uid: [{u}]"));
    }
    if let Some(u) = &m.unit {
        l.push(format!("systemdUnit: [{}]", q(u)));
    }
    let k8s = [
        ("namespace", &m.namespace),
        ("serviceAccount", &m.service_account),
    ];
    let has_k8s =
        k8s.iter().any(|(_, v)| v.is_some()) || !m.labels.is_empty() || m.container.is_some();
    if has_k8s {
        l.push("k8s:".to_string());
        for (key, v) in k8s {
            if let Some(v) = v {
                l.push(format!("  {key}: [{}]", q(v)));
            }
        }
        if !m.labels.is_empty() {
            let pairs: Vec<String> = m
                .labels
                .iter()
                .map(|(k, v)| format!("{}: {}", q(k), q(v)))
                .collect();
            l.push(format!("  podLabels: {{{}}}", pairs.join(", ")));
        }
        if let Some(c) = &m.container {
            l.push(format!("  container: [{}]", q(c)));
        }
    }
    l
}

#[cfg(test)]
mod tests;

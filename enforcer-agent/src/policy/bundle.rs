//! The compiled policy bundle: protobuf (prost), recognised by its leading magic field.

use sha2::{Digest, Sha256};

use super::cgroup_attr::{CgroupAttr, label_atom, split_label};
use super::check::entries_overlap;
use super::{
    Action, Diagnostic, Identity, MatchEntry, Mode, Policy, PolicyError, Protocol, Rule, Severity,
    check,
};

/// Field 1 of every bundle.
const MAGIC: &[u8] = b"ENFORCER-POLICY";
/// Version of the bundle format (field 2). 2 added `systemdUnit` (match field 5), 3 the `k8s`
/// selectors (match fields 6 to 9): an agent that ignored them would widen identities, so
/// older agents must refuse these bundles. 4 added time-bound entries (rule fields 20 to 22)
/// and `maxGrant` (policy field 20): an agent that ignored `expires` would honour an entry
/// forever.
pub const BUNDLE_FORMAT: u32 = 4;
/// Oldest format this agent reads (older formats have no field it does not know).
const BUNDLE_FORMAT_MIN: u32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct BundleMsg {
    #[prost(bytes = "vec", tag = "1")]
    magic: Vec<u8>,
    #[prost(uint32, tag = "2")]
    format: u32,
    #[prost(message, optional, tag = "3")]
    policy: Option<PolicyMsg>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PolicyMsg {
    #[prost(string, tag = "1")]
    trust_domain: String,
    /// 1 enforce, 2 audit
    #[prost(uint32, tag = "2")]
    mode: u32,
    /// 1 allow, 2 audit, 3 deny
    #[prost(uint32, tag = "3")]
    unattested: u32,
    #[prost(string, repeated, tag = "4")]
    scope: Vec<String>,
    #[prost(bool, tag = "5")]
    report_allow: bool,
    #[prost(message, repeated, tag = "6")]
    identities: Vec<IdentityMsg>,
    #[prost(message, repeated, tag = "7")]
    rules: Vec<RuleMsg>,
    /// `maxGrant` in seconds (0: the default).
    #[prost(uint64, tag = "20")]
    max_grant_secs: u64,
    /// `revokeConnections`; absent means true (the default), so an agent that does not know
    /// the field closes more connections, never fewer, and default policies keep their hash.
    #[prost(bool, optional, tag = "21")]
    revoke_connections: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct IdentityMsg {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    spiffe_id: String,
    #[prost(message, repeated, tag = "3")]
    matches: Vec<MatchMsg>,
    /// `sockets:` as [`enforcer_common::SocketKind`] bits. An agent that does not know the
    /// field ignores it and refuses more sockets, never fewer.
    #[prost(uint32, tag = "4")]
    sockets: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MatchMsg {
    #[prost(bytes = "vec", repeated, tag = "1")]
    binary_sha256: Vec<Vec<u8>>,
    #[prost(string, repeated, tag = "2")]
    binary_path: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    cgroup: Vec<String>,
    #[prost(uint32, repeated, tag = "4")]
    uid: Vec<u32>,
    #[prost(string, repeated, tag = "5")]
    systemd_unit: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    k8s_namespace: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    k8s_service_account: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    k8s_container: Vec<String>,
    /// All must hold.
    #[prost(message, repeated, tag = "9")]
    k8s_pod_labels: Vec<LabelMsg>,
    /// `preload:` sha256s. An agent that does not know the field grants no preload (the
    /// identity is withheld): never wider, so the format stays.
    #[prost(bytes = "vec", repeated, tag = "10")]
    preload: Vec<Vec<u8>>,
}

/// One `k8s.podLabels` pair.
#[derive(Clone, PartialEq, prost::Message)]
struct LabelMsg {
    #[prost(string, tag = "1")]
    key: String,
    /// A glob on the label's value.
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RuleMsg {
    #[prost(uint32, tag = "1")]
    ident: u32,
    #[prost(bool, tag = "2")]
    deny: bool,
    #[prost(string, tag = "3")]
    cidr: String,
    #[prost(message, repeated, tag = "4")]
    ports: Vec<PortRangeMsg>,
    /// 1 tcp, 2 udp, 3 any
    #[prost(uint32, tag = "5")]
    protocol: u32,
    #[prost(uint64, tag = "6")]
    line: u64,
    #[prost(string, tag = "7")]
    text: String,
    /// Identity number of a `to: {identity: X}` destination (0: `cidr` applies).
    #[prost(uint32, tag = "8")]
    to_ident: u32,
    /// `notBefore`, Unix ns (absent: none).
    #[prost(int64, optional, tag = "20")]
    not_before: Option<i64>,
    /// `expires`, Unix ns (absent: never).
    #[prost(int64, optional, tag = "21")]
    expires: Option<i64>,
    #[prost(string, optional, tag = "22")]
    reason: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PortRangeMsg {
    #[prost(uint32, tag = "1")]
    first: u32,
    #[prost(uint32, tag = "2")]
    last: u32,
}

/// The bytes every bundle starts with (field 1, length-delimited, holding [`MAGIC`]).
fn magic_prefix() -> Vec<u8> {
    let mut p = vec![0x0a, u8::try_from(MAGIC.len()).unwrap_or(0)];
    p.extend_from_slice(MAGIC);
    p
}

/// Is `bytes` a compiled bundle (by its magic)?
pub fn is_bundle(bytes: &[u8]) -> bool {
    bytes.starts_with(&magic_prefix())
}

/// The compiled protobuf bundle of a policy.
pub fn encode_bundle(policy: &Policy) -> Vec<u8> {
    let msg = BundleMsg {
        magic: MAGIC.to_vec(),
        format: BUNDLE_FORMAT,
        policy: Some(PolicyMsg {
            trust_domain: policy.trust_domain.clone(),
            mode: match policy.mode {
                Mode::Enforce => 1,
                Mode::Audit => 2,
            },
            unattested: match policy.unattested {
                Action::Allow => 1,
                Action::Audit => 2,
                Action::Deny => 3,
            },
            scope: policy.scope.clone(),
            report_allow: policy.report_allow,
            revoke_connections: (!policy.revoke_connections).then_some(false),
            identities: policy
                .identities
                .iter()
                .map(|i| IdentityMsg {
                    name: i.name.clone(),
                    spiffe_id: i.spiffe_id.clone(),
                    sockets: i.sockets,
                    matches: i
                        .matches
                        .iter()
                        .map(|m| MatchMsg {
                            binary_sha256: m.binary_sha256.iter().map(|h| h.to_vec()).collect(),
                            binary_path: m.binary_path.clone(),
                            preload: m.preload.iter().map(|h| h.to_vec()).collect(),
                            cgroup: m.cgroup.clone(),
                            uid: m.uid.clone(),
                            systemd_unit: m.systemd_unit.clone(),
                            k8s_namespace: m.k8s_namespace.clone(),
                            k8s_service_account: m.k8s_service_account.clone(),
                            k8s_container: m.k8s_container.clone(),
                            k8s_pod_labels: m
                                .k8s_pod_labels
                                .iter()
                                .map(|atom| {
                                    // An atom without `=` (never made by `check`) is encoded
                                    // so that decoding rejects it, not as an empty value.
                                    let (key, value) = split_label(atom).unwrap_or((atom, "="));
                                    LabelMsg {
                                        key: key.to_string(),
                                        value: value.to_string(),
                                    }
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            rules: policy
                .rules
                .iter()
                .map(|r| RuleMsg {
                    ident: r.ident,
                    to_ident: r.to_ident,
                    deny: r.deny,
                    cidr: r.cidr.to_string(),
                    ports: r
                        .ports
                        .iter()
                        .map(|&(a, b)| PortRangeMsg {
                            first: a.into(),
                            last: b.into(),
                        })
                        .collect(),
                    protocol: match r.protocol {
                        Protocol::Tcp => 1,
                        Protocol::Udp => 2,
                        Protocol::Any => 3,
                    },
                    line: u64::try_from(r.line).unwrap_or(0),
                    text: r.text.clone(),
                    not_before: r.timing.not_before,
                    expires: r.timing.expires,
                    reason: r.timing.reason.clone(),
                })
                .collect(),
            max_grant_secs: policy.max_grant_secs,
        }),
    };
    prost::Message::encode_to_vec(&msg)
}

/// sha256 hex of [`encode_bundle`]'s output: names a policy in status and events.
pub fn policy_hash(policy: &Policy) -> String {
    hex::encode(Sha256::digest(encode_bundle(policy)))
}

fn invalid<T>(msg: String) -> Result<T, PolicyError> {
    Err(PolicyError::InvalidBundle(msg))
}

/// Decode a compiled bundle and validate it again.
pub fn decode_bundle(bytes: &[u8]) -> Result<Policy, PolicyError> {
    if !is_bundle(bytes) {
        return Err(PolicyError::NotABundle);
    }
    let msg: BundleMsg = prost::Message::decode(bytes)
        .map_err(|e: prost::DecodeError| PolicyError::Corrupt(e.to_string()))?;
    if !(BUNDLE_FORMAT_MIN..=BUNDLE_FORMAT).contains(&msg.format) {
        return Err(PolicyError::BundleVersion {
            found: msg.format,
            expected: BUNDLE_FORMAT,
        });
    }
    let Some(p) = msg.policy else {
        return invalid("it holds no policy".into());
    };
    let mode = match p.mode {
        1 => Mode::Enforce,
        2 => Mode::Audit,
        m => return invalid(format!("unknown mode {m}")),
    };
    let unattested = match p.unattested {
        1 => Action::Allow,
        2 => Action::Audit,
        3 => Action::Deny,
        a => return invalid(format!("unknown unattested action {a}")),
    };
    let mut identities = Vec::new();
    for (i, id) in p.identities.into_iter().enumerate() {
        let mut matches = Vec::new();
        for (j, m) in id.matches.into_iter().enumerate() {
            let mut hashes = Vec::new();
            for h in m.binary_sha256 {
                match <[u8; 32]>::try_from(h.as_slice()) {
                    Ok(h) => hashes.push(h),
                    Err(_) => {
                        return invalid(format!(
                            "identities[{i}].match[{j}] has a binarySha256 of {} bytes, not 32",
                            h.len()
                        ));
                    }
                }
            }
            let mut preload = Vec::new();
            for h in m.preload {
                match <[u8; 32]>::try_from(h.as_slice()) {
                    Ok(h) => preload.push(h),
                    Err(_) => {
                        return invalid(format!(
                            "identities[{i}].match[{j}] has a preload sha256 of {} bytes, not 32",
                            h.len()
                        ));
                    }
                }
            }
            matches.push(MatchEntry {
                binary_sha256: hashes,
                preload,
                binary_path: m.binary_path,
                cgroup: m.cgroup,
                systemd_unit: m.systemd_unit,
                uid: m.uid,
                k8s_namespace: m.k8s_namespace,
                k8s_service_account: m.k8s_service_account,
                k8s_container: m.k8s_container,
                k8s_pod_labels: m
                    .k8s_pod_labels
                    .iter()
                    .map(|l| label_atom(&l.key, &l.value))
                    .collect(),
            });
        }
        let known = enforcer_common::SocketKind::ALL
            .iter()
            .fold(0, |m, k| m | k.bit());
        if id.sockets & !known != 0 {
            return invalid(format!(
                "identities[{i}] allows unknown socket kinds (bits {:#x})",
                id.sockets & !known
            ));
        }
        identities.push(Identity {
            name: id.name,
            spiffe_id: id.spiffe_id,
            matches,
            sockets: id.sockets,
        });
    }
    let mut rules = Vec::new();
    for (k, r) in p.rules.into_iter().enumerate() {
        let Ok(cidr) = r.cidr.parse::<ipnet::IpNet>() else {
            return invalid(format!("rules[{k}] has an invalid cidr {:?}", r.cidr));
        };
        let mut ports = Vec::new();
        for pr in &r.ports {
            match (u16::try_from(pr.first), u16::try_from(pr.last)) {
                (Ok(a), Ok(b)) => ports.push((a, b)),
                _ => {
                    return invalid(format!(
                        "rules[{k}] has port range {}-{} outside 1-65535",
                        pr.first, pr.last
                    ));
                }
            }
        }
        let protocol = match r.protocol {
            1 => Protocol::Tcp,
            2 => Protocol::Udp,
            3 => Protocol::Any,
            x => return invalid(format!("rules[{k}] has unknown protocol {x}")),
        };
        if r.to_ident as usize > identities.len() {
            return invalid(format!(
                "rules[{k}] names destination identity {} of {}",
                r.to_ident,
                identities.len()
            ));
        }
        rules.push(Rule {
            ident: r.ident,
            deny: r.deny,
            cidr,
            to_ident: r.to_ident,
            ports,
            protocol,
            line: usize::try_from(r.line).unwrap_or(0),
            text: r.text,
            timing: super::Timing {
                not_before: r.not_before,
                expires: r.expires,
                reason: r.reason,
                grant: None,
            },
        });
    }
    let policy = Policy {
        trust_domain: p.trust_domain,
        mode,
        unattested,
        scope: p.scope,
        report_allow: p.report_allow,
        revoke_connections: p.revoke_connections.unwrap_or(true),
        identities,
        rules,
        max_grant_secs: if p.max_grant_secs == 0 {
            super::DEFAULT_MAX_GRANT_SECS
        } else {
            p.max_grant_secs
        },
    };
    validate(&policy).map_err(PolicyError::InvalidBundle)?;
    Ok(policy)
}

/// The checks of [`check`] that apply to a decoded policy.
fn validate(p: &Policy) -> Result<(), String> {
    let td_ok = !p.trust_domain.is_empty()
        && p.trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if !td_ok {
        return Err(format!("trust domain {:?} is not valid", p.trust_domain));
    }
    if p.scope.is_empty() || p.scope.len() > enforcer_common::MAX_SCOPES as usize {
        return Err(format!(
            "scope has {} entries, 1 to {} are allowed",
            p.scope.len(),
            enforcer_common::MAX_SCOPES
        ));
    }
    for s in &p.scope {
        if !s.starts_with('/') || s.split('/').any(|x| x == ".." || x == ".") || s.contains('*') {
            return Err(format!("scope entry {s:?} is not a cgroup path"));
        }
    }
    let prefix = format!("spiffe://{}/", p.trust_domain);
    for (i, id) in p.identities.iter().enumerate() {
        if id.name.is_empty() || p.identities[..i].iter().any(|o| o.name == id.name) {
            return Err(format!(
                "identities[{i}] has an empty or duplicate name {:?}",
                id.name
            ));
        }
        if !id.spiffe_id.starts_with(&prefix) || id.spiffe_id.len() == prefix.len() {
            return Err(format!(
                "identities[{i}] has spiffeId {:?} outside trust domain {}",
                id.spiffe_id, p.trust_domain
            ));
        }
        if id.matches.is_empty() {
            return Err(format!("identities[{i}] has no match entry"));
        }
        for (j, m) in id.matches.iter().enumerate() {
            let selectors = MatchEntry {
                preload: Vec::new(),
                ..m.clone()
            };
            if selectors == MatchEntry::default() {
                return Err(format!("identities[{i}].match[{j}] is empty"));
            }
            for attr in CgroupAttr::ALL {
                if let Some(msg) = attr.globs(m).iter().find_map(|g| attr.problem(g)) {
                    return Err(format!("identities[{i}].match[{j}]: {msg}"));
                }
            }
            let keys: Vec<&str> = m
                .k8s_pod_labels
                .iter()
                .filter_map(|a| split_label(a).map(|(k, _)| k))
                .collect();
            if let Some(k) = keys
                .iter()
                .enumerate()
                .find_map(|(x, k)| keys[..x].contains(k).then_some(k))
            {
                return Err(format!(
                    "identities[{i}].match[{j}] has the podLabels key {k:?} twice"
                ));
            }
            if m.binary_path.iter().any(|x| !x.starts_with('/')) {
                return Err(format!(
                    "identities[{i}].match[{j}] has a relative binaryPath"
                ));
            }
            if m.uid.contains(&enforcer_common::ANY) {
                return Err(format!(
                    "identities[{i}].match[{j}] has uid {}",
                    enforcer_common::ANY
                ));
            }
            for (a, other) in p.identities[..i].iter().enumerate() {
                if other
                    .matches
                    .iter()
                    .any(|o| entries_overlap(o, m).is_some())
                {
                    return Err(format!(
                        "identities[{i}] {:?} can match the same process as identities[{a}] {:?}",
                        id.name, other.name
                    ));
                }
            }
        }
    }
    let n = p.identities.len();
    for (k, r) in p.rules.iter().enumerate() {
        if r.ident == 0 || usize::try_from(r.ident).map_or(true, |x| x > n) {
            return Err(format!(
                "rules[{k}] names identity number {}, but there are {n} identities",
                r.ident
            ));
        }
        if r.cidr.trunc() != r.cidr {
            return Err(format!("rules[{k}] cidr {} has host bits set", r.cidr));
        }
        if let Some((a, b)) = r.ports.iter().find(|(a, b)| *a == 0 || a > b) {
            return Err(format!("rules[{k}] has invalid port range {a}-{b}"));
        }
        let t = &r.timing;
        if t.not_before.is_some_and(|b| b <= 0) || t.expires.is_some_and(|e| e <= 0) {
            return Err(format!("rules[{k}] has an instant before 1970"));
        }
        if let (Some(b), Some(e)) = (t.not_before, t.expires)
            && b >= e
        {
            return Err(format!("rules[{k}] expires before its notBefore"));
        }
    }
    if p.max_grant_secs == 0 {
        return Err("maxGrant is 0".into());
    }
    Ok(())
}

/// Load a YAML policy or a compiled bundle (recognised by its magic). YAML errors come back
/// as [`PolicyError::Invalid`] with every diagnostic rendered against `path_for_messages`.
pub fn load(
    path_for_messages: &str,
    bytes: &[u8],
) -> Result<(Policy, Vec<Diagnostic>), PolicyError> {
    if is_bundle(bytes) {
        return decode_bundle(bytes).map(|p| (p, Vec::new()));
    }
    let Ok(source) = std::str::from_utf8(bytes) else {
        return Err(PolicyError::NotUtf8 {
            file: path_for_messages.to_string(),
        });
    };
    check(source).map_err(|diagnostics| {
        let rendered = diagnostics
            .iter()
            .map(|d| d.render(path_for_messages))
            .collect::<Vec<_>>()
            .join("\n");
        let errors = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        PolicyError::Invalid {
            rendered: format!("{rendered}\n{path_for_messages}: {errors} error(s); fix them and check again with `enforcer-agent policy check {path_for_messages}`"),
            diagnostics,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DEFAULT_POLICY;
    use crate::policy::check::tests::FULL;

    fn full() -> Policy {
        match check(FULL) {
            Ok((p, _)) => p,
            Err(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn roundtrip() -> Result<(), PolicyError> {
        let timed = load(
            "t",
            b"apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmaxGrant: 2h\nidentities:\n  - name: a\n    match: [{uid: [1]}]\nrules:\n  - identity: a\n    egress:\n      - to: {cidr: 10.0.0.1}\n        expires: 2099-01-01T00:00:00Z\n        notBefore: 2098-01-01T00:00:00Z\n        reason: why\n",
        )?
        .0;
        assert!(timed.rules[0].timing.is_timed());
        for p in [full(), load("d", DEFAULT_POLICY.as_bytes())?.0, timed] {
            let b = encode_bundle(&p);
            assert!(is_bundle(&b));
            assert_eq!(decode_bundle(&b)?, p);
            assert_eq!(load("x", &b)?.0, p);
            assert_eq!(policy_hash(&p), policy_hash(&decode_bundle(&b)?));
            assert_eq!(policy_hash(&p).len(), 64);
        }
        assert_ne!(
            policy_hash(&full()),
            policy_hash(&load("d", DEFAULT_POLICY.as_bytes())?.0)
        );
        // `revokeConnections: false` survives the bundle and changes the hash.
        let mut off = full();
        off.revoke_connections = false;
        assert_eq!(decode_bundle(&encode_bundle(&off))?, off);
        assert_ne!(policy_hash(&off), policy_hash(&full()));
        // `preload:` survives the bundle, and an entry with only `preload:` is refused.
        let mut p = full();
        p.identities[0].matches[0].preload = vec![[7u8; 32]];
        assert_eq!(decode_bundle(&encode_bundle(&p))?, p);
        assert_ne!(policy_hash(&p), policy_hash(&full()));
        p.identities[1].matches[0] = MatchEntry {
            preload: vec![[7u8; 32]],
            ..MatchEntry::default()
        };
        assert!(decode_bundle(&encode_bundle(&p)).is_err());
        Ok(())
    }

    #[test]
    fn rejects_bad_bundles() {
        let p = full();
        let good = encode_bundle(&p);
        assert!(matches!(
            decode_bundle(b"apiVersion: x"),
            Err(PolicyError::NotABundle)
        ));
        let truncated = &good[..good.len() - 3];
        assert!(decode_bundle(truncated).is_err());
        let mut bad = p.clone();
        bad.rules[0].ident = 99;
        let e = decode_bundle(&encode_bundle(&bad));
        assert!(
            matches!(e, Err(PolicyError::InvalidBundle(ref m)) if m.contains("identity number 99")),
            "{e:?}"
        );
        let mut bad = p.clone();
        bad.rules[0].ports = vec![(0, 5)];
        assert!(matches!(
            decode_bundle(&encode_bundle(&bad)),
            Err(PolicyError::InvalidBundle(_))
        ));
        let mut msg: BundleMsg = match prost::Message::decode(good.as_slice()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        msg.format = 7;
        let e = decode_bundle(&prost::Message::encode_to_vec(&msg));
        assert!(matches!(
            e,
            Err(PolicyError::BundleVersion {
                found: 7,
                expected: BUNDLE_FORMAT
            })
        ));
        // A format-1 bundle (no systemdUnit field) still loads.
        msg.format = 1;
        assert!(decode_bundle(&prost::Message::encode_to_vec(&msg)).is_ok());
        let mut bad = p;
        bad.identities[1].name = bad.identities[0].name.clone();
        assert!(decode_bundle(&encode_bundle(&bad)).is_err());
    }

    #[test]
    fn load_yaml_errors_are_rendered() {
        let e = load(
            "bad.yaml",
            b"apiVersion: enforcer/v2\nkind: Policy\ntrustDomain: x\n",
        );
        let Err(PolicyError::Invalid {
            rendered,
            diagnostics,
        }) = e
        else {
            panic!("{e:?}");
        };
        assert_eq!(diagnostics.len(), 1);
        assert!(
            rendered.starts_with("bad.yaml:1:13: error: unknown apiVersion"),
            "{rendered}"
        );
        assert!(matches!(
            load("bin", &[0xff, 0xfe, 0x00]),
            Err(PolicyError::NotUtf8 { .. })
        ));
    }

    const K8S: &str = "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nidentities:\n  - name: web\n    match:\n      - binarySha256: [\"1111111111111111111111111111111111111111111111111111111111111111\"]\n        k8s: {namespace: [prod], serviceAccount: [api], podLabels: {app: web, \"app.kubernetes.io/tier\": \"b*\"}, container: [\"app*\"]}\n  - name: dev\n    match:\n      - k8s: {namespace: [dev]}\n";

    #[test]
    fn k8s_roundtrip_and_validation() -> Result<(), PolicyError> {
        let p = match check(K8S) {
            Ok((p, _)) => p,
            Err(d) => panic!("{d:?}"),
        };
        assert_eq!(p.identities[0].spiffe_id, "spiffe://t.org/ns/prod/sa/api");
        let b = encode_bundle(&p);
        assert_eq!(decode_bundle(&b)?, p);
        let msg: BundleMsg = match prost::Message::decode(b.as_slice()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(msg.format, BUNDLE_FORMAT);
        let labels = &msg
            .policy
            .as_ref()
            .map(|p| p.identities[0].matches[0].k8s_pod_labels.clone());
        assert_eq!(
            labels.as_deref().map(|l| l
                .iter()
                .map(|l| (l.key.as_str(), l.value.as_str()))
                .collect::<Vec<_>>()),
            Some(vec![("app", "web"), ("app.kubernetes.io/tier", "b*")])
        );
        // Every k8s field is validated again on load.
        let bad = |f: &dyn Fn(&mut MatchEntry), needle: &str| {
            let mut q = p.clone();
            f(&mut q.identities[0].matches[0]);
            let e = decode_bundle(&encode_bundle(&q));
            assert!(
                matches!(&e, Err(PolicyError::InvalidBundle(m)) if m.contains(needle)),
                "{needle}: {e:?}"
            );
        };
        bad(&|m| m.k8s_namespace = vec!["Prod".into()], "namespace name");
        bad(
            &|m| m.k8s_service_account = vec!["a..b".into()],
            "service account",
        );
        bad(&|m| m.k8s_container = vec!["a_b".into()], "container name");
        bad(&|m| m.k8s_pod_labels = vec!["ap p=web".into()], "label key");
        bad(
            &|m| m.k8s_pod_labels = vec!["app=we b".into()],
            "label value",
        );
        bad(
            &|m| m.k8s_pod_labels = vec!["app=a".into(), "app=b".into()],
            "twice",
        );
        bad(&|m| m.k8s_namespace = vec![String::new()], "is empty");
        bad(&|m| m.k8s_pod_labels = vec!["app".into()], "label value");
        // The bundle's overlap check covers k8s selectors: dev's entry made to match prod.
        bad(
            &|m| {
                *m = MatchEntry {
                    k8s_namespace: vec!["dev".into()],
                    ..MatchEntry::default()
                }
            },
            "can match the same process",
        );
        // A format-2 bundle (no k8s field) still loads.
        let mut old: BundleMsg = match prost::Message::decode(encode_bundle(&full()).as_slice()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        old.format = 2;
        assert_eq!(decode_bundle(&prost::Message::encode_to_vec(&old))?, full());
        Ok(())
    }
}

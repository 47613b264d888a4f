//! `enforcer-agent learn`: a least-privilege policy from the decision record
//! ([`crate::record`]).
//!
//! One identity per distinct (executable sha256, where it ran) that connected: the pod
//! (`k8s` namespace, service account, container and stable labels) for pod processes, the
//! systemd unit when every cgroup the binary ran in belongs to one, else the exact cgroup
//! path. Egress entries cover exactly what was seen: one per (protocol, host) with the ports
//! listed, hosts grouped into a prefix only when asked (`--aggregate /N`). Processes with no
//! identity become identities too. The output is sorted (the same record gives the same
//! text) and passes `policy check`, which is run on it before it is returned.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use ipnet::IpNet;

use crate::record::{Key, Seen, rfc3339};

/// What `learn` was asked for.
#[derive(Debug, Clone, Default)]
pub struct LearnOptions {
    pub trust_domain: String,
    /// cgroup subtrees to learn (and the policy's `scope`); empty: every recorded cgroup,
    /// scope `/`.
    pub scope: Vec<String>,
    /// Pod namespaces to learn; empty: all (and processes outside pods). Given: only pods of
    /// these namespaces.
    pub namespaces: Vec<String>,
    /// Group IPv4 hosts into prefixes of this length (`--aggregate /N`).
    pub aggregate_v4: Option<u8>,
    /// Group IPv6 hosts into prefixes of this length (`--aggregate6 /N`).
    pub aggregate_v6: Option<u8>,
}

/// The learned policy and what it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub yaml: String,
    pub identities: usize,
    /// Record entries used.
    pub entries: usize,
    pub connects: u64,
    /// Record entries left out: the process was not attested (no sha256).
    pub skipped: usize,
    /// Record entries left out: the kernel denied them last (a policy in force refused
    /// them; learning never widens access to what was refused).
    pub denied: usize,
}

/// Errors of `learn`.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(
        "nothing to learn: the record holds no connects{0}; let the workloads run with allow reports on (`learn --for 10m`, `reportAllow: true` or audit mode) and try again"
    )]
    Empty(String),
    #[error("--aggregate /{0}: an IPv4 prefix length is 0-32")]
    BadPrefixV4(u8),
    #[error("--aggregate6 /{0}: an IPv6 prefix length is 0-128")]
    BadPrefixV6(u8),
    #[error(
        "the learned policy does not pass `policy check` (a bug of learn; please report it):\n{0}"
    )]
    Invalid(String),
}

/// Labels that change with every rollout or pod: never selected on.
const VOLATILE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "controller-uid",
    "job-name",
];

/// Where an identity's processes ran.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    Pod {
        namespace: String,
        service_account: Option<String>,
        container: String,
        labels: BTreeMap<String, String>,
    },
    Unit(String),
    Cgroup(String),
}

#[derive(Default)]
struct Stats {
    count: u64,
    first: u64,
    last: u64,
}

impl Stats {
    fn add(&mut self, s: &Seen) {
        if self.count == 0 {
            self.first = s.first_seen;
            self.last = s.last_seen;
        } else {
            self.first = self.first.min(s.first_seen);
            self.last = self.last.max(s.last_seen);
        }
        self.count = self.count.saturating_add(s.count);
    }

    fn comment(&self) -> String {
        format!(
            "{} connect{}, first {}, last {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            rfc3339(self.first),
            rfc3339(self.last)
        )
    }
}

#[derive(Default)]
struct Learning {
    exes: BTreeSet<String>,
    uids: BTreeSet<u32>,
    cgroups: BTreeSet<String>,
    seen: Stats,
    /// (protocol, destination prefix) -> port -> stats.
    dests: BTreeMap<(String, IpNet), BTreeMap<u16, Stats>>,
    identities: BTreeSet<String>,
}

/// True when `cgroup` is `scope` or below it.
pub fn in_scope(scope: &[String], cgroup: &str) -> bool {
    scope.iter().any(|s| {
        let s = s.trim_end_matches('/');
        s.is_empty() || cgroup == s || cgroup.starts_with(&format!("{s}/"))
    })
}

/// A name part: letters, digits, '.', '-' and '_' only.
fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = out.trim_matches(|c| c == '-' || c == '.').to_string();
    if out.is_empty() { "x".into() } else { out }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn place_name(p: &Place) -> String {
    match p {
        Place::Pod {
            namespace,
            container,
            ..
        } => format!("{namespace}-{container}"),
        Place::Unit(u) => u
            .trim_end_matches(".service")
            .trim_end_matches(".scope")
            .to_string(),
        Place::Cgroup(c) => match c.rsplit('/').find(|s| !s.is_empty()) {
            Some(last) => last.to_string(),
            None => "root".into(),
        },
    }
}

/// The policy learned from `entries` (see the module's documentation).
pub fn learn(entries: &[(Key, Seen)], opts: &LearnOptions) -> Result<Learned, LearnError> {
    if let Some(n) = opts.aggregate_v4.filter(|n| *n > 32) {
        return Err(LearnError::BadPrefixV4(n));
    }
    if let Some(n) = opts.aggregate_v6.filter(|n| *n > 128) {
        return Err(LearnError::BadPrefixV6(n));
    }
    let mut skipped = 0;
    let mut denied = 0;
    let wanted: Vec<&(Key, Seen)> = entries
        .iter()
        .filter(|(k, _)| opts.scope.is_empty() || in_scope(&opts.scope, &k.facts.cgroup))
        .filter(|(k, _)| {
            opts.namespaces.is_empty()
                || k.facts
                    .pod
                    .as_ref()
                    .is_some_and(|p| opts.namespaces.contains(&p.namespace))
        })
        .filter(|(_, s)| {
            let refused = s.verdict == enforcer_common::Verdict::Deny.name();
            if refused {
                denied += 1;
            }
            !refused
        })
        .filter(|(k, _)| {
            let attested = !k.facts.sha256.is_empty() && k.port != 0;
            if !attested {
                skipped += 1;
            }
            attested
        })
        .collect();
    if wanted.is_empty() {
        let mut why = String::new();
        if !opts.scope.is_empty() {
            let _ = write!(why, " under {}", opts.scope.join(", "));
        }
        if !opts.namespaces.is_empty() {
            let _ = write!(why, " in namespaces {}", opts.namespaces.join(", "));
        }
        if skipped > 0 {
            let _ = write!(
                why,
                " from attested processes ({skipped} unattested left out)"
            );
        }
        if denied > 0 {
            let _ = write!(why, " that were not denied ({denied} denied left out)");
        }
        return Err(LearnError::Empty(why));
    }
    // How each binary's places are selected: one style per binary, so that two identities
    // of one binary differ on the same selector (and `policy check` can tell they are
    // disjoint).
    let mut styles: BTreeMap<&str, (bool, bool)> = BTreeMap::new(); // (all pods, all units)
    for (k, _) in &wanted {
        let e = styles.entry(&k.facts.sha256).or_insert((true, true));
        e.0 &= k.facts.pod.is_some();
        e.1 &= k.facts.pod.is_none() && crate::policy::systemd_unit(&k.facts.cgroup).is_some();
    }
    let mut ids: BTreeMap<(String, Place), Learning> = BTreeMap::new();
    let mut total = Stats::default();
    for (k, s) in &wanted {
        let f = &k.facts;
        let place = match (styles[f.sha256.as_str()], &f.pod) {
            ((true, _), Some(p)) => Place::Pod {
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                container: p.container.clone(),
                labels: p
                    .labels
                    .iter()
                    .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
            ((_, true), _) => Place::Unit(
                crate::policy::systemd_unit(&f.cgroup)
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => Place::Cgroup(f.cgroup.clone()),
        };
        let l = ids.entry((f.sha256.clone(), place)).or_default();
        l.exes.insert(f.exe.clone());
        l.uids.insert(f.uid);
        l.cgroups.insert(f.cgroup.clone());
        l.seen.add(s);
        total.add(s);
        if let Some(i) = &s.identity {
            l.identities.insert(i.clone());
        }
        let len = match k.dst {
            IpAddr::V4(_) => opts.aggregate_v4.unwrap_or(32),
            IpAddr::V6(_) => opts.aggregate_v6.unwrap_or(128),
        };
        let net = IpNet::new(k.dst, len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(k.dst));
        l.dests
            .entry((k.protocol.clone(), net))
            .or_default()
            .entry(k.port)
            .or_default()
            .add(s);
    }
    // Names: the executable's file name and where it ran, de-duplicated in key order.
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut names = Vec::new();
    for ((_, place), l) in &ids {
        let exe = l
            .exes
            .iter()
            .next()
            .map(|e| e.rsplit('/').next().unwrap_or(e).to_string())
            .unwrap_or_default();
        let base = format!("{}-{}", sanitize(&exe), sanitize(&place_name(place)));
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        names.push(name);
    }
    let scope: Vec<String> = if opts.scope.is_empty() {
        vec!["/".into()]
    } else {
        opts.scope.clone()
    };
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Learned by `enforcer-agent learn` from {} recorded connect entries ({}).",
        wanted.len(),
        total.comment()
    );
    let _ = writeln!(
        y,
        "# Every egress entry allows exactly what was seen; review, then `policy diff` and apply."
    );
    let _ = writeln!(y, "apiVersion: enforcer/v1\nkind: Policy");
    let _ = writeln!(y, "trustDomain: {}", yaml_str(&opts.trust_domain));
    let _ = writeln!(y, "mode: enforce");
    if opts.scope.is_empty() {
        let _ = writeln!(
            y,
            "unattested: audit   # the whole node is in scope: processes not learned are reported, not denied"
        );
    } else {
        let _ = writeln!(y, "unattested: deny");
    }
    let scope_list: Vec<String> = scope.iter().map(|s| yaml_str(s)).collect();
    let _ = writeln!(y, "scope: [{}]", scope_list.join(", "));
    let _ = writeln!(y, "identities:");
    for (((sha, place), l), name) in ids.iter().zip(&names) {
        let _ = writeln!(y, "  - name: {name}");
        let exes: Vec<&str> = l.exes.iter().map(String::as_str).collect();
        let uids: Vec<String> = l.uids.iter().map(u32::to_string).collect();
        let _ = writeln!(
            y,
            "    # exe {} uid {}; {}",
            exes.join(", "),
            uids.join(", "),
            l.seen.comment()
        );
        if l.identities.is_empty() {
            let _ = writeln!(y, "    # had no identity when seen (unattested)");
        } else {
            let had: Vec<&str> = l.identities.iter().map(String::as_str).collect();
            let _ = writeln!(y, "    # identity when seen: {}", had.join(", "));
        }
        let _ = writeln!(y, "    match:");
        let _ = writeln!(y, "      - binarySha256: [{sha}]");
        match place {
            Place::Cgroup(c) => {
                let _ = writeln!(y, "        cgroup: [{}]", yaml_str(c));
            }
            Place::Unit(u) => {
                let cgs: Vec<&str> = l.cgroups.iter().map(String::as_str).collect();
                let _ = writeln!(
                    y,
                    "        systemdUnit: [{}]   # cgroup {}",
                    yaml_str(u),
                    cgs.join(", ")
                );
            }
            Place::Pod {
                namespace,
                service_account,
                container,
                labels,
            } => {
                let _ = writeln!(y, "        k8s:");
                let _ = writeln!(y, "          namespace: [{}]", yaml_str(namespace));
                if let Some(sa) = service_account {
                    let _ = writeln!(y, "          serviceAccount: [{}]", yaml_str(sa));
                }
                let _ = writeln!(y, "          container: [{}]", yaml_str(container));
                if !labels.is_empty() {
                    let pairs: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v)))
                        .collect();
                    let _ = writeln!(y, "          podLabels: {{{}}}", pairs.join(", "));
                }
            }
        }
    }
    let _ = writeln!(y, "rules:");
    for ((_, l), name) in ids.iter().zip(&names) {
        let _ = writeln!(y, "  - identity: {name}");
        let _ = writeln!(y, "    egress:");
        for ((proto, net), ports) in &l.dests {
            let list: Vec<String> = ports.keys().map(u16::to_string).collect();
            let mut seen = Stats::default();
            for s in ports.values() {
                seen.count += s.count;
                seen.first = if seen.first == 0 {
                    s.first
                } else {
                    seen.first.min(s.first)
                };
                seen.last = seen.last.max(s.last);
            }
            let _ = writeln!(
                y,
                "      - to: {{cidr: {}, ports: [{}], protocol: {proto}}}   # {}",
                yaml_str(&net.to_string()),
                list.join(", "),
                seen.comment()
            );
        }
    }
    if let Err(diags) = crate::policy::check(&y) {
        let rendered: Vec<String> = diags.iter().map(|d| d.render("learned.yaml")).collect();
        return Err(LearnError::Invalid(rendered.join("\n")));
    }
    Ok(Learned {
        yaml: y,
        identities: ids.len(),
        entries: wanted.len(),
        connects: total.count,
        skipped,
        denied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Pod, ProcFacts};

    fn entry(sha: char, exe: &str, cgroup: &str, dst: &str, port: u16, proto: &str) -> (Key, Seen) {
        (
            Key {
                facts: ProcFacts {
                    sha256: sha.to_string().repeat(64),
                    exe: exe.into(),
                    cgroup: cgroup.into(),
                    uid: 1000,
                    pod: None,
                },
                dst: dst.parse().expect("addr"),
                port,
                protocol: proto.into(),
            },
            Seen {
                count: 3,
                first_seen: 1_796_140_800,
                last_seen: 1_796_144_400,
                verdict: "audit".into(),
                identity: None,
            },
        )
    }

    fn opts() -> LearnOptions {
        LearnOptions {
            trust_domain: "t.org".into(),
            scope: vec!["/w".into()],
            ..Default::default()
        }
    }

    #[test]
    fn learns_exact_checked_sorted_policies() {
        let mut entries = vec![
            entry('a', "/opt/app", "/w/one", "127.0.0.1", 8080, "tcp"),
            entry('a', "/opt/app", "/w/one", "127.0.0.1", 9090, "tcp"),
            entry('a', "/opt/app", "/w/two", "::1", 53, "udp"),
            entry('b', "/opt/app", "/w/one", "10.1.2.3", 443, "tcp"),
            entry('b', "/opt/app", "/w/one", "10.1.2.9", 443, "tcp"),
            entry(
                'c',
                "/usr/sbin/nginx",
                "/system.slice/nginx.service",
                "10.0.0.1",
                80,
                "tcp",
            ),
            entry('d', "", "/w/one", "10.0.0.1", 80, "tcp"),
        ];
        entries[6].0.facts.sha256.clear();
        let mut refused = entry('a', "/opt/app", "/w/one", "10.9.9.9", 22, "tcp");
        refused.1.verdict = "deny".into();
        entries.push(refused);
        let l = learn(&entries, &opts()).expect("learn");
        assert_eq!(l.identities, 3, "{}", l.yaml);
        assert_eq!((l.skipped, l.denied), (1, 1));
        assert!(
            !l.yaml.contains("10.9.9.9"),
            "a denied connect is never learned"
        );
        let (p, _) = crate::policy::check(&l.yaml).unwrap_or_else(|d| panic!("{d:?}\n{}", l.yaml));
        assert_eq!(p.mode, crate::policy::Mode::Enforce);
        assert_eq!(p.unattested, crate::policy::Action::Deny);
        let names: Vec<&str> = p.identities.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["app-one", "app-two", "app-one-2"], "{}", l.yaml);
        assert!(
            l.yaml.contains("ports: [8080, 9090], protocol: tcp"),
            "{}",
            l.yaml
        );
        assert!(
            l.yaml
                .contains("cidr: \"::1/128\", ports: [53], protocol: udp")
        );
        assert!(l.yaml.contains("6 connects, first 2026-12-01T16:00:00Z"));
        // The same record in another order: the same text.
        let mut rev = entries.clone();
        rev.reverse();
        assert_eq!(learn(&rev, &opts()).expect("learn").yaml, l.yaml);
        // Aggregated on request only.
        let agg = learn(
            &entries,
            &LearnOptions {
                aggregate_v4: Some(24),
                ..opts()
            },
        )
        .expect("learn");
        assert!(
            agg.yaml.contains("cidr: \"10.1.2.0/24\", ports: [443]"),
            "{}",
            agg.yaml
        );
        assert!(!l.yaml.contains("10.1.2.0/24"));
        // No scope: the whole node, systemd units by name, unattested only reported.
        let all = learn(
            &entries,
            &LearnOptions {
                scope: vec![],
                ..opts()
            },
        )
        .expect("learn");
        assert!(
            all.yaml.contains("systemdUnit: [\"nginx.service\"]"),
            "{}",
            all.yaml
        );
        assert!(all.yaml.contains("unattested: audit"));
        assert!(matches!(
            learn(
                &entries,
                &LearnOptions {
                    aggregate_v4: Some(33),
                    ..opts()
                }
            ),
            Err(LearnError::BadPrefixV4(33))
        ));
        assert!(matches!(
            learn(
                &entries,
                &LearnOptions {
                    scope: vec!["/none".into()],
                    ..opts()
                }
            ),
            Err(LearnError::Empty(_))
        ));
    }

    #[test]
    fn pods_by_namespace_container_and_stable_labels() {
        let mut e = entry(
            'a',
            "/app",
            "/kubepods.slice/x.scope",
            "10.0.0.1",
            5432,
            "tcp",
        );
        e.0.facts.pod = Some(Pod {
            namespace: "payments".into(),
            pod_name: "api-7d9f-x".into(),
            container: "api".into(),
            service_account: Some("api".into()),
            labels: [("app", "api"), ("pod-template-hash", "7d9f")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        let mut other = e.clone();
        other.0.facts.pod.as_mut().expect("pod").namespace = "shop".into();
        let l = learn(
            &[e.clone(), other],
            &LearnOptions {
                namespaces: vec!["payments".into()],
                scope: vec![],
                ..opts()
            },
        )
        .expect("learn");
        assert_eq!(l.identities, 1);
        let (p, _) = crate::policy::check(&l.yaml).unwrap_or_else(|d| panic!("{d:?}\n{}", l.yaml));
        assert_eq!(
            p.identities[0].spiffe_id,
            "spiffe://t.org/ns/payments/sa/api"
        );
        assert!(
            l.yaml.contains("podLabels: {\"app\": \"api\"}"),
            "{}",
            l.yaml
        );
        assert!(!l.yaml.contains("pod-template-hash"));
    }
}

//! Identity matching: which identity a process gets, directly from its facts ([`resolve`])
//! and as the kernel does it from interned classes ([`Classes`]).

use std::collections::{BTreeSet, HashMap};

use enforcer_common::{ANY, BIN_NONE, CG_NONE, IdMatchKey};

use super::cgroup_attr::{CgroupAttr, CgroupFacts};
use super::{Identity, MatchEntry, Policy};

/// Facts of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessFacts<'a> {
    pub sha256: Option<&'a [u8; 32]>,
    pub exe_path: Option<&'a str>,
    /// The process's cgroup: its path relative to the cgroup2 root and its pod, if known.
    pub cgroup: Option<CgroupFacts<'a>>,
    pub uid: u32,
}

/// The identity a process gets, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Identity number (0 = none).
    pub ident: u32,
    /// e.g. `identities[0].match[1]: binarySha256 + cgroup`, or `no identity matched`.
    pub reason: String,
    /// Set when two identities matched with equal specificity (the lower number won).
    pub tie: Option<String>,
}

/// What a selector is checked against; the cgroup as a predicate over the policy's globs on
/// its attributes, so that classes (sets of matched globs) and real paths share one
/// implementation.
struct Probe<'a> {
    sha256: Option<&'a [u8; 32]>,
    exe_path: Option<&'a str>,
    cgroup: &'a dyn Fn(CgroupAttr, &str) -> bool,
    uid: u32,
}

fn holds(e: &MatchEntry, p: &Probe<'_>) -> bool {
    (e.binary_sha256.is_empty() || p.sha256.is_some_and(|h| e.binary_sha256.contains(h)))
        && (e.binary_path.is_empty()
            || p.exe_path
                .is_some_and(|x| e.binary_path.iter().any(|b| b == x)))
        && CgroupAttr::ALL
            .iter()
            .all(|&a| a.combine(a.globs(e), |g| (p.cgroup)(a, g)))
        && (e.uid.is_empty() || e.uid.contains(&p.uid))
}

/// (binary tier: hash 2, path 1, none 0; number of selectors). Higher is more specific.
fn specificity(e: &MatchEntry) -> (u8, usize) {
    let tier = if !e.binary_sha256.is_empty() {
        2
    } else if !e.binary_path.is_empty() {
        1
    } else {
        0
    };
    let n = [
        e.binary_sha256.is_empty(),
        e.binary_path.is_empty(),
        e.uid.is_empty(),
    ]
    .iter()
    .filter(|empty| !**empty)
    .count()
        + CgroupAttr::ALL
            .iter()
            .filter(|a| !a.globs(e).is_empty())
            .count();
    (tier, n)
}

fn selectors(e: &MatchEntry) -> String {
    let mut s = Vec::new();
    if !e.binary_sha256.is_empty() {
        s.push("binarySha256");
    }
    if !e.binary_path.is_empty() {
        s.push("binaryPath");
    }
    for a in CgroupAttr::ALL {
        if !a.globs(e).is_empty() {
            s.push(a.key());
        }
    }
    if !e.uid.is_empty() {
        s.push("uid");
    }
    s.join(" + ")
}

fn ident_of(i: usize) -> u32 {
    u32::try_from(i + 1).unwrap_or(u32::MAX)
}

fn resolve_probe(identities: &[Identity], p: &Probe<'_>) -> Resolution {
    // Best entry per identity: (specificity, identity index, entry index).
    let mut best: Option<((u8, usize), usize, usize)> = None;
    let mut tie: Option<(usize, usize)> = None;
    for (i, id) in identities.iter().enumerate() {
        let mut mine: Option<((u8, usize), usize)> = None;
        for (j, e) in id.matches.iter().enumerate() {
            if holds(e, p) {
                let s = specificity(e);
                if mine.is_none_or(|(ms, _)| s > ms) {
                    mine = Some((s, j));
                }
            }
        }
        let Some((s, j)) = mine else { continue };
        match best {
            None => best = Some((s, i, j)),
            Some((bs, _, _)) if s > bs => {
                best = Some((s, i, j));
                tie = None;
            }
            Some((bs, bi, _)) if s == bs => {
                if tie.is_none() {
                    tie = Some((bi, i));
                }
            }
            Some(_) => {}
        }
    }
    let Some((_, i, j)) = best else {
        return Resolution {
            ident: 0,
            reason: "no identity matched".into(),
            tie: None,
        };
    };
    let entry = &identities[i].matches[j];
    let tie = tie.map(|(a, b)| {
        format!(
            "identities[{a}] {:?} and identities[{b}] {:?} matched with equal specificity ({}); chose identities[{a}]",
            identities[a].name,
            identities[b].name,
            selectors(entry)
        )
    });
    Resolution {
        ident: ident_of(i),
        reason: format!("identities[{i}].match[{j}]: {}", selectors(entry)),
        tie,
    }
}

/// The identity of a process with these facts. An entry matches when every selector it has
/// holds; a missing fact makes a selector on it fail. The most specific entry wins (a hash
/// beats a path beats neither, then more selectors beat fewer); on equal specificity of two
/// identities the lower identity number wins and `tie` says so.
pub fn resolve(policy: &Policy, facts: &ProcessFacts<'_>) -> Resolution {
    let cg = |a: CgroupAttr, g: &str| facts.cgroup.is_some_and(|c| a.matches(g, &c));
    resolve_probe(
        &policy.identities,
        &Probe {
            sha256: facts.sha256,
            exe_path: facts.exe_path,
            cgroup: &cg,
            uid: facts.uid,
        },
    )
}

/// The first of `hashes` (objects `LD_PRELOAD` loads) that no `preload:` list grants to a
/// process with these facts and identity number `ident` (the one [`resolve`] gives), if any:
/// the lists of the identity's entries that hold for the process count (entries are OR-ed).
/// `Some(0)` for no identity.
pub fn preload_missing(
    policy: &Policy,
    facts: &ProcessFacts<'_>,
    ident: u32,
    hashes: &[[u8; 32]],
) -> Option<usize> {
    let id = (ident as usize)
        .checked_sub(1)
        .and_then(|i| policy.identities.get(i));
    let Some(id) = id else {
        return Some(0);
    };
    let cg = |a: CgroupAttr, g: &str| facts.cgroup.is_some_and(|c| a.matches(g, &c));
    let p = Probe {
        sha256: facts.sha256,
        exe_path: facts.exe_path,
        cgroup: &cg,
        uid: facts.uid,
    };
    let granted: Vec<&[u8; 32]> = id
        .matches
        .iter()
        .filter(|e| holds(e, &p))
        .flat_map(|e| e.preload.iter())
        .collect();
    hashes.iter().position(|h| !granted.contains(&h))
}

/// Interning tables of the kernel's binary and cgroup classes for one policy.
#[derive(Debug, Clone)]
pub struct Classes {
    /// The policy's identities: all classes need (never its possibly million rules).
    identities: Vec<Identity>,
    sha_atoms: Vec<[u8; 32]>,
    path_atoms: Vec<String>,
    /// Every (attribute, glob) the policy's cgroup selectors name.
    globs: Vec<(CgroupAttr, String)>,
    uid_atoms: Vec<u32>,
    /// Class `k` (1-based) is `bins[k - 1]`.
    bins: Vec<(Option<usize>, Option<usize>)>,
    bin_index: HashMap<(Option<usize>, Option<usize>), u32>,
    cgs: Vec<Vec<usize>>,
    cg_index: HashMap<Vec<usize>, u32>,
}

fn class_number(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Classes {
    pub fn new(policy: &Policy) -> Self {
        let mut sha = BTreeSet::new();
        let mut path = BTreeSet::new();
        let mut glob = BTreeSet::new();
        let mut uid = BTreeSet::new();
        for e in policy.identities.iter().flat_map(|i| &i.matches) {
            sha.extend(e.binary_sha256.iter().copied());
            path.extend(e.binary_path.iter().cloned());
            for a in CgroupAttr::ALL {
                glob.extend(a.globs(e).iter().map(|g| (a, g.clone())));
            }
            uid.extend(e.uid.iter().copied());
        }
        Classes {
            identities: policy.identities.clone(),
            sha_atoms: sha.into_iter().collect(),
            path_atoms: path.into_iter().collect(),
            globs: glob.into_iter().collect(),
            uid_atoms: uid.into_iter().filter(|u| *u != ANY).collect(),
            bins: Vec::new(),
            bin_index: HashMap::new(),
            cgs: Vec::new(),
            cg_index: HashMap::new(),
        }
    }

    /// True when the policy has cgroup selectors of any attribute (exec must classify the
    /// cgroup).
    pub fn uses_cgroups(&self) -> bool {
        !self.globs.is_empty()
    }

    /// True when the policy has `k8s` selectors: a container's cgroup must not be classified
    /// before its pod metadata is known (it would get the class of a cgroup without a pod).
    pub fn uses_k8s(&self) -> bool {
        self.globs.iter().any(|(a, _)| a.is_k8s())
    }

    /// True when the policy has `k8s.serviceAccount` selectors (which only the API server
    /// can make hold).
    pub fn uses_service_account(&self) -> bool {
        self.globs
            .iter()
            .any(|(a, _)| *a == CgroupAttr::K8sServiceAccount)
    }

    /// Binary class of a file: interned from (which binarySha256 atom it matches, which
    /// binaryPath atom it matches); [`BIN_NONE`] when it matches neither. Classes start at 1.
    pub fn bin_class(&mut self, sha256: &[u8; 32], exe_path: Option<&str>) -> u32 {
        let s = self.sha_atoms.binary_search(sha256).ok();
        let p = exe_path.and_then(|x| self.path_atoms.iter().position(|a| a == x));
        if s.is_none() && p.is_none() {
            return BIN_NONE;
        }
        if let Some(c) = self.bin_index.get(&(s, p)) {
            return *c;
        }
        self.bins.push((s, p));
        let c = class_number(self.bins.len());
        self.bin_index.insert((s, p), c);
        c
    }

    /// Cgroup class: interned set of the policy's cgroup-attribute atoms that hold for this
    /// cgroup (its path, the systemd unit the path names, its pod...); [`CG_NONE`] when none.
    pub fn cg_class(&mut self, cgroup: &CgroupFacts<'_>) -> u32 {
        let set: Vec<usize> = self
            .globs
            .iter()
            .enumerate()
            .filter(|(_, (a, g))| a.matches(g, cgroup))
            .map(|(i, _)| i)
            .collect();
        if set.is_empty() {
            return CG_NONE;
        }
        if let Some(c) = self.cg_index.get(&set) {
            return *c;
        }
        self.cgs.push(set.clone());
        let c = class_number(self.cgs.len());
        self.cg_index.insert(set, c);
        c
    }

    fn ident_for(
        &self,
        bin: Option<&(Option<usize>, Option<usize>)>,
        cg: &[usize],
        uid: u32,
    ) -> u32 {
        let (s, p) = bin.copied().unwrap_or((None, None));
        let in_class = |a: CgroupAttr, g: &str| {
            cg.iter()
                .any(|i| self.globs.get(*i).is_some_and(|(xa, x)| *xa == a && x == g))
        };
        let probe = Probe {
            sha256: s.and_then(|i| self.sha_atoms.get(i)),
            exe_path: p.and_then(|i| self.path_atoms.get(i)).map(String::as_str),
            cgroup: &in_class,
            uid,
        };
        resolve_probe(&self.identities, &probe).ident
    }

    /// Every `IdMatchKey -> identity` entry needed for all classes interned so far (class 0
    /// included), consistent with [`resolve`] under the kernel's two lookups
    /// `(gen, bin, cg, uid)` then `(gen, bin, cg, ANY)`: per (bin, cg) pair one `uid = ANY`
    /// entry (what a uid named by no selector gets) plus one per uid atom of the policy whose
    /// identity differs from it. Entries with identity 0 are omitted.
    pub fn idmatch_entries(&self, generation: u32) -> Vec<(IdMatchKey, u32)> {
        let mut out = Vec::new();
        let none: Vec<usize> = Vec::new();
        for bin in 0..=self.bins.len() {
            let bin_rep = bin.checked_sub(1).and_then(|k| self.bins.get(k));
            for cg in 0..=self.cgs.len() {
                let cg_rep = cg
                    .checked_sub(1)
                    .and_then(|k| self.cgs.get(k))
                    .unwrap_or(&none);
                let key = |uid| IdMatchKey {
                    generation,
                    bin: class_number(bin),
                    cg: class_number(cg),
                    uid,
                };
                let any = self.ident_for(bin_rep, cg_rep, ANY);
                if any != 0 {
                    out.push((key(ANY), any));
                }
                for &u in &self.uid_atoms {
                    let id = self.ident_for(bin_rep, cg_rep, u);
                    if id != 0 && id != any {
                        out.push((key(u), id));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::PodMeta;
    use crate::policy::{Action, Identity, Mode};

    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn chance(&mut self, pct: u64) -> bool {
            self.next() % 100 < pct
        }
    }

    fn h(b: u8) -> [u8; 32] {
        [b; 32]
    }

    const GLOBS: &[&str] = &["/a/**", "/a/b", "/*/c", "/**", "/b/*.service", "/a/b/**"];
    const UNITS: &[&str] = &["x.service", "*.service", "y*", "d.scope"];
    const PATHS: &[&str] = &["/bin/x", "/bin/y", "/bin/z"];
    const CGS: &[&str] = &[
        "/",
        "/a",
        "/a/b",
        "/a/c",
        "/b/c",
        "/b/x.service",
        "/a/b/d",
        "/z",
        "/b/x.service/w",
        "/a/y.service",
        "/a/d.scope",
    ];
    const UIDS: &[u32] = &[0, 1000, 1001];
    const NAMESPACES: &[&str] = &["prod", "dev", "p*", "*"];
    const ACCOUNTS: &[&str] = &["api", "db", "*"];
    const CONTAINERS: &[&str] = &["app", "side*", ""];
    const LABELS: &[&str] = &[
        "app=web",
        "app=db",
        "app=*",
        "tier=back",
        "tier=*",
        "env=p*",
    ];

    /// Pods the samples run in (`None`: a cgroup without a known pod).
    fn pods() -> Vec<Option<PodMeta>> {
        let pod = |ns: &str, sa: Option<&str>, labels: &[(&str, &str)], container: &str| {
            Some(PodMeta {
                namespace: ns.into(),
                pod_name: format!("{ns}-pod"),
                pod_uid: "0b1c2d3e-0000-4000-8000-000000000001".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                container: container.into(),
                service_account: sa.map(str::to_string),
            })
        };
        vec![
            None,
            pod(
                "prod",
                Some("api"),
                &[("app", "web"), ("tier", "back")],
                "app",
            ),
            pod("prod", None, &[("app", "web"), ("tier", "back")], "app"),
            pod("dev", Some("api"), &[("app", "web")], "sidecar"),
            pod("prod", Some("db"), &[("app", "db"), ("env", "prod")], "app"),
            pod("payments", Some("api"), &[], "app"),
            pod("prod", Some("api"), &[("app", "")], ""),
        ]
    }

    fn pick<T: Clone>(r: &mut Rng, pool: &[T]) -> Vec<T> {
        let mut v: Vec<T> = Vec::new();
        for x in pool {
            if r.chance(35) {
                v.push(x.clone());
            }
        }
        if v.is_empty() {
            v.push(pool[r.below(pool.len())].clone());
        }
        v
    }

    fn random_policy(r: &mut Rng) -> Policy {
        let n = 1 + r.below(4);
        let identities = (0..n)
            .map(|i| Identity {
                name: format!("id{i}"),
                spiffe_id: format!("spiffe://t/id{i}"),
                sockets: 0,
                matches: (0..1 + r.below(3))
                    .map(|_| {
                        let mut e = MatchEntry::default();
                        while e == MatchEntry::default() {
                            if r.chance(40) {
                                e.binary_sha256 = pick(r, &[h(1), h(2), h(3)]);
                            }
                            if r.chance(30) {
                                e.binary_path =
                                    pick(r, PATHS).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(40) {
                                e.cgroup = pick(r, GLOBS).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(25) {
                                e.systemd_unit =
                                    pick(r, UNITS).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(40) {
                                e.uid = pick(r, UIDS);
                            }
                            if r.chance(25) {
                                e.k8s_namespace =
                                    pick(r, NAMESPACES).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(20) {
                                e.k8s_service_account =
                                    pick(r, ACCOUNTS).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(15) {
                                e.k8s_container =
                                    pick(r, CONTAINERS).iter().map(|s| s.to_string()).collect();
                            }
                            if r.chance(25) {
                                // One pair per label key, as `check` makes them.
                                let mut labels: Vec<String> = Vec::new();
                                for l in pick(r, LABELS) {
                                    let key = l.split('=').next();
                                    if !labels.iter().any(|x| x.split('=').next() == key) {
                                        labels.push(l.to_string());
                                    }
                                }
                                e.k8s_pod_labels = labels;
                            }
                        }
                        e
                    })
                    .collect(),
            })
            .collect();
        Policy {
            trust_domain: "t".into(),
            mode: Mode::Enforce,
            unattested: Action::Allow,
            scope: vec!["/".into()],
            report_allow: false,
            revoke_connections: true,
            identities,
            rules: Vec::new(),
            max_grant_secs: crate::policy::DEFAULT_MAX_GRANT_SECS,
        }
    }

    #[test]
    fn specificity_and_tie() {
        let e = |sha: bool, path: bool, uid: bool| MatchEntry {
            binary_sha256: if sha { vec![h(1)] } else { vec![] },
            binary_path: if path { vec!["/x".into()] } else { vec![] },
            uid: if uid { vec![7] } else { vec![] },
            ..MatchEntry::default()
        };
        let mut p = random_policy(&mut Rng(5));
        p.identities = vec![
            Identity {
                name: "a".into(),
                spiffe_id: "spiffe://t/a".into(),
                sockets: 0,
                matches: vec![e(false, true, true)],
            },
            Identity {
                name: "b".into(),
                spiffe_id: "spiffe://t/b".into(),
                sockets: 0,
                matches: vec![e(true, false, false)],
            },
            Identity {
                name: "c".into(),
                spiffe_id: "spiffe://t/c".into(),
                sockets: 0,
                matches: vec![e(true, false, false)],
            },
        ];
        let facts = ProcessFacts {
            sha256: Some(&h(1)),
            exe_path: Some("/x"),
            cgroup: None,
            uid: 7,
        };
        let r = resolve(&p, &facts);
        assert_eq!(r.ident, 2);
        assert_eq!(r.reason, "identities[1].match[0]: binarySha256");
        assert!(r.tie.is_some());
        let r = resolve(
            &p,
            &ProcessFacts {
                sha256: None,
                ..facts
            },
        );
        assert_eq!((r.ident, r.tie), (1, None));
        assert_eq!(r.reason, "identities[0].match[0]: binaryPath + uid");
        let r = resolve(
            &p,
            &ProcessFacts {
                sha256: None,
                uid: 8,
                ..facts
            },
        );
        assert_eq!(r.ident, 0);
        assert_eq!(r.reason, "no identity matched");
    }

    #[test]
    fn classes_agree_with_resolve() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let pods = pods();
        // Samples that got their identity through a k8s selector (the generator must make some).
        let mut by_k8s = 0;
        for _ in 0..400 {
            let p = random_policy(&mut r);
            let mut classes = Classes::new(&p);
            let mut samples = Vec::new();
            for _ in 0..40 {
                let sha = h(1 + r.below(4) as u8);
                let path = [
                    Some("/bin/x"),
                    Some("/bin/y"),
                    Some("/bin/z"),
                    Some("/other"),
                    None,
                ][r.below(5)];
                let cg = CgroupFacts {
                    path: CGS[r.below(CGS.len())],
                    pod: pods[r.below(pods.len())].as_ref(),
                };
                let uid = [0, 1000, 1001, 5][r.below(4)];
                let bin = classes.bin_class(&sha, path);
                let cgc = classes.cg_class(&cg);
                samples.push((sha, path, cg, uid, bin, cgc));
            }
            for generation in [0, 1] {
                let map: HashMap<IdMatchKey, u32> =
                    classes.idmatch_entries(generation).into_iter().collect();
                for (sha, path, cg, uid, bin, cgc) in &samples {
                    let k = |uid| IdMatchKey {
                        generation,
                        bin: *bin,
                        cg: *cgc,
                        uid,
                    };
                    let kernel = map
                        .get(&k(*uid))
                        .or_else(|| map.get(&k(ANY)))
                        .copied()
                        .unwrap_or(0);
                    let facts = ProcessFacts {
                        sha256: Some(sha),
                        exe_path: *path,
                        cgroup: Some(*cg),
                        uid: *uid,
                    };
                    let res = resolve(&p, &facts);
                    assert_eq!(kernel, res.ident, "{p:?} {facts:?}");
                    by_k8s += usize::from(res.reason.contains("k8s."));
                }
            }
        }
        assert!(by_k8s > 100, "{by_k8s}");
    }

    #[test]
    fn class_numbers() {
        let mut p = random_policy(&mut Rng(77));
        p.identities[0].matches = vec![MatchEntry {
            binary_sha256: vec![h(9)],
            cgroup: vec!["/a/**".into()],
            ..MatchEntry::default()
        }];
        p.identities.truncate(1);
        let mut c = Classes::new(&p);
        assert_eq!(c.bin_class(&h(200), None), BIN_NONE);
        assert_eq!(c.bin_class(&h(9), Some("/x")), 1);
        assert_eq!(c.bin_class(&h(9), None), 1);
        assert_eq!(
            c.cg_class(&CgroupFacts::without_pod("/nowhere/at/all")),
            CG_NONE
        );
        assert_eq!(c.cg_class(&CgroupFacts::without_pod("/a/b")), 1);
        assert_eq!(c.cg_class(&CgroupFacts::without_pod("/a")), 1);
        // A unit selector folds into the cgroup class too (the kernel sees only the class).
        let mut q = p.clone();
        q.identities[0].matches = vec![MatchEntry {
            systemd_unit: vec!["web*.service".into()],
            ..MatchEntry::default()
        }];
        let mut u = Classes::new(&q);
        assert!(u.uses_cgroups());
        assert_eq!(
            u.cg_class(&CgroupFacts::without_pod("/system.slice/db.service")),
            CG_NONE
        );
        assert_eq!(
            u.cg_class(&CgroupFacts::without_pod("/system.slice/web-1.service")),
            1
        );
        assert_eq!(
            u.cg_class(&CgroupFacts::without_pod(
                "/system.slice/web-1.service/worker"
            )),
            1
        );
        let e = c.idmatch_entries(1);
        assert_eq!(
            e,
            vec![(
                IdMatchKey {
                    generation: 1,
                    bin: 1,
                    cg: 1,
                    uid: ANY
                },
                1
            )]
        );
    }

    #[test]
    fn pod_classes() {
        let mut p = random_policy(&mut Rng(3));
        p.identities = vec![Identity {
            name: "web".into(),
            spiffe_id: "spiffe://t/ns/prod/sa/api".into(),
            sockets: 0,
            matches: vec![MatchEntry {
                binary_sha256: vec![h(1)],
                k8s_namespace: vec!["prod".into()],
                k8s_pod_labels: vec!["app=web".into(), "tier=b*".into()],
                ..MatchEntry::default()
            }],
        }];
        let mut c = Classes::new(&p);
        assert!(c.uses_cgroups() && c.uses_k8s() && !c.uses_service_account());
        let pods = pods();
        let prod = pods[1].as_ref();
        let prod_again = pods[2].as_ref(); // the same namespace and labels, no service account
        let dev = pods[3].as_ref();
        let cg = |path, pod| CgroupFacts { path, pod };
        // Two containers' cgroups with the same pod facts share one class.
        let a = c.cg_class(&cg("/kubepods/besteffort/pod1/aaaa", prod));
        assert_ne!(a, CG_NONE);
        assert_eq!(c.cg_class(&cg("/kubepods/besteffort/pod1/bbbb", prod)), a);
        assert_eq!(
            c.cg_class(&cg("/kubepods/burstable/pod2/cccc", prod_again)),
            a
        );
        // A pod of another namespace with the same labels: only the label atom holds.
        let other = c.cg_class(&cg("/kubepods/besteffort/pod3/dddd", dev));
        assert!(other != a && other != CG_NONE);
        // No k8s atom holds without a pod, or for a pod with nothing in common.
        assert_eq!(
            c.cg_class(&cg("/kubepods/besteffort/pod4/eeee", pods[5].as_ref())),
            CG_NONE
        );
        assert_eq!(
            c.cg_class(&cg("/kubepods/besteffort/pod1/aaaa", None)),
            CG_NONE
        );
        let bin = c.bin_class(&h(1), None);
        let entries: HashMap<IdMatchKey, u32> = c.idmatch_entries(0).into_iter().collect();
        let kernel = |cgc| {
            entries
                .get(&IdMatchKey {
                    generation: 0,
                    bin,
                    cg: cgc,
                    uid: ANY,
                })
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(kernel(a), 1);
        assert_eq!(kernel(other), 0);
        assert_eq!(kernel(CG_NONE), 0);
        // The same binary in a pod of another namespace is not that identity, by resolve too.
        let sha = h(1);
        let facts = |pod| ProcessFacts {
            sha256: Some(&sha),
            exe_path: None,
            cgroup: Some(cg("/kubepods/besteffort/pod3/dddd", pod)),
            uid: 0,
        };
        assert_eq!(resolve(&p, &facts(dev)).ident, 0);
        let r = resolve(&p, &facts(prod));
        assert_eq!(r.ident, 1);
        assert_eq!(
            r.reason,
            "identities[0].match[0]: binarySha256 + k8s.namespace + k8s.podLabels"
        );
        // One label of two is not enough (the pairs of podLabels are AND-ed).
        let mut half = pods[1].clone().unwrap_or_default();
        half.labels.remove("tier");
        assert_eq!(resolve(&p, &facts(Some(&half))).ident, 0);
        // Only `app=web` holds: a class of its own, which gives no identity.
        let k = c.cg_class(&cg("/kubepods/x", Some(&half)));
        assert!(k != a && k != CG_NONE);
        assert!(
            !c.idmatch_entries(0)
                .iter()
                .any(|(key, id)| key.cg == k && *id != 0)
        );
        // serviceAccount: holds only once the pod's account is known.
        p.identities[0].matches[0].k8s_service_account = vec!["api".into()];
        let mut c = Classes::new(&p);
        assert!(c.uses_service_account());
        assert_eq!(resolve(&p, &facts(prod)).ident, 1);
        assert_eq!(resolve(&p, &facts(prod_again)).ident, 0);
        assert_ne!(
            c.cg_class(&cg("/p", prod)),
            c.cg_class(&cg("/p", prod_again))
        );
        // More k8s selectors are more specific.
        p.identities.push(Identity {
            name: "any-prod".into(),
            spiffe_id: "spiffe://t/any-prod".into(),
            sockets: 0,
            matches: vec![MatchEntry {
                binary_sha256: vec![h(1)],
                k8s_namespace: vec!["p*".into()],
                ..MatchEntry::default()
            }],
        });
        let r = resolve(&p, &facts(prod));
        assert_eq!((r.ident, r.tie), (1, None));
        assert_eq!(resolve(&p, &facts(prod_again)).ident, 2);
    }
}

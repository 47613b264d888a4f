//! Selectors over attributes of a process's cgroup.
//!
//! The kernel never sees these attributes: the agent derives each from the cgroup's facts
//! ([`CgroupFacts`]: its path, and the pod it belongs to when known) and folds every selector
//! that holds into the cgroup's class, so the connect path keeps one lookup by cgroup id.
//! Adding an attribute is one variant here, one `MatchEntry` field and one YAML key.
//!
//! An attribute's selector atoms are strings: a glob on the attribute's value, or for
//! `k8s.podLabels` one `KEY=GLOB` pair (a label key has no `=`). An entry's atoms on one
//! attribute combine with OR, except `k8s.podLabels`, whose pairs must all hold
//! ([`CgroupAttr::all_must_hold`]).

use super::MatchEntry;
use super::glob::{
    cgroup_glob_match, glob_problem, globs_intersect, name_glob_match, name_globs_intersect,
};
use crate::k8s::PodMeta;

/// What the agent knows of a cgroup: the facts its attributes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupFacts<'a> {
    /// Path relative to the cgroup2 root, e.g. `/system.slice/x.service`.
    pub path: &'a str,
    /// The pod and container the cgroup belongs to, when known; `None` for a cgroup outside
    /// any pod or whose pod is not known yet, and then no `k8s` selector holds.
    pub pod: Option<&'a PodMeta>,
}

impl<'a> CgroupFacts<'a> {
    /// A cgroup known by its path only (no pod).
    pub fn without_pod(path: &'a str) -> Self {
        CgroupFacts { path, pod: None }
    }
}

/// The `match` key that holds the Kubernetes selectors (`k8s: {namespace: [...], ...}`).
pub const K8S_KEY: &str = "k8s";

/// An attribute of a cgroup that a `match` entry can select on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CgroupAttr {
    /// `cgroup: [GLOB]`: the cgroup v2 path itself.
    Path,
    /// `systemdUnit: [GLOB]`: the systemd unit that owns the cgroup ([`systemd_unit`]).
    SystemdUnit,
    /// `k8s.namespace: [GLOB]`: the pod's namespace.
    K8sNamespace,
    /// `k8s.serviceAccount: [GLOB]`: the pod's service account (known from the API server
    /// only; no selector holds while it is unknown).
    K8sServiceAccount,
    /// `k8s.podLabels: {KEY: GLOB}`: the pod's labels; every pair must hold.
    K8sPodLabels,
    /// `k8s.container: [GLOB]`: the container's name in the pod spec.
    K8sContainer,
}

impl CgroupAttr {
    pub const ALL: [CgroupAttr; 6] = [
        CgroupAttr::Path,
        CgroupAttr::SystemdUnit,
        CgroupAttr::K8sNamespace,
        CgroupAttr::K8sServiceAccount,
        CgroupAttr::K8sPodLabels,
        CgroupAttr::K8sContainer,
    ];

    /// The selector's name in messages and reasons: its `match` key, or `k8s.SUBKEY`.
    pub const fn key(self) -> &'static str {
        match self {
            CgroupAttr::Path => "cgroup",
            CgroupAttr::SystemdUnit => "systemdUnit",
            CgroupAttr::K8sNamespace => "k8s.namespace",
            CgroupAttr::K8sServiceAccount => "k8s.serviceAccount",
            CgroupAttr::K8sPodLabels => "k8s.podLabels",
            CgroupAttr::K8sContainer => "k8s.container",
        }
    }

    /// Where the selector stands in the YAML: `(None, key)` for a key of the `match` entry,
    /// `(Some("k8s"), subkey)` for a key of its `k8s` mapping.
    pub const fn yaml_key(self) -> (Option<&'static str>, &'static str) {
        match self {
            CgroupAttr::Path => (None, "cgroup"),
            CgroupAttr::SystemdUnit => (None, "systemdUnit"),
            CgroupAttr::K8sNamespace => (Some(K8S_KEY), "namespace"),
            CgroupAttr::K8sServiceAccount => (Some(K8S_KEY), "serviceAccount"),
            CgroupAttr::K8sPodLabels => (Some(K8S_KEY), "podLabels"),
            CgroupAttr::K8sContainer => (Some(K8S_KEY), "container"),
        }
    }

    /// A Kubernetes (pod) attribute: it never holds for a cgroup without a known pod.
    pub const fn is_k8s(self) -> bool {
        self.yaml_key().0.is_some()
    }

    /// An example value, for messages.
    pub const fn example(self) -> &'static str {
        match self {
            CgroupAttr::Path => "\"/system.slice/app.service\"",
            CgroupAttr::SystemdUnit => "\"nginx.service\"",
            CgroupAttr::K8sNamespace => "payments",
            CgroupAttr::K8sServiceAccount => "api",
            CgroupAttr::K8sPodLabels => "{app: web, tier: \"back*\"}",
            CgroupAttr::K8sContainer => "app",
        }
    }

    /// True when all of an entry's atoms on this attribute must hold (the labels of
    /// `podLabels`), false when any one suffices (the globs of the other attributes).
    pub const fn all_must_hold(self) -> bool {
        matches!(self, CgroupAttr::K8sPodLabels)
    }

    /// Do an entry's `atoms` on this attribute hold together, given which single atoms hold?
    /// An empty list does not constrain the attribute.
    pub fn combine(self, atoms: &[String], mut holds: impl FnMut(&str) -> bool) -> bool {
        if atoms.is_empty() {
            true
        } else if self.all_must_hold() {
            atoms.iter().all(|a| holds(a))
        } else {
            atoms.iter().any(|a| holds(a))
        }
    }

    /// Why `atom` is not a valid selector atom on this attribute, if it is not.
    pub fn problem(self, atom: &str) -> Option<String> {
        match self {
            CgroupAttr::Path => glob_problem(atom),
            CgroupAttr::SystemdUnit => unit_glob_problem(atom),
            CgroupAttr::K8sNamespace | CgroupAttr::K8sContainer => {
                k8s_name_problem(self, atom, false)
            }
            CgroupAttr::K8sServiceAccount => k8s_name_problem(self, atom, true),
            CgroupAttr::K8sPodLabels => match split_label(atom) {
                Some((k, v)) => label_key_problem(k).or_else(|| label_value_problem(k, v)),
                None => Some(format!(
                    "k8s.podLabels {atom:?} is not a KEY=GLOB pair; write the labels as a mapping, e.g. podLabels: {}",
                    self.example()
                )),
            },
        }
    }

    /// The entry's atoms on this attribute (empty: the entry does not constrain it).
    pub fn globs(self, e: &MatchEntry) -> &[String] {
        match self {
            CgroupAttr::Path => &e.cgroup,
            CgroupAttr::SystemdUnit => &e.systemd_unit,
            CgroupAttr::K8sNamespace => &e.k8s_namespace,
            CgroupAttr::K8sServiceAccount => &e.k8s_service_account,
            CgroupAttr::K8sPodLabels => &e.k8s_pod_labels,
            CgroupAttr::K8sContainer => &e.k8s_container,
        }
    }

    /// The entry's atoms on this attribute, to fill in.
    pub fn globs_mut(self, e: &mut MatchEntry) -> &mut Vec<String> {
        match self {
            CgroupAttr::Path => &mut e.cgroup,
            CgroupAttr::SystemdUnit => &mut e.systemd_unit,
            CgroupAttr::K8sNamespace => &mut e.k8s_namespace,
            CgroupAttr::K8sServiceAccount => &mut e.k8s_service_account,
            CgroupAttr::K8sPodLabels => &mut e.k8s_pod_labels,
            CgroupAttr::K8sContainer => &mut e.k8s_container,
        }
    }

    /// The attribute's value for a cgroup; `None` when the cgroup has none (then no selector
    /// on it holds). `podLabels` has one value per label key: always `None` here, see
    /// [`CgroupAttr::matches`].
    pub fn value<'a>(self, cg: &CgroupFacts<'a>) -> Option<&'a str> {
        match self {
            CgroupAttr::Path => Some(cg.path),
            CgroupAttr::SystemdUnit => systemd_unit(cg.path),
            CgroupAttr::K8sNamespace => cg.pod.map(|p| p.namespace.as_str()),
            CgroupAttr::K8sServiceAccount => cg.pod.and_then(|p| p.service_account.as_deref()),
            CgroupAttr::K8sContainer => cg.pod.map(|p| p.container.as_str()),
            CgroupAttr::K8sPodLabels => None,
        }
    }

    /// Does the atom `atom` on this attribute hold for the cgroup?
    pub fn matches(self, atom: &str, cg: &CgroupFacts<'_>) -> bool {
        match self {
            // A unit name is one path segment, so the cgroup glob (`*` within a segment) is
            // the glob of unit names too.
            CgroupAttr::Path | CgroupAttr::SystemdUnit => {
                self.value(cg).is_some_and(|v| cgroup_glob_match(atom, v))
            }
            CgroupAttr::K8sNamespace | CgroupAttr::K8sServiceAccount | CgroupAttr::K8sContainer => {
                self.value(cg).is_some_and(|v| name_glob_match(atom, v))
            }
            CgroupAttr::K8sPodLabels => split_label(atom).is_some_and(|(k, glob)| {
                cg.pod
                    .and_then(|p| p.labels.get(k))
                    .is_some_and(|v| name_glob_match(glob, v))
            }),
        }
    }

    /// Can one cgroup satisfy both atoms? (Conservative: true unless provably not.)
    pub fn atoms_compatible(self, a: &str, b: &str) -> bool {
        match self {
            CgroupAttr::Path | CgroupAttr::SystemdUnit => globs_intersect(a, b),
            CgroupAttr::K8sNamespace | CgroupAttr::K8sServiceAccount | CgroupAttr::K8sContainer => {
                name_globs_intersect(a, b)
            }
            CgroupAttr::K8sPodLabels => match (split_label(a), split_label(b)) {
                (Some((ka, va)), Some((kb, vb))) if ka == kb => name_globs_intersect(va, vb),
                _ => true,
            },
        }
    }

    /// Can one cgroup satisfy both entries' non-empty atom lists on this attribute? For an OR
    /// attribute, the atoms that can (`Some((a, b))`); for `podLabels`, `Some` of the first
    /// pair when no pair of labels contradicts.
    pub fn lists_compatible<'e>(
        self,
        a: &'e [String],
        b: &'e [String],
    ) -> Option<(&'e str, &'e str)> {
        let mut pairs = a
            .iter()
            .flat_map(|x| b.iter().map(move |y| (x.as_str(), y.as_str())));
        if self.all_must_hold() {
            let first = (a.first()?.as_str(), b.first()?.as_str());
            pairs
                .all(|(x, y)| self.atoms_compatible(x, y))
                .then_some(first)
        } else {
            pairs.find(|(x, y)| self.atoms_compatible(x, y))
        }
    }
}

/// The atom of one `podLabels` pair.
pub fn label_atom(key: &str, glob: &str) -> String {
    format!("{key}={glob}")
}

/// `(KEY, GLOB)` of a `podLabels` atom.
pub fn split_label(atom: &str) -> Option<(&str, &str)> {
    atom.split_once('=')
}

/// Why `s` is not a name of ASCII letters (lower case only when `lower`) and digits, with
/// `inner` characters allowed inside but not at either end, of at most `max` characters;
/// `*` (when `star`) matches any characters and counts for none.
fn name_rule_problem(s: &str, star: bool, lower: bool, inner: &str, max: usize) -> Option<String> {
    let edge_ok = |c: char| {
        c.is_ascii_digit()
            || c.is_ascii_lowercase()
            || (!lower && c.is_ascii_uppercase())
            || (star && c == '*')
    };
    if let Some(c) = s.chars().find(|&c| !edge_ok(c) && !inner.contains(c)) {
        return Some(if c.is_ascii_uppercase() {
            format!("it has the upper-case letter {c:?}")
        } else {
            format!("it has {c:?}")
        });
    }
    if let Some(c) = s.chars().next().filter(|&c| !edge_ok(c)) {
        return Some(format!("it starts with {c:?}"));
    }
    if let Some(c) = s.chars().last().filter(|&c| !edge_ok(c)) {
        return Some(format!("it ends with {c:?}"));
    }
    let literal = s.chars().filter(|&c| !(star && c == '*')).count();
    (literal > max).then(|| format!("it is longer than {max} characters"))
}

/// Why `glob` cannot match a Kubernetes namespace or container name (a DNS-1123 label), or
/// with `subdomain` a service account name (a DNS-1123 subdomain).
fn k8s_name_problem(attr: CgroupAttr, glob: &str, subdomain: bool) -> Option<String> {
    let key = attr.key();
    let example = attr.example();
    let (noun, rule) = if subdomain {
        (
            "service account name (a DNS-1123 subdomain)",
            "lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 253 characters",
        )
    } else if attr == CgroupAttr::K8sNamespace {
        (
            "namespace name (a DNS-1123 label)",
            "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
        )
    } else {
        (
            "container name (a DNS-1123 label)",
            "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
        )
    };
    if glob.is_empty() {
        return Some(format!(
            "a {key} entry is empty; give a {noun} such as {example:?} (\"*\" matches any characters)"
        ));
    }
    let why = if subdomain {
        if glob.split('.').any(str::is_empty) {
            Some("it has an empty part between dots".to_string())
        } else {
            glob.split('.')
                .find_map(|part| name_rule_problem(part, true, true, "-", 253))
                .or_else(|| {
                    let literal = glob.chars().filter(|&c| c != '*').count();
                    (literal > 253).then(|| "it is longer than 253 characters".to_string())
                })
        }
    } else {
        name_rule_problem(glob, true, true, "-", 63)
    };
    why.map(|why| {
        format!(
            "{key} {glob:?} cannot match any Kubernetes {noun}: {why}; write {rule} (\"*\" matches any characters), e.g. {example:?}"
        )
    })
}

/// Why `key` is not a Kubernetes label key (`[PREFIX/]NAME`: an optional DNS-1123 subdomain
/// and a name of letters, digits, '-', '_' and '.'). Keys are exact, never globs.
pub fn label_key_problem(key: &str) -> Option<String> {
    const RULE: &str = "an optional DNS subdomain prefix and '/', then a name of at most 63 letters, digits, '-', '_' and '.' that starts and ends with a letter or digit, e.g. \"app\" or \"app.kubernetes.io/name\"";
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let why = if key.contains('*') {
        Some("label keys are exact, not globs (a value may be a glob)".to_string())
    } else if name.is_empty() {
        Some("its name is empty".to_string())
    } else if let Some(p) = prefix {
        if p.is_empty() || p.split('.').any(str::is_empty) {
            Some("its prefix is not a DNS subdomain".to_string())
        } else if p.len() > 253 {
            Some("its prefix is longer than 253 characters".to_string())
        } else {
            p.split('.')
                .find_map(|part| name_rule_problem(part, false, true, "-", 253))
                .map(|w| format!("its prefix is not a DNS subdomain ({w})"))
        }
    } else {
        None
    };
    why.or_else(|| name_rule_problem(name, false, false, "-_.", 63))
        .map(|why| {
            format!("k8s.podLabels key {key:?} is not a Kubernetes label key: {why}; write {RULE}")
        })
}

/// Why `glob` cannot match a value of the label `key` (at most 63 letters, digits, '-', '_'
/// and '.', starting and ending with a letter or digit, or empty; `*` matches any).
pub fn label_value_problem(key: &str, glob: &str) -> Option<String> {
    name_rule_problem(glob, true, false, "-_.", 63).map(|why| {
        format!(
            "k8s.podLabels value {glob:?} of {key:?} cannot match any Kubernetes label value: {why}; write at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit (\"*\" matches any characters, \"\" the empty value), e.g. {key}: web"
        )
    })
}

/// Unit name suffixes that own processes' cgroups (a slice only groups them).
const UNIT_SUFFIXES: [&str; 2] = [".service", ".scope"];

/// The systemd unit that owns a cgroup, as systemd derives it from the cgroup path: the
/// deepest path segment that is a service or scope unit name. A sub-cgroup a service created
/// for itself (delegation, e.g. `/system.slice/app.service/worker`) belongs to that service;
/// a user's units (`/user.slice/user-1000.slice/user@1000.service/app.slice/x.service`) are
/// the innermost; container runtimes' scopes (`cri-containerd-ID.scope`) are units too.
/// `None` outside any unit (`/`, a slice, a cgroup made by hand).
pub fn systemd_unit(cgroup_path: &str) -> Option<&str> {
    cgroup_path.split('/').rev().find(|seg| {
        UNIT_SUFFIXES
            .iter()
            .any(|s| seg.len() > s.len() && seg.ends_with(s))
    })
}

/// Why `glob` is not a valid `systemdUnit` entry, if it is not.
pub fn unit_glob_problem(glob: &str) -> Option<String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@*".contains(c);
    if glob.is_empty() {
        return Some(
            "a systemdUnit entry is empty; give a unit name such as \"nginx.service\"".into(),
        );
    }
    if glob.contains('/') {
        return Some(format!(
            "systemdUnit {glob:?} is a path; give a unit name such as \"nginx.service\" (or select the path with cgroup)"
        ));
    }
    if let Some(c) = glob.chars().find(|c| !ok_char(*c)) {
        return Some(format!(
            "systemdUnit {glob:?} has {c:?}, which no unit name has; use letters, digits, \":-_.\\@\" and \"*\""
        ));
    }
    if !glob.contains('*') && !UNIT_SUFFIXES.iter().any(|s| glob.ends_with(s)) {
        return Some(format!(
            "systemdUnit {glob:?} names no service or scope; write the full unit name, e.g. \"{glob}.service\" (only services and scopes own processes)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_from_cgroup_paths() {
        // Real shapes: a system service, its delegated sub-cgroup, a user unit, a session
        // scope, container scopes of the systemd cgroup driver, none.
        for (path, unit) in [
            ("/system.slice/nginx.service", Some("nginx.service")),
            ("/system.slice/nginx.service/worker", Some("nginx.service")),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
                Some("foo.service"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/init.scope",
                Some("init.scope"),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            (
                "/system.slice/docker-0123abcd.scope",
                Some("docker-0123abcd.scope"),
            ),
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-ab12.scope",
                Some("cri-containerd-ab12.scope"),
            ),
            ("/system.slice", None),
            ("/", None),
            ("/enftest-1-x", None),
            ("/a/.service", None),
        ] {
            assert_eq!(systemd_unit(path), unit, "{path}");
        }
    }

    #[test]
    fn unit_globs() {
        let m = |g, p| CgroupAttr::SystemdUnit.matches(g, &CgroupFacts::without_pod(p));
        assert!(m("nginx.service", "/system.slice/nginx.service"));
        assert!(m("nginx.service", "/system.slice/nginx.service/worker"));
        assert!(m("nginx*.service", "/system.slice/nginx-2.service"));
        assert!(m("*.service", "/system.slice/x.service"));
        assert!(!m("*.service", "/system.slice/x.scope"));
        assert!(!m("nginx.service", "/system.slice/apache.service"));
        assert!(!m("*", "/system.slice"));
        assert!(CgroupAttr::Path.matches(
            "/system.slice/**",
            &CgroupFacts::without_pod("/system.slice/x.service")
        ));
    }

    #[test]
    fn unit_glob_problems() {
        assert_eq!(unit_glob_problem("nginx.service"), None);
        assert_eq!(unit_glob_problem("nginx*"), None);
        assert_eq!(unit_glob_problem("user@1000.service"), None);
        assert!(unit_glob_problem("nginx").is_some_and(|m| m.contains("nginx.service")));
        assert!(unit_glob_problem("/system.slice/x.service").is_some_and(|m| m.contains("path")));
        assert!(unit_glob_problem("a b.service").is_some());
        assert!(unit_glob_problem("").is_some());
    }

    fn pod(ns: &str, sa: Option<&str>, labels: &[(&str, &str)], container: &str) -> PodMeta {
        PodMeta {
            namespace: ns.into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            container: container.into(),
            service_account: sa.map(str::to_string),
        }
    }

    #[test]
    fn k8s_matching() {
        let p = pod(
            "payments",
            Some("api"),
            &[
                ("app", "web"),
                ("app.kubernetes.io/tier", "backend"),
                ("x", ""),
            ],
            "app",
        );
        let cg = CgroupFacts {
            path: "/kubepods/besteffort/pod1/abc",
            pod: Some(&p),
        };
        let bare = CgroupFacts::without_pod(cg.path);
        let m = |a: CgroupAttr, atom: &str, cg: &CgroupFacts<'_>| a.matches(atom, cg);
        use CgroupAttr::*;
        assert!(m(K8sNamespace, "payments", &cg));
        assert!(m(K8sNamespace, "pay*", &cg));
        assert!(m(K8sNamespace, "*", &cg));
        assert!(!m(K8sNamespace, "pay", &cg));
        assert!(m(K8sServiceAccount, "api", &cg));
        assert!(!m(K8sServiceAccount, "db", &cg));
        assert!(m(K8sContainer, "a*p", &cg));
        assert!(!m(K8sContainer, "sidecar", &cg));
        assert!(m(K8sPodLabels, "app=web", &cg));
        assert!(m(K8sPodLabels, "app.kubernetes.io/tier=back*", &cg));
        assert!(m(K8sPodLabels, "x=", &cg));
        assert!(m(K8sPodLabels, "x=*", &cg));
        assert!(!m(K8sPodLabels, "app=db", &cg));
        assert!(
            !m(K8sPodLabels, "missing=*", &cg),
            "an absent label never holds"
        );
        // No pod: no k8s selector holds, not even "*"; the path ones still do.
        for a in CgroupAttr::ALL.into_iter().filter(|a| a.is_k8s()) {
            assert!(!m(a, "*", &bare), "{a:?}");
            assert!(!m(a, "app=*", &bare), "{a:?}");
        }
        assert!(m(Path, "/kubepods/**", &bare));
        // serviceAccount not known (CRI only): no serviceAccount selector holds.
        let no_sa = pod("payments", None, &[("app", "web")], "app");
        let cg2 = CgroupFacts {
            pod: Some(&no_sa),
            ..cg
        };
        assert!(!m(K8sServiceAccount, "*", &cg2));
        assert!(m(K8sNamespace, "payments", &cg2));
        // podLabels pairs combine with AND, the other attributes' globs with OR.
        let atoms = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let labels = atoms(&["app=web", "app.kubernetes.io/tier=backend"]);
        assert!(K8sPodLabels.combine(&labels, |a| m(K8sPodLabels, a, &cg)));
        let labels = atoms(&["app=web", "app.kubernetes.io/tier=frontend"]);
        assert!(!K8sPodLabels.combine(&labels, |a| m(K8sPodLabels, a, &cg)));
        let ns = atoms(&["dev", "payments"]);
        assert!(K8sNamespace.combine(&ns, |a| m(K8sNamespace, a, &cg)));
        assert!(
            K8sNamespace.combine(&[], |_| false),
            "no atoms: unconstrained"
        );
        assert_eq!(K8sNamespace.value(&cg), Some("payments"));
        assert_eq!(K8sPodLabels.value(&cg), None);
    }

    #[test]
    fn k8s_compatibility() {
        use CgroupAttr::*;
        let atoms = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = |a: CgroupAttr, x: &[&str], y: &[&str]| {
            a.lists_compatible(&atoms(x), &atoms(y)).is_some()
        };
        assert!(ok(K8sNamespace, &["prod", "dev"], &["d*"]));
        assert!(!ok(K8sNamespace, &["prod"], &["dev"]));
        assert!(ok(K8sPodLabels, &["app=web"], &["tier=back"]));
        assert!(ok(K8sPodLabels, &["app=w*"], &["app=*b"]));
        assert!(!ok(
            K8sPodLabels,
            &["app=web", "tier=back"],
            &["tier=front"]
        ));
    }

    #[test]
    fn k8s_problems() {
        use CgroupAttr::*;
        for (a, atom) in [
            (K8sNamespace, "payments"),
            (K8sNamespace, "team-*"),
            (K8sNamespace, "*"),
            (K8sServiceAccount, "api"),
            (K8sServiceAccount, "system.api-1"),
            (K8sServiceAccount, "*.api"),
            (K8sContainer, "app-2"),
            (K8sPodLabels, "app=web"),
            (K8sPodLabels, "app.kubernetes.io/name=Web_1.x"),
            (K8sPodLabels, "a="),
            (K8sPodLabels, "A_b.c=*"),
        ] {
            assert_eq!(a.problem(atom), None, "{a:?} {atom}");
        }
        for (a, atom, needle) in [
            (K8sNamespace, "Payments", "upper-case"),
            (K8sNamespace, "pay.ments", "'.'"),
            (K8sNamespace, "pay-", "ends with '-'"),
            (K8sNamespace, "", "is empty"),
            (K8sServiceAccount, "api.", "empty part"),
            (K8sServiceAccount, "a_b", "'_'"),
            (K8sContainer, "-x", "starts with '-'"),
            (K8sPodLabels, "app", "KEY=GLOB"),
            (K8sPodLabels, "/app=x", "prefix"),
            (K8sPodLabels, "a/b/c=x", "'/'"),
            (K8sPodLabels, "app*=x", "exact"),
            (K8sPodLabels, "app=x=y", "'='"),
            (K8sPodLabels, "app=-x", "starts with '-'"),
        ] {
            let msg = a.problem(atom);
            assert!(
                msg.as_deref().is_some_and(|m| m.contains(needle)),
                "{a:?} {atom}: {msg:?}"
            );
        }
        let long = format!("x={}", "v".repeat(64));
        assert!(
            K8sPodLabels
                .problem(&long)
                .is_some_and(|m| m.contains("63"))
        );
        let long_sa = ["a"; 130].join(".");
        assert!(
            K8sServiceAccount
                .problem(&long_sa)
                .is_some_and(|m| m.contains("253"))
        );
    }
}

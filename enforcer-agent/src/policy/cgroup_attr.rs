//! Selectors over attributes of a process's cgroup.
//!
//! The kernel never sees these attributes: the agent derives each from the cgroup (today from
//! its path; pod metadata is the next provider) and folds every selector that holds into the
//! cgroup's class, so the connect path keeps one lookup by cgroup id. Adding an attribute is
//! one variant here, one `MatchEntry` field and one YAML key.

use super::MatchEntry;
use super::glob::{cgroup_glob_match, glob_problem};

/// An attribute of a cgroup that a `match` entry can select on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CgroupAttr {
    /// `cgroup: [GLOB]`: the cgroup v2 path itself.
    Path,
    /// `systemdUnit: [GLOB]`: the systemd unit that owns the cgroup ([`systemd_unit`]).
    SystemdUnit,
}

impl CgroupAttr {
    pub const ALL: [CgroupAttr; 2] = [CgroupAttr::Path, CgroupAttr::SystemdUnit];

    /// The `match` key in the policy YAML.
    pub const fn key(self) -> &'static str {
        match self {
            CgroupAttr::Path => "cgroup",
            CgroupAttr::SystemdUnit => "systemdUnit",
        }
    }

    /// An example value, for messages.
    pub const fn example(self) -> &'static str {
        match self {
            CgroupAttr::Path => "\"/system.slice/app.service\"",
            CgroupAttr::SystemdUnit => "\"nginx.service\"",
        }
    }

    /// Why `glob` is not a valid glob on this attribute, if it is not.
    pub fn problem(self, glob: &str) -> Option<String> {
        match self {
            CgroupAttr::Path => glob_problem(glob),
            CgroupAttr::SystemdUnit => unit_glob_problem(glob),
        }
    }

    /// The entry's globs on this attribute (empty: the entry does not constrain it).
    pub fn globs(self, e: &MatchEntry) -> &[String] {
        match self {
            CgroupAttr::Path => &e.cgroup,
            CgroupAttr::SystemdUnit => &e.systemd_unit,
        }
    }

    /// The entry's globs on this attribute, to fill in.
    pub fn globs_mut(self, e: &mut MatchEntry) -> &mut Vec<String> {
        match self {
            CgroupAttr::Path => &mut e.cgroup,
            CgroupAttr::SystemdUnit => &mut e.systemd_unit,
        }
    }

    /// The attribute's value for a cgroup path (relative to the cgroup2 root); `None` when the
    /// cgroup has none (then no selector on it holds).
    pub fn value(self, cgroup_path: &str) -> Option<&str> {
        match self {
            CgroupAttr::Path => Some(cgroup_path),
            CgroupAttr::SystemdUnit => systemd_unit(cgroup_path),
        }
    }

    /// Does `glob` on this attribute hold for the cgroup at `cgroup_path`?
    pub fn matches(self, glob: &str, cgroup_path: &str) -> bool {
        // A unit name is one path segment, so the cgroup glob (`*` within a segment) is the
        // glob of unit names too.
        self.value(cgroup_path)
            .is_some_and(|v| cgroup_glob_match(glob, v))
    }
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
        let m = |g, p| CgroupAttr::SystemdUnit.matches(g, p);
        assert!(m("nginx.service", "/system.slice/nginx.service"));
        assert!(m("nginx.service", "/system.slice/nginx.service/worker"));
        assert!(m("nginx*.service", "/system.slice/nginx-2.service"));
        assert!(m("*.service", "/system.slice/x.service"));
        assert!(!m("*.service", "/system.slice/x.scope"));
        assert!(!m("nginx.service", "/system.slice/apache.service"));
        assert!(!m("*", "/system.slice"));
        assert!(CgroupAttr::Path.matches("/system.slice/**", "/system.slice/x.service"));
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
}

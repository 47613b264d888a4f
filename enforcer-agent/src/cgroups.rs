//! The cgroup registry: cgroup id -> path of every cgroup the agent has given the kernel a
//! class for. A cgroup that is removed leaves it, and the caller removes it from the kernel's
//! `ENF_CGROUPS` too, so churn (pods, transient units) never fills the map.
//!
//! Pure: whether a cgroup still exists is asked of a function (the agent stats the path under
//! the cgroup2 mount; unit tests pass a table).

use std::collections::HashMap;

#[derive(Default)]
pub struct CgroupRegistry {
    paths: HashMap<u64, String>,
}

impl CgroupRegistry {
    pub fn get(&self, id: u64) -> Option<&str> {
        self.paths.get(&id).map(String::as_str)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.paths.contains_key(&id)
    }

    pub fn insert(&mut self, id: u64, path: &str) {
        if self.paths.get(&id).is_none_or(|p| p != path) {
            self.paths.insert(id, path.to_string());
        }
    }

    pub fn remove(&mut self, id: u64) -> Option<String> {
        self.paths.remove(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.paths.iter().map(|(&id, p)| (id, p.as_str()))
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Removes every cgroup that no longer exists and returns their ids. `id_of(path)` is the
    /// id of the cgroup at `path` now (None: no such cgroup); a path that now holds another
    /// cgroup (removed and created again) counts as removed.
    pub fn sweep(&mut self, id_of: impl Fn(&str) -> Option<u64>) -> Vec<u64> {
        let gone: Vec<u64> = self
            .paths
            .iter()
            .filter(|(id, p)| id_of(p) != Some(**id))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.paths.remove(id);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_or_recreated_cgroup_leaves_the_registry() {
        let mut r = CgroupRegistry::default();
        r.insert(10, "/a");
        r.insert(11, "/a/b");
        r.insert(12, "/c");
        let now: HashMap<&str, u64> = HashMap::from([("/a", 10), ("/c", 99)]);
        let mut gone = r.sweep(|p| now.get(p).copied());
        gone.sort_unstable();
        assert_eq!(gone, vec![11, 12], "/a/b removed, /c created again");
        assert_eq!(r.get(10), Some("/a"));
        assert!(!r.contains(11) && !r.contains(12));
        assert_eq!(r.len(), 1);
        assert!(r.sweep(|p| now.get(p).copied()).is_empty());
    }
}

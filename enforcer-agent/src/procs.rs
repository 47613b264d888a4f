//! The process table: every process the agent tracks, with the facts its identity comes from.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use crate::{
    exes::Exe,
    k8s::PodMeta,
    policy::{CgroupFacts, ProcessFacts},
};

/// One process the agent tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub exe_id: u32,
    pub cgroup: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Default)]
pub struct ProcessTable {
    procs: HashMap<u32, Tracked>,
    /// Why the identity of a process is withheld (the loader variable the kernel or the
    /// agent found at its exec), for events and `identities`.
    withheld: HashMap<u32, Cow<'static, str>>,
    /// The preloads granted to a process at its exec (`preload:`), for `identities`.
    granted: HashMap<u32, String>,
}

impl Tracked {
    /// What [`crate::policy::resolve`] needs of this process and its executable.
    pub(crate) fn facts<'a>(&'a self, exe: &'a Exe, pod: Option<&'a PodMeta>) -> ProcessFacts<'a> {
        ProcessFacts {
            sha256: Some(&exe.sha256),
            exe_path: Some(&exe.path),
            cgroup: Some(CgroupFacts {
                path: &self.cgroup,
                pod,
            }),
            uid: self.uid,
        }
    }
}

impl ProcessTable {
    pub fn get(&self, pid: u32) -> Option<&Tracked> {
        self.procs.get(&pid)
    }

    pub fn insert(&mut self, pid: u32, t: Tracked) {
        self.procs.insert(pid, t);
    }

    /// A fork: the child has its parent's facts (when the parent is tracked).
    pub fn fork(&mut self, parent: u32, child: u32) {
        if let Some(t) = self.procs.get(&parent).cloned() {
            self.procs.insert(child, t);
        }
        match self.withheld.get(&parent).cloned() {
            Some(r) => self.withheld.insert(child, r),
            None => self.withheld.remove(&child),
        };
        match self.granted.get(&parent).cloned() {
            Some(g) => self.granted.insert(child, g),
            None => self.granted.remove(&child),
        };
    }

    pub fn exit(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.withheld.remove(&pid);
        self.granted.remove(&pid);
    }

    /// Records (or clears, with `None`) why the identity of `pid` is withheld since its exec.
    pub fn set_withheld(&mut self, pid: u32, reason: Option<&'static str>) {
        match reason {
            Some(r) => self.withheld.insert(pid, Cow::Borrowed(r)),
            None => self.withheld.remove(&pid),
        };
    }

    /// [`ProcessTable::set_withheld`] with a reason made at run time (a preload refused).
    pub fn set_withheld_why(&mut self, pid: u32, reason: String) {
        self.withheld.insert(pid, Cow::Owned(reason));
    }

    /// Why the identity of `pid` is withheld, when the agent saw it.
    pub fn withheld(&self, pid: u32) -> Option<&str> {
        self.withheld.get(&pid).map(|r| r.as_ref())
    }

    /// Records (or clears, with `None`) the preloads granted to `pid` at its exec.
    pub fn set_granted(&mut self, pid: u32, granted: Option<String>) {
        match granted {
            Some(g) => self.granted.insert(pid, g),
            None => self.granted.remove(&pid),
        };
    }

    /// The preloads granted to `pid` at its exec, if any.
    pub fn granted(&self, pid: u32) -> Option<&str> {
        self.granted.get(&pid).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Tracked)> {
        self.procs.iter().map(|(&pid, t)| (pid, t))
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Exe ids of the tracked processes.
    pub fn exe_ids(&self) -> HashSet<u32> {
        self.procs.values().map(|t| t.exe_id).collect()
    }

    /// Drops processes for which `alive(pid)` is false (their exit event was lost). Returns
    /// how many were dropped.
    pub fn sweep(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        let before = self.procs.len();
        self.procs.retain(|&pid, _| alive(pid));
        before - self.procs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(exe_id: u32) -> Tracked {
        Tracked {
            exe_id,
            cgroup: "/a".into(),
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn fork_exit_and_sweep() {
        let mut p = ProcessTable::default();
        p.insert(1, t(5));
        p.fork(1, 2);
        p.fork(3, 4); // untracked parent: nothing
        assert_eq!(p.get(2), Some(&t(5)));
        assert!(p.get(4).is_none());
        p.insert(6, t(7));
        assert_eq!(p.exe_ids(), HashSet::from([5, 7]));
        p.exit(1);
        assert_eq!(p.len(), 2);
        assert_eq!(p.sweep(|pid| pid != 6), 1);
        assert_eq!(p.exe_ids(), HashSet::from([5]));
    }
}

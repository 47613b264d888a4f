//! Container cgroups whose pod metadata the agent is still waiting for.
//!
//! When the policy has `k8s:` selectors, a container's cgroup gets no class until its pod is
//! known: processes that exec there stay pending (the kernel holds them at exec in an enforced
//! scope, and a pending process's connects are denied), so no pod process is ever judged on
//! missing metadata. This registry remembers, per container id, which cgroups and held
//! processes wait for it, when the runtime was asked, and hands them back when the answer
//! comes (or when a held process has waited too long: it goes on, still pending, so denied).
//!
//! Pure: the daemon asks the runtime and writes the kernel.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How long a process held at exec waits for its pod's metadata before it goes on (pending:
/// its connects are denied until the metadata comes).
pub const HOLD_LIMIT: Duration = Duration::from_secs(3);
/// How often the runtime is asked again about a container it has not answered for.
pub const ASK_AGAIN: Duration = Duration::from_secs(5);

/// What waits for one container's metadata.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub since: Instant,
    asked: Instant,
    /// cgroup id -> path.
    pub cgroups: BTreeMap<u64, String>,
    /// (pid, start_ns) of processes held at exec.
    pub held: Vec<(u32, u64)>,
}

#[derive(Debug, Default)]
pub struct PendingContainers {
    by_id: HashMap<String, Waiting>,
}

impl PendingContainers {
    /// Records that the cgroup `cg` (at `path`) waits for container `id`. True when the
    /// runtime must be asked now (the first wait for this container).
    pub fn wait(&mut self, id: &str, cg: u64, path: &str, now: Instant) -> bool {
        let mut first = false;
        let w = self.by_id.entry(id.to_string()).or_insert_with(|| {
            first = true;
            Waiting {
                since: now,
                asked: now,
                cgroups: BTreeMap::new(),
                held: Vec::new(),
            }
        });
        w.cgroups.insert(cg, path.to_string());
        first
    }

    /// A process held at exec in a cgroup that waits for container `id` stays held: true,
    /// unless the container has waited `limit` already (then it goes on at once: false).
    pub fn hold(
        &mut self,
        id: &str,
        pid: u32,
        start_ns: u64,
        now: Instant,
        limit: Duration,
    ) -> bool {
        match self.by_id.get_mut(id) {
            Some(w) if now.duration_since(w.since) < limit => {
                if !w.held.iter().any(|(p, _)| *p == pid) {
                    w.held.push((pid, start_ns));
                }
                true
            }
            _ => false,
        }
    }

    /// True when the cgroup waits for its container's pod.
    pub fn has_cgroup(&self, cg: u64) -> bool {
        self.by_id.values().any(|w| w.cgroups.contains_key(&cg))
    }

    /// The container's metadata came: everything that waited for it.
    pub fn take(&mut self, id: &str) -> Option<Waiting> {
        self.by_id.remove(id)
    }

    /// Held processes that waited longer than `limit`: they go on (still pending). Their
    /// cgroups keep waiting.
    pub fn overdue(&mut self, now: Instant, limit: Duration) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for w in self.by_id.values_mut() {
            if now.duration_since(w.since) >= limit {
                out.append(&mut w.held);
            }
        }
        out
    }

    /// Containers to ask the runtime about again (no answer for `every`).
    pub fn ask_again(&mut self, now: Instant, every: Duration) -> Vec<String> {
        let mut out = Vec::new();
        for (id, w) in &mut self.by_id {
            if now.duration_since(w.asked) >= every {
                w.asked = now;
                out.push(id.clone());
            }
        }
        out.sort();
        out
    }

    /// Forgets cgroups that no longer exist; a container with none left stops waiting.
    pub fn forget_cgroups(&mut self, gone: &[u64]) {
        for w in self.by_id.values_mut() {
            for id in gone {
                w.cgroups.remove(id);
            }
        }
        self.by_id
            .retain(|_, w| !w.cgroups.is_empty() || !w.held.is_empty());
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// How long the oldest container has waited.
    pub fn oldest(&self, now: Instant) -> Option<Duration> {
        self.by_id
            .values()
            .map(|w| now.duration_since(w.since))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_is_asked_about_once_and_hands_back_what_waited() {
        let t0 = Instant::now();
        let mut p = PendingContainers::default();
        assert!(p.wait("c1", 10, "/kubepods/pod1/c1", t0), "first wait asks");
        assert!(
            !p.wait("c1", 11, "/kubepods/pod1/c1/sub", t0),
            "second does not"
        );
        assert!(p.hold("c1", 100, 7, t0, HOLD_LIMIT));
        assert!(
            p.hold("c1", 100, 7, t0, HOLD_LIMIT),
            "holding twice keeps one entry"
        );
        assert!(
            !p.hold("c2", 101, 8, t0, HOLD_LIMIT),
            "nothing waits for c2"
        );
        assert!(
            !p.hold("c1", 102, 9, t0 + HOLD_LIMIT, HOLD_LIMIT),
            "past the limit a process goes on at once"
        );
        assert!(p.has_cgroup(11) && !p.has_cgroup(12));
        let w = p.take("c1").expect("c1 waits");
        assert_eq!(w.cgroups.keys().copied().collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(w.held, vec![(100, 7)]);
        assert!(p.is_empty());
    }

    #[test]
    fn held_processes_go_on_after_the_limit_and_the_cgroup_keeps_waiting() {
        let t0 = Instant::now();
        let mut p = PendingContainers::default();
        p.wait("c1", 10, "/p/c1", t0);
        p.hold("c1", 100, 7, t0, HOLD_LIMIT);
        assert!(
            p.overdue(t0 + Duration::from_secs(1), HOLD_LIMIT)
                .is_empty()
        );
        assert_eq!(p.overdue(t0 + HOLD_LIMIT, HOLD_LIMIT), vec![(100, 7)]);
        assert!(
            p.overdue(t0 + HOLD_LIMIT, HOLD_LIMIT).is_empty(),
            "released once"
        );
        assert_eq!(p.len(), 1, "the cgroup still waits");
        assert!(
            p.ask_again(t0 + Duration::from_secs(1), ASK_AGAIN)
                .is_empty()
        );
        assert_eq!(
            p.ask_again(t0 + ASK_AGAIN, ASK_AGAIN),
            vec!["c1".to_string()]
        );
        assert!(
            p.ask_again(t0 + ASK_AGAIN, ASK_AGAIN).is_empty(),
            "asked again once"
        );
        p.forget_cgroups(&[10]);
        assert!(p.is_empty(), "its only cgroup is gone");
    }
}

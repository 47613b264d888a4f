//! Liveness and readiness of the agent, served as `GET /healthz` and `GET /readyz` next to
//! `/metrics` (see [`crate::metrics`]).
//!
//! - `/healthz`: the event loop ticked within [`LIVENESS_STALE`]. It depends on nothing
//!   outside the agent (no API server, no container runtime), so a liveness probe built on it
//!   restarts only an agent whose loop is stuck.
//! - `/readyz`: the programs are attached, a policy is in force, and the kernel maps held
//!   what the agent compiled at the last check. The daemon computes this in its housekeeping
//!   ([`Health::set_readiness`]); a probe only reads the last result, it never reads a map.
//!
//! Both answer 200 `ok`, or 503 with one line saying why not.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// `/healthz` fails when the event loop has not ticked for this long (it ticks every 500 ms).
pub const LIVENESS_STALE: Duration = Duration::from_secs(10);

/// What the daemon found at its last readiness check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// A policy was applied and its generation is the one the programs judge with.
    pub policy_applied: bool,
    /// Program links that should be pinned and are not (e.g. `connect4 on /kubepods.slice`).
    pub missing_links: Vec<String>,
    /// Differences between the kernel maps and the compiled policy at the last check.
    pub drift: Vec<String>,
}

impl Readiness {
    /// None when ready; else one line saying why not (the first thing missing, most basic first).
    pub fn reason(&self) -> Option<String> {
        if !self.policy_applied {
            return Some("not ready: no policy is in force yet".into());
        }
        if let Some(first) = self.missing_links.first() {
            return Some(format!(
                "not ready: {} program link(s) not attached, first {first}; \
                 see `enforcer-agent status`",
                self.missing_links.len()
            ));
        }
        if let Some(first) = self.drift.first() {
            return Some(format!(
                "not ready: the kernel maps differ from the policy in force ({} difference(s), \
                 first: {first}); see `enforcer-agent status`, the next apply rewrites them",
                self.drift.len()
            ));
        }
        None
    }
}

#[derive(Debug)]
struct Inner {
    born: Instant,
    /// Milliseconds after `born` of the last tick of the event loop.
    last_tick_ms: AtomicU64,
    /// None until the daemon's first check.
    readiness: Mutex<Option<Readiness>>,
}

/// Liveness and readiness, shared between the event loop (writer) and the HTTP endpoint
/// (reader). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                born: Instant::now(),
                last_tick_ms: AtomicU64::new(0),
                readiness: Mutex::new(None),
            }),
        }
    }

    /// The event loop is alive now.
    pub fn tick(&self) {
        let ms = self.inner.born.elapsed().as_millis() as u64;
        self.inner.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Records the result of a readiness check.
    pub fn set_readiness(&self, r: Readiness) {
        // A poisoned lock only means a writer panicked mid-store; the value is still whole.
        *self
            .inner
            .readiness
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// Ok, or why the agent is not live.
    pub fn live(&self) -> Result<(), String> {
        self.live_at(self.inner.born.elapsed())
    }

    fn live_at(&self, now: Duration) -> Result<(), String> {
        let last = Duration::from_millis(self.inner.last_tick_ms.load(Ordering::Relaxed));
        let age = now.saturating_sub(last);
        if age > LIVENESS_STALE {
            return Err(format!(
                "not live: the event loop last ticked {:.1}s ago (limit {}s)",
                age.as_secs_f64(),
                LIVENESS_STALE.as_secs()
            ));
        }
        Ok(())
    }

    /// Ok, or why the agent is not ready.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        let r = self
            .inner
            .readiness
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match r.as_ref() {
            None => Err("not ready: the agent is starting".into()),
            Some(r) => r.reason().map_or(Ok(()), Err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_what_is_missing_most_basic_first() {
        let ok = Readiness {
            policy_applied: true,
            missing_links: vec![],
            drift: vec![],
        };
        assert_eq!(ok.reason(), None);

        let drift = Readiness {
            drift: vec![
                "ENF_RULES: 1 entries missing".into(),
                "ENF_IDMATCH: 2 extra".into(),
            ],
            ..ok.clone()
        };
        let why = drift.reason().expect("not ready");
        assert!(
            why.starts_with("not ready: the kernel maps differ")
                && why.contains("2 difference(s)")
                && why.contains("ENF_RULES: 1 entries missing")
                && !why.contains('\n'),
            "{why}"
        );

        let unattached = Readiness {
            missing_links: vec!["connect4 on /kubepods.slice".into()],
            ..drift.clone()
        };
        let why = unattached.reason().expect("not ready");
        assert!(
            why.contains("1 program link(s) not attached")
                && why.contains("connect4 on /kubepods.slice"),
            "{why}"
        );

        let nothing = Readiness {
            policy_applied: false,
            ..unattached
        };
        assert_eq!(
            nothing.reason().as_deref(),
            Some("not ready: no policy is in force yet")
        );
    }

    #[test]
    fn live_while_ticking_not_ready_until_checked() {
        let h = Health::new();
        h.tick();
        assert_eq!(h.live(), Ok(()));
        assert_eq!(
            h.ready(),
            Err("not ready: the agent is starting".to_string())
        );
        h.set_readiness(Readiness {
            policy_applied: true,
            ..Readiness::default()
        });
        assert_eq!(h.ready(), Ok(()));

        // A loop that stopped ticking is neither live nor ready.
        let later = Duration::from_millis(h.inner.last_tick_ms.load(Ordering::Relaxed))
            + LIVENESS_STALE
            + Duration::from_secs(1);
        let why = h.live_at(later).expect_err("stale");
        assert!(
            why.starts_with("not live: the event loop last ticked 11.0s ago"),
            "{why}"
        );
    }
}

//! The agent's side of pod metadata: a container cgroup is classified with its pod's facts;
//! when the policy has `k8s` selectors and the pod is not known yet, the cgroup waits (no
//! class: processes there stay pending, held at exec) until the runtime answers.

use std::time::Instant;

use anyhow::Result;
use enforcer_common::{Event, EventKind, PROC_HELD, PROC_PENDING};

use super::{Agent, resume};
use crate::k8s::feed::PodUpdate;
use crate::k8s::{PodMeta, cgroup_path};
use crate::pods::{ASK_AGAIN, HOLD_LIMIT};
use crate::policy::CgroupFacts;

/// A container cgroup whose pod the agent does not know yet while the policy selects by pod.
#[derive(Debug, thiserror::Error)]
#[error(
    "waiting for the pod metadata of container {container} (cgroup {path}); its processes stay pending until the container runtime answers"
)]
pub struct WaitingForPod {
    pub container: String,
    pub path: String,
}

/// What the agent knows of its metadata sources, for `status`.
#[derive(Debug, Default, Clone)]
pub struct K8sHealth {
    /// `containerd v1.6.20 at /run/containerd/containerd.sock` while connected.
    pub cri: Option<String>,
    /// Why the runtime cannot be reached (said once per change in the log).
    pub cri_down: Option<String>,
    /// The API-server watch (`None`: not configured, no `--kube-node`).
    pub api: Option<crate::k8s::api::ApiStatus>,
}

/// The pod a cgroup belongs to, as far as the agent knows.
pub(crate) enum PodOf {
    /// Not a container cgroup (or a container the runtime does not know).
    NotPod,
    Known(PodMeta),
    /// A container whose pod is not known yet.
    Unknown(String),
}

impl Agent {
    pub(crate) fn pod_of(&self, path: &str) -> PodOf {
        let Some(c) = cgroup_path::parse(path) else {
            return PodOf::NotPod;
        };
        if c.pod_uid.is_none() {
            // A container outside any kubelet's tree (plain Docker or containerd).
            return PodOf::NotPod;
        }
        match self.pods.meta(&c.id) {
            Some(m) => PodOf::Known(m),
            None if self.not_pods.contains(&c.id) => PodOf::NotPod,
            None => PodOf::Unknown(c.id),
        }
    }

    /// Writes the class of cgroup `id` at `path` in the generation in force, with its pod.
    /// When the policy selects by pod and the pod is not known yet: the runtime is asked, the
    /// cgroup waits, and this fails with [`WaitingForPod`] (unless the kernel already has a
    /// class for it: that one stays until the answer re-classifies it).
    pub(crate) fn classify_cgroup(&mut self, id: u64, path: &str) -> Result<()> {
        let pod = match self.pod_of(path) {
            PodOf::NotPod => None,
            PodOf::Known(m) => Some(m),
            PodOf::Unknown(container) if self.in_force.classes.uses_k8s() => {
                if self.waiting.wait(&container, id, path, Instant::now())
                    && let Some(feed) = &self.feed
                {
                    feed.ask(&container);
                }
                if self.kernel.knows_cgroup(id) {
                    return Ok(());
                }
                return Err(WaitingForPod {
                    container,
                    path: path.to_string(),
                }
                .into());
            }
            PodOf::Unknown(_) => None,
        };
        let class = self.in_force.classes.cg_class(&CgroupFacts {
            path,
            pod: pod.as_ref(),
        });
        self.sync_idmatch()?;
        self.kernel
            .set_cgroup_class(self.in_force.generation, id, class)?;
        Ok(())
    }

    /// A process held at exec whose cgroup waits for its pod: it stays held until the answer
    /// (or [`HOLD_LIMIT`]). False when it must go on now.
    pub(crate) fn keep_held(&mut self, err: &anyhow::Error, pid: u32, start_ns: u64) -> bool {
        match err.downcast_ref::<WaitingForPod>() {
            Some(w) => self
                .waiting
                .hold(&w.container, pid, start_ns, Instant::now(), HOLD_LIMIT),
            None => false,
        }
    }

    /// Re-classifies the cgroups of these containers (their pod facts changed) and lets what
    /// waited for them go on.
    fn pods_changed(&mut self, containers: &[String]) {
        let wanted: std::collections::HashSet<&str> =
            containers.iter().map(String::as_str).collect();
        let mut cgs: Vec<(u64, String)> = Vec::new();
        let mut held = Vec::new();
        for c in containers {
            if let Some(w) = self.waiting.take(c) {
                if !w.held.is_empty() {
                    // `cargo xtask bench` reads this: what a held first exec waited for.
                    tracing::debug!(
                        container = %c,
                        held = w.held.len(),
                        waited_us = w.since.elapsed().as_micros() as u64,
                        "pod metadata came for held processes"
                    );
                }
                cgs.extend(w.cgroups);
                held.extend(w.held);
            }
        }
        // Cgroups of these containers the kernel already has a class for.
        for (id, path) in self.cgroups.iter() {
            if cgroup_path::parse(path).is_some_and(|c| wanted.contains(c.id.as_str()))
                && !cgs.iter().any(|(x, _)| *x == id)
            {
                cgs.push((id, path.to_string()));
            }
        }
        for (id, path) in cgs {
            self.cgroups.insert(id, &path);
            if let Err(e) = self.classify_cgroup(id, &path) {
                tracing::warn!(cgroup = %path, "classifying a container cgroup: {e:#}");
            }
        }
        for (pid, start_ns) in held {
            self.settle_held(pid, start_ns);
        }
    }

    /// Attests a process that was held for its pod's metadata and lets it go on.
    fn settle_held(&mut self, pid: u32, start_ns: u64) {
        let ev = Event {
            kind: EventKind::Exec as u32,
            tgid: pid,
            start_ns,
            flags: PROC_PENDING | PROC_HELD,
            ..Default::default()
        };
        self.on_exec(&ev);
    }

    /// One update from the metadata task.
    pub(crate) fn on_pod_update(&mut self, u: PodUpdate) {
        match u {
            PodUpdate::Container { id, meta } => {
                match meta {
                    Some(m) => self.pods.insert_container(&id, m),
                    None => {
                        tracing::debug!(container = %id, "the container runtime does not know this container; no k8s selector holds for it");
                        self.not_pods.insert(id.clone());
                    }
                }
                self.pods_changed(&[id]);
            }
            PodUpdate::Listed(all) => {
                let ids: Vec<String> = all.iter().map(|(id, _)| id.clone()).collect();
                for (id, m) in all {
                    self.pods.insert_container(&id, m);
                }
                tracing::info!(
                    containers = ids.len(),
                    "listed the container runtime's containers"
                );
                self.pods_changed(&ids);
            }
            PodUpdate::CriUp { socket, runtime } => {
                tracing::info!(%socket, %runtime, "container runtime connected (pod metadata)");
                self.k8s_health.cri = Some(format!("{runtime} at {socket}"));
                self.k8s_health.cri_down = None;
                // Ask again about everything that waits.
                self.pods_tick_ask_all();
            }
            PodUpdate::CriDown { error } => {
                if self.in_force.classes.uses_k8s() {
                    tracing::warn!(
                        "container runtime unreachable: {error}; processes in containers whose pod is not known stay pending (denied in enforce mode) until it answers"
                    );
                } else {
                    tracing::info!("no container runtime for pod metadata: {error}");
                }
                self.k8s_health.cri = None;
                self.k8s_health.cri_down = Some(error);
            }
            PodUpdate::Api(ev) => {
                let changed = self.pods.apply_event(ev);
                self.pods_changed(&changed);
            }
            PodUpdate::ApiStatus(s) => {
                match &s {
                    crate::k8s::api::ApiStatus::NotConnected { error } => {
                        let sa = if self.in_force.classes.uses_service_account() {
                            "; serviceAccount selectors cannot match pods whose account is not known"
                        } else {
                            ""
                        };
                        tracing::warn!("Kubernetes API server: {error}{sa}");
                    }
                    other => tracing::info!("Kubernetes API server: {other}"),
                }
                self.k8s_health.api = Some(s);
            }
        }
    }

    /// Every tick: held processes that waited too long go on (still pending: denied), and the
    /// runtime is asked again about containers it has not answered for.
    pub(crate) fn pods_tick(&mut self) {
        let now = Instant::now();
        for (pid, start_ns) in self.waiting.overdue(now, HOLD_LIMIT) {
            tracing::warn!(
                pid,
                "no pod metadata after {} s; the process goes on with no identity (its connects are denied in enforce mode) until the metadata comes",
                HOLD_LIMIT.as_secs()
            );
            if let Err(e) = resume(pid, start_ns) {
                tracing::debug!(pid, "could not resume a held process: {e:#}");
            }
        }
        let again = self.waiting.ask_again(now, ASK_AGAIN);
        if let Some(feed) = &self.feed {
            for id in again {
                feed.ask(&id);
            }
        }
    }

    /// Asks the runtime about every container that waits (once the task runs).
    pub(crate) fn pods_tick_ask_all(&mut self) {
        let ids = self
            .waiting
            .ask_again(Instant::now(), std::time::Duration::ZERO);
        if let Some(feed) = &self.feed {
            for id in ids {
                feed.ask(&id);
            }
        }
    }

    /// After a sweep: containers whose cgroups are all gone leave the directory.
    pub(crate) fn pods_forget(&mut self, gone: &[u64]) {
        self.waiting.forget_cgroups(gone);
        if gone.is_empty() {
            return;
        }
        let live: std::collections::HashSet<String> = self
            .cgroups
            .iter()
            .filter_map(|(_, p)| cgroup_path::parse(p).map(|c| c.id))
            .collect();
        self.pods.retain_containers(|id| live.contains(id));
        self.not_pods.retain(|id| live.contains(id));
    }
}

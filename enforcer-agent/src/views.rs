//! What the API asks of the agent (`status`, `identities`, `explain`) and the record of each
//! decision, answered from a [`View`]: read-only borrows of its components and the kernel maps.
//! Nothing here changes state; `policy apply` and following events are the daemon's.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use enforcer_common::*;

use crate::{
    api, cgroups::CgroupRegistry, events::EventSink, exes::ExeRegistry, in_force::InForce,
    kernel::Kernel, policy, probe::Probe, procs::ProcessTable,
};

/// Window of the coverage report (connections with no identity).
pub const UNCOVERED_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Read-only borrows of the agent's components: everything the API's answers and the event
/// records read, nothing they could change.
pub(crate) struct View<'a> {
    pub(crate) kernel: &'a Kernel,
    pub(crate) in_force: &'a InForce,
    pub(crate) exes: &'a ExeRegistry,
    pub(crate) procs: &'a ProcessTable,
    pub(crate) cgroups: &'a CgroupRegistry,
    pub(crate) sink: &'a EventSink,
    pub(crate) probe: &'a Probe,
    pub(crate) pods: &'a crate::k8s::PodDirectory,
    pub(crate) k8s_health: &'a crate::daemon::K8sHealth,
    pub(crate) waiting: &'a crate::pods::PendingContainers,
}

impl View<'_> {
    /// The decision record of one connect or socket event.
    pub(crate) fn decision(&self, ev: &Event) -> api::Decision {
        let t = self.procs.get(ev.tgid);
        let exe = t.and_then(|t| self.exes.get(t.exe_id));
        let mut d = api::Decision {
            pid: ev.tgid,
            exe: exe.map(|e| e.path.clone()),
            sha256: exe.map(|e| hex::encode(e.sha256)),
            cgroup: t.map(|t| t.cgroup.clone()),
            uid: ev.uid,
            identity: self.in_force.identity_name(ev.ident).map(str::to_string),
            verdict: verdict_name(ev.verdict).to_string(),
            rule: if ev.rule == RULE_WITHHELD {
                withheld_reason(self.procs, ev.tgid)
            } else {
                self.in_force.rule_text(ev.rule)
            },
            time_ns: ev.ktime_ns,
            ..Default::default()
        };
        if ev.kind == EventKind::Socket as u32 {
            let protocol = u32::from_ne_bytes([ev.dst[0], ev.dst[1], ev.dst[2], ev.dst[3]]);
            let kind = SocketKind::from_u32(ev.dst[4].into());
            let kind_name = kind.map_or("other", SocketKind::name);
            d.socket = Some(kind_name.to_string());
            d.family = Some(
                if ev.family == FAMILY_V6 {
                    "inet6"
                } else {
                    "inet"
                }
                .to_string(),
            );
            d.socket_type = Some(socket_type_name(ev.port.into()));
            d.protocol = ip_protocol_name(protocol);
            d.protocol_number = Some(protocol);
            if ev.rule == RULE_SOCKET_KIND {
                d.rule = if Verdict::from_raw(ev.verdict) == Verdict::Allow {
                    format!("sockets: {kind_name} (the identity's `sockets:` list)")
                } else {
                    format!("socket kind {kind_name} is not in the identity's `sockets:` list")
                };
            }
            return d;
        }
        let dst: IpAddr = if ev.family == FAMILY_V6 {
            IpAddr::from(ev.dst)
        } else {
            IpAddr::from([ev.dst[0], ev.dst[1], ev.dst[2], ev.dst[3]])
        };
        d.dst = dst.to_string();
        d.port = ev.port.into();
        d.protocol = protocol_name(ev.proto).to_string();
        if ev.flags & EVENT_ALIAS != 0 {
            // The only addresses the kernel rewrites: which one from the hook and family.
            let v6_hook = matches!(
                Hook::from_u32(ev.aux),
                Some(Hook::Connect6 | Hook::Sendmsg6)
            );
            d.written = Some(
                match (v6_hook, ev.family == FAMILY_V6) {
                    (false, _) => "0.0.0.0",
                    (true, true) => "::",
                    (true, false) => "::ffff:0.0.0.0",
                }
                .to_string(),
            );
        }
        d
    }

    /// The record of one tamper event: who (`by_*`) did what (`syscall`) to which process,
    /// and the identity that process held (now withheld).
    pub(crate) fn tamper(&self, ev: &Event) -> TamperRecord {
        let exe_of = |pid: u32| {
            self.procs
                .get(pid)
                .and_then(|t| self.exes.get(t.exe_id))
                .map(|e| (e.path.clone(), hex::encode(e.sha256)))
        };
        let target = exe_of(ev.tgid);
        let identity = self.procs.get(ev.tgid).and_then(|t| {
            let exe = self.exes.get(t.exe_id)?;
            let pod = self.pods.for_cgroup(&t.cgroup);
            let r = policy::resolve(&self.in_force.policy, &t.facts(exe, pod.as_ref()));
            self.in_force.identity_name(r.ident).map(str::to_string)
        });
        TamperRecord {
            event: "tamper",
            pid: ev.tgid,
            exe: target.as_ref().map(|t| t.0.clone()),
            sha256: target.map(|t| t.1),
            identity,
            by_pid: ev.aux,
            by_exe: exe_of(ev.aux).map(|t| t.0),
            by_uid: ev.uid,
            syscall: tamper_syscall(ev.flags),
            time_ns: ev.ktime_ns,
        }
    }

    /// Connects with no identity in the last window, by executable and cgroup, from the
    /// kernel's own tally (`ENF_UNCOVERED`).
    fn uncovered(&self) -> Vec<api::Uncovered> {
        let now_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        let window = UNCOVERED_WINDOW.as_nanos() as u64;
        let mut out: Vec<api::Uncovered> = self
            .kernel
            .uncovered()
            .into_iter()
            .filter(|(_, v)| now_ns.saturating_sub(v.last_ns) <= window)
            .map(|(k, v)| {
                let exe = self.exes.get(k.exe_id);
                let dst: IpAddr = if v.last_family == FAMILY_V6 {
                    IpAddr::from(v.last_dst)
                } else {
                    IpAddr::from([v.last_dst[0], v.last_dst[1], v.last_dst[2], v.last_dst[3]])
                };
                api::Uncovered {
                    exe: exe
                        .map(|e| e.path.clone())
                        .unwrap_or_else(|| "(not attested)".into()),
                    sha256: exe.map(|e| hex::encode(e.sha256)).unwrap_or_default(),
                    cgroup: self
                        .cgroups
                        .get(k.cgroup_id)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("cgroup id {}", k.cgroup_id)),
                    connects: v.connects,
                    destinations: vec![format!(
                        "last: {} {dst}:{}",
                        protocol_name(v.last_proto),
                        v.last_port
                    )],
                }
            })
            .collect();
        out.sort_by(|a, b| b.connects.cmp(&a.connects).then(a.exe.cmp(&b.exe)));
        out
    }

    pub(crate) fn status(&self) -> api::Status {
        let cfg = self.kernel.config().unwrap_or_default();
        let generation = cfg.active & 1;
        let g = cfg.generations[generation as usize];
        let counters = Counter::ALL
            .iter()
            .map(|&c| api::NamedCount {
                name: c.name().into(),
                value: self.kernel.counter(c),
            })
            .chain([
                // Decision lines stdout (or --events-file) did not take in time.
                api::NamedCount {
                    name: "events_dropped".into(),
                    value: self.sink.dropped(),
                },
                api::NamedCount {
                    name: "exe_ids_in_use".into(),
                    value: self.exes.len() as u64,
                },
                api::NamedCount {
                    name: "cgroups_known".into(),
                    value: self.cgroups.len() as u64,
                },
                // Live connections closed by revocation.
                api::NamedCount {
                    name: "connections_closed".into(),
                    value: self.sink.closed(),
                },
            ])
            .collect();
        let attached = self
            .kernel
            .links()
            .into_iter()
            .map(|l| {
                let (program, target) = match l.strip_prefix("tp_") {
                    Some(tp) => (program_label(tp), tp.to_string()),
                    None => {
                        let mut parts = l.trim_start_matches("cg_").splitn(2, '_');
                        let id: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let hook = parts.next().unwrap_or("?");
                        let path = self
                            .cgroups
                            .get(id)
                            .map(str::to_string)
                            .unwrap_or_else(|| format!("cgroup id {id}"));
                        (program_label(hook), path)
                    }
                };
                api::Attachment { program, target }
            })
            .collect();
        let maps = self
            .kernel
            .fill()
            .into_iter()
            .map(|(name, entries, capacity)| api::MapFill {
                name: name.into(),
                entries,
                capacity,
            })
            .collect();
        let uncovered = self.uncovered();
        api::Status {
            kernel_features: self
                .probe
                .features
                .iter()
                .map(|f| {
                    if f.found {
                        format!("{}: {}", f.name, f.detail)
                    } else {
                        format!("{}: MISSING ({}); {}", f.name, f.detail, f.without)
                    }
                })
                .collect(),
            kernel_release: self.probe.release.clone(),
            features: self
                .probe
                .features
                .iter()
                .map(|f| api::KernelFeature {
                    name: f.name.into(),
                    required: f.required,
                    found: f.found,
                    detail: f.detail.clone(),
                    without: f.without.into(),
                })
                .collect(),
            kubernetes: Some(self.kubernetes()),
            attached,
            maps,
            policy_source: self.in_force.source.clone(),
            policy_hash: self.in_force.hash.clone(),
            mode: match (g.loaded, g.mode) {
                (0, _) => "none".into(),
                (_, m) if m == Mode::Enforce as u32 => Mode::Enforce.name().into(),
                _ => Mode::Audit.name().into(),
            },
            generation,
            counters,
            drift: self.drift(generation),
            uncovered,
            uncovered_window_secs: UNCOVERED_WINDOW.as_secs(),
            events_lost: self.kernel.counter(Counter::EventsLost),
            // Filled by the agent (it holds the grants).
            grants: Vec::new(),
            timed_entries: 0,
            next_expiry: None,
            revocation: crate::revoke::status_line(
                self.probe,
                self.in_force.policy.revoke_connections,
            ),
        }
    }

    /// Differences between what the kernel holds for the generation in force and what the
    /// agent compiled (someone edited a map by hand, or a write was lost).
    pub(crate) fn drift(&self, generation: u32) -> Vec<String> {
        let mut out = Vec::new();
        match policy::rule_entries_of(
            &self.in_force.policy.rules,
            &self.in_force.listener_rules,
            generation,
            self.kernel.max_rules,
            self.in_force.clock,
        ) {
            Ok(want) => {
                let have = self.kernel.rules_of(generation);
                compare("ENF_RULES", &want, &have, &mut out);
            }
            Err(e) => out.push(format!("the policy in force no longer compiles: {e}")),
        }
        let want = policy::socket_entries(&self.in_force.policy, generation);
        let have = self.kernel.sockets_of(generation);
        compare("ENF_SOCKETS", &want, &have, &mut out);
        let want: Vec<(IdMatchKey, u32)> = self.in_force.classes.idmatch_entries(generation);
        let have = self.kernel.idmatch_of(generation);
        compare("ENF_IDMATCH", &want, &have, &mut out);
        let mut classes = self.in_force.classes.clone();
        for (id, exe) in self.exes.iter() {
            let want = classes.bin_class(&exe.sha256, Some(&exe.path));
            let have = self.kernel.bin_class(generation, id);
            if want != have {
                out.push(format!(
                    "ENF_BINCLASS: executable {} ({}) has class {have}, the policy gives {want}",
                    id, exe.path
                ));
            }
        }
        out
    }

    fn kubernetes(&self) -> api::Kubernetes {
        let h = self.k8s_health;
        let (runtime, runtime_connected) = match (&h.cri, &h.cri_down) {
            (Some(c), _) => (format!("{c} (connected)"), true),
            (None, Some(e)) => (format!("unreachable: {e}"), false),
            (None, None) => ("not asked yet".to_string(), false),
        };
        let (api_server, api_server_connected) = match &h.api {
            None => ("not configured (no --kube-node)".to_string(), false),
            Some(s) => (s.to_string(), *s == crate::k8s::api::ApiStatus::Connected),
        };
        let classes = &self.in_force.classes;
        let mut notes = Vec::new();
        if classes.uses_service_account() && !api_server_connected {
            notes.push(
                "the policy has k8s.serviceAccount selectors but the API server is not connected: they cannot match pods whose service account is not known yet (CRI never reports it)"
                    .to_string(),
            );
        }
        if classes.uses_k8s() && !runtime_connected {
            notes.push(
                "the policy has k8s selectors but the container runtime does not answer: new containers' processes stay pending (denied in enforce mode)"
                    .to_string(),
            );
        }
        api::Kubernetes {
            runtime,
            runtime_connected,
            api_server,
            api_server_connected,
            containers_known: self.pods.len() as u64,
            containers_waiting: self.waiting.len() as u64,
            notes,
        }
    }

    pub(crate) fn identities(&self) -> api::Identities {
        let mut processes: Vec<api::Process> = self
            .procs
            .iter()
            .map(|(pid, t)| {
                let exe = self.exes.get(t.exe_id);
                let pod = self.pods.for_cgroup(&t.cgroup);
                let res =
                    exe.map(|e| policy::resolve(&self.in_force.policy, &t.facts(e, pod.as_ref())));
                let kflags = self.kernel.process(pid).map_or(0, |s| s.flags);
                let pending = kflags & PROC_PENDING != 0;
                let tampered = kflags & PROC_TAMPERED != 0;
                let withheld = kflags & PROC_WITHHELD != 0;
                api::Process {
                    pid,
                    exe: exe.map(|e| e.path.clone()),
                    sha256: exe.map(|e| hex::encode(e.sha256)),
                    cgroup: Some(t.cgroup.clone()),
                    uid: t.uid,
                    gid: t.gid,
                    identity: res
                        .as_ref()
                        .filter(|_| !tampered && !withheld)
                        .and_then(|r| self.in_force.identity_name(r.ident))
                        .map(str::to_string),
                    reason: match res {
                        _ if withheld => withheld_reason(self.procs, pid),
                        Some(r) if tampered => format!(
                            "tampered: traced, memory written or descriptors taken by another process; no identity until it execs again untraced (would be: {})",
                            r.reason
                        ),
                        Some(r) => match self.procs.granted(pid) {
                            Some(g) => format!("{}; preload granted: {g}", r.reason),
                            None => r.reason,
                        },
                        None => "executable not hashed".into(),
                    },
                    tampered,
                    pending,
                    pod: pod.map(|m| format!("{}/{}/{}", m.namespace, m.pod_name, m.container)),
                }
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        api::Identities { processes }
    }

    pub(crate) fn explain(&self, r: &api::ExplainRequest) -> Result<api::Decision> {
        let dst: IpAddr = r
            .dst
            .parse()
            .with_context(|| format!("{:?} is not an IP address; pass --to ADDR:PORT", r.dst))?;
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("port {} is out of range 1-65535", r.port))?;
        let proto = match r.protocol.as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            other => bail!("protocol {other:?} is neither tcp nor udp"),
        };
        let cgroup = crate::attest::process_cgroup(r.pid)
            .with_context(|| format!("no process {} to explain", r.pid))?;
        let t = self.procs.get(r.pid);
        let exe = t.and_then(|t| self.exes.get(t.exe_id));
        let in_scope = self.in_force.policy.scope.iter().any(|s| {
            let s = s.trim_end_matches('/');
            s.is_empty() || cgroup == s || cgroup.starts_with(&format!("{s}/"))
        });
        let mut timing = None;
        let (verdict, ident, rule) = if in_scope {
            let j = self.kernel.judge(r.pid, dst, port, proto)?;
            timing = self
                .in_force
                .rule(j.rule)
                .map(|r| r.timing.clone())
                .filter(|t| t.is_timed());
            let rule = if j.rule == RULE_WITHHELD {
                withheld_reason(self.procs, r.pid)
            } else {
                self.in_force.rule_text(j.rule)
            };
            (j.verdict.name(), j.ident, rule)
        } else {
            (
                Verdict::Allow.name(),
                IDENT_NONE,
                format!(
                    "outside the enforced scope ({})",
                    self.in_force.policy.scope.join(", ")
                ),
            )
        };
        Ok(api::Decision {
            pid: r.pid,
            exe: exe.map(|e| e.path.clone()),
            sha256: exe.map(|e| hex::encode(e.sha256)),
            cgroup: Some(cgroup),
            uid: t.map(|t| t.uid).unwrap_or(0),
            identity: self.in_force.identity_name(ident).map(str::to_string),
            verdict: verdict.to_string(),
            dst: dst.to_string(),
            port: port.into(),
            protocol: protocol_name(proto).to_string(),
            rule,
            time_ns: 0,
            expires: timing
                .as_ref()
                .and_then(|t| t.expires)
                .map(crate::policy::rfc3339),
            reason: timing.as_ref().and_then(|t| t.reason.clone()),
            grant: timing.as_ref().and_then(|t| t.grant),
            ..Default::default()
        })
    }
}

fn compare<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy + std::fmt::Debug>(
    map: &str,
    want: &[(K, V)],
    have: &[(K, V)],
    out: &mut Vec<String>,
) {
    let want: std::collections::BTreeMap<K, V> = want.iter().copied().collect();
    let have: std::collections::BTreeMap<K, V> = have.iter().copied().collect();
    let missing = want.iter().filter(|(k, v)| have.get(k) != Some(v)).count();
    let extra = have.keys().filter(|k| !want.contains_key(k)).count();
    if missing + extra > 0 {
        let example = have
            .iter()
            .find(|(k, v)| want.get(k) != Some(v))
            .map(|(k, v)| format!("; e.g. {k:?} -> {v:?}"))
            .unwrap_or_default();
        out.push(format!(
            "{map}: {missing} compiled entries missing or changed, {extra} entries not in the policy{example}"
        ));
    }
}

/// A tamper event as a JSON line (`"event": "tamper"`), beside the decision lines.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct TamperRecord {
    pub(crate) event: &'static str,
    /// The process tampered with.
    pub(crate) pid: u32,
    pub(crate) exe: Option<String>,
    pub(crate) sha256: Option<String>,
    /// The identity it held, now withheld.
    pub(crate) identity: Option<String>,
    /// The process that did it.
    pub(crate) by_pid: u32,
    pub(crate) by_exe: Option<String>,
    pub(crate) by_uid: u32,
    pub(crate) syscall: &'static str,
    pub(crate) time_ns: u64,
}

/// Name of the syscall a tamper event reports (x86_64 numbers).
fn tamper_syscall(nr: u32) -> &'static str {
    match nr {
        101 => "ptrace",
        311 => "process_vm_writev",
        438 => "pidfd_getfd",
        257 => "open /proc/PID/mem for writing",
        _ => "unknown",
    }
}

fn protocol_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "other",
    }
}

/// `status`'s name of the program attached at `attach` (a cgroup hook or a tracepoint), from
/// the program table: `cgroup/connect4`, `raw_tracepoint/sched_process_exec`.
fn program_label(attach: &str) -> String {
    match PROGRAMS.iter().find(|p| p.kind.attach_point() == attach) {
        Some(p) => format!("{}/{attach}", p.kind.section()),
        None => format!("unknown/{attach}"),
    }
}

/// The name of a verdict read back from the kernel (anything unknown is a deny).
/// `SOCK_*` names of a socket type.
fn socket_type_name(t: u32) -> String {
    match t {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        4 => "rdm".into(),
        5 => "seqpacket".into(),
        6 => "dccp".into(),
        10 => "packet".into(),
        t => t.to_string(),
    }
}

/// IP protocol names (`/etc/protocols`) of the protocols a socket event may carry.
fn ip_protocol_name(p: u32) -> String {
    match p {
        0 => "ip".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        255 => "raw".into(),
        256 => "smc".into(),
        262 => "mptcp".into(),
        p => p.to_string(),
    }
}

fn verdict_name(v: u32) -> &'static str {
    Verdict::from_raw(v).name()
}

/// What the user reads for a process whose identity is withheld: the loader variable found
/// at its exec (`withheld: LD_PRELOAD`).
fn withheld_reason(procs: &ProcessTable, pid: u32) -> String {
    format!(
        "withheld: {}",
        procs.withheld(pid).unwrap_or("loader environment")
    )
}

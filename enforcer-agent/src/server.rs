//! The agent's side of the API: answers `status`, `identities`, `explain`, `events` and
//! `policy apply` from the running agent's state and the kernel maps themselves.

use std::{
    collections::VecDeque, net::IpAddr, os::unix::fs::PermissionsExt as _, path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use enforcer_common::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::{
    api::{self, reply, request},
    daemon::{Agent, facts_of, hex32},
    policy,
};

/// Decisions kept for `events` without `--follow`.
const HISTORY: usize = 1000;
/// Window of the coverage report (connections with no identity).
pub const UNCOVERED_WINDOW: Duration = Duration::from_secs(600);
/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Recent decisions, live `events --follow` clients, and unattested traffic.
#[derive(Default)]
pub struct Feed {
    history: VecDeque<api::Decision>,
    followers: Vec<(std::os::unix::net::UnixStream, bool)>,
}

impl Feed {
    /// Number of live `events --follow` clients.
    pub fn followers(&self) -> usize {
        self.followers.len()
    }

    pub fn push(&mut self, d: api::Decision) {
        let frame = api::frame(&api::Reply {
            kind: Some(reply::Kind::Event(d.clone())),
        });
        // A follower that cannot take the whole frame now is dropped: the agent never waits
        // on a client.
        self.followers.retain_mut(|(s, all)| {
            if !*all && d.verdict == Verdict::Allow.name() {
                return true;
            }
            write_now(s, &frame)
        });
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(d);
    }
}

fn write_now(s: &mut std::os::unix::net::UnixStream, frame: &[u8]) -> bool {
    use std::io::Write as _;
    let mut off = 0;
    while off < frame.len() {
        match s.write(&frame[off..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => off += n,
        }
    }
    true
}

/// Binds the API socket, root-only (0600). A live agent already serving it is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent already serves {}; stop it first or pass another --api-socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale API socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(l)
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
fn verdict_name(v: u32) -> &'static str {
    Verdict::from_raw(v).name()
}

impl Agent {
    fn rule_text(&self, rule: u32) -> String {
        match rule {
            RULE_DEFAULT_DENY => "default deny (no egress entry matches)".to_string(),
            RULE_UNATTESTED => "unattested".to_string(),
            RULE_PENDING => "pending attestation".to_string(),
            RULE_UNTRACKED => "untracked process".to_string(),
            RULE_NO_CONFIG => "no policy loaded".to_string(),
            r => {
                let own = self.policy.rules.len();
                let i = r as usize;
                let rule = if i < own {
                    self.policy.rules.get(i)
                } else {
                    self.listener_rules.get(i - own)
                };
                rule.map_or_else(|| format!("rule {r}"), |r| r.text.clone())
            }
        }
    }

    /// The decision record of one connect event.
    pub(crate) fn decision(&self, ev: &Event) -> api::Decision {
        let t = self.procs.get(&ev.tgid);
        let exe = t.and_then(|t| self.exes.get(&t.exe_id));
        let dst: IpAddr = if ev.family == FAMILY_V6 {
            IpAddr::from(ev.dst)
        } else {
            IpAddr::from([ev.dst[0], ev.dst[1], ev.dst[2], ev.dst[3]])
        };
        api::Decision {
            pid: ev.tgid,
            exe: exe.map(|e| e.path.clone()),
            sha256: exe.map(|e| hex32(&e.sha256)),
            cgroup: t.map(|t| t.cgroup.clone()),
            uid: ev.uid,
            identity: self.identity_name(ev.ident).map(str::to_string),
            verdict: verdict_name(ev.verdict).to_string(),
            dst: dst.to_string(),
            port: ev.port.into(),
            protocol: protocol_name(ev.proto).to_string(),
            rule: self.rule_text(ev.rule),
            time_ns: ev.ktime_ns,
        }
    }

    /// Serves one API connection.
    pub(crate) async fn serve(&mut self, mut stream: UnixStream) {
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let _ = send(&mut stream, error(format!("bad API request: {e:#}"))).await;
                return;
            }
            Err(_) => {
                let _ = send(
                    &mut stream,
                    error("no API request within 2 s; closing".into()),
                )
                .await;
                return;
            }
        };
        let reply = match req.kind {
            None => error("empty API request: name a command".into()),
            Some(request::Kind::Status(_)) => reply::Kind::Status(self.status()),
            Some(request::Kind::Identities(_)) => reply::Kind::Identities(self.identities()),
            Some(request::Kind::Explain(r)) => match self.explain(&r) {
                Ok(d) => reply::Kind::Explain(d),
                Err(e) => error(format!("{e:#}")),
            },
            Some(request::Kind::Apply(r)) => match self.apply_request(&r) {
                Ok(a) => reply::Kind::Apply(a),
                Err(e) => error(format!(
                    "policy not applied, the policy in force is unchanged: {e:#}"
                )),
            },
            Some(request::Kind::Events(r)) => {
                for d in self
                    .feed
                    .history
                    .iter()
                    .filter(|d| r.all || d.verdict != Verdict::Allow.name())
                {
                    if send(&mut stream, reply::Kind::Event(d.clone()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if r.follow
                    && let Ok(std) = stream.into_std()
                {
                    let _ = std.set_nonblocking(true);
                    self.feed.followers.push((std, r.all));
                    self.sync_report_allow();
                }
                return;
            }
        };
        let _ = send(&mut stream, reply).await;
    }

    /// The kernel reports allowed decisions while the policy asks for it or an
    /// `events --follow --all` client listens.
    pub(crate) fn sync_report_allow(&mut self) {
        let want = self.policy.report_allow || self.feed.followers.iter().any(|(_, all)| *all);
        let Ok(mut cfg) = self.kernel.config() else {
            return;
        };
        let g = &mut cfg.generations[(cfg.active & 1) as usize];
        if (g.report_allow != 0) != want {
            g.report_allow = u32::from(want);
            if let Err(e) = self.kernel.set_config(&cfg) {
                tracing::warn!("switching allow reports: {e}");
            }
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
            .maps
            .uncovered
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| now_ns.saturating_sub(v.last_ns) <= window)
            .map(|(k, v)| {
                let exe = self.exes.get(&k.exe_id);
                let dst: IpAddr = if v.last_family == FAMILY_V6 {
                    IpAddr::from(v.last_dst)
                } else {
                    IpAddr::from([v.last_dst[0], v.last_dst[1], v.last_dst[2], v.last_dst[3]])
                };
                api::Uncovered {
                    exe: exe
                        .map(|e| e.path.clone())
                        .unwrap_or_else(|| "(not attested)".into()),
                    sha256: exe.map(|e| hex32(&e.sha256)).unwrap_or_default(),
                    cgroup: self
                        .cgroups
                        .get(&k.cgroup_id)
                        .cloned()
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

    fn status(&mut self) -> api::Status {
        let cfg = self.kernel.config().unwrap_or_default();
        let generation = cfg.active & 1;
        let g = cfg.generations[generation as usize];
        let counters = Counter::ALL
            .iter()
            .map(|&c| api::NamedCount {
                name: c.name().into(),
                value: self.kernel.counter(c),
            })
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
                            .get(&id)
                            .cloned()
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
            attached,
            maps,
            policy_source: self.policy_source.clone(),
            policy_hash: self.policy_hash.clone(),
            mode: match (g.loaded, g.mode) {
                (0, _) => "none".into(),
                (_, m) if m == Mode::Enforce as u32 => Mode::Enforce.name().into(),
                _ => Mode::Audit.name().into(),
            },
            generation,
            counters,
            drift: {
                let d = self.drift(generation);
                if !d.is_empty() {
                    self.kernel.forget_written();
                }
                d
            },
            uncovered,
            uncovered_window_secs: UNCOVERED_WINDOW.as_secs(),
            events_lost: self.kernel.counter(Counter::EventsLost),
        }
    }

    /// Differences between what the kernel holds for the generation in force and what the
    /// agent compiled (someone edited a map by hand, or a write was lost).
    fn drift(&self, generation: u32) -> Vec<String> {
        let mut out = Vec::new();
        match policy::rule_entries_of(
            &self.policy.rules,
            &self.listener_rules,
            generation,
            self.kernel.max_rules,
        ) {
            Ok(want) => {
                let have = self.kernel.rules_of(generation);
                compare("ENF_RULES", &want, &have, &mut out);
            }
            Err(e) => out.push(format!("the policy in force no longer compiles: {e}")),
        }
        let want: Vec<(IdMatchKey, u32)> = self.classes.idmatch_entries(generation);
        let have = self.kernel.idmatch_of(generation);
        compare("ENF_IDMATCH", &want, &have, &mut out);
        for (&id, exe) in &self.exes {
            let mut classes = self.classes.clone();
            let want = classes.bin_class(&exe.sha256, Some(&exe.path));
            let have = self
                .kernel
                .maps
                .binclass
                .get(&binclass_index(generation, id), 0)
                .unwrap_or(BIN_NONE);
            if want != have {
                out.push(format!(
                    "ENF_BINCLASS: executable {} ({}) has class {have}, the policy gives {want}",
                    id, exe.path
                ));
            }
        }
        out
    }

    fn identities(&self) -> api::Identities {
        let mut processes: Vec<api::Process> = self
            .procs
            .iter()
            .map(|(&pid, t)| {
                let exe = self.exes.get(&t.exe_id);
                let res = exe.map(|e| policy::resolve(&self.policy, &facts_of(e, t)));
                let pending = self
                    .kernel
                    .maps
                    .procs
                    .get(&pid, 0)
                    .is_ok_and(|s| s.flags & PROC_PENDING != 0);
                api::Process {
                    pid,
                    exe: exe.map(|e| e.path.clone()),
                    sha256: exe.map(|e| hex32(&e.sha256)),
                    cgroup: Some(t.cgroup.clone()),
                    uid: t.uid,
                    gid: t.gid,
                    identity: res
                        .as_ref()
                        .and_then(|r| self.identity_name(r.ident))
                        .map(str::to_string),
                    reason: res
                        .map(|r| r.reason)
                        .unwrap_or_else(|| "executable not hashed".into()),
                    pending,
                }
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        api::Identities { processes }
    }

    fn explain(&self, r: &api::ExplainRequest) -> Result<api::Decision> {
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
        let t = self.procs.get(&r.pid);
        let exe = t.and_then(|t| self.exes.get(&t.exe_id));
        let in_scope = self.policy.scope.iter().any(|s| {
            let s = s.trim_end_matches('/');
            s.is_empty() || cgroup == s || cgroup.starts_with(&format!("{s}/"))
        });
        let (verdict, ident, rule) = if in_scope {
            let j = self.kernel.judge(r.pid, dst, port, proto)?;
            (j.verdict.name(), j.ident, self.rule_text(j.rule))
        } else {
            (
                Verdict::Allow.name(),
                IDENT_NONE,
                format!(
                    "outside the enforced scope ({})",
                    self.policy.scope.join(", ")
                ),
            )
        };
        Ok(api::Decision {
            pid: r.pid,
            exe: exe.map(|e| e.path.clone()),
            sha256: exe.map(|e| hex32(&e.sha256)),
            cgroup: Some(cgroup),
            uid: t.map(|t| t.uid).unwrap_or(0),
            identity: self.identity_name(ident).map(str::to_string),
            verdict: verdict.to_string(),
            dst: dst.to_string(),
            port: port.into(),
            protocol: protocol_name(proto).to_string(),
            rule,
            time_ns: 0,
        })
    }

    fn apply_request(&mut self, r: &api::ApplyRequest) -> Result<api::Applied> {
        let name = if r.name.is_empty() {
            "policy"
        } else {
            r.name.as_str()
        };
        let t0 = std::time::Instant::now();
        let (p, warnings) = policy::load(name, &r.policy).map_err(anyhow::Error::new)?;
        let decode_ms = (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0;
        self.apply_from(p, Some(format!("{name} (policy apply)")))?;
        tracing::info!(policy = %name, decode_ms, "policy applied through the API");
        Ok(api::Applied {
            policy_hash: self.policy_hash.clone(),
            generation: self.active,
            warnings: warnings.iter().map(|w| w.render(name)).collect(),
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

fn error(msg: String) -> reply::Kind {
    reply::Kind::Error(msg)
}

async fn read_request(s: &mut UnixStream) -> Result<api::Request> {
    let len = s.read_u32().await.context("reading the frame length")?;
    if len > api::MAX_FRAME {
        bail!(
            "frame of {len} bytes is larger than {} bytes",
            api::MAX_FRAME
        );
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.context("reading the frame")?;
    <api::Request as prost::Message>::decode(buf.as_slice())
        .context("decoding the protobuf request")
}

async fn send(s: &mut UnixStream, kind: reply::Kind) -> std::io::Result<()> {
    let frame = api::frame(&api::Reply { kind: Some(kind) });
    s.write_all(&frame).await
}

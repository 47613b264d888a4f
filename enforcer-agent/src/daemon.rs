//! The node agent: keeps the kernel's facts and policy current.
//!
//! One straight line: kernel event -> attestation -> identity -> maps -> verdict -> event.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use enforcer_common::*;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    attest::{self, HashCache},
    kernel::Kernel,
    listeners::{self, Listener},
    policy::{self, Classes, Policy, ProcessFacts},
};

/// What `enforcer-agent run` was asked to do.
pub struct Options {
    pub policy: Policy,
    /// Where the policy came from, for messages.
    pub policy_source: String,
    /// The policy file, re-read on SIGHUP (none: the embedded default).
    pub policy_path: Option<PathBuf>,
    /// bpffs folder for pins (default `/sys/fs/bpf/enforcer/v2`).
    pub pin_dir: PathBuf,
    /// Folder for the agent's own state (default `/run/enforcer`).
    pub state_dir: PathBuf,
    /// Unix socket of the API (default `/run/enforcer/api.sock`).
    pub api_socket: PathBuf,
    /// Remove pins (and so detach everything) on a clean exit. Default: enforcement stays.
    pub unpin_on_exit: bool,
    /// Write decisions (JSON lines) to this file instead of stdout.
    pub events_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (opt-in).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Rule entries a policy may compile to (`--max-rules`); sizes the rule maps.
    pub max_rules: u32,
    /// When `run` began (the "agent ready" log line says how long the start took).
    pub started: std::time::Instant,
}

/// One executable the agent hashed, by its `exe_id`.
#[derive(Clone, Debug)]
pub(crate) struct Exe {
    pub(crate) sha256: [u8; 32],
    pub(crate) path: String,
}

/// One process the agent tracks.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub exe_id: u32,
    pub cgroup: String,
    pub uid: u32,
    pub gid: u32,
}

pub struct Agent {
    pub(crate) kernel: Kernel,
    pub(crate) cg_mount: PathBuf,
    pub(crate) cache: HashCache,
    pub(crate) policy: Policy,
    pub(crate) classes: Classes,
    pub(crate) active: u32,
    pub(crate) exes: HashMap<u32, Exe>,
    pub(crate) exe_by_key: HashMap<ExeKey, u32>,
    pub(crate) next_exe: u32,
    pub(crate) exe_log: fs::File,
    pub(crate) cgroups: HashMap<u64, String>,
    pub(crate) procs: HashMap<u32, Tracked>,
    pub(crate) idmatch_written: HashSet<(IdMatchKey, u32)>,
    /// Rules as the kernel numbers them: the policy's, then those expanded from listeners.
    /// Rules made for identity destinations from the listeners found (see `listeners`); their
    /// rule ids follow the policy's own rules.
    pub(crate) listener_rules: Vec<policy::Rule>,
    /// Listeners of identities named in `to: {identity: X}` destinations, as last applied.
    pub(crate) listeners: BTreeSet<(u32, Listener)>,
    /// Where the policy in force came from.
    pub(crate) policy_source: String,
    /// sha256 of the compiled policy in force (computed once per apply).
    pub(crate) policy_hash: String,
    /// What the agent found of the kernel at start.
    pub(crate) probe: crate::probe::Probe,
    /// API side: recent decisions, `events --follow` clients, unattested traffic.
    pub(crate) feed: crate::server::Feed,
    pub(crate) metrics: crate::metrics::Metrics,
    /// `--events-file`: decisions go there (JSON lines) instead of stdout.
    events_out: Option<fs::File>,
    /// sha256 of the policy file as last read (file watch).
    policy_fingerprint: Option<[u8; 32]>,
    last_fill: Instant,
}

/// sha256 of a policy file's bytes.
fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// sha256 of a file's content (None when unreadable).
fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    fs::read(path).ok().map(|b| digest(&b))
}

pub(crate) fn hex32(b: &[u8; 32]) -> String {
    hex::encode(b)
}

impl Agent {
    /// Loads (or takes over) the kernel state, attests every process, applies the policy and
    /// attaches to the policy's scopes.
    pub fn start(opts: &Options) -> Result<Self> {
        // What the kernel offers, before anything is loaded: refuse a kernel that lacks a
        // required feature, log what is lost without an optional one.
        let probe = crate::probe::Probe::run();
        probe.check()?;
        probe.log_degradations();
        let cg_mount = match &probe.cgroup2 {
            Some(m) => m.clone(),
            None => attest::cgroup2_mount()
                .context("finding the cgroup2 mount (the enforcer needs cgroup v2)")?,
        };
        // No usable BTF: `valid = 0` (also over offsets a previous agent pinned), so the
        // kernel treats every exec as never seen: held and attested, never trusted by key.
        let offsets = probe.offsets.unwrap_or_default();
        // Everything about the policy that can be refused is refused before the kernel is
        // touched: a rejected policy leaves no pin and no attachment behind.
        scope_dirs(&opts.policy, &cg_mount)?;
        policy::rule_entries_of(&opts.policy.rules, &[], 0, opts.max_rules as usize)
            .map_err(anyhow::Error::new)?;
        let fresh = !opts.pin_dir.join(MAP_CONFIG).exists();
        let started = Self::start_kernel(opts, cg_mount, offsets, probe);
        if started.is_err() && fresh {
            let _ = crate::kernel::uninstall(&opts.pin_dir);
        }
        started
    }

    fn start_kernel(
        opts: &Options,
        cg_mount: PathBuf,
        offsets: KernelOffsets,
        probe: crate::probe::Probe,
    ) -> Result<Self> {
        let mut kernel = Kernel::load(&opts.pin_dir, opts.max_rules)?;
        if kernel.max_rules != opts.max_rules as usize {
            tracing::warn!(
                pinned = kernel.max_rules,
                asked = opts.max_rules,
                "the pinned rule maps keep their capacity of {} rules; --max-rules takes effect after `enforcer-agent uninstall` (which stops enforcement) and a restart",
                kernel.max_rules
            );
        }
        if kernel.took_over {
            tracing::info!(pins = %opts.pin_dir.display(), "taking over pinned kernel state; enforcement never stopped");
        }
        kernel.set_offsets(&offsets)?;
        let mut cfg = kernel.config()?;
        cfg.abi_version = ABI_VERSION;
        cfg.agent_tgid = std::process::id();
        kernel.set_config(&cfg)?;
        fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("creating state folder {}", opts.state_dir.display()))?;
        let log_path = opts.state_dir.join("exes.log");
        if !kernel.took_over {
            let _ = fs::remove_file(&log_path);
        }
        let (exes, exe_by_key, next_exe) = read_exe_log(&log_path);
        let exe_log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let classes = Classes::new(&opts.policy);
        let mut agent = Self {
            kernel,
            cg_mount,
            cache: HashCache::new(4096),
            policy: opts.policy.clone(),
            classes,
            active: cfg.active & 1,
            exes,
            exe_by_key,
            next_exe,
            exe_log,
            cgroups: HashMap::new(),
            procs: HashMap::new(),
            idmatch_written: HashSet::new(),
            listener_rules: Vec::new(),
            listeners: BTreeSet::new(),
            policy_source: opts.policy_source.clone(),
            policy_hash: String::new(),
            probe,
            feed: crate::server::Feed::default(),
            metrics: crate::metrics::Metrics::new(),
            events_out: match &opts.events_file {
                Some(p) => Some(
                    fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .with_context(|| format!("opening the events file {}", p.display()))?,
                ),
                None => None,
            },
            policy_fingerprint: None,
            last_fill: Instant::now(),
        };
        agent.kernel.attach_tracepoints()?;
        agent.scan_cgroups();
        let t0 = Instant::now();
        let n = agent.scan_processes();
        tracing::info!(
            processes = n,
            ms = t0.elapsed().as_millis() as u64,
            "attested running processes"
        );
        agent
            .apply(opts.policy.clone())
            .with_context(|| format!("applying policy {}", opts.policy_source))?;
        Ok(agent)
    }

    fn scan_cgroups(&mut self) {
        match attest::walk_cgroups(&self.cg_mount) {
            Ok(all) => {
                for (path, id) in all {
                    self.cgroups.insert(id, path);
                }
            }
            Err(e) => tracing::warn!("walking cgroups: {e}"),
        }
    }

    /// Attests every process in /proc that the kernel does not already know (or knows as
    /// pending). Returns how many were attested.
    fn scan_processes(&mut self) -> usize {
        let pids = match attest::list_pids() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("listing processes: {e}");
                return 0;
            }
        };
        let mut n = 0;
        for pid in pids {
            let existing = self.kernel.maps.procs.get(&pid, 0).ok();
            let pending = existing.is_none_or(|s| s.flags & PROC_PENDING != 0);
            match self.attest(pid, None, existing.map(|s| s.exe_id).filter(|_| !pending)) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!(pid, "not attested: {e:#}"),
            }
        }
        n
    }

    fn alloc_exe(&mut self, sha256: [u8; 32], path: &str) -> Result<u32> {
        if self.next_exe >= MAX_EXES {
            bail!(
                "all {MAX_EXES} executable slots are used; restart the agent with `uninstall` first to reset"
            );
        }
        let id = self.next_exe;
        self.next_exe += 1;
        // Logged before the kernel can see the id, so a restarted agent knows every id.
        writeln!(self.exe_log, "{id} {} {path}", hex32(&sha256)).context("writing exes.log")?;
        self.exes.insert(
            id,
            Exe {
                sha256,
                path: path.to_string(),
            },
        );
        self.write_binclass(id)?;
        Ok(id)
    }

    fn write_binclass(&mut self, id: u32) -> Result<()> {
        let exe = self.exes.get(&id).context("unknown exe id")?.clone();
        let class = self.classes.bin_class(&exe.sha256, Some(&exe.path));
        self.sync_idmatch()?;
        self.kernel
            .maps
            .binclass
            .set(binclass_index(self.active, id), &class, 0)
            .context("writing ENF_BINCLASS")?;
        Ok(())
    }

    /// Writes idmatch entries for classes interned since the last write (active generation).
    fn sync_idmatch(&mut self) -> Result<()> {
        for (k, v) in self.classes.idmatch_entries(self.active) {
            if self.idmatch_written.insert((k, v)) {
                self.kernel
                    .maps
                    .idmatch
                    .insert(&k, &v, 0)
                    .context("writing ENF_IDMATCH")?;
            }
        }
        Ok(())
    }

    fn ensure_cgroup(&mut self, id: u64, path: &str) -> Result<()> {
        self.cgroups.insert(id, path.to_string());
        if !self.classes.uses_cgroups() && self.kernel.maps.cgroups.get(&id, 0).is_ok() {
            return Ok(());
        }
        let class = self.classes.cg_class(path);
        self.sync_idmatch()?;
        let mut v = self.kernel.maps.cgroups.get(&id, 0).unwrap_or_default();
        v.class[self.active as usize] = class;
        self.kernel
            .maps
            .cgroups
            .insert(&id, &v, 0)
            .context("writing ENF_CGROUPS")?;
        Ok(())
    }

    /// Attests one process from /proc and writes its facts to the kernel. `known_exe` is the
    /// kernel's exe id when the kernel already classified it (only learnt, never rewritten).
    fn attest(&mut self, pid: u32, ev: Option<&Event>, known_exe: Option<u32>) -> Result<()> {
        let facts = attest::attest_pid(&mut self.cache, pid)?;
        if let Some(ev) = ev
            && ev.start_ns != 0
            && attest::boot_ns_to_ticks(ev.start_ns).abs_diff(facts.start_ticks) > 1
        {
            bail!("pid {pid} was reused before it could be attested");
        }
        let cgroup_id = attest::cgroup_id(&self.cg_mount, &facts.cgroup)?;
        self.ensure_cgroup(cgroup_id, &facts.cgroup)?;
        if let Some(id) = known_exe
            && self.exes.contains_key(&id)
        {
            self.procs.insert(pid, tracked(&facts, id));
            return Ok(());
        }
        let exe_id = match self.exe_by_key.get(&facts.key) {
            Some(&id) if self.exes.get(&id).is_some_and(|e| e.sha256 == facts.sha256) => id,
            _ => {
                let id = self.alloc_exe(facts.sha256, &facts.exe_path)?;
                if facts.cacheable {
                    // The kernel's view of the file: the exec event's key when it agrees
                    // with what we hashed (overlayfs may report another dev/ino).
                    let key = match ev {
                        Some(ev) if same_content_key(&ev.exe, &facts.key) => ev.exe,
                        Some(ev) => {
                            tracing::debug!(pid, kernel = ?ev.exe, fstat = ?facts.key, "exec key differs from fstat");
                            facts.key
                        }
                        None => facts.key,
                    };
                    self.kernel
                        .maps
                        .exes
                        .insert(&key, &id, 0)
                        .context("writing ENF_EXES")?;
                    self.exe_by_key.insert(key, id);
                    self.exe_by_key.insert(facts.key, id);
                }
                id
            }
        };
        let st = ProcState {
            exe_id,
            uid: facts.uid,
            cgroup_id,
            flags: PROC_AGENT,
            _pad0: 0,
            start_ns: ev.map(|e| e.start_ns).unwrap_or(0),
        };
        self.kernel
            .maps
            .procs
            .insert(&pid, &st, 0)
            .context("writing ENF_PROCS")?;
        self.procs.insert(pid, tracked(&facts, exe_id));
        Ok(())
    }

    /// Applies a policy atomically: fill the inactive generation, then flip `active`.
    pub fn apply(&mut self, policy: Policy) -> Result<()> {
        self.apply_from(policy, None)
    }

    /// [`Agent::apply`], recording where the policy came from.
    pub fn apply_from(&mut self, policy: Policy, source: Option<String>) -> Result<()> {
        let t0 = Instant::now();
        let cfg = self.kernel.config()?;
        let next = if cfg.generations[self.active as usize].loaded == 0 {
            self.active
        } else {
            1 - self.active
        };
        // Everything that can be rejected is computed before the kernel is touched.
        let found = self.find_listeners(&policy);
        let extra = listeners::listener_rules(&policy, &found, &listeners::local_addresses());
        let rules = policy::rule_entries_of(&policy.rules, &extra, next, self.kernel.max_rules)
            .map_err(anyhow::Error::new)?;
        let scope_dirs = scope_dirs(&policy, &self.cg_mount)?;
        let mut classes = Classes::new(&policy);
        let bins: Vec<(u32, u32)> = self
            .exes
            .iter()
            .map(|(&id, e)| (id, classes.bin_class(&e.sha256, Some(&e.path))))
            .collect();
        let cgs: Vec<(u64, u32)> = self
            .cgroups
            .iter()
            .map(|(&id, p)| (id, classes.cg_class(p)))
            .collect();
        let idm = classes.idmatch_entries(next);
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;

        self.kernel.write_idmatch(next, &idm)?;
        let written = self.kernel.write_rules(next, &rules)?;
        for (id, class) in bins {
            self.kernel
                .maps
                .binclass
                .set(binclass_index(next, id), &class, 0)
                .context("writing ENF_BINCLASS")?;
        }
        for (id, class) in cgs {
            let mut v = self.kernel.maps.cgroups.get(&id, 0).unwrap_or_default();
            v.class[next as usize] = class;
            self.kernel
                .maps
                .cgroups
                .insert(&id, &v, 0)
                .context("writing ENF_CGROUPS")?;
        }
        let mut cfg = self.kernel.config()?;
        cfg.generations[next as usize] = GenConfig {
            loaded: 1,
            mode: match policy.mode {
                policy::Mode::Enforce => Mode::Enforce as u32,
                policy::Mode::Audit => Mode::Audit as u32,
            },
            unattested: match policy.unattested {
                policy::Action::Allow => Action::Allow as u32,
                policy::Action::Audit => Action::Audit as u32,
                policy::Action::Deny => Action::Deny as u32,
            },
            uses_cgroups: u32::from(classes.uses_cgroups()),
            report_allow: u32::from(policy.report_allow),
            uses_uids: u32::from(
                policy
                    .identities
                    .iter()
                    .any(|i| i.matches.iter().any(|m| !m.uid.is_empty())),
            ),
            prefix_rules: u32::from(written.prefixes > 0),
        };
        self.kernel.set_config(&cfg)?;
        // Attach to new scopes before the flip (they judge with the policy in force).
        for (dir, id) in &scope_dirs {
            self.kernel.attach_cgroup(dir, *id)?;
        }
        cfg.active = next;
        cfg.scope_count = scope_dirs.len() as u32;
        self.kernel.set_config(&cfg)?; // the flip: one 4-byte store seen by the programs
        let in_force_ms = t0.elapsed().as_secs_f64() * 1e3;
        for (i, (dir, _)) in scope_dirs.iter().enumerate() {
            let f = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            self.kernel
                .maps
                .scopes
                .set(i as u32, f, 0)
                .context("writing ENF_SCOPES")?;
        }
        let keep: HashSet<u64> = scope_dirs.iter().map(|(_, id)| *id).collect();
        for id in self.kernel.attached_cgroups() {
            if !keep.contains(&id) {
                self.kernel.detach_cgroup(id)?;
            }
        }
        self.active = next;
        self.classes = classes;
        self.idmatch_written = idm.into_iter().collect();
        self.policy = policy;
        self.policy_hash = policy::policy_hash(&self.policy);
        self.listener_rules = extra;
        self.listeners = found;
        self.sync_report_allow();
        if let Some(src) = source {
            self.policy_source = src;
        }
        tracing::info!(
            generation = next,
            hash = %self.policy_hash,
            rules = rules.len(),
            hosts = written.hosts,
            prefixes = written.prefixes,
            kernel_writes = written.writes,
            compile_ms = (compile_ms * 10.0).round() / 10.0,
            ms = (in_force_ms * 10.0).round() / 10.0,
            "policy in force"
        );
        Ok(())
    }

    /// Processes the kernel left pending (exec'd while the agent was away, or before it was
    /// ready): attest them and let held ones go on.
    pub fn settle_pending(&mut self) {
        let pending: Vec<(u32, ProcState)> = self
            .kernel
            .maps
            .procs
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, s)| s.flags & PROC_PENDING != 0)
            .collect();
        for (pid, st) in pending {
            let ev = Event {
                kind: EventKind::Exec as u32,
                tgid: pid,
                start_ns: st.start_ns,
                flags: st.flags,
                ..Default::default()
            };
            self.on_exec(&ev);
        }
    }

    /// Listeners of the identities that `to: {identity: X}` destinations of `policy` name.
    fn find_listeners(&self, policy: &Policy) -> BTreeSet<(u32, Listener)> {
        let targets: HashSet<u32> = policy
            .rules
            .iter()
            .map(|r| r.to_ident)
            .filter(|&i| i != 0)
            .collect();
        let mut out = BTreeSet::new();
        if targets.is_empty() {
            return out;
        }
        for (&pid, t) in &self.procs {
            let Some(exe) = self.exes.get(&t.exe_id) else {
                continue;
            };
            let ident = policy::resolve(policy, &facts_of(exe, t)).ident;
            if targets.contains(&ident) {
                out.extend(
                    listeners::process_listeners(pid)
                        .into_iter()
                        .map(|l| (ident, l)),
                );
            }
        }
        out
    }

    /// Re-applies the policy when the listeners behind identity destinations changed.
    fn refresh_listeners(&mut self) {
        if !self.policy.rules.iter().any(|r| r.to_ident != 0) {
            return;
        }
        if self.find_listeners(&self.policy) == self.listeners {
            return;
        }
        match self.apply(self.policy.clone()) {
            Ok(()) => tracing::info!(
                listeners = self.listeners.len(),
                "identity destinations updated"
            ),
            Err(e) => tracing::error!(
                "updating identity destinations failed; the previous rules stay in force: {e:#}"
            ),
        }
    }

    /// A policy file that changed on disk (a mounted ConfigMap changes by a symlink swap) is
    /// applied like SIGHUP: all or nothing, with a log line either way.
    fn watch_policy_file(&mut self, opts: &Options) {
        let Some(path) = &opts.policy_path else {
            return;
        };
        let now = fingerprint(path);
        if now.is_some() && now != self.policy_fingerprint {
            tracing::info!(policy = %path.display(), "the policy file changed on disk; applying it");
            self.reload(opts);
        }
    }

    fn update_metrics(&mut self) {
        self.metrics
            .set_lost_events(self.kernel.counter(Counter::EventsLost));
        if self.last_fill.elapsed() >= std::time::Duration::from_secs(10) {
            self.last_fill = Instant::now();
            for (name, entries, cap) in self.kernel.fill() {
                self.metrics.set_map_fill(name, entries, cap);
            }
        }
    }

    /// SIGHUP: re-read the policy file and apply it, all or nothing.
    fn reload(&mut self, opts: &Options) {
        let Some(path) = &opts.policy_path else {
            tracing::warn!("SIGHUP: running the embedded default policy, nothing to re-read");
            return;
        };
        let name = path.display().to_string();
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(policy = %name, "policy rejected; the policy in force is unchanged: cannot read it: {e}");
                return;
            }
        };
        // One apply per distinct content, whether SIGHUP or the file watch saw it first.
        let print = digest(&bytes);
        if self.policy_fingerprint == Some(print) {
            tracing::info!(policy = %name, "the policy file is unchanged; nothing to apply");
            return;
        }
        self.policy_fingerprint = Some(print);
        let loaded = policy::load(&name, &bytes).map_err(anyhow::Error::new);
        let res = loaded.and_then(|(p, warnings)| {
            for w in warnings {
                tracing::warn!("{}", w.render(&name));
            }
            self.apply_from(p, Some(name.clone()))
        });
        match res {
            Ok(()) => tracing::info!(policy = %name, "policy reloaded"),
            Err(e) => {
                tracing::error!(policy = %name, "policy rejected; the policy in force is unchanged: {e:#}")
            }
        }
    }

    fn on_exec(&mut self, ev: &Event) {
        let pid = ev.tgid;
        if ev.flags & PROC_PENDING == 0 {
            let exe_id = ev.ident;
            match self.exes.contains_key(&exe_id) {
                // The kernel resolved it: the event carries every fact, no /proc read.
                true if self.cgroups.contains_key(&ev.cgroup_id) => {
                    let cgroup = self.cgroups.get(&ev.cgroup_id).cloned().unwrap_or_default();
                    self.procs.insert(
                        pid,
                        Tracked {
                            exe_id,
                            cgroup,
                            uid: ev.uid,
                            gid: ev.gid,
                        },
                    );
                }
                true => {
                    let _ = self.attest(pid, Some(ev), Some(exe_id)).map_err(|e| {
                        tracing::debug!(pid, "exec of a known file, not re-read: {e:#}");
                    });
                }
                false => tracing::warn!(
                    pid,
                    exe_id,
                    "kernel reported an exe id this agent does not know"
                ),
            }
            return;
        }
        let t0 = Instant::now();
        let res = self.attest(pid, Some(ev), None);
        if let Err(e) = &res {
            tracing::warn!(
                pid,
                "attesting a pending process failed; its connects stay denied: {e:#}"
            );
        }
        if ev.flags & PROC_HELD != 0 {
            // Held by the kernel at exec: let it go on. On failure it stays pending, so its
            // connects are denied (fail closed) but it is not frozen forever.
            if let Err(e) = resume(pid, ev.start_ns) {
                tracing::warn!(pid, "could not resume a held process: {e:#}");
            }
        }
        if res.is_ok()
            && let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        {
            // From the kernel's exec event to the identity in the maps.
            let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
            self.metrics
                .observe_attestation(now_ns.saturating_sub(ev.ktime_ns) as f64 / 1e9);
        }
        tracing::debug!(
            pid,
            us = t0.elapsed().as_micros() as u64,
            ok = res.is_ok(),
            "attested at exec"
        );
    }

    fn on_event(&mut self, ev: &Event) {
        match EventKind::try_from(ev.kind) {
            Ok(EventKind::Exec) => self.on_exec(ev),
            Ok(EventKind::Fork) => {
                if ev.flags & PROC_PENDING != 0 {
                    let _ = self.attest(ev.tgid, Some(ev), None);
                } else if let Some(parent) = self.procs.get(&ev.aux).cloned() {
                    self.procs.insert(ev.tgid, parent);
                }
            }
            Ok(EventKind::Exit) => {
                self.procs.remove(&ev.tgid);
            }
            Ok(EventKind::Connect) => self.report(ev),
            Err(_) => {}
        }
    }

    pub(crate) fn identity_name(&self, ident: u32) -> Option<&str> {
        let i = ident.checked_sub(1)? as usize;
        self.policy
            .identities
            .get(i)
            .map(|id| id.spiffe_id.as_str())
    }

    fn report(&mut self, ev: &Event) {
        let d = self.decision(ev);
        self.metrics
            .decision(d.identity.as_deref().unwrap_or("none"), &d.verdict);
        match serde_json::to_string(&d) {
            Ok(line) => match &mut self.events_out {
                Some(f) => {
                    if let Err(e) = writeln!(f, "{line}") {
                        tracing::warn!("writing the events file: {e}");
                    }
                }
                None => println!("{line}"),
            },
            Err(e) => tracing::warn!("encoding an event: {e}"),
        }
        let followers = self.feed.followers();
        self.feed.push(d);
        if self.feed.followers() != followers {
            self.sync_report_allow();
        }
    }

    /// Runs until SIGINT/SIGTERM.
    pub async fn run(mut self, opts: &Options) -> Result<()> {
        self.settle_pending();
        let rb = self
            .kernel
            .events
            .take()
            .context("the event ring buffer is gone")?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it drops.
        let mut rb = unsafe { AsyncFd::register(rb) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        let api = crate::server::bind(&opts.api_socket)?;
        let _metrics_server = match opts.metrics_addr {
            Some(addr) => {
                let h = self.metrics.serve(addr).await?;
                tracing::info!(%addr, "serving Prometheus metrics on /metrics");
                Some(h)
            }
            None => None,
        };
        self.policy_fingerprint = opts.policy_path.as_deref().and_then(fingerprint);
        tracing::info!(
            api = %opts.api_socket.display(),
            startup_ms = opts.started.elapsed().as_millis() as u64,
            "agent ready"
        );
        let mut ticks: u64 = 0;
        let mut lost_seen = self.kernel.counter(Counter::EventsLost);
        loop {
            tokio::select! {
                guard = rb.readable_mut() => {
                    let mut guard = guard.context("waiting on the event ring buffer")?;
                    let mut batch = Vec::new();
                    {
                        let ring = guard.get_inner_mut();
                        while let Some(item) = ring.next() {
                            if item.len() >= size_of::<Event>() {
                                // SAFETY: the kernel writes whole `Event`s; read unaligned.
                                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
                            }
                        }
                    }
                    guard.clear_ready();
                    for ev in &batch {
                        self.on_event(ev);
                    }
                }
                _ = tick.tick() => {
                    // A held process whose event was lost must not stay frozen: scan the
                    // process map at once when the kernel lost events, else every 5 s.
                    ticks += 1;
                    let lost = self.kernel.counter(Counter::EventsLost);
                    if lost != lost_seen || ticks.is_multiple_of(10) {
                        lost_seen = lost;
                        self.settle_pending();
                    }
                    self.refresh_listeners();
                    self.watch_policy_file(opts);
                    self.update_metrics();
                }
                conn = api.accept() => match conn {
                    Ok((stream, _)) => self.serve(stream).await,
                    Err(e) => tracing::warn!("API accept: {e}"),
                },
                _ = hup.recv() => self.reload(opts),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let _ = fs::remove_file(&opts.api_socket);
        if opts.unpin_on_exit {
            tracing::info!(pins = %self.kernel.pin_dir.display(), "removing pins: enforcement ends");
            let dir = self.kernel.pin_dir.clone();
            drop(self);
            crate::kernel::uninstall(&dir)?;
        } else {
            tracing::info!("exiting; the pinned programs keep enforcing the policy in force");
        }
        Ok(())
    }
}

/// The scope cgroups of a policy: (folder, cgroup id), each checked to exist.
fn scope_dirs(policy: &Policy, cg_mount: &Path) -> Result<Vec<(PathBuf, u64)>> {
    if policy.scope.len() > MAX_SCOPES as usize {
        bail!(
            "the policy has {} scopes; at most {MAX_SCOPES} are supported",
            policy.scope.len()
        );
    }
    let mut out = Vec::new();
    for s in &policy.scope {
        let rel = s.trim_start_matches('/');
        let dir = if rel.is_empty() {
            cg_mount.to_path_buf()
        } else {
            cg_mount.join(rel)
        };
        let id = attest::cgroup_id(cg_mount, s).with_context(|| {
            format!(
                "scope {s}: no such cgroup under {}; create it or fix `scope`",
                cg_mount.display()
            )
        })?;
        out.push((dir, id));
    }
    Ok(out)
}

fn tracked(f: &attest::Facts, exe_id: u32) -> Tracked {
    Tracked {
        exe_id,
        cgroup: f.cgroup.clone(),
        uid: f.uid,
        gid: f.gid,
    }
}

fn same_content_key(a: &ExeKey, b: &ExeKey) -> bool {
    a.size == b.size
        && a.mtime_sec == b.mtime_sec
        && a.mtime_nsec == b.mtime_nsec
        && a.ctime_sec == b.ctime_sec
        && a.ctime_nsec == b.ctime_nsec
}

/// Exe ids a previous agent handed out (from `exes.log`), so a takeover never reuses one.
fn read_exe_log(path: &Path) -> (HashMap<u32, Exe>, HashMap<ExeKey, u32>, u32) {
    let mut exes = HashMap::new();
    let mut next = 1;
    if let Ok(text) = fs::read_to_string(path) {
        for line in text.lines() {
            let mut it = line.splitn(3, ' ');
            let (Some(id), Some(sha), Some(p)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(id), Ok(bytes)) = (id.parse::<u32>(), hex::decode(sha)) else {
                continue;
            };
            let Ok(sha256) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                continue;
            };
            exes.insert(
                id,
                Exe {
                    sha256,
                    path: p.to_string(),
                },
            );
            next = next.max(id + 1);
        }
    }
    (exes, HashMap::new(), next)
}

/// Sends SIGCONT to a process we hold, through a pidfd so a reused pid is never signalled.
fn resume(pid: u32, start_ns: u64) -> Result<()> {
    let fd = crate::sys::pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
    let same = start_ns == 0
        || fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                rest.split_whitespace().nth(19)?.parse::<u64>().ok()
            })
            .is_some_and(|t| t.abs_diff(attest::boot_ns_to_ticks(start_ns)) <= 1);
    if same {
        use std::os::fd::AsFd as _;
        crate::sys::pidfd_send_signal(fd.as_fd(), libc::SIGCONT)
            .with_context(|| format!("pidfd_send_signal({pid}, SIGCONT)"))?;
    }
    Ok(())
}

/// What [`policy::resolve`] needs of a tracked process and its executable.
pub(crate) fn facts_of<'a>(exe: &'a Exe, t: &'a Tracked) -> ProcessFacts<'a> {
    ProcessFacts {
        sha256: Some(&exe.sha256),
        exe_path: Some(&exe.path),
        cgroup: Some(&t.cgroup),
        uid: t.uid,
    }
}

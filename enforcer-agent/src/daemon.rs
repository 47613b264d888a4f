//! The node agent: keeps the kernel's facts and policy current.
//!
//! One straight line: kernel event -> attestation -> identity -> maps -> verdict -> event.

use std::{
    collections::{BTreeSet, HashSet},
    fs,
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
    api::{self, reply, request},
    attest::{self, HashCache},
    cgroups::CgroupRegistry,
    events::EventSink,
    exes::{ExeError, ExeRegistry},
    in_force::InForce,
    kernel::Kernel,
    listeners::{self, Listener},
    policy::{self, Classes, Policy},
    procs::ProcessTable,
    revoke::RevokeReason,
    server::Call,
    views::View,
};

/// What `enforcer-agent run` was asked to do.
pub struct Options {
    pub policy: Policy,
    /// Where the policy came from, for messages.
    pub policy_source: String,
    /// The policy file, re-read on SIGHUP (none: the embedded default).
    pub policy_path: Option<PathBuf>,
    /// bpffs folder for pins (default `/sys/fs/bpf/enforcer/v4`).
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
    /// Where pod metadata comes from.
    pub k8s: crate::k8s::Options,
}

pub use crate::procs::Tracked;

/// The agent: the kernel, and the components it keeps current. Each component is its own
/// module with its own tests ([`crate::procs`], [`crate::exes`], [`crate::cgroups`],
/// [`crate::events`]); this type sequences them. The API is served off the event loop by
/// [`crate::server`], which hands requests here ([`crate::views`] answers them).
pub struct Agent {
    pub(crate) kernel: Kernel,
    pub(crate) cg_mount: PathBuf,
    cache: HashCache,
    pub(crate) in_force: InForce,
    pub(crate) exes: ExeRegistry,
    pub(crate) cgroups: CgroupRegistry,
    pub(crate) procs: ProcessTable,
    pub(crate) sink: EventSink,
    /// What the agent found of the kernel at start.
    pub(crate) probe: crate::probe::Probe,
    /// sha256 of the policy file as last read (file watch).
    policy_fingerprint: Option<[u8; 32]>,
    last_fill: Instant,
    /// The cgroup registry is swept at once when it grows to this many entries.
    cgroup_watermark: usize,
    /// Drift found at the last readiness check, and when (None: check at the next one).
    drift_checked: Option<(Instant, Vec<String>)>,
    /// Pod metadata of container cgroups (CRI and API server), by container id.
    pub(crate) pods: crate::k8s::PodDirectory,
    /// Container cgroups waiting for their pod's metadata, and processes held for it.
    pub(crate) waiting: crate::pods::PendingContainers,
    /// Container ids the runtime does not know (no `k8s` selector holds there).
    pub(crate) not_pods: HashSet<String>,
    /// The metadata task (started by `run`).
    feed: Option<crate::k8s::feed::PodFeed>,
    pub(crate) k8s_health: k8s::K8sHealth,
    /// Time-bound exceptions from the command line, added to every policy applied.
    pub(crate) grants: crate::grants::Grants,
    /// Wall-clock time (Unix ns) up to which time-bound entries were checked ([`Agent::check_time`]).
    time_checked: i64,
    /// A sweep found no way to close connections and said so (once).
    revoke_warned: bool,
    /// The decision record (`learn`, `policy diff`), saved in the state folder.
    pub(crate) record: crate::record::Record,
    /// `learn --for` requests waiting for their observation time to end.
    learning: Vec<PendingLearn>,
    last_record_save: Instant,
    /// The thread writing the last snapshot of the record.
    record_writer: Option<std::thread::JoinHandle<()>>,
}

/// A `learn --for` request: answered when `until` passes (allow reports stay on till then).
struct PendingLearn {
    until: Instant,
    req: api::LearnRequest,
    reply: tokio::sync::oneshot::Sender<reply::Kind>,
}

/// The longest `learn --for` the agent accepts.
const MAX_LEARN_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `/readyz` compares the kernel maps with the compiled policy at most this often (and
/// after each apply); the probe itself only reads the last result.
const DRIFT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

mod k8s;
pub use k8s::K8sHealth;

/// sha256 of a policy file's bytes.
fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// sha256 of a file's content (None when unreadable).
fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    fs::read(path).ok().map(|b| digest(&b))
}

impl Agent {
    /// Loads (or takes over) the kernel state, attests every process, applies the policy and
    /// attaches to the policy's scopes.
    pub fn start(opts: &Options) -> Result<Self> {
        Self::start_with_pods(opts, Vec::new())
    }

    /// [`Agent::start`] knowing the containers the runtime runs (listed before the first
    /// apply, so that a restart or a rolling update keeps every pod's identity).
    pub fn start_with_pods(
        opts: &Options,
        pods: Vec<(String, crate::k8s::PodMeta)>,
    ) -> Result<Self> {
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (64 KiB by default there).
        if let Err(e) = crate::sys::raise_memlock() {
            tracing::debug!(
                "RLIMIT_MEMLOCK not raised ({e}); kernels before 5.11 need it raised for the \
                 maps (CAP_SYS_RESOURCE, or LimitMEMLOCK=infinity in a systemd unit)"
            );
        }
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
        policy::rule_entries_of(
            &opts.policy.rules,
            &[],
            0,
            opts.max_rules as usize,
            policy::Clock::now(),
        )
        .map_err(anyhow::Error::new)?;
        let fresh = !opts.pin_dir.join(MAP_CONFIG).exists();
        let started = Self::start_kernel(opts, cg_mount, offsets, probe, pods);
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
        pods: Vec<(String, crate::k8s::PodMeta)>,
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
        match crate::btf::tamper_offsets() {
            Ok(t) => kernel.set_tamper_offsets(&t)?,
            Err(e) => tracing::warn!(
                "the tamper programs see only process_vm_writev by pid without kernel BTF offsets (ptrace, /proc/PID/mem and pidfd_getfd go unseen): {e}"
            ),
        }
        kernel.claim(std::process::id())?;
        let generation = kernel.active_generation()?;
        fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("creating state folder {}", opts.state_dir.display()))?;
        let exes = ExeRegistry::open(&opts.state_dir.join("exes.log"), kernel.took_over)?;
        let (record, record_err) = crate::record::Record::open(&opts.state_dir);
        if let Some(e) = record_err {
            tracing::warn!("{e}");
        }
        let events_out = match &opts.events_file {
            Some(p) => Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening the events file {}", p.display()))?,
            ),
            None => None,
        };
        let sink = EventSink::new(
            events_out,
            crate::metrics::Metrics::new(),
            crate::events::QUEUE,
        )
        .context("starting the decision writer thread")?;
        let mut agent = Self {
            kernel,
            cg_mount,
            cache: HashCache::new(4096),
            in_force: InForce {
                classes: Classes::new(&opts.policy),
                policy: opts.policy.clone(),
                base: opts.policy.clone(),
                clock: policy::Clock::now(),
                generation,
                idmatch_written: HashSet::new(),
                listener_rules: Vec::new(),
                timed: Vec::new(),
                listeners: BTreeSet::new(),
                source: opts.policy_source.clone(),
                hash: String::new(),
            },
            exes,
            cgroups: CgroupRegistry::default(),
            procs: ProcessTable::default(),
            sink,
            probe,
            policy_fingerprint: None,
            last_fill: Instant::now(),
            cgroup_watermark: CGROUP_WATERMARK_MIN,
            drift_checked: None,
            pods: crate::k8s::PodDirectory::new(),
            waiting: crate::pods::PendingContainers::default(),
            not_pods: HashSet::new(),
            feed: None,
            k8s_health: k8s::K8sHealth::default(),
            grants: crate::grants::Grants::open(&opts.state_dir.join("grants.json")),
            time_checked: policy::wall_now_ns(),
            revoke_warned: false,
            record,
            learning: Vec::new(),
            last_record_save: Instant::now(),
            record_writer: None,
        };
        // Grants that expired while no agent ran: reported, then dropped (the kernel already
        // stopped honouring them at their instant).
        let over = agent.grants.expire(agent.time_checked);
        for g in &over {
            agent.report_grant("expired", g, "expired while the agent was not running");
        }
        for (id, meta) in pods {
            agent.pods.insert_container(&id, meta);
        }
        agent.kernel.attach_tracepoints()?;
        agent.scan_cgroups();
        let t0 = Instant::now();
        let n = agent.scan_processes();
        tracing::info!(
            processes = n,
            ms = t0.elapsed().as_millis() as u64,
            "attested running processes"
        );
        // In force, then what lost its allow while no agent ran is closed.
        agent
            .apply_for(opts.policy.clone(), None, RevokeReason::Startup)
            .with_context(|| format!("applying policy {}", opts.policy_source))?;
        Ok(agent)
    }

    /// Every cgroup of the machine into the registry; kernel entries of cgroups that no
    /// longer exist (left by a previous agent) leave the kernel.
    fn scan_cgroups(&mut self) {
        match attest::walk_cgroups(&self.cg_mount) {
            Ok(all) => {
                for (path, id) in all {
                    self.cgroups.insert(id, &path);
                }
            }
            Err(e) => tracing::warn!("walking cgroups: {e}"),
        }
        let stale: Vec<u64> = self
            .kernel
            .cgroup_ids()
            .into_iter()
            .filter(|id| !self.cgroups.contains(*id))
            .collect();
        for id in stale {
            if let Err(e) = self.kernel.forget_cgroup(id) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Removes cgroups that no longer exist from the registry and from `ENF_CGROUPS`.
    fn sweep_cgroups(&mut self) {
        let mount = self.cg_mount.clone();
        let gone = self.cgroups.sweep(|p| attest::cgroup_id(&mount, p).ok());
        let n = gone.len();
        for &id in &gone {
            if let Err(e) = self.kernel.forget_cgroup(id) {
                tracing::warn!("{e}");
            }
        }
        self.pods_forget(&gone);
        self.cgroup_watermark =
            (self.cgroups.len() + CGROUP_WATERMARK_STEP).max(CGROUP_WATERMARK_MIN);
        if n > 0 {
            tracing::debug!(
                removed = n,
                live = self.cgroups.len(),
                "forgot removed cgroups"
            );
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
            let existing = self.kernel.process(pid);
            let pending = existing.is_none_or(|s| s.flags & PROC_PENDING != 0);
            match self.attest(pid, None, existing.map(|s| s.exe_id).filter(|_| !pending)) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!(pid, "not attested: {e:#}"),
            }
        }
        n
    }

    /// The id of an executable's content; a new (or reused) id gets its class in the kernel
    /// before anything can refer to it. When every id is taken, unreferenced ones are
    /// collected first.
    fn intern_exe(&mut self, sha256: [u8; 32], path: &str) -> Result<u32> {
        let r = match self.exes.intern(sha256, path) {
            Err(ExeError::Full(_)) => {
                self.collect_exes(true);
                self.exes.intern(sha256, path)
            }
            r => r,
        };
        let (id, new) = r?;
        if new && let Err(e) = self.write_binclass(id) {
            // Never leave an id whose class the kernel does not have.
            self.exes.release(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Frees exe ids no process and no kernel entry refers to. With `evict`, first removes
    /// the `ENF_EXES` entries of files no live process runs (their next exec is attested
    /// again), so that the kernel's cache never pins every id.
    fn collect_exes(&mut self, evict: bool) {
        let t0 = Instant::now();
        let mut in_use = self.procs.exe_ids();
        in_use.extend(self.kernel.processes().into_iter().map(|(_, s)| s.exe_id));
        let mut evicted = 0;
        if evict {
            for (key, id) in self.kernel.exes() {
                if in_use.contains(&id) {
                    continue;
                }
                match self.kernel.forget_exe(&key) {
                    Ok(()) => {
                        self.exes.forget_key(&key);
                        evicted += 1;
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            // A process that exec'd one of those files while they were removed got its id
            // from the entry: read the processes again.
            in_use.extend(self.kernel.processes().into_iter().map(|(_, s)| s.exe_id));
        }
        let mut referenced = in_use;
        referenced.extend(self.kernel.exes().into_iter().map(|(_, id)| id));
        match self.exes.collect(&referenced) {
            Ok(freed) => tracing::debug!(
                freed = freed.len(),
                evicted,
                live = self.exes.len(),
                ms = t0.elapsed().as_millis() as u64,
                "collected executable ids"
            ),
            Err(e) => tracing::warn!("collecting executable ids: {e}"),
        }
    }

    fn write_binclass(&mut self, id: u32) -> Result<()> {
        let exe = self.exes.get(id).context("unknown exe id")?.clone();
        let class = self
            .in_force
            .classes
            .bin_class(&exe.sha256, Some(&exe.path));
        self.sync_idmatch()?;
        self.kernel
            .set_bin_class(self.in_force.generation, id, class)?;
        Ok(())
    }

    /// Writes idmatch entries for classes interned since the last write (generation in force).
    fn sync_idmatch(&mut self) -> Result<()> {
        let f = &mut self.in_force;
        for (k, v) in f.classes.idmatch_entries(f.generation) {
            if f.idmatch_written.insert((k, v)) {
                self.kernel.set_idmatch(&k, v)?;
            }
        }
        Ok(())
    }

    fn ensure_cgroup(&mut self, id: u64, path: &str) -> Result<()> {
        if !self.cgroups.contains(id) && self.cgroups.len() >= self.cgroup_watermark {
            self.sweep_cgroups();
        }
        self.cgroups.insert(id, path);
        if !self.in_force.classes.uses_cgroups() && self.kernel.knows_cgroup(id) {
            return Ok(());
        }
        self.classify_cgroup(id, path)?;
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
            && self.exes.contains(id)
        {
            self.procs.insert(pid, tracked(&facts, id));
            return Ok(());
        }
        let exe_id = match self.exes.by_key(&facts.key, &facts.sha256) {
            Some(id) => id,
            None => {
                let id = self.intern_exe(facts.sha256, &facts.exe_path)?;
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
                    // The cache entry only spares later execs a round trip: without it they
                    // are held and attested, so a full map is not an error.
                    match self.kernel.set_exe(&key, id) {
                        Ok(()) => {
                            self.exes.remember_key(key, id);
                            self.exes.remember_key(facts.key, id);
                        }
                        Err(e) => tracing::debug!(pid, "not cached in the kernel: {e}"),
                    }
                }
                id
            }
        };
        // Tampering the kernel saw (it may happen while the process waits to be attested),
        // or a tracer attached before the agent ran: either keeps the identity away.
        let tampered = self
            .kernel
            .process(pid)
            .is_some_and(|s| s.flags & PROC_TAMPERED != 0)
            || attest::traced(pid);
        // The loader-environment check (SECURITY.md guarantee 3): what the kernel saw at
        // exec stays, and what /proc shows now adds to it; never cleared here.
        // An environment the kernel could not read in full is read here, and trusted only if
        // the process was held before its first instruction (else it may have rewritten it).
        let kflags = self.kernel.process(pid).map_or(0, |s| s.flags);
        let unseen_env = kflags & PROC_ENV_UNREAD != 0 && kflags & PROC_HELD == 0;
        if unseen_env && self.procs.withheld(pid).is_none() {
            self.procs
                .set_withheld(pid, Some("environment not seen before the process ran"));
        }
        let mut withheld = ev.is_some_and(|e| e.flags & PROC_WITHHELD != 0)
            || kflags & PROC_WITHHELD != 0
            || unseen_env
            || {
                let found = attest::loader_env(pid);
                if found.is_some() && self.procs.withheld(pid).is_none() {
                    self.procs.set_withheld(pid, found);
                }
                found.is_some()
            };
        // A held process is trusted for the environment read above only if it is still where
        // the kernel stopped it: one continued by another process (SIGCONT) may have run
        // ld.so and rewritten its environment before it was read.
        if !withheld && kflags & PROC_ENV_UNREAD != 0 && !crate::preload::untouched_since_exec(pid)
        {
            self.procs
                .set_withheld(pid, Some("environment not seen before the process ran"));
            withheld = true;
        }
        // A `preload:` grant (SECURITY.md guarantee 3): only for a process the kernel held at
        // exec (its environment is still the one ld.so will read) and not tampered with.
        let held = (kflags | ev.map_or(0, |e| e.flags)) & PROC_HELD != 0;
        if withheld && held && !tampered && policy::has_preload(&self.in_force.policy) {
            match self.grant_preloads(pid, &facts) {
                Ok(granted) => {
                    tracing::info!(pid, exe = %facts.exe_path, "preload granted: {granted}");
                    withheld = false;
                    self.procs.set_withheld(pid, None);
                    self.procs.set_granted(pid, Some(granted));
                }
                Err(refused) => {
                    tracing::warn!(pid, exe = %facts.exe_path, "identity withheld: {refused}");
                    self.procs.set_withheld_why(pid, refused.to_string());
                }
            }
        }
        let st = ProcState {
            exe_id,
            uid: facts.uid,
            cgroup_id,
            flags: PROC_AGENT
                | if tampered { PROC_TAMPERED } else { 0 }
                | if withheld { PROC_WITHHELD } else { 0 },
            _pad0: 0,
            start_ns: ev.map(|e| e.start_ns).unwrap_or(0),
        };
        self.kernel.set_process(pid, &st)?;
        self.procs.insert(pid, tracked(&facts, exe_id));
        Ok(())
    }

    /// The preloads of held process `pid` (whose facts are `facts`), when every one is
    /// granted: `PATH sha256 HEX, ...`; else why not ([`crate::preload`]).
    fn grant_preloads(
        &mut self,
        pid: u32,
        facts: &attest::Facts,
    ) -> std::result::Result<String, crate::preload::Refusal> {
        use crate::preload::{self, Refusal};
        let environ = fs::read(format!("/proc/{pid}/environ")).map_err(|_| Refusal::Unreadable)?;
        let entries = preload::preload_entries(&environ)?;
        let pod = self.pods.for_cgroup(&facts.cgroup);
        let pf = policy::ProcessFacts {
            sha256: Some(&facts.sha256),
            exe_path: Some(&facts.exe_path),
            cgroup: Some(policy::CgroupFacts {
                path: &facts.cgroup,
                pod: pod.as_ref(),
            }),
            uid: facts.uid,
        };
        let p = &self.in_force.policy;
        let ident = policy::resolve(p, &pf).ident;
        let Some(identity) = (ident as usize)
            .checked_sub(1)
            .and_then(|i| p.identities.get(i))
        else {
            return Err(Refusal::NoIdentity);
        };
        let identity = identity.name.clone();
        let loaded = preload::hash_preloads(&mut self.cache, pid, &entries)?;
        let hashes: Vec<[u8; 32]> = loaded.iter().map(|l| l.sha256).collect();
        if let Some(i) = policy::preload_missing(&self.in_force.policy, &pf, ident, &hashes) {
            let l = &loaded[i];
            return Err(Refusal::NotGranted {
                path: l.path.clone(),
                sha256: hex::encode(l.sha256),
                identity,
            });
        }
        // Last: everything above was read from a process that had not run yet.
        if !preload::untouched_since_exec(pid) {
            return Err(Refusal::Ran);
        }
        Ok(loaded
            .iter()
            .map(|l| format!("{} sha256 {}", l.path, hex::encode(l.sha256)))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// Applies a policy atomically: fill the inactive generation, then flip `active`.
    pub fn apply(&mut self, policy: Policy) -> Result<()> {
        self.apply_from(policy, None)
    }

    /// [`Agent::apply`], recording where the policy came from; then the live connections it
    /// no longer allows are closed ([`Agent::revoke_denied`]).
    pub fn apply_from(&mut self, base: Policy, source: Option<String>) -> Result<()> {
        self.apply_for(base, source, RevokeReason::PolicyApply)
    }

    /// [`Agent::apply_from`], the closures reported with `reason`. `base` is the policy as
    /// applied (file, API); the grants in force join it.
    pub fn apply_for(
        &mut self,
        base: Policy,
        source: Option<String>,
        reason: RevokeReason,
    ) -> Result<()> {
        let t0 = Instant::now();
        // The grants in force join the policy (fitted to it: a grant whose identity it lacks
        // is dropped, one longer than its `maxGrant` is cut), as time-bound egress entries.
        let clock = policy::Clock::now();
        let mut grants = self.grants.clone();
        let (grant_rules, fitted) = grants.fit(&base);
        let mut policy = base.clone();
        policy.rules.extend(grant_rules);
        let active = self.in_force.generation;
        let next = if !self.kernel.generation_loaded(active)? {
            active
        } else {
            1 - active
        };
        // Everything that can be rejected is computed before the kernel is touched.
        let found = self.find_listeners(&policy);
        let extra = listeners::listener_rules(&policy, &found, &listeners::local_addresses());
        let rules =
            policy::rule_entries_of(&policy.rules, &extra, next, self.kernel.max_rules, clock)
                .map_err(anyhow::Error::new)?;
        let scope_dirs = scope_dirs(&policy, &self.cg_mount)?;
        // Only cgroups that still exist get classes: removed ones leave the kernel first.
        self.sweep_cgroups();
        let mut classes = Classes::new(&policy);
        let bins: Vec<(u32, u32)> = self
            .exes
            .iter()
            .map(|(id, e)| (id, classes.bin_class(&e.sha256, Some(&e.path))))
            .collect();
        // A container cgroup still waiting for its pod gets no class (its processes stay
        // pending); one whose pod is not known gets a class without it and the runtime is
        // asked (the answer re-classifies it).
        let mut ask = Vec::new();
        let cgs: Vec<(u64, u32)> = self
            .cgroups
            .iter()
            .filter(|(id, _)| !self.waiting.has_cgroup(*id))
            .map(|(id, p)| {
                let pod = match self.pod_of(p) {
                    k8s::PodOf::Known(m) => Some(m),
                    k8s::PodOf::Unknown(c) => {
                        ask.push(c);
                        None
                    }
                    k8s::PodOf::NotPod => None,
                };
                (
                    id,
                    classes.cg_class(&policy::CgroupFacts {
                        path: p,
                        pod: pod.as_ref(),
                    }),
                )
            })
            .collect();
        let idm = classes.idmatch_entries(next);
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;

        self.kernel.write_idmatch(next, &idm)?;
        self.kernel
            .write_sockets(next, &policy::socket_entries(&policy, next))?;
        let written = self.kernel.write_rules(next, &rules)?;
        for (id, class) in bins {
            self.kernel.set_bin_class(next, id, class)?;
        }
        for (id, class) in cgs {
            self.kernel.set_cgroup_class(next, id, class)?;
        }
        let settings = GenConfig {
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
            preload_hold: u32::from(policy::has_preload(&policy)),
        };
        self.kernel.prepare_generation(next, settings)?;
        // Attach to new scopes before the flip (they judge with the policy in force).
        for (dir, id) in &scope_dirs {
            self.kernel.attach_cgroup(dir, *id)?;
        }
        self.kernel
            .publish_generation(next, scope_dirs.len() as u32)?;
        let in_force_ms = t0.elapsed().as_secs_f64() * 1e3;
        for (i, (dir, _)) in scope_dirs.iter().enumerate() {
            let f = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            self.kernel.set_scope(i as u32, f)?;
        }
        let keep: HashSet<u64> = scope_dirs.iter().map(|(_, id)| *id).collect();
        for id in self.kernel.attached_cgroups() {
            if !keep.contains(&id) {
                self.kernel.detach_cgroup(id)?;
            }
        }
        if classes.uses_k8s()
            && let Some(feed) = &self.feed
        {
            ask.sort();
            ask.dedup();
            for c in &ask {
                feed.ask(c);
            }
        }
        let hash = policy::policy_hash(&policy);
        let source = source.unwrap_or_else(|| self.in_force.source.clone());
        let timed: Vec<usize> = policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.timing.is_timed())
            .map(|(i, _)| i)
            .collect();
        self.in_force = InForce {
            policy,
            base,
            clock,
            classes,
            generation: next,
            idmatch_written: idm.into_iter().collect(),
            listener_rules: extra,
            timed,
            listeners: found,
            source,
            hash,
        };
        self.sync_report_allow();
        self.drift_checked = None;
        self.grants = grants;
        if !fitted.is_empty() {
            self.grants.persist();
        }
        for (g, what) in &fitted {
            let verdict = if what.starts_with("dropped") {
                "revoked"
            } else {
                "grant"
            };
            self.report_grant(verdict, g, what);
        }
        tracing::info!(
            generation = next,
            hash = %self.in_force.hash,
            rules = rules.len(),
            hosts = written.hosts,
            prefixes = written.prefixes,
            kernel_writes = written.writes,
            compile_ms = (compile_ms * 10.0).round() / 10.0,
            ms = (in_force_ms * 10.0).round() / 10.0,
            "policy in force"
        );
        self.revoke_denied(reason);
        Ok(())
    }

    /// Closes the live connections that the policy in force denies now (README
    /// "Revocation"): the TCP connections and connected UDP sockets of every process the
    /// agent tracks in an enforced scope, each closure an event. Off with
    /// `revokeConnections: false`; in audit mode reported as `would close`. Returns the
    /// number closed. Called after every apply, at start, and (by [`Agent::revoke_pid`])
    /// when a process loses its identity.
    pub fn revoke_denied(&mut self, reason: RevokeReason) -> usize {
        self.revoke_among(None, reason)
    }

    /// [`Agent::revoke_denied`] for one process.
    pub fn revoke_pid(&mut self, pid: u32, reason: RevokeReason) -> usize {
        self.revoke_among(Some(pid), reason)
    }

    fn revoke_among(&mut self, only: Option<u32>, reason: RevokeReason) -> usize {
        if !self.in_force.policy.revoke_connections {
            return 0;
        }
        if !self.probe.found(crate::revoke::FEATURE_NETLINK) {
            if !self.revoke_warned {
                self.revoke_warned = true;
                let why = self
                    .probe
                    .feature(crate::revoke::FEATURE_NETLINK)
                    .map_or_else(|| "not probed".to_string(), |f| f.detail.clone());
                tracing::warn!(
                    reason = reason.name(),
                    "{}: {why}",
                    crate::revoke::WITHOUT_NETLINK
                );
            }
            return 0;
        }
        let t0 = Instant::now();
        let scope = &self.in_force.policy.scope;
        let pids: Vec<u32> = self
            .procs
            .iter()
            .filter(|(pid, t)| {
                only.is_none_or(|o| o == *pid) && crate::revoke::in_scope(scope, &t.cgroup)
            })
            .map(|(pid, _)| pid)
            .collect();
        let kernel = &self.kernel;
        let sweep = crate::revoke::sweep(&pids, |pid, ip, port, proto| {
            kernel
                .judge(pid, ip, port, proto)
                .map_err(|e| e.to_string())
        });
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        for e in &sweep.errors {
            tracing::warn!(
                reason = reason.name(),
                "revocation: {e}; the sweep went on with the other sockets"
            );
        }
        let now = crate::sys::boottime_ns();
        let mut closed = 0;
        for c in &sweep.closures {
            closed += usize::from(c.closed);
            let d = self.view().closure(c, reason, now);
            self.sink.emit_closure(d);
        }
        let would = sweep.closures.len() - closed;
        if sweep.closures.is_empty() && sweep.errors.is_empty() {
            tracing::debug!(
                reason = reason.name(),
                processes = sweep.processes,
                sockets = sweep.sockets,
                ms = (ms * 10.0).round() / 10.0,
                "revocation sweep: nothing to close"
            );
        } else {
            tracing::info!(
                reason = reason.name(),
                closed,
                would_close = would,
                errors = sweep.errors.len(),
                processes = sweep.processes,
                sockets = sweep.sockets,
                ms = (ms * 10.0).round() / 10.0,
                "revocation sweep"
            );
        }
        closed
    }

    /// The kernel reports allowed decisions while the policy asks for it or an
    /// `events --follow --all` client listens.
    pub(crate) fn sync_report_allow(&mut self) {
        let want = self.in_force.policy.report_allow
            || self.sink.feed.wants_allows()
            || !self.learning.is_empty();
        if let Err(e) = self.kernel.set_report_allow(want) {
            tracing::warn!("switching allow reports: {e}");
        }
    }

    /// Processes the kernel left pending (exec'd while the agent was away, or before it was
    /// ready): attest them and let held ones go on.
    pub fn settle_pending(&mut self) {
        let pending: Vec<(u32, ProcState)> = self
            .kernel
            .processes()
            .into_iter()
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

    /// Housekeeping every few seconds: forget removed cgroups and exited processes whose exit
    /// event was lost; collect exe ids when few are left.
    fn maintain(&mut self) {
        self.sweep_cgroups();
        let dropped = self
            .procs
            .sweep(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if dropped > 0 {
            tracing::debug!(dropped, "forgot processes whose exit was not seen");
        }
        let low = self.exes.capacity() / 4;
        if self.exes.available() < low {
            self.collect_exes(false);
            if self.exes.available() < low {
                self.collect_exes(true);
            }
        }
    }

    /// Readiness for `/readyz`: programs attached, the policy in force published, and the
    /// maps in sync with it (compared every [`DRIFT_CHECK_EVERY`] and after each apply).
    fn check_readiness(&mut self) {
        let generation = self.in_force.generation;
        let policy_applied = !self.in_force.hash.is_empty()
            && self.kernel.active_generation().ok() == Some(generation)
            && self.kernel.generation_loaded(generation).unwrap_or(false);
        let scopes: Vec<(u64, &str)> = self
            .in_force
            .policy
            .scope
            .iter()
            .map(|s| {
                (
                    attest::cgroup_id(&self.cg_mount, s).unwrap_or(0),
                    s.as_str(),
                )
            })
            .collect();
        let missing_links = self.kernel.missing_links(&scopes);
        let stale = self
            .drift_checked
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= DRIFT_CHECK_EVERY);
        if stale {
            let drift = self.view().drift(generation);
            if !drift.is_empty() {
                tracing::warn!(
                    differences = drift.len(),
                    first = %drift[0],
                    "the kernel maps differ from the policy in force; the next apply rewrites them"
                );
                self.kernel.forget_written();
            }
            self.drift_checked = Some((Instant::now(), drift));
        }
        let drift = self
            .drift_checked
            .as_ref()
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        self.sink
            .metrics
            .health()
            .set_readiness(crate::health::Readiness {
                policy_applied,
                missing_links,
                drift,
            });
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
        for (pid, t) in self.procs.iter() {
            let Some(exe) = self.exes.get(t.exe_id) else {
                continue;
            };
            let pod = self.pods.for_cgroup(&t.cgroup);
            let ident = policy::resolve(policy, &t.facts(exe, pod.as_ref())).ident;
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
        if !self.in_force.policy.rules.iter().any(|r| r.to_ident != 0) {
            return;
        }
        if self.find_listeners(&self.in_force.policy) == self.in_force.listeners {
            return;
        }
        match self.apply(self.in_force.base.clone()) {
            Ok(()) => tracing::info!(
                listeners = self.in_force.listeners.len(),
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
        self.sink
            .metrics
            .set_grants_active(self.grants.list().len() as u64);
        self.sink
            .metrics
            .set_lost_events(self.kernel.counter(Counter::EventsLost));
        if self.last_fill.elapsed() >= std::time::Duration::from_secs(10) {
            self.last_fill = Instant::now();
            for (name, entries, cap) in self.kernel.fill() {
                self.sink.metrics.set_map_fill(name, entries, cap);
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
        let withheld = (ev.flags & PROC_WITHHELD != 0).then(|| match ev.aux {
            WITHHELD_UNREADABLE => "environment not readable in full",
            found => loader_var_name(found).unwrap_or("loader environment"),
        });
        self.procs.set_withheld(pid, withheld);
        self.procs.set_granted(pid, None);
        if ev.flags & PROC_PENDING == 0 {
            let exe_id = ev.ident;
            match self.exes.contains(exe_id) {
                // The kernel resolved it: the event carries every fact, no /proc read.
                true if self.cgroups.contains(ev.cgroup_id) => {
                    let cgroup = self
                        .cgroups
                        .get(ev.cgroup_id)
                        .unwrap_or_default()
                        .to_string();
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
            if ev.flags & PROC_HELD != 0 && self.keep_held(e, pid, ev.start_ns) {
                // Held until its pod's metadata comes (or the hold limit).
                tracing::debug!(pid, "{e:#}");
                return;
            }
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
            self.sink
                .metrics
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
                } else {
                    self.procs.fork(ev.aux, ev.tgid);
                }
            }
            Ok(EventKind::Exit) => self.procs.exit(ev.tgid),
            Ok(EventKind::Tamper) => {
                let rec = self.view().tamper(ev);
                tracing::warn!(
                    pid = rec.pid,
                    by_pid = rec.by_pid,
                    by_uid = rec.by_uid,
                    syscall = rec.syscall,
                    "process tampered with: its identity is withheld until it execs again untraced"
                );
                self.sink.emit_line(&rec);
                // Its connections are judged again without the identity.
                self.revoke_pid(rec.pid, RevokeReason::IdentityLost);
            }
            Ok(EventKind::Connect | EventKind::Socket) => {
                let d = self.view().decision(ev);
                self.observe(&d);
                let followers = self.sink.feed.followers();
                self.sink.emit(d);
                if self.sink.feed.followers() != followers {
                    self.sync_report_allow();
                }
            }
            Err(_) => {}
        }
    }

    /// Runs until SIGINT/SIGTERM.
    pub async fn run(mut self, opts: &Options) -> Result<()> {
        self.settle_pending();
        let rb = self
            .kernel
            .take_events()
            .context("the event ring buffer is gone")?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it drops.
        let mut rb = unsafe { AsyncFd::register(rb) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        // API connections are served on their own tasks; only their requests reach the loop.
        let (call_tx, mut calls) = tokio::sync::mpsc::channel(crate::server::QUEUE);
        let api = crate::server::bind(&opts.api_socket)?;
        let api_task = tokio::spawn(crate::server::serve(api, call_tx));
        let _metrics_server = match opts.metrics_addr {
            Some(addr) => {
                let h = self.sink.metrics.serve(addr).await?;
                tracing::info!(%addr, "serving Prometheus metrics on /metrics");
                Some(h)
            }
            None => None,
        };
        self.policy_fingerprint = opts.policy_path.as_deref().and_then(fingerprint);
        self.sink.metrics.health().tick();
        self.check_readiness();
        let (feed, mut pod_updates) = crate::k8s::feed::spawn(&opts.k8s);
        self.feed = Some(feed);
        // What waited for pods before the task ran is asked about now.
        self.pods_tick_ask_all();
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
                    self.sink.metrics.health().tick();
                    if let Err(e) = self.kernel.beat() {
                        tracing::warn!("writing the heartbeat (the kernel stops holding never-seen execs when it is stale): {e}");
                    }
                    let lost = self.kernel.counter(Counter::EventsLost);
                    if lost != lost_seen || ticks.is_multiple_of(10) {
                        lost_seen = lost;
                        self.settle_pending();
                        self.maintain();
                    }
                    self.pods_tick();
                    self.check_time();
                    self.refresh_listeners();
                    self.watch_policy_file(opts);
                    if ticks.is_multiple_of(10) || self.drift_checked.is_none() {
                        self.check_readiness();
                    }
                    self.update_metrics();
                    self.finish_learning(false);
                    if self.last_record_save.elapsed() >= crate::record::SAVE_EVERY {
                        self.save_record();
                    }
                }
                Some(u) = pod_updates.recv() => self.on_pod_update(u),
                call = calls.recv() => match call {
                    Some(call) => self.answer(call),
                    None => bail!("the API server stopped; see the log above"),
                },
                _ = hup.recv() => self.reload(opts),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        api_task.abort();
        let _ = fs::remove_file(&opts.api_socket);
        self.finish_learning(true);
        if let Some(h) = self.record_writer.take() {
            let _ = h.join();
        }
        if let Err(e) = self.record.save() {
            tracing::warn!("{e}");
        }
        // From now on the kernel runs never-seen execs pending instead of holding them; let go
        // of those it held before it saw the heartbeat stop.
        if let Err(e) = self.kernel.stop_beating(std::process::id()) {
            tracing::warn!("clearing the heartbeat at exit: {e}");
        }
        self.settle_pending();
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

/// The cgroup registry is swept before it grows past this many entries...
const CGROUP_WATERMARK_MIN: usize = MAX_CGROUPS as usize / 2;
/// ...or past this many more than were alive at the last sweep.
const CGROUP_WATERMARK_STEP: usize = MAX_CGROUPS as usize / 8;

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

/// Sends SIGCONT to a process we hold, through a pidfd so a reused pid is never signalled.
fn resume(pid: u32, start_ns: u64) -> Result<()> {
    let fd = crate::sys::pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
    // The pidfd pins the process now at `pid`; skip it only when it is provably another
    // process than the one held (pid reused). An unreadable start time is no proof: a held
    // process left frozen forever is worse than a SIGCONT to a process that was not stopped
    // (which changes nothing for enforcement: its identity is in the kernel's map).
    let started = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            rest.split_whitespace().nth(19)?.parse::<u64>().ok()
        });
    match started {
        Some(t) if start_ns != 0 && t.abs_diff(attest::boot_ns_to_ticks(start_ns)) > 1 => {
            tracing::debug!(pid, "not resuming: the pid now belongs to another process");
            return Ok(());
        }
        None if start_ns != 0 => {
            tracing::warn!(
                pid,
                "resuming a held process whose start time could not be read from /proc/{pid}/stat"
            );
        }
        _ => {}
    }
    use std::os::fd::AsFd as _;
    crate::sys::pidfd_send_signal(fd.as_fd(), libc::SIGCONT)
        .with_context(|| format!("pidfd_send_signal({pid}, SIGCONT)"))?;
    Ok(())
}

/// The API's requests, answered on the event loop from read-only views ([`crate::views`]);
/// the server task writes the reply, so no client is ever waited on here.
impl Agent {
    /// Read-only view of the components, for answers and event records.
    pub(crate) fn view(&self) -> View<'_> {
        View {
            kernel: &self.kernel,
            in_force: &self.in_force,
            exes: &self.exes,
            procs: &self.procs,
            cgroups: &self.cgroups,
            sink: &self.sink,
            probe: &self.probe,
            pods: &self.pods,
            k8s_health: &self.k8s_health,
            waiting: &self.waiting,
        }
    }

    /// `status`; drift found means the kernel no longer holds what was written, so the next
    /// apply writes everything again.
    fn status(&mut self) -> api::Status {
        let mut s = self.view().status();
        let now = policy::wall_now_ns();
        s.grants = self
            .grants
            .list()
            .iter()
            .map(|g| self.grant_info(g, now))
            .collect();
        let timed: Vec<&policy::Timing> = self
            .in_force
            .timed
            .iter()
            .map(|&i| &self.in_force.policy.rules[i].timing)
            .filter(|t| !t.is_over(now))
            .collect();
        s.timed_entries = timed.iter().filter(|t| t.grant.is_none()).count() as u64;
        s.next_expiry = timed
            .iter()
            .flat_map(|t| [t.not_before, t.expires])
            .flatten()
            .filter(|&at| at > now)
            .min()
            .map(policy::rfc3339);
        if !s.drift.is_empty() {
            self.kernel.forget_written();
        }
        s
    }

    /// Answers one API call; never waits on the client (the server task writes the reply).
    pub(crate) fn answer(&mut self, call: Call) {
        match call {
            Call::Ask(request::Kind::Learn(req), reply) if req.for_secs > 0 => {
                let wait = std::time::Duration::from_secs(req.for_secs).min(MAX_LEARN_FOR);
                tracing::info!(
                    secs = wait.as_secs(),
                    "learn: observing (allowed connects are reported meanwhile)"
                );
                self.learning.push(PendingLearn {
                    until: Instant::now() + wait,
                    req,
                    reply,
                });
                self.sync_report_allow();
            }
            Call::Ask(kind, reply) => {
                let _ = reply.send(self.ask(kind));
            }
            Call::History { all, reply } => {
                let _ = reply.send(self.sink.feed.history(all));
            }
            Call::Follow { stream, all } => {
                self.sink.feed.follow(stream, all);
                self.sync_report_allow();
            }
        }
    }

    /// Counts a connect decision in the record. A decision about a process the agent had
    /// not attested yet (pending, untracked) carries no facts it can vouch for (the process
    /// may have exited before its exec was read, leaving its parent's): it is not recorded.
    fn observe(&mut self, d: &api::Decision) {
        let unknown = [RULE_PENDING, RULE_UNTRACKED].map(|r| self.in_force.rule_text(r));
        if unknown.contains(&d.rule) {
            return;
        }
        let pod = d.cgroup.as_deref().and_then(|c| self.pods.for_cgroup(c));
        if let Some(k) = crate::record::key_of(d, pod.as_ref()) {
            self.record.observe(
                k,
                &d.verdict,
                d.identity.as_deref(),
                crate::record::now_secs(),
            );
        }
    }

    /// Writes the record when it changed, on a thread of its own (a full record takes a few
    /// hundred ms to write; the event loop only copies it).
    fn save_record(&mut self) {
        self.last_record_save = Instant::now();
        if self
            .record_writer
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let Some(snap) = self.record.take_snapshot() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("record-writer".into())
            .spawn(move || {
                if let Err(e) = snap.write() {
                    tracing::warn!(
                        "{e}; the record stays in memory and is written at its next change"
                    );
                }
            });
        match spawned {
            Ok(h) => self.record_writer = Some(h),
            Err(e) => tracing::warn!("starting the record writer thread: {e}"),
        }
    }

    /// Answers the `learn --for` requests whose time is up (all of them with `all`).
    fn finish_learning(&mut self, all: bool) {
        if self.learning.is_empty() {
            return;
        }
        let now = Instant::now();
        let (done, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.learning)
            .into_iter()
            .partition(|p| all || p.until <= now || p.reply.is_closed());
        self.learning = wait;
        for p in done {
            let _ = p.reply.send(self.learn(&p.req));
        }
        self.sync_report_allow();
    }

    /// `learn`: the policy learned from the record.
    fn learn(&self, r: &api::LearnRequest) -> reply::Kind {
        let since = match r.since_secs {
            0 => 0,
            s => crate::record::now_secs().saturating_sub(s),
        };
        let prefix = |n: Option<u32>| n.map(|n| u8::try_from(n).unwrap_or(u8::MAX));
        let opts = crate::learn::LearnOptions {
            trust_domain: self.in_force.policy.trust_domain.clone(),
            scope: r.scope.clone(),
            namespaces: r.namespace.clone(),
            aggregate_v4: prefix(r.aggregate_v4),
            aggregate_v6: prefix(r.aggregate_v6),
        };
        match crate::learn::learn(&self.record.entries_since(since), &opts) {
            Ok(l) => reply::Kind::Learned(api::Learned {
                yaml: l.yaml,
                identities: l.identities as u32,
                entries: l.entries as u64,
                connects: l.connects,
                skipped: l.skipped as u64,
                denied: l.denied as u64,
            }),
            Err(e) => reply::Kind::Error(e.to_string()),
        }
    }

    /// `policy diff`: the candidate replayed over the record against the policy in force.
    fn diff_request(&self, r: &api::DiffRequest) -> Result<api::DiffReport> {
        let name = if r.name.is_empty() {
            "policy"
        } else {
            r.name.as_str()
        };
        let (candidate, warnings) = policy::load(name, &r.policy).map_err(anyhow::Error::new)?;
        let found = self.find_listeners(&candidate);
        let extra = listeners::listener_rules(&candidate, &found, &listeners::local_addresses());
        let limit = self.kernel.max_rules;
        let new =
            crate::replay::Model::new(&candidate, &extra, limit).map_err(anyhow::Error::new)?;
        let old =
            crate::replay::Model::new(&self.in_force.policy, &self.in_force.listener_rules, limit)
                .map_err(anyhow::Error::new)
                .context("compiling the policy in force")?;
        let since = match r.since_secs {
            0 => 0,
            s => crate::record::now_secs().saturating_sub(s),
        };
        let mut report = crate::replay::diff(&old, &new, &self.record.entries_since(since));
        report.warnings = warnings.iter().map(|w| w.render(name)).collect();
        Ok(report)
    }

    fn ask(&mut self, kind: request::Kind) -> reply::Kind {
        match kind {
            request::Kind::Status(_) => reply::Kind::Status(self.status()),
            request::Kind::Identities(_) => reply::Kind::Identities(self.view().identities()),
            request::Kind::Explain(r) => match self.view().explain(&r) {
                Ok(d) => reply::Kind::Explain(d),
                Err(e) => reply::Kind::Error(format!("{e:#}")),
            },
            request::Kind::Apply(r) => match self.apply_request(&r) {
                Ok(a) => reply::Kind::Apply(a),
                Err(e) => reply::Kind::Error(format!(
                    "policy not applied, the policy in force is unchanged: {e:#}"
                )),
            },
            request::Kind::Grant(r) => match self.grant_request(&r) {
                Ok(g) => reply::Kind::Grant(g),
                Err(e) => reply::Kind::Error(format!("{e:#}")),
            },
            request::Kind::Grants(_) => {
                let now = policy::wall_now_ns();
                reply::Kind::Grants(api::GrantList {
                    grants: self
                        .grants
                        .list()
                        .iter()
                        .map(|g| self.grant_info(g, now))
                        .collect(),
                    max_grant_secs: self.in_force.base.max_grant_secs,
                })
            }
            request::Kind::Revoke(r) => match self.revoke_request(r.id) {
                Ok(g) => reply::Kind::Grant(g),
                Err(e) => reply::Kind::Error(format!("{e:#}")),
            },
            request::Kind::Learn(r) => self.learn(&r),
            request::Kind::Diff(r) => match self.diff_request(&r) {
                Ok(d) => reply::Kind::Diff(d),
                Err(e) => reply::Kind::Error(format!("policy not replayed: {e:#}")),
            },
            // The server answers `events` from the history it asks for.
            request::Kind::Events(_) => {
                reply::Kind::Error("events are served by the API server".into())
            }
        }
    }

    /// `grant`: the grant is saved, then the policy in force is applied again with it, all
    /// or nothing (a failed apply takes the grant back).
    fn grant_request(&mut self, r: &api::GrantRequest) -> Result<api::GrantInfo> {
        let req = crate::grants::GrantRequest {
            identity: r.identity.clone(),
            to: r.to.clone(),
            protocol: r.protocol.clone(),
            duration: r.duration.clone(),
            reason: r.reason.clone(),
            by: r.by.clone(),
        };
        let now = policy::wall_now_ns();
        let g = self
            .grants
            .add(&req, &self.in_force.base, now)
            .map_err(anyhow::Error::new)?;
        if let Err(e) = self.apply(self.in_force.base.clone()) {
            let _ = self.grants.remove(g.id);
            return Err(e.context("the grant was not made"));
        }
        self.report_grant("grant", &g, &format!("granted by {}", g.by));
        Ok(self.grant_info(&g, now))
    }

    /// `revoke ID`: the grant ends now; the policy in force is applied again without it.
    fn revoke_request(&mut self, id: u64) -> Result<api::GrantInfo> {
        let now = policy::wall_now_ns();
        let g = self.grants.remove(id).map_err(anyhow::Error::new)?;
        let base = self.in_force.base.clone();
        if let Err(e) = self.apply_for(base, None, RevokeReason::GrantRevoked) {
            // Still in force in the kernel until its instant: say so, never hide it.
            self.grants.restore(g.clone());
            return Err(e.context(format!(
                "grant {id} could not be revoked; it stays in force until {}",
                policy::rfc3339(g.expires)
            )));
        }
        self.report_grant("revoked", &g, "revoked from the command line");
        Ok(self.grant_info(&g, now))
    }

    pub(crate) fn grant_info(&self, g: &crate::grants::Grant, now: i64) -> api::GrantInfo {
        api::GrantInfo {
            id: g.id,
            identity: g.identity.clone(),
            spiffe_id: self
                .in_force
                .base
                .identities
                .iter()
                .find(|i| i.name == g.identity)
                .map(|i| i.spiffe_id.clone())
                .unwrap_or_default(),
            destination: g.destination(),
            reason: g.reason.clone(),
            by: g.by.clone(),
            granted_at: policy::rfc3339(g.granted_at),
            expires_at: policy::rfc3339(g.expires),
            seconds_left: u64::try_from((g.expires - now).max(0) / 1_000_000_000).unwrap_or(0),
            expires_unix_ns: g.expires,
        }
    }

    /// Reports a grant made, over or revoked (`verdict`), with what happened: a JSON line,
    /// the events history, a metric and a log line.
    pub(crate) fn report_grant(&mut self, verdict: &str, g: &crate::grants::Grant, what: &str) {
        tracing::info!(
            grant = g.id,
            identity = %g.identity,
            destination = %g.destination(),
            reason = %g.reason,
            expires = %policy::rfc3339(g.expires),
            "grant {verdict}: {what}"
        );
        let info = self.grant_info(g, policy::wall_now_ns());
        let d = api::Decision {
            identity: (!info.spiffe_id.is_empty()).then_some(info.spiffe_id),
            verdict: verdict.to_string(),
            dst: g.cidr.to_string(),
            port: g.ports.first().map_or(0, |p| p.0.into()),
            protocol: g.protocol.clone(),
            rule: format!(
                "grant {} ({}): {} egress: {}: {what}",
                g.id,
                g.reason,
                g.identity,
                g.destination()
            ),
            time_ns: crate::sys::boottime_ns(),
            reason: Some(g.reason.clone()),
            grant: Some(g.id),
            expires: Some(policy::rfc3339(g.expires)),
            ..Default::default()
        };
        self.sink.record(d);
        self.sink.metrics.grant_event(verdict);
        self.sink
            .metrics
            .set_grants_active(self.grants.list().len() as u64);
    }

    /// Every tick: grants and time-bound entries whose instant passed are reported (the kernel
    /// already stopped honouring them by itself) and the policy is compiled again, so the maps
    /// hold exactly what is in force; the same when the wall clock was stepped (the boot-clock
    /// windows were computed from the old offset).
    pub(crate) fn check_time(&mut self) {
        let clock = policy::Clock::now();
        let now = clock.wall_ns;
        let since = self.time_checked;
        self.time_checked = now;
        let stepped = (clock.offset() - self.in_force.clock.offset()).abs() > 1_000_000_000;
        let mut crossed = false;
        let mut expired_entries = Vec::new();
        for r in self
            .in_force
            .timed
            .iter()
            .map(|&i| &self.in_force.policy.rules[i])
        {
            let t = &r.timing;
            if t.grant.is_some() {
                continue;
            }
            let passed = |at: Option<i64>| at.is_some_and(|at| since < at && at <= now);
            if passed(t.not_before) {
                crossed = true;
            }
            if passed(t.expires) {
                crossed = true;
                expired_entries.push(r.clone());
            }
        }
        for r in &expired_entries {
            tracing::info!(rule = %r.text, reason = ?r.timing.reason, "policy entry expired");
            let d = api::Decision {
                identity: self.in_force.identity_name(r.ident).map(str::to_string),
                verdict: "expired".into(),
                dst: r.cidr.to_string(),
                port: r.ports.first().map_or(0, |p| p.0.into()),
                protocol: r.protocol.as_str().to_string(),
                rule: r.text.clone(),
                time_ns: crate::sys::boottime_ns(),
                reason: r.timing.reason.clone(),
                expires: r.timing.expires.map(policy::rfc3339),
                ..Default::default()
            };
            self.sink.record(d);
        }
        let over = self.grants.expire(now);
        for g in &over {
            self.report_grant("expired", g, "its time is over");
        }
        if over.is_empty() && !crossed && !stepped {
            return;
        }
        if stepped {
            tracing::warn!(
                offset_change_ms =
                    ((clock.offset() - self.in_force.clock.offset()) / 1_000_000) as i64,
                "the wall clock was stepped: time-bound entries are mapped to the kernel clock again"
            );
        }
        let reason = if !over.is_empty() {
            RevokeReason::GrantExpired
        } else if !expired_entries.is_empty() {
            RevokeReason::EntryExpired
        } else {
            RevokeReason::PolicyApply
        };
        let base = self.in_force.base.clone();
        if let Err(e) = self.apply_for(base, None, reason) {
            tracing::error!(
                "compiling the policy again after a time-bound entry's instant: {e:#}; the kernel still stops honouring each entry at its instant"
            );
            // The kernel already denies what expired: close it all the same.
            self.revoke_denied(reason);
        }
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
            policy_hash: self.in_force.hash.clone(),
            generation: self.in_force.generation,
            warnings: warnings.iter().map(|w| w.render(name)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// The kubelet's atomic writer: the ConfigMap's files live in a timestamped folder,
    /// `..data` points to it and `policy.yaml` points to `..data/policy.yaml`; an update
    /// writes a new folder, renames a new `..data` symlink over the old one and removes the
    /// old folder. The watch reads through the symlinks, so it sees the new content.
    #[test]
    fn policy_watch_sees_a_configmap_symlink_swap() {
        let dir = std::env::temp_dir().join(format!("enf-cm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("..2026_12_01_06_00_00.1")).expect("mkdir");
        fs::write(
            dir.join("..2026_12_01_06_00_00.1/policy.yaml"),
            "mode: audit\n",
        )
        .expect("w");
        symlink("..2026_12_01_06_00_00.1", dir.join("..data")).expect("symlink");
        symlink("..data/policy.yaml", dir.join("policy.yaml")).expect("symlink");
        let path = dir.join("policy.yaml");
        let before = fingerprint(&path);
        assert_eq!(before, Some(digest(b"mode: audit\n")));

        fs::create_dir_all(dir.join("..2026_12_01_06_05_00.2")).expect("mkdir");
        fs::write(
            dir.join("..2026_12_01_06_05_00.2/policy.yaml"),
            "mode: enforce\n",
        )
        .expect("w");
        symlink("..2026_12_01_06_05_00.2", dir.join("..data_tmp")).expect("symlink");
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        fs::remove_dir_all(dir.join("..2026_12_01_06_00_00.1")).expect("rm old");

        let after = fingerprint(&path);
        assert_eq!(after, Some(digest(b"mode: enforce\n")));
        assert_ne!(before, after, "the watch must see the swapped content");
        let _ = fs::remove_dir_all(&dir);
    }
}

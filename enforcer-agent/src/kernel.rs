//! The only module that knows the kernel object: loads it, pins and attaches its programs,
//! and hands out typed map handles. Map and program names come from `enforcer-common`.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, CgroupArray, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, RawTracePoint,
        links::{FdLink, PinnedLink},
    },
};
use enforcer_common::*;

/// Errors of the kernel side, each naming what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this agent was built without its kernel programs; build it with `cargo xtask build` (which sets ENFORCER_EBPF_OBJ)"
    )]
    NoObject,
    #[error(
        "could not create the pin folder {path}: {err}; is bpffs mounted there (mount -t bpf bpf /sys/fs/bpf)?"
    )]
    PinDir { path: PathBuf, err: io::Error },
    #[error(
        "{path} is not on a bpffs and mounting one there failed: {err}; mount it with `mount -t bpf bpf {path}`"
    )]
    NoBpffs { path: PathBuf, err: String },
    #[error(
        "loading the kernel programs failed: {0}; run as root on a kernel with BPF (5.10 or later)"
    )]
    Load(#[from] Box<aya::EbpfError>),
    #[error(
        "the kernel object has no {kind} named {name}; the agent and its kernel object do not match, rebuild with `cargo xtask build`"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the kernel (release {release}) refused to load program {program} ({kind}): {error}\n--- verifier log of {program}: {shown} of {total} lines ---\n{log}\n--- end of verifier log ---\nThis agent build and this kernel do not fit: run a kernel from the README's kernel table (5.10 or later), or report the log above with `uname -r` and the agent version"
    )]
    Rejected {
        program: &'static str,
        kind: &'static str,
        release: String,
        error: String,
        log: String,
        shown: usize,
        total: usize,
    },
    #[error("{what} failed: {detail}")]
    Op { what: String, detail: String },
    #[error(
        "the pinned state under {path} was written by ABI version {found}, this agent speaks {ABI_VERSION}; remove it with `enforcer-agent uninstall --bpffs-dir {path}` first"
    )]
    AbiMismatch { path: PathBuf, found: u32 },
}

fn op<E: std::error::Error>(what: impl Into<String>) -> impl FnOnce(E) -> KernelError {
    let what = what.into();
    move |e| {
        let mut detail = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            src = s.source();
        }
        KernelError::Op { what, detail }
    }
}

#[cfg(enforcer_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ENFORCER_EBPF_OBJ"));
#[cfg(not(enforcer_ebpf))]
static OBJECT: &[u8] = &[];

/// The cgroup hooks and their program names.
pub const HOOKS: [(&str, &str); 4] = [
    ("connect4", PROG_CONNECT4),
    ("connect6", PROG_CONNECT6),
    ("sendmsg4", PROG_SENDMSG4),
    ("sendmsg6", PROG_SENDMSG6),
];
const TRACEPOINTS: [(&str, &str); 3] = [
    (PROG_FORK, TP_FORK),
    (PROG_EXEC, TP_EXEC),
    (PROG_EXIT, TP_EXIT),
];

/// Typed handles on every map.
pub struct Maps {
    pub procs: HashMap<MapData, u32, ProcState>,
    pub exes: HashMap<MapData, ExeKey, u32>,
    pub binclass: Array<MapData, u32>,
    pub cgroups: HashMap<MapData, u64, CgroupValue>,
    pub idmatch: HashMap<MapData, IdMatchKey, u32>,
    pub rules: LpmTrie<MapData, RuleKeyData, RuleValue>,
    pub config: Array<MapData, Config>,
    pub offsets: Array<MapData, KernelOffsets>,
    pub counters: PerCpuArray<MapData, u64>,
    pub scopes: CgroupArray<MapData>,
    pub uncovered: HashMap<MapData, UncoveredKey, UncoveredValue>,
}

/// The loaded object, its maps, and where its pins live.
pub struct Kernel {
    ebpf: Ebpf,
    pub pin_dir: PathBuf,
    pub maps: Maps,
    pub events: Option<RingBuf<MapData>>,
    /// True when pinned state of a previous agent was found and taken over.
    pub took_over: bool,
    /// `ENF_RULES` content of each generation as this agent last wrote it (None: unknown).
    rules_written: [Option<std::collections::HashMap<RuleKey, RuleValue>>; 2],
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error,
{
    let map = ebpf
        .take_map(name)
        .ok_or(KernelError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(op(format!("opening map {name}")))
}

impl Kernel {
    /// Loads the programs, reusing the maps pinned under `pin_dir` when a previous agent left
    /// them (that is the takeover: the kernel state is never rebuilt from scratch).
    pub fn load(pin_dir: &Path) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir.join("links")).map_err(|err| KernelError::PinDir {
            path: pin_dir.to_path_buf(),
            err,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        for (_, name) in HOOKS {
            load_program::<CgroupSockAddr>(&mut ebpf, name)?;
        }
        for (name, _) in TRACEPOINTS {
            load_program::<RawTracePoint>(&mut ebpf, name)?;
        }
        let maps = Maps {
            procs: take(&mut ebpf, MAP_PROCS)?,
            exes: take(&mut ebpf, MAP_EXES)?,
            binclass: take(&mut ebpf, MAP_BINCLASS)?,
            cgroups: take(&mut ebpf, MAP_CGROUPS)?,
            idmatch: take(&mut ebpf, MAP_IDMATCH)?,
            rules: take(&mut ebpf, MAP_RULES)?,
            config: take(&mut ebpf, MAP_CONFIG)?,
            offsets: take(&mut ebpf, MAP_OFFSETS)?,
            counters: take(&mut ebpf, MAP_COUNTERS)?,
            scopes: take(&mut ebpf, MAP_SCOPES)?,
            uncovered: take(&mut ebpf, MAP_UNCOVERED)?,
        };
        let events = Some(take(&mut ebpf, MAP_EVENTS)?);
        let mut k = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            maps,
            events,
            took_over: false,
            rules_written: [None, None],
        };
        let cfg = k.config()?;
        k.took_over = cfg.abi_version != 0;
        if k.took_over && cfg.abi_version != ABI_VERSION {
            return Err(KernelError::AbiMismatch {
                path: pin_dir.to_path_buf(),
                found: cfg.abi_version,
            });
        }
        Ok(k)
    }

    pub fn config(&self) -> Result<Config, KernelError> {
        self.maps
            .config
            .get(&0, 0)
            .map_err(op(format!("reading map {MAP_CONFIG}")))
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<(), KernelError> {
        self.maps
            .config
            .set(0, cfg, 0)
            .map_err(op(format!("writing map {MAP_CONFIG}")))
    }

    pub fn set_offsets(&mut self, off: &KernelOffsets) -> Result<(), KernelError> {
        self.maps
            .offsets
            .set(0, off, 0)
            .map_err(op(format!("writing map {MAP_OFFSETS}")))
    }

    /// Attaches the process tracepoints, unless pinned links from a previous agent are in
    /// place (they keep running and feed the same pinned maps).
    pub fn attach_tracepoints(&mut self) -> Result<(), KernelError> {
        for (name, tp) in TRACEPOINTS {
            let pin = self.pin_dir.join("links").join(format!("tp_{tp}"));
            if pin.exists() {
                continue;
            }
            let prog: &mut RawTracePoint = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(tp)
                .map_err(op(format!("attaching {name} to raw tracepoint {tp}")))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(op(format!("taking the link of {name}")))?
                .into();
            link.pin(&pin)
                .map_err(op(format!("pinning {}", pin.display())))?;
        }
        Ok(())
    }

    fn cgroup_pin(&self, cgroup_id: u64, hook: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("cg_{cgroup_id}_{hook}"))
    }

    /// Attaches the four socket programs to a cgroup (bpf_link: other programs on the cgroup
    /// keep running) and pins the links. Links pinned by a previous agent get this
    /// agent's programs atomically (`BPF_LINK_UPDATE`): no instant without a program.
    pub fn attach_cgroup(&mut self, dir: &Path, cgroup_id: u64) -> Result<(), KernelError> {
        let cg = fs::File::open(dir).map_err(op(format!("opening cgroup {}", dir.display())))?;
        for (hook, name) in HOOKS {
            let pin = self.cgroup_pin(cgroup_id, hook);
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = if pin.exists() {
                let fd: FdLink = PinnedLink::from_pin(&pin)
                    .map_err(op(format!("opening pinned link {}", pin.display())))?
                    .into();
                let link = fd.try_into().map_err(op(format!(
                    "pinned link {} is not a cgroup link",
                    pin.display()
                )))?;
                prog.attach_to_link(link)
                    .map_err(op(format!("updating pinned link {}", pin.display())))?
            } else {
                // With bpf_link (5.7+) the kernel always multi-attaches and rejects flags:
                // `Single` passes 0, and other programs on the cgroup keep running.
                prog.attach(cg.as_fd(), CgroupAttachMode::Single)
                    .map_err(op(format!("attaching {name} to {}", dir.display())))?
            };
            let link: FdLink = prog
                .take_link(id)
                .map_err(op(format!("taking the link of {name}")))?
                .try_into()
                .map_err(op(format!(
                    "link of {name} is not a bpf_link (kernel older than 5.7?)"
                )))?;
            if !pin.exists() {
                link.pin(&pin)
                    .map_err(op(format!("pinning {}", pin.display())))?;
            }
        }
        Ok(())
    }

    /// Cgroup ids that have pinned socket links.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("cg_")?.split('_').next()?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Detaches the socket programs from a cgroup by removing the pinned links.
    pub fn detach_cgroup(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        for (hook, _) in HOOKS {
            let pin = self.cgroup_pin(cgroup_id, hook);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(op(format!("removing {}", pin.display()))(e)),
            }
        }
        Ok(())
    }

    /// Sum of one per-CPU counter.
    pub fn counter(&self, idx: u32) -> u64 {
        self.maps
            .counters
            .get(&idx, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Replaces every `ENF_RULES` entry of `generation` by `entries`.
    pub fn write_rules(
        &mut self,
        generation: u32,
        entries: &[(RuleKey, RuleValue)],
    ) -> Result<(), KernelError> {
        let slot = (generation & 1) as usize;
        // What this generation holds: remembered from our last write, else read back once
        // (after a takeover).
        let old: std::collections::HashMap<RuleKey, RuleValue> =
            match self.rules_written[slot].take() {
                Some(m) => m,
                None => self.rules_of(generation).into_iter().collect(),
            };
        let new: std::collections::HashMap<RuleKey, RuleValue> = entries.iter().copied().collect();
        // On any error the slot is left unknown, so the next write reads it back.
        for k in old.keys().filter(|k| !new.contains_key(k)) {
            self.maps
                .rules
                .remove(&Key::new(k.prefix_len, k.data))
                .map_err(op(format!("clearing map {MAP_RULES}")))?;
        }
        for (k, v) in &new {
            if old.get(k) == Some(v) {
                continue; // already in the kernel as it should be
            }
            self.maps
                .rules
                .insert(&Key::new(k.prefix_len, k.data), v, 0)
                .map_err(op(format!("writing map {MAP_RULES}")))?;
        }
        self.rules_written[slot] = Some(new);
        Ok(())
    }

    /// Forgets what this agent believes the rule maps hold: the next apply reads them back
    /// and rewrites every difference (after drift was seen).
    pub fn forget_written(&mut self) {
        self.rules_written = [None, None];
    }

    /// Replaces every `ENF_IDMATCH` entry of `generation` by `entries`.
    pub fn write_idmatch(
        &mut self,
        generation: u32,
        entries: &[(IdMatchKey, u32)],
    ) -> Result<(), KernelError> {
        let stale: Vec<IdMatchKey> = self
            .maps
            .idmatch
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == generation && !entries.iter().any(|(e, _)| e == k))
            .collect();
        for k in stale {
            self.maps
                .idmatch
                .remove(&k)
                .map_err(op(format!("clearing map {MAP_IDMATCH}")))?;
        }
        for (k, v) in entries {
            self.maps
                .idmatch
                .insert(k, v, 0)
                .map_err(op(format!("writing map {MAP_IDMATCH}")))?;
        }
        Ok(())
    }
}

/// What the kernel decides for one (process, destination): the verdict, the identity number
/// and the rule id. Mirrors the `enf_*` socket programs step by step, reading the same maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: u32,
    pub ident: u32,
    pub rule: u32,
}

impl Kernel {
    pub fn judge(
        &self,
        pid: u32,
        dst: std::net::IpAddr,
        port: u16,
        proto: u8,
    ) -> Result<Judgement, KernelError> {
        let deny = |rule| Judgement {
            verdict: VERDICT_DENY,
            ident: IDENT_NONE,
            rule,
        };
        let cfg = self.config()?;
        let generation = cfg.active & 1;
        let g = cfg.generations[generation as usize];
        let mut j = if g.loaded == 0 {
            deny(RULE_NO_CONFIG)
        } else {
            match self.maps.procs.get(&pid, 0) {
                Err(_) => deny(RULE_UNTRACKED),
                Ok(p) if p.flags & PROC_PENDING != 0 => deny(RULE_PENDING),
                Ok(p) => {
                    let ident = self.identity(&g, generation, &p);
                    if ident == IDENT_NONE {
                        let verdict = match g.unattested {
                            ACTION_ALLOW => VERDICT_ALLOW,
                            ACTION_AUDIT => VERDICT_AUDIT,
                            _ => VERDICT_DENY,
                        };
                        Judgement {
                            verdict,
                            ident,
                            rule: RULE_UNATTESTED,
                        }
                    } else {
                        let (family, addr) = match dst {
                            std::net::IpAddr::V4(a) => (FAMILY_V4, a.octets()),
                            std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                                Some(v4) => (FAMILY_V4, v4.octets()),
                                None => {
                                    let mut data = RuleKeyData {
                                        generation,
                                        ident,
                                        proto,
                                        family: FAMILY_V6,
                                        port,
                                        addr: a.octets(),
                                    };
                                    let v = self.lookup_rule(&mut data, 128);
                                    return Ok(self.finish(
                                        &g,
                                        Judgement {
                                            verdict: v.verdict,
                                            ident,
                                            rule: v.rule,
                                        },
                                    ));
                                }
                            },
                        };
                        let mut a16 = [0u8; 16];
                        a16[..4].copy_from_slice(&addr);
                        let mut data = RuleKeyData {
                            generation,
                            ident,
                            proto,
                            family,
                            port,
                            addr: a16,
                        };
                        let v = self.lookup_rule(&mut data, 32);
                        Judgement {
                            verdict: v.verdict,
                            ident,
                            rule: v.rule,
                        }
                    }
                }
            }
        };
        if g.loaded == 0 && g.mode == MODE_AUDIT {
            j.verdict = VERDICT_ALLOW;
        }
        Ok(self.finish(&g, j))
    }

    fn finish(&self, g: &GenConfig, mut j: Judgement) -> Judgement {
        if j.verdict == VERDICT_DENY && g.loaded != 0 && g.mode != MODE_ENFORCE {
            j.verdict = VERDICT_AUDIT;
        }
        j
    }

    fn identity(&self, g: &GenConfig, generation: u32, p: &ProcState) -> u32 {
        let bin = self
            .maps
            .binclass
            .get(&(generation * MAX_EXES + (p.exe_id & (MAX_EXES - 1))), 0)
            .unwrap_or(BIN_NONE);
        let cg = if g.uses_cgroups == 0 {
            CG_NONE
        } else {
            self.maps
                .cgroups
                .get(&p.cgroup_id, 0)
                .map(|c| c.class[generation as usize])
                .unwrap_or(CG_NONE)
        };
        let mut k = IdMatchKey {
            generation,
            bin,
            cg,
            uid: p.uid,
        };
        if g.uses_uids != 0
            && let Ok(id) = self.maps.idmatch.get(&k, 0)
        {
            return id;
        }
        k.uid = ANY;
        self.maps.idmatch.get(&k, 0).unwrap_or(IDENT_NONE)
    }

    fn lookup_rule(&self, data: &mut RuleKeyData, addr_bits: u32) -> RuleValue {
        let bits = RULE_FIXED_BITS + addr_bits;
        if let Ok(v) = self.maps.rules.get(&Key::new(bits, *data), 0) {
            return v;
        }
        data.port = 0;
        if let Ok(v) = self.maps.rules.get(&Key::new(bits, *data), 0) {
            return v;
        }
        RuleValue {
            verdict: VERDICT_DENY,
            rule: RULE_DEFAULT_DENY,
        }
    }

    /// Number of entries of each map, with its capacity.
    pub fn fill(&self) -> Vec<(&'static str, u64, u64)> {
        let n = |it: usize| it as u64;
        vec![
            (
                MAP_PROCS,
                n(self.maps.procs.keys().count()),
                MAX_PROCS.into(),
            ),
            (MAP_EXES, n(self.maps.exes.keys().count()), MAX_EXES.into()),
            (
                MAP_CGROUPS,
                n(self.maps.cgroups.keys().count()),
                MAX_CGROUPS.into(),
            ),
            (
                MAP_IDMATCH,
                n(self.maps.idmatch.keys().count()),
                MAX_IDMATCH.into(),
            ),
            (
                MAP_RULES,
                n(self.maps.rules.keys().count()),
                MAX_RULES.into(),
            ),
        ]
    }

    /// The `ENF_RULES` entries of one generation, as the kernel holds them.
    pub fn rules_of(&self, generation: u32) -> Vec<(RuleKey, RuleValue)> {
        self.maps
            .rules
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.data().generation == generation)
            .map(|(k, v)| {
                (
                    RuleKey {
                        prefix_len: k.prefix_len(),
                        data: k.data(),
                    },
                    v,
                )
            })
            .collect()
    }

    /// The `ENF_IDMATCH` entries of one generation.
    pub fn idmatch_of(&self, generation: u32) -> Vec<(IdMatchKey, u32)> {
        self.maps
            .idmatch
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.generation == generation)
            .collect()
    }

    /// Pinned links: (link file name, program).
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let p = ebpf.program_mut(name).ok_or(KernelError::Missing {
        kind: "program",
        name,
    })?;
    p.try_into().map_err(|_| KernelError::Missing {
        kind: "program of the right type",
        name,
    })
}

/// A program type the agent loads, with the name its errors give it.
trait Loadable {
    const KIND: &'static str;
    fn load_it(&mut self) -> Result<(), ProgramError>;
}

impl Loadable for CgroupSockAddr {
    const KIND: &'static str = "cgroup_sock_addr";
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for RawTracePoint {
    const KIND: &'static str = "raw_tracepoint";
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

/// Verifier log lines kept in a rejection message (its end says why).
const VERIFIER_TAIL: usize = 60;

/// Loads one program into the kernel; a refusal names the program, its type, the kernel
/// release and carries the end of the verifier log.
fn load_program<'a, T: Loadable + 'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<(), KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog: &mut T = program(ebpf, name)?;
    prog.load_it().map_err(|e| rejected(name, T::KIND, e))
}

fn rejected(program: &'static str, kind: &'static str, e: ProgramError) -> KernelError {
    let (error, full) = match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => (io_error.to_string(), verifier_log.to_string()),
        other => {
            let mut error = other.to_string();
            let mut src = std::error::Error::source(&other);
            while let Some(s) = src {
                error.push_str(": ");
                error.push_str(&s.to_string());
                src = s.source();
            }
            (error, String::new())
        }
    };
    let lines: Vec<&str> = full.lines().filter(|l| !l.trim().is_empty()).collect();
    let total = lines.len();
    let shown = total.min(VERIFIER_TAIL);
    let log = if total == 0 {
        "(the kernel gave no verifier log)".to_string()
    } else {
        lines[total - shown..].join("\n")
    };
    KernelError::Rejected {
        program,
        kind,
        release: crate::probe::kernel_release(),
        error,
        log,
        shown,
        total,
    }
}

/// Loads the cgroup_sock_addr program `name` of the embedded object through the agent's own
/// loader, then unloads it: nothing is attached, the maps it needs are created in a scratch
/// folder under `/sys/fs/bpf` and unpinned at once. For diagnostics and tests (the object
/// holds [`PROG_REJECT`], which the verifier must refuse).
pub fn load_sock_addr_program(name: &'static str) -> Result<(), KernelError> {
    if OBJECT.is_empty() {
        return Err(KernelError::NoObject);
    }
    let scratch = Path::new(BPFFS).join(format!("enforcer-load-{}", std::process::id()));
    ensure_bpffs(&scratch)?;
    fs::create_dir_all(&scratch).map_err(|err| KernelError::PinDir {
        path: scratch.clone(),
        err,
    })?;
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&scratch)
        .load(OBJECT)
        .map_err(|e| KernelError::Load(Box::new(e)));
    // The maps were pinned only because the object asks for it: unpin them now.
    if let Ok(rd) = fs::read_dir(&scratch) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(&scratch);
    load_program::<CgroupSockAddr>(&mut loaded?, name)
}

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub(crate) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Pins under /sys/fs/bpf need bpffs there; a fresh machine may not have it mounted.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelError> {
    let root = Path::new(BPFFS);
    if !pin_dir.starts_with(root) || is_bpffs(root) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| KernelError::NoBpffs {
        path: root.to_path_buf(),
        err: e.to_string(),
    })?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// Removes every pin under `pin_dir` (links first, so programs detach), then the folder.
pub fn uninstall(pin_dir: &Path) -> Result<(), KernelError> {
    let links = pin_dir.join("links");
    if let Ok(rd) = fs::read_dir(&links) {
        for e in rd.flatten() {
            fs::remove_file(e.path()).map_err(op(format!("removing {}", e.path().display())))?;
        }
        fs::remove_dir(&links).map_err(op(format!("removing {}", links.display())))?;
    }
    if let Ok(rd) = fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            fs::remove_file(e.path()).map_err(op(format!("removing {}", e.path().display())))?;
        }
        fs::remove_dir(pin_dir).map_err(op(format!("removing {}", pin_dir.display())))?;
    }
    // The versioned folder's parent (`enforcer/`) goes too once empty.
    if let Some(parent) = pin_dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

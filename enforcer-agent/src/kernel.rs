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
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, RawTracePoint,
        links::{FdLink, PinnedLink},
    },
};
use enforcer_common::*;

use crate::sys;

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

/// The cgroup programs of [`PROGRAMS`] (sock_addr and sock_create): (cgroup hook, program
/// name).
pub fn socket_programs() -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS
        .iter()
        .filter_map(|p| p.kind.cgroup_hook().map(|h| (h.name(), p.name)))
}

/// The process programs of [`PROGRAMS`]: (program name, raw tracepoint).
pub fn tracepoint_programs() -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS.iter().filter_map(|p| match p.kind {
        ProgramKind::RawTracepoint(tp) => Some((p.name, tp)),
        ProgramKind::CgroupSockAddr(_) | ProgramKind::CgroupSock(_) => None,
    })
}

/// Typed handles on every map. Private to this module: the rest of the agent says what it
/// means through [`Kernel`]'s methods, never which map entry it writes.
struct Maps {
    procs: HashMap<MapData, u32, ProcState>,
    exes: HashMap<MapData, ExeKey, u32>,
    binclass: Array<MapData, u32>,
    cgroups: HashMap<MapData, u64, CgroupValue>,
    idmatch: HashMap<MapData, IdMatchKey, u32>,
    rules: LpmTrie<MapData, RuleKeyData, RuleValue>,
    hosts: HashMap<MapData, RuleKeyData, RuleValue>,
    /// A second descriptor of `ENF_HOSTS` for the batch syscalls (aya has no batch API).
    hosts_fd: MapData,
    config: Array<MapData, Config>,
    offsets: Array<MapData, KernelOffsets>,
    tamper_offsets: Array<MapData, TamperOffsets>,
    counters: PerCpuArray<MapData, u64>,
    scopes: CgroupArray<MapData>,
    uncovered: HashMap<MapData, UncoveredKey, UncoveredValue>,
    sockets: HashMap<MapData, SocketKey, u32>,
}

/// The loaded object, its maps, and where its pins live.
pub struct Kernel {
    ebpf: Ebpf,
    pub pin_dir: PathBuf,
    maps: Maps,
    events: Option<RingBuf<MapData>>,
    /// True when pinned state of a previous agent was found and taken over.
    pub took_over: bool,
    /// Rule entries one policy may use: half the capacity of the rule maps (two generations).
    pub max_rules: usize,
    /// `ENF_RULES` + `ENF_HOSTS` content of each generation as this agent last wrote it,
    /// sorted by [`entry_order`] (None: unknown).
    rules_written: [Option<Vec<(RuleKey, RuleValue)>>; 2],
}

/// What [`Kernel::write_rules`] put in the kernel for one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RulesWritten {
    /// Entries in `ENF_HOSTS` (single hosts).
    pub hosts: usize,
    /// Entries in the `ENF_RULES` trie (shorter prefixes).
    pub prefixes: usize,
    /// Kernel writes done (inserts, replacements and removals): 0 for a re-apply of the same.
    pub writes: usize,
}

/// The order rule entries are kept and compared in: by key data, then prefix length.
fn entry_order(e: &(RuleKey, RuleValue)) -> (RuleKeyData, u32) {
    (e.0.data, e.0.prefix_len)
}

fn is_host(k: &RuleKey) -> bool {
    k.prefix_len == host_prefix_len(k.data.family)
}

/// The kernel writes that turn `old` into `new` (both sorted by [`entry_order`], no duplicate
/// keys), split by map.
#[derive(Debug, Default, PartialEq, Eq)]
struct RulesDiff {
    host_del: Vec<RuleKeyData>,
    host_put: Vec<(RuleKeyData, RuleValue)>,
    trie_del: Vec<RuleKey>,
    trie_put: Vec<(RuleKey, RuleValue)>,
}

fn diff_rules(old: &[(RuleKey, RuleValue)], new: &[(RuleKey, RuleValue)]) -> RulesDiff {
    use std::cmp::Ordering;
    let mut d = RulesDiff::default();
    let (mut i, mut j) = (0, 0);
    loop {
        let ord = match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => entry_order(o).cmp(&entry_order(n)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        if ord == Ordering::Less {
            let k = old[i].0;
            if is_host(&k) {
                d.host_del.push(k.data);
            } else {
                d.trie_del.push(k);
            }
            i += 1;
            continue;
        }
        if ord == Ordering::Equal {
            i += 1;
            if old[i - 1].1 == new[j].1 {
                j += 1; // already in the kernel as it should be
                continue;
            }
        }
        let (k, v) = new[j];
        if is_host(&k) {
            d.host_put.push((k.data, v));
        } else {
            d.trie_put.push((k, v));
        }
        j += 1;
    }
    d
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
    ///
    /// The rule maps get room for two generations of `max_rules` entries, unless pinned maps
    /// exist: their capacity stays (see [`Kernel::max_rules`]); changing it takes an
    /// `uninstall` first.
    pub fn load(pin_dir: &Path, max_rules: u32) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir.join("links")).map_err(|err| KernelError::PinDir {
            path: pin_dir.to_path_buf(),
            err,
        })?;
        let capacity = MapData::from_pin(pin_dir.join(MAP_HOSTS))
            .ok()
            .and_then(|m| m.info().ok())
            .map_or(max_rules.saturating_mul(2), |i| i.max_entries());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(MAP_HOSTS, capacity)
            .map_max_entries(MAP_RULES, capacity)
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        for p in &PROGRAMS {
            let loaded = match p.kind {
                ProgramKind::CgroupSockAddr(_) => load_program::<CgroupSockAddr>(&mut ebpf, p.name),
                ProgramKind::RawTracepoint(_) => load_program::<RawTracePoint>(&mut ebpf, p.name),
                ProgramKind::CgroupSock(_) => load_program::<CgroupSock>(&mut ebpf, p.name),
            };
            match loaded {
                Ok(()) => {}
                Err(e) if !p.required => {
                    tracing::warn!(
                        "optional program {} not loaded, going on without it: {e}",
                        p.name
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let maps = Maps {
            procs: take(&mut ebpf, MAP_PROCS)?,
            exes: take(&mut ebpf, MAP_EXES)?,
            binclass: take(&mut ebpf, MAP_BINCLASS)?,
            cgroups: take(&mut ebpf, MAP_CGROUPS)?,
            idmatch: take(&mut ebpf, MAP_IDMATCH)?,
            rules: take(&mut ebpf, MAP_RULES)?,
            hosts: take(&mut ebpf, MAP_HOSTS)?,
            hosts_fd: MapData::from_pin(pin_dir.join(MAP_HOSTS))
                .map_err(op(format!("opening the pin of map {MAP_HOSTS}")))?,
            config: take(&mut ebpf, MAP_CONFIG)?,
            offsets: take(&mut ebpf, MAP_OFFSETS)?,
            tamper_offsets: take(&mut ebpf, MAP_TAMPER_OFFSETS)?,
            counters: take(&mut ebpf, MAP_COUNTERS)?,
            scopes: take(&mut ebpf, MAP_SCOPES)?,
            uncovered: take(&mut ebpf, MAP_UNCOVERED)?,
            sockets: take(&mut ebpf, MAP_SOCKETS)?,
        };
        let events = Some(take(&mut ebpf, MAP_EVENTS)?);
        // The loader-environment table (SECURITY.md guarantee 3), before any program is
        // attached; the same content at every start, so a takeover rewrites it unchanged.
        let mut loadenv: Array<MapData, EnvSlot> = take(&mut ebpf, MAP_LOADENV)?;
        for (i, slot) in ENV_TABLE.iter().enumerate() {
            loadenv
                .set(i as u32, slot, 0)
                .map_err(op(format!("writing map {MAP_LOADENV}")))?;
        }
        let mut k = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            maps,
            events,
            took_over: false,
            max_rules: capacity as usize / 2,
            rules_written: [None, None],
        };
        let cfg = k.config()?;
        k.took_over = cfg.abi_version != 0;
        if !k.took_over {
            // Maps no agent has configured yet: no rule was ever written (the ABI version is
            // set before any). Knowing that spares reading back a large, empty hash table.
            k.rules_written = [Some(Vec::new()), Some(Vec::new())];
        }
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

    pub fn set_tamper_offsets(&mut self, off: &TamperOffsets) -> Result<(), KernelError> {
        self.maps
            .tamper_offsets
            .set(0, off, 0)
            .map_err(op(format!("writing map {MAP_TAMPER_OFFSETS}")))
    }

    /// Attaches the process tracepoints, unless pinned links from a previous agent are in
    /// place (they keep running and feed the same pinned maps).
    pub fn attach_tracepoints(&mut self) -> Result<(), KernelError> {
        for (name, tp) in tracepoint_programs() {
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

    /// Attaches the cgroup programs (the four sock_addr ones and sock_create) to a cgroup
    /// (bpf_link: other programs on the cgroup keep running) and pins the links. Links pinned
    /// by a previous agent get this agent's programs atomically (`BPF_LINK_UPDATE`): no
    /// instant without a program.
    pub fn attach_cgroup(&mut self, dir: &Path, cgroup_id: u64) -> Result<(), KernelError> {
        let cg = fs::File::open(dir).map_err(op(format!("opening cgroup {}", dir.display())))?;
        for p in &PROGRAMS {
            let Some(hook) = p.kind.cgroup_hook() else {
                continue;
            };
            let (hook, name) = (hook.name(), p.name);
            let pin = self.cgroup_pin(cgroup_id, hook);
            if matches!(p.kind, ProgramKind::CgroupSock(_)) {
                self.attach_sock(&cg, dir, &pin, name)?;
                continue;
            }
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = if pin.exists() {
                let fd: FdLink = PinnedLink::from_pin(&pin)
                    .map_err(op(format!("opening pinned link {}", pin.display())))?
                    .into();
                // Already running this very program (a re-apply): nothing to update.
                let ours = prog.info().map(|i| i.id()).ok();
                if ours.is_some() && fd.info().map(|i| i.program_id()).ok() == ours {
                    continue;
                }
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

    /// [`Kernel::attach_cgroup`] for the cgroup sock program `name` (aya has no
    /// `attach_to_link` for it: a pinned link is updated with a raw `BPF_LINK_UPDATE`).
    fn attach_sock(
        &mut self,
        cg: &fs::File,
        dir: &Path,
        pin: &Path,
        name: &'static str,
    ) -> Result<(), KernelError> {
        let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
        if pin.exists() {
            let fd: FdLink = PinnedLink::from_pin(pin)
                .map_err(op(format!("opening pinned link {}", pin.display())))?
                .into();
            let ours = prog.info().map(|i| i.id()).ok();
            if ours.is_some() && fd.info().map(|i| i.program_id()).ok() == ours {
                return Ok(());
            }
            let pfd = prog
                .fd()
                .map_err(op(format!("the descriptor of program {name}")))?;
            return sys::link_update_pinned(pin, pfd.as_fd())
                .map_err(op(format!("updating pinned link {}", pin.display())));
        }
        let id = prog
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(op(format!("attaching {name} to {}", dir.display())))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(op(format!("taking the link of {name}")))?
            .try_into()
            .map_err(op(format!(
                "link of {name} is not a bpf_link (kernel older than 5.7?)"
            )))?;
        link.pin(pin)
            .map_err(op(format!("pinning {}", pin.display())))?;
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
        for (hook, _) in socket_programs() {
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
    pub fn counter(&self, c: Counter) -> u64 {
        self.maps
            .counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Replaces every rule entry of `generation` by `entries` (from `policy::rule_entries`):
    /// single hosts go to `ENF_HOSTS` in batches, shorter prefixes to the `ENF_RULES` trie.
    /// Only differences from what the generation already holds are written.
    pub fn write_rules(
        &mut self,
        generation: u32,
        entries: &[(RuleKey, RuleValue)],
    ) -> Result<RulesWritten, KernelError> {
        let slot = (generation & 1) as usize;
        // What this generation holds: remembered from our last write, else read back once
        // (after a takeover). On any error the slot is left unknown, so the next write reads
        // it back.
        let old = match self.rules_written[slot].take() {
            Some(v) => v,
            None => self.rules_of(generation),
        };
        let mut new = entries.to_vec();
        new.sort_unstable_by_key(entry_order);
        new.dedup_by_key(|e| e.0);
        let RulesDiff {
            host_del,
            host_put,
            trie_del,
            trie_put,
        } = diff_rules(&old, &new);
        let writes = host_del.len() + host_put.len() + trie_del.len() + trie_put.len();
        self.batch_delete_hosts(&host_del)?;
        for k in &trie_del {
            self.maps
                .rules
                .remove(&Key::new(k.prefix_len, k.data))
                .map_err(op(format!("clearing map {MAP_RULES}")))?;
        }
        let (keys, values): (Vec<RuleKeyData>, Vec<RuleValue>) = host_put.into_iter().unzip();
        self.batch_update_hosts(&keys, &values)?;
        for (k, v) in &trie_put {
            self.maps
                .rules
                .insert(&Key::new(k.prefix_len, k.data), v, 0)
                .map_err(op(format!("writing map {MAP_RULES}")))?;
        }
        let hosts = new.iter().filter(|(k, _)| is_host(k)).count();
        let written = RulesWritten {
            hosts,
            prefixes: new.len() - hosts,
            writes,
        };
        self.rules_written[slot] = Some(new);
        Ok(written)
    }

    /// `BPF_MAP_UPDATE_BATCH` of `ENF_HOSTS`: one syscall per [`BATCH`] entries instead of one
    /// per entry, spread over the CPUs (the hash map locks per bucket, so writers on
    /// different CPUs rarely meet); element by element where the kernel has no batch operation.
    fn batch_update_hosts(
        &mut self,
        keys: &[RuleKeyData],
        values: &[RuleValue],
    ) -> Result<(), KernelError> {
        let fail = |e: io::Error| batch_failed("writing", keys.len(), &e);
        let fd = self.maps.hosts_fd.fd().as_fd();
        // A first small chunk on this thread tells whether the kernel has batches.
        let first = keys.len().min(256);
        // SAFETY: `hosts_fd` is the pinned `ENF_HOSTS`, whose typed handle `hosts` checked at
        // open that its keys are `RuleKeyData` and its values `RuleValue`.
        match unsafe {
            sys::map_batch(
                sys::BPF_MAP_UPDATE_BATCH,
                fd,
                &keys[..first],
                Some(&values[..first]),
            )
        } {
            Ok(()) => {}
            Err((0, e)) if batch_unsupported(&e) => {
                for (k, v) in keys.iter().zip(values) {
                    self.maps
                        .hosts
                        .insert(k, v, 0)
                        .map_err(op(format!("writing map {MAP_HOSTS}")))?;
                }
                return Ok(());
            }
            Err((_, e)) => return Err(fail(e)),
        }
        let (keys, values) = (&keys[first..], &values[first..]);
        if keys.is_empty() {
            return Ok(());
        }
        let workers = if keys.len() < 2048 {
            1
        } else {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 4)
        };
        let per = keys.len().div_ceil(workers);
        let results: Vec<Result<(), io::Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = keys
                .chunks(per)
                .zip(values.chunks(per))
                .map(|(ks, vs)| {
                    s.spawn(move || -> Result<(), io::Error> {
                        for (k, v) in ks.chunks(BATCH).zip(vs.chunks(BATCH)) {
                            // SAFETY: as above, `fd` is `ENF_HOSTS`.
                            unsafe { sys::map_batch(sys::BPF_MAP_UPDATE_BATCH, fd, k, Some(v)) }
                                .map_err(|(_, e)| e)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a map writer thread panicked")))
                })
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>().map_err(fail)
    }

    /// `BPF_MAP_DELETE_BATCH` of `ENF_HOSTS`; keys already gone are skipped.
    fn batch_delete_hosts(&mut self, keys: &[RuleKeyData]) -> Result<(), KernelError> {
        let mut done = 0;
        while done < keys.len() {
            let end = (done + BATCH).min(keys.len());
            // SAFETY: `hosts_fd` is the pinned `ENF_HOSTS`, whose typed handle `hosts` checked
            // at open that its keys are `RuleKeyData` and its values `RuleValue`.
            match unsafe {
                sys::map_batch::<RuleKeyData, RuleValue>(
                    sys::BPF_MAP_DELETE_BATCH,
                    self.maps.hosts_fd.fd().as_fd(),
                    &keys[done..end],
                    None,
                )
            } {
                Ok(()) => done = end,
                // The key at `done + n` was not there (edited by hand): nothing to remove.
                Err((n, e)) if e.raw_os_error() == Some(libc::ENOENT) => done += n + 1,
                Err((n, e)) if batch_unsupported(&e) && n == 0 => {
                    for k in &keys[done..] {
                        match self.maps.hosts.remove(k) {
                            Ok(()) => {}
                            Err(aya::maps::MapError::KeyNotFound) => {}
                            Err(e) => return Err(op(format!("clearing map {MAP_HOSTS}"))(e)),
                        }
                    }
                    return Ok(());
                }
                Err((_, e)) => return Err(batch_failed("clearing", keys.len(), &e)),
            }
        }
        Ok(())
    }

    /// Forgets what this agent believes the rule maps hold: the next apply reads them back
    /// and rewrites every difference (after drift was seen).
    pub fn forget_written(&mut self) {
        self.rules_written = [None, None];
    }

    /// Replaces every `ENF_SOCKETS` entry of `generation` by `entries` (identity -> socket
    /// kinds its `sockets:` list allows; identities without a list have no entry).
    pub fn write_sockets(
        &mut self,
        generation: u32,
        entries: &[(SocketKey, u32)],
    ) -> Result<(), KernelError> {
        replace_generation(&mut self.maps.sockets, MAP_SOCKETS, entries, |k| {
            k.generation == generation
        })
    }

    /// The `ENF_SOCKETS` entries of one generation.
    pub fn sockets_of(&self, generation: u32) -> Vec<(SocketKey, u32)> {
        let mut v: Vec<(SocketKey, u32)> = self
            .maps
            .sockets
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.generation == generation)
            .collect();
        v.sort_unstable();
        v
    }

    /// Replaces every `ENF_IDMATCH` entry of `generation` by `entries`.
    pub fn write_idmatch(
        &mut self,
        generation: u32,
        entries: &[(IdMatchKey, u32)],
    ) -> Result<(), KernelError> {
        replace_generation(&mut self.maps.idmatch, MAP_IDMATCH, entries, |k| {
            k.generation == generation
        })
    }
}

/// Intent-level operations on the process, executable, cgroup and scope maps.
impl Kernel {
    /// Marks the maps as this agent's: the ABI version they speak, and the agent's pid (the
    /// kernel never holds the agent's own execs).
    pub fn claim(&mut self, agent_tgid: u32) -> Result<(), KernelError> {
        let mut cfg = self.config()?;
        cfg.abi_version = ABI_VERSION;
        cfg.agent_tgid = agent_tgid;
        cfg.heartbeat_ns = crate::sys::boottime_ns();
        self.set_config(&cfg)
    }

    /// Tells the kernel this agent is alive (every tick): it holds never-seen execs only
    /// while the heartbeat is fresh, since nobody else would release them.
    pub fn beat(&mut self) -> Result<(), KernelError> {
        let mut cfg = self.config()?;
        cfg.heartbeat_ns = crate::sys::boottime_ns();
        self.set_config(&cfg)
    }

    /// At a clean exit: stops the holding at exec, if the maps are still this agent's (a
    /// newer agent that took over keeps its own heartbeat). The kernel does the same when
    /// the agent's process ends any other way.
    pub fn stop_beating(&mut self, agent_tgid: u32) -> Result<(), KernelError> {
        let mut cfg = self.config()?;
        if cfg.agent_tgid != agent_tgid {
            return Ok(());
        }
        cfg.heartbeat_ns = 0;
        self.set_config(&cfg)
    }

    /// The generation the programs judge with now.
    pub fn active_generation(&self) -> Result<u32, KernelError> {
        Ok(self.config()?.active & 1)
    }

    /// True when a policy was ever published in `generation`.
    pub fn generation_loaded(&self, generation: u32) -> Result<bool, KernelError> {
        Ok(self.config()?.generations[(generation & 1) as usize].loaded != 0)
    }

    /// Writes the settings of the (inactive) `generation` whose tables were just filled.
    pub fn prepare_generation(&mut self, generation: u32, g: GenConfig) -> Result<(), KernelError> {
        let mut cfg = self.config()?;
        cfg.generations[(generation & 1) as usize] = g;
        self.set_config(&cfg)
    }

    /// Puts `generation` in force with its `scope_count` scopes: one 4-byte store seen by the
    /// programs (a connect sees the old policy or the new, never a mix).
    pub fn publish_generation(
        &mut self,
        generation: u32,
        scope_count: u32,
    ) -> Result<(), KernelError> {
        let mut cfg = self.config()?;
        cfg.active = generation & 1;
        cfg.scope_count = scope_count;
        self.set_config(&cfg)
    }

    /// Whether the kernel reports allowed connects (the generation in force). Returns true
    /// when it changed.
    pub fn set_report_allow(&mut self, want: bool) -> Result<bool, KernelError> {
        let mut cfg = self.config()?;
        let g = &mut cfg.generations[(cfg.active & 1) as usize];
        if (g.report_allow != 0) == want {
            return Ok(false);
        }
        g.report_allow = u32::from(want);
        self.set_config(&cfg)?;
        Ok(true)
    }

    /// The event ring buffer, handed out once to the event loop.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The kernel's facts about one process, if it has any.
    pub fn process(&self, pid: u32) -> Option<ProcState> {
        self.maps.procs.get(&pid, 0).ok()
    }

    /// Every process the kernel tracks, with its facts.
    pub fn processes(&self) -> Vec<(u32, ProcState)> {
        self.maps.procs.iter().filter_map(|r| r.ok()).collect()
    }

    /// Gives a process its attested facts (clears pending: its connects are judged by them).
    pub fn set_process(&mut self, pid: u32, st: &ProcState) -> Result<(), KernelError> {
        self.maps
            .procs
            .insert(&pid, st, 0)
            .map_err(op(format!("writing map {MAP_PROCS} (pid {pid})")))
    }

    /// Lets the kernel recognise a file at exec by its inode key: processes exec'ing it get
    /// `exe_id` at once, without a round trip to the agent.
    pub fn set_exe(&mut self, key: &ExeKey, exe_id: u32) -> Result<(), KernelError> {
        self.maps
            .exes
            .insert(key, &exe_id, 0)
            .map_err(op(format!("writing map {MAP_EXES}")))
    }

    /// Forgets a file's inode key: its next exec is attested by the agent again.
    pub fn forget_exe(&mut self, key: &ExeKey) -> Result<(), KernelError> {
        match self.maps.exes.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(op(format!("removing an entry of map {MAP_EXES}"))(e)),
        }
    }

    /// Every inode key the kernel recognises at exec, with its exe id.
    pub fn exes(&self) -> Vec<(ExeKey, u32)> {
        self.maps.exes.iter().filter_map(|r| r.ok()).collect()
    }

    /// The identity class of an executable in one policy generation.
    pub fn set_bin_class(
        &mut self,
        generation: u32,
        exe_id: u32,
        class: u32,
    ) -> Result<(), KernelError> {
        self.maps
            .binclass
            .set(binclass_index(generation, exe_id), &class, 0)
            .map_err(op(format!("writing map {MAP_BINCLASS}")))
    }

    /// The identity class the kernel holds for an executable in one generation.
    pub fn bin_class(&self, generation: u32, exe_id: u32) -> u32 {
        self.maps
            .binclass
            .get(&binclass_index(generation, exe_id), 0)
            .unwrap_or(BIN_NONE)
    }

    /// Adds one (generation, classes, uid) -> identity entry.
    pub fn set_idmatch(&mut self, k: &IdMatchKey, ident: u32) -> Result<(), KernelError> {
        self.maps
            .idmatch
            .insert(k, &ident, 0)
            .map_err(op(format!("writing map {MAP_IDMATCH}")))
    }

    /// True when the kernel knows this cgroup (processes exec'ing in it are not held for it).
    pub fn knows_cgroup(&self, cgroup_id: u64) -> bool {
        self.maps.cgroups.get(&cgroup_id, 0).is_ok()
    }

    /// The cgroup's identity class in one policy generation (the other generation's class
    /// is kept).
    pub fn set_cgroup_class(
        &mut self,
        generation: u32,
        cgroup_id: u64,
        class: u32,
    ) -> Result<(), KernelError> {
        let mut v = self.maps.cgroups.get(&cgroup_id, 0).unwrap_or_default();
        v.class[(generation & 1) as usize] = class;
        self.maps
            .cgroups
            .insert(&cgroup_id, &v, 0)
            .map_err(op(format!("writing map {MAP_CGROUPS}")))
    }

    /// Removes a cgroup that no longer exists from the kernel's table.
    pub fn forget_cgroup(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        match self.maps.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(op(format!(
                "removing cgroup {cgroup_id} from map {MAP_CGROUPS}"
            ))(e)),
        }
    }

    /// Every cgroup id the kernel knows.
    pub fn cgroup_ids(&self) -> Vec<u64> {
        self.maps.cgroups.keys().filter_map(|r| r.ok()).collect()
    }

    /// Makes the cgroup open at `dir` the `slot`-th enforced scope.
    pub fn set_scope(&mut self, slot: u32, dir: fs::File) -> Result<(), KernelError> {
        self.maps
            .scopes
            .set(slot, dir, 0)
            .map_err(op(format!("writing map {MAP_SCOPES}")))
    }

    /// The kernel's tally of connects with no identity, by (exe id, cgroup id).
    pub fn uncovered(&self) -> Vec<(UncoveredKey, UncoveredValue)> {
        self.maps.uncovered.iter().filter_map(|r| r.ok()).collect()
    }
}

/// What the kernel decides for one (process, destination): the verdict, the identity number
/// and the rule id. The kernel programs' own decision function ([`decide`]), run over the
/// same maps read through bpf().
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub ident: u32,
    pub rule: u32,
}

impl IdentityMaps for Maps {
    fn binclass(&self, index: u32) -> Option<u32> {
        self.binclass.get(&index, 0).ok()
    }

    fn cgroup(&self, cgroup_id: u64) -> Option<CgroupValue> {
        self.cgroups.get(&cgroup_id, 0).ok()
    }

    fn idmatch(&self, key: &IdMatchKey) -> Option<u32> {
        self.idmatch.get(key, 0).ok()
    }
}

impl RuleMaps for Maps {
    fn host(&self, key: &RuleKeyData) -> Option<RuleValue> {
        self.hosts.get(key, 0).ok()
    }

    fn prefix(&self, prefix_len: u32, key: &RuleKeyData) -> Option<RuleValue> {
        self.rules.get(&Key::new(prefix_len, *key), 0).ok()
    }

    fn now_ns(&self) -> u64 {
        crate::sys::boottime_ns()
    }
}

impl Kernel {
    pub fn judge(
        &self,
        pid: u32,
        dst: std::net::IpAddr,
        port: u16,
        proto: u8,
    ) -> Result<Judgement, KernelError> {
        let cfg = self.config()?;
        let proc_ = self.maps.procs.get(&pid, 0).ok();
        let dst = match dst {
            std::net::IpAddr::V4(a) => destination_v4(proto, port, a.octets()),
            std::net::IpAddr::V6(a) => destination_v6(proto, port, a.octets()),
        };
        let d = decide(&self.maps, &cfg, proc_.as_ref(), &dst);
        Ok(Judgement {
            verdict: d.verdict,
            ident: d.ident,
            rule: d.rule,
        })
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
                2 * self.max_rules as u64,
            ),
            (
                MAP_HOSTS,
                n(self.maps.hosts.keys().count()),
                2 * self.max_rules as u64,
            ),
        ]
    }

    /// The rule entries (`ENF_RULES` and `ENF_HOSTS`) of one generation, as the kernel holds
    /// them, sorted by key data then prefix length.
    pub fn rules_of(&self, generation: u32) -> Vec<(RuleKey, RuleValue)> {
        let mut v: Vec<(RuleKey, RuleValue)> = self
            .maps
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
            .chain(
                self.maps
                    .hosts
                    .iter()
                    .filter_map(|r| r.ok())
                    .filter(|(k, _)| k.generation == generation)
                    .map(|(k, v)| {
                        (
                            RuleKey {
                                prefix_len: host_prefix_len(k.family),
                                data: k,
                            },
                            v,
                        )
                    }),
            )
            .collect();
        v.sort_unstable_by_key(entry_order);
        v
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

    /// Links that should be pinned and are not: the process tracepoints, and the socket
    /// programs on each of `scopes` (cgroup id, path for the message). One readdir.
    pub fn missing_links(&self, scopes: &[(u64, &str)]) -> Vec<String> {
        let have: std::collections::HashSet<String> = self.links().into_iter().collect();
        let tps = tracepoint_programs()
            .filter(|(_, tp)| !have.contains(&format!("tp_{tp}")))
            .map(|(name, tp)| format!("{name} on raw tracepoint {tp}"));
        let cgs = scopes.iter().flat_map(|&(id, path)| {
            socket_programs()
                .filter(|(hook, _)| !have.contains(&format!("cg_{id}_{hook}")))
                .map(move |(hook, _)| format!("{hook} on {path}"))
                .collect::<Vec<_>>()
        });
        tps.chain(cgs).collect()
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

/// Entries per batch syscall.
const BATCH: usize = 1 << 16;
fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | sys::ENOTSUPP)
    )
}

/// A batch of `ENF_HOSTS` that failed: what was done to how many entries, and what to do.
fn batch_failed(doing: &str, entries: usize, e: &io::Error) -> KernelError {
    let detail = match e.raw_os_error() {
        Some(libc::E2BIG | libc::ENOMEM) => format!(
            "{e}; the map is full or the kernel is out of memory: reduce the number of rules or raise `run --max-rules`"
        ),
        _ => e.to_string(),
    };
    KernelError::Op {
        what: format!("{doing} map {MAP_HOSTS} ({entries} entries)"),
        detail,
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

impl Loadable for CgroupSock {
    const KIND: &'static str = "cgroup_sock";
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
        release: sys::kernel_release(),
        error,
        log,
        shown,
        total,
    }
}

/// Loads the cgroup_sock_addr program `name` of the embedded object through the agent's own
/// loader, then unloads it: nothing is attached, the maps it needs are created in a scratch
/// folder under `/sys/fs/bpf` and unpinned at once. For diagnostics.
pub fn load_sock_addr_program(name: &'static str) -> Result<(), KernelError> {
    if OBJECT.is_empty() {
        return Err(KernelError::NoObject);
    }
    load_sock_addr_program_from(OBJECT, name)
}

/// [`load_sock_addr_program`] for another object, such as the test object
/// (`enforcer-ebpf-test`, whose [`PROG_REJECT`] the verifier must refuse).
pub fn load_sock_addr_program_from(object: &[u8], name: &'static str) -> Result<(), KernelError> {
    let scratch = Path::new(BPFFS).join(format!("enforcer-load-{}", std::process::id()));
    ensure_bpffs(&scratch)?;
    fs::create_dir_all(&scratch).map_err(|err| KernelError::PinDir {
        path: scratch.clone(),
        err,
    })?;
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&scratch)
        .load(object)
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

/// Pins under /sys/fs/bpf need bpffs there; a fresh machine may not have it mounted.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelError> {
    let root = Path::new(BPFFS);
    if !pin_dir.starts_with(root) || sys::is_bpffs(root) {
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

/// Makes the entries of `map` (named `name`) that `in_generation` selects exactly `entries`:
/// stale keys of that generation removed, then every entry written (the other generation,
/// the one in force, is never touched).
fn replace_generation<K: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, u32>,
    name: &str,
    entries: &[(K, u32)],
    in_generation: impl Fn(&K) -> bool,
) -> Result<(), KernelError> {
    let stale: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| in_generation(k) && !entries.iter().any(|(e, _)| e == k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(op(format!("clearing map {name}")))?;
    }
    for (k, v) in entries {
        map.insert(k, v, 0)
            .map_err(op(format!("writing map {name}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: u8, prefix: u32, port: u16, verdict: u32) -> (RuleKey, RuleValue) {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 0, 0, addr]);
        (
            RuleKey {
                prefix_len: RULE_FIXED_BITS + prefix,
                data: RuleKeyData {
                    generation: 1,
                    ident: 3,
                    proto: PROTO_TCP,
                    family: FAMILY_V4,
                    port,
                    addr: a,
                },
            },
            RuleValue::permanent(verdict, 0),
        )
    }

    fn sorted(mut v: Vec<(RuleKey, RuleValue)>) -> Vec<(RuleKey, RuleValue)> {
        v.sort_unstable_by_key(entry_order);
        v
    }

    #[test]
    fn diff_writes_only_differences_into_the_right_map() {
        let keep_host = entry(1, 32, 80, Verdict::Allow as u32);
        let keep_net = entry(0, 24, 0, Verdict::Deny as u32);
        let gone_host = entry(2, 32, 80, Verdict::Allow as u32);
        let gone_net = entry(0, 16, 443, Verdict::Allow as u32);
        let changed_host = entry(3, 32, 80, Verdict::Allow as u32);
        let mut changed_host_new = changed_host;
        changed_host_new.1.verdict = Verdict::Deny as u32;
        let new_host = entry(4, 32, 0, Verdict::Allow as u32);
        let new_net = entry(0, 8, 22, Verdict::Allow as u32);
        let old = sorted(vec![keep_host, keep_net, gone_host, gone_net, changed_host]);
        let new = sorted(vec![
            keep_host,
            keep_net,
            changed_host_new,
            new_host,
            new_net,
        ]);
        let d = diff_rules(&old, &new);
        assert_eq!(d.host_del, vec![gone_host.0.data]);
        assert_eq!(d.trie_del, vec![gone_net.0]);
        let mut puts = d.host_put.clone();
        puts.sort_by_key(|(k, _)| k.addr);
        assert_eq!(
            puts,
            vec![
                (changed_host_new.0.data, changed_host_new.1),
                (new_host.0.data, new_host.1)
            ]
        );
        assert_eq!(d.trie_put, vec![new_net]);
        // Same content again: nothing to write.
        assert_eq!(diff_rules(&new, &new), RulesDiff::default());
        // From nothing: everything, split by prefix length.
        let all = diff_rules(&[], &new);
        assert_eq!(all.host_put.len(), 3);
        assert_eq!(all.trie_put.len(), 2);
        // To nothing: everything removed.
        let none = diff_rules(&new, &[]);
        assert_eq!((none.host_del.len(), none.trie_del.len()), (3, 2));
    }

    /// The production object holds the programs of [`PROGRAMS`] and nothing else: the bench's
    /// allow-only programs and the rejected program live in the test object.
    #[test]
    fn production_object_holds_exactly_the_program_table() {
        if OBJECT.is_empty() {
            assert!(
                !crate::in_ci(),
                "the agent was built without its kernel object (ENFORCER_EBPF_OBJ) under CI: run `cargo xtask test`"
            );
            eprintln!("skipped: no embedded kernel object (build with `cargo xtask build`)");
            return;
        }
        let obj = match aya_obj::Object::parse(OBJECT) {
            Ok(o) => o,
            Err(e) => panic!("parsing the embedded kernel object: {e}"),
        };
        let mut have: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        have.sort_unstable();
        let mut want: Vec<&str> = PROGRAMS.iter().map(|p| p.name).collect();
        want.sort_unstable();
        assert_eq!(have, want);
        for (_, bench) in BENCH_PROGS {
            assert!(
                !have.contains(&bench),
                "{bench} is in the production object"
            );
        }
        assert!(!have.contains(&PROG_REJECT));
    }

    #[test]
    fn a_host_and_a_prefix_with_the_same_address_are_different_entries() {
        let host = entry(0, 32, 80, Verdict::Allow as u32);
        let net = entry(0, 24, 80, Verdict::Deny as u32);
        let d = diff_rules(&sorted(vec![host]), &sorted(vec![host, net]));
        assert!(d.host_put.is_empty() && d.host_del.is_empty());
        assert_eq!(d.trie_put, vec![net]);
    }
}

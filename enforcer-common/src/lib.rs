//! The ABI shared by the kernel programs (`enforcer-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, made of fixed-width integers, with padding written out and a
//! size assertion beside each type. Values are built from zero (`zeroed()`), so no byte a map
//! compares is ever uninitialised. Change any layout here and bump [`ABI_VERSION`]: the agent
//! refuses pinned state of another version, and pins live under a folder named after it.
#![no_std]

mod decide;
mod kinds;
mod loader_env;
mod programs;

pub use decide::*;
pub use kinds::*;
pub use loader_env::*;
pub use programs::*;

/// Version of this ABI. Checked at load against the kernel object's `ENF_ABI` global and used
/// in the bpffs pin folder, so two versions never share maps.
pub const ABI_VERSION: u32 = 4;

/// Pin folder, relative to the bpffs mount (`/sys/fs/bpf`): `enforcer/v{ABI_VERSION}`.
pub const PIN_SUBDIR: &str = "enforcer/v4";
const _: () = assert!(ABI_VERSION == 4, "update PIN_SUBDIR with ABI_VERSION");

// ---- names (at most 15 characters: the kernel's BPF_OBJ_NAME_LEN - 1) ----
pub const MAP_PROCS: &str = "ENF_PROCS";
pub const MAP_EXES: &str = "ENF_EXES";
pub const MAP_BINCLASS: &str = "ENF_BINCLASS";
pub const MAP_UNCOVERED: &str = "ENF_UNCOVERED";
pub const MAP_CGROUPS: &str = "ENF_CGROUPS";
pub const MAP_IDMATCH: &str = "ENF_IDMATCH";
pub const MAP_RULES: &str = "ENF_RULES";
pub const MAP_HOSTS: &str = "ENF_HOSTS";
pub const MAP_CONFIG: &str = "ENF_CONFIG";
pub const MAP_COUNTERS: &str = "ENF_COUNTERS";
pub const MAP_EVENTS: &str = "ENF_EVENTS";
pub const MAP_SCOPES: &str = "ENF_SCOPES";
pub const MAP_OFFSETS: &str = "ENF_OFFSETS";
/// Kernel struct offsets of the tamper programs ([`TamperOffsets`]).
pub const MAP_TAMPER_OFFSETS: &str = "ENF_TAMPEROFF";
/// (generation, identity) -> socket kinds the identity may create (see [`SocketKey`]).
pub const MAP_SOCKETS: &str = "ENF_SOCKETS";
const _: () = assert!(MAP_SOCKETS.len() <= 15);
/// Array (`ENV_SLOTS` entries of [`EnvSlot`]): [`ENV_TABLE`], filled by the agent before it
/// attaches the programs.
pub const MAP_LOADENV: &str = "ENF_LOADENV";

const _: () = {
    const fn short(s: &str) -> bool {
        s.len() <= 15
    }
    assert!(short(MAP_PROCS) && short(MAP_EXES) && short(MAP_CGROUPS) && short(MAP_IDMATCH));
    assert!(short(MAP_RULES) && short(MAP_CONFIG) && short(MAP_COUNTERS) && short(MAP_EVENTS));
    assert!(short(MAP_SCOPES) && short(MAP_OFFSETS) && short(MAP_BINCLASS));
    assert!(short(MAP_UNCOVERED) && short(MAP_HOSTS));
    assert!(short(MAP_TAMPER_OFFSETS));
};

// ---- capacities ----
pub const MAX_PROCS: u32 = 1 << 16;
pub const MAX_EXES: u32 = 1 << 16;
pub const MAX_CGROUPS: u32 = 1 << 14;
pub const MAX_IDMATCH: u32 = 1 << 16;
/// Rule entries one policy may compile to unless `run --max-rules` says otherwise.
pub const DEFAULT_MAX_RULES: u32 = 1 << 17;
/// Largest `run --max-rules`.
pub const MAX_RULES_LIMIT: u32 = 1 << 23;
/// Capacity the object declares for `ENF_HOSTS` and `ENF_RULES` (two generations at the
/// default); the agent sets the real one at load from `--max-rules`.
pub const MAX_RULES: u32 = 2 * DEFAULT_MAX_RULES;
pub const MAX_SCOPES: u32 = 16;
/// Entries of `ENF_SOCKETS`: identities with a `sockets:` list, both generations.
pub const MAX_SOCKET_RULES: u32 = 1 << 14;
/// (executable, cgroup) pairs of unattested traffic kept for the coverage report (LRU: this
/// is a statistic, never an identity).
pub const MAX_UNCOVERED: u32 = 4096;
pub const EVENTS_BYTES: u32 = 1 << 20;

// ---- small integers ----
/// Identity number meaning "no identity" (the process is unattested).
pub const IDENT_NONE: u32 = 0;
/// Wildcard in an [`IdMatchKey`] field.
pub const ANY: u32 = u32::MAX;
/// Binary class of an executable whose hash matches no binary selector of the policy.
pub const BIN_NONE: u32 = 0;
/// Cgroup class of a cgroup that matches no cgroup selector of the policy.
pub const CG_NONE: u32 = 0;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

// Socket creation (`cgroup/sock_create`): the kernel's numbers.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_RAW: u32 = 3;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_SCTP: u32 = 132;
pub const IPPROTO_UDPLITE: u32 = 136;
pub const IPPROTO_MPTCP: u32 = 262;

/// Rule id reported when no rule matched (default deny).
pub const RULE_DEFAULT_DENY: u32 = u32::MAX;
/// Rule id reported for a decision taken from the `unattested` action.
pub const RULE_UNATTESTED: u32 = u32::MAX - 1;
/// Rule id reported when the process is not attested yet (exec of a file or cgroup never seen).
pub const RULE_PENDING: u32 = u32::MAX - 2;
/// Rule id reported when the process has no entry at all (insert failed, or not scanned yet).
pub const RULE_UNTRACKED: u32 = u32::MAX - 3;
/// Rule id reported when the configuration slot is missing: fail closed.
pub const RULE_NO_CONFIG: u32 = u32::MAX - 4;
/// Rule id reported when the process lost its identity to tampering ([`PROC_TAMPERED`]).
pub const RULE_TAMPERED: u32 = u32::MAX - 6;
/// Rule id of a socket creation judged by the identity's `sockets:` list (allowed when it
/// names the kind, refused otherwise).
pub const RULE_SOCKET_KIND: u32 = u32::MAX - 7;
/// Rule id reported when the process's identity is withheld: its environment asks the loader
/// or a runtime to load code ([`LOADER_ENV`]), see [`PROC_WITHHELD`].
pub const RULE_WITHHELD: u32 = u32::MAX - 5;

/// Number of policy generations kept side by side; see [`Config::active`].
pub const GENERATIONS: usize = 2;

/// Key of `ENF_EXES` and of the agent's hash cache: what identifies the *content* of an
/// executable file without reading it. A file rewritten in place changes size, mtime or ctime.
/// `dev` is the kernel's encoding (`major << 20 | minor`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExeKey {
    pub dev: u32,
    pub _pad0: u32,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_nsec: u32,
    pub ctime_sec: i64,
}
const _: () = assert!(core::mem::size_of::<ExeKey>() == 48);

/// Value of `ENF_EXES`: the agent's small number for this file (never 0). Its binary class in
/// each generation is `ENF_BINCLASS[binclass_index(generation, exe_id)]`.
pub type ExeId = u32;
/// `exe_id` of a process whose executable the kernel could not find in `ENF_EXES`.
pub const EXE_UNKNOWN: u32 = 0;

/// Value of `ENF_CGROUPS` (key: cgroup v2 id, `u64`): the cgroup class in each generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CgroupValue {
    pub class: [u32; GENERATIONS],
}
const _: () = assert!(core::mem::size_of::<CgroupValue>() == 8);

/// Key of `ENF_IDMATCH`: (generation, binary class, cgroup class, uid) -> identity number.
/// Any of `bin`, `cg`, `uid` may be [`ANY`]. The kernel tries the most specific key first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct IdMatchKey {
    pub generation: u32,
    pub bin: u32,
    pub cg: u32,
    pub uid: u32,
}
const _: () = assert!(core::mem::size_of::<IdMatchKey>() == 16);

/// Process flags in [`ProcState::flags`].
/// The process exec'd a file (or sits in a cgroup) the kernel could not classify: the agent
/// must attest it. Connects from it are judged as pending (denied in enforce mode).
pub const PROC_PENDING: u32 = 1;
/// The kernel stopped the process at exec (SIGSTOP) until the agent attests it.
pub const PROC_HELD: u32 = 2;
/// Attested by the agent from /proc (not resolved by the kernel at exec).
pub const PROC_AGENT: u32 = 4;
/// Another process attached to it with ptrace, wrote its memory (`process_vm_writev`, a
/// `/proc/PID/mem` opened for writing) or took its file descriptors (`pidfd_getfd`): it has
/// no identity until it execs again while not traced. Set by the tamper programs (and by the
/// agent for a process it finds traced); kept across fork, cleared only by an untraced exec.
pub const PROC_TAMPERED: u32 = 16;
/// The exec's environment asks the loader or a runtime to load code ([`LOADER_ENV`]), or could
/// not be read in full: the process has no identity (judged as unattested, rule
/// [`RULE_WITHHELD`]) unless the agent grants the loaded code (`preload:`) and clears the flag.
/// Kept across fork, replaced at the next exec.
pub const PROC_WITHHELD: u32 = 8;

/// The kernel could not read the whole environment at exec (more than [`MAX_ENV_VARS`]
/// strings, or a fault): the process is pending (held while a live agent exists) and the
/// agent decides from `/proc/PID/environ`, which it trusts only for a process held before its
/// first instruction (one that ran may have rewritten its environment): otherwise withheld.
pub const PROC_ENV_UNREAD: u32 = 32;

/// `aux` of an exec event whose identity was withheld because the environment could not be
/// read in full (a fault, or more than [`MAX_ENV_VARS`] strings). Otherwise `aux` of an exec
/// event is `1 + index` in [`LOADER_ENV`] of the first variable found, or 0.
pub const WITHHELD_UNREADABLE: u32 = u32::MAX;

/// Value of `ENF_PROCS` (key: tgid, `u32`): the facts of a process as of its last exec.
/// Written by the kernel at fork (copied from the parent) and exec, removed at exit; written by
/// the agent only for processes it attests from /proc or holds. Holding facts rather than an
/// identity means a policy apply never rewrites this map: identity = f(facts, generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProcState {
    /// `ENF_EXES` value of the executable ([`EXE_UNKNOWN`] when pending).
    pub exe_id: u32,
    /// Real uid at exec.
    pub uid: u32,
    /// cgroup v2 id at exec.
    pub cgroup_id: u64,
    pub flags: u32,
    pub _pad0: u32,
    /// Kernel `task->start_boottime` of the process in ns, so the agent never confuses a
    /// reused pid with the process it attested.
    pub start_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ProcState>() == 32);

/// Key of `ENF_SOCKETS`: an identity of one generation. The value (`u32`) holds the bits
/// ([`SocketKind::bit`]) of the socket kinds its `sockets:` list allows; no entry = none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SocketKey {
    pub generation: u32,
    pub ident: u32,
}
const _: () = assert!(core::mem::size_of::<SocketKey>() == 8);

/// [`Event::flags`] bit of a connect or send to an address the kernel rewrites (`0.0.0.0`,
/// `::`, `::ffff:0.0.0.0`): `dst` is the address judged (where it goes), not the one written.
/// Above every [`ProcState`] flag.
pub const EVENT_ALIAS: u32 = 1 << 31;

/// Per-generation part of [`Config`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GenConfig {
    /// 1 when this slot holds a compiled policy.
    pub loaded: u32,
    /// A [`Mode`].
    pub mode: u32,
    /// An [`Action`].
    pub unattested: u32,
    /// 1 when the policy has cgroup selectors: exec must classify the cgroup.
    pub uses_cgroups: u32,
    /// 1 to report allowed decisions too (the default audit policy does).
    pub report_allow: u32,
    /// 1 when some identity has a `uid` selector: only then does the kernel try the
    /// exact-uid `ENF_IDMATCH` key before the any-uid one.
    pub uses_uids: u32,
    /// 1 when the generation has entries in the `ENF_RULES` trie (prefixes shorter than a
    /// host); 0 lets the kernel skip the trie and look up `ENF_HOSTS` only.
    pub prefix_rules: u32,
    /// 1 when some identity of the generation has a `preload:` list: an exec whose
    /// environment names `LD_PRELOAD` (first of the loader variables) is then held while an
    /// agent lives, so that the agent can hash the preloads before the process runs.
    pub preload_hold: u32,
}
const _: () = assert!(core::mem::size_of::<GenConfig>() == 32);

/// The single value of `ENF_CONFIG` (index 0). Applying a policy writes the inactive slot of
/// every map, then flips `active` with one 4-byte store: a connect sees the old policy or the
/// new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub abi_version: u32,
    /// Index (0 or 1) of the generation in force.
    pub active: u32,
    /// Tgid of the agent; never held at exec (it never execs anyway).
    pub agent_tgid: u32,
    /// Number of entries of `ENF_SCOPES` in use.
    pub scope_count: u32,
    /// The agent's last sign of life (kernel boot clock, ns; `CLOCK_BOOTTIME`), written every
    /// tick; zeroed by the kernel when the agent's process exits. The kernel holds a never-seen
    /// exec only while it is fresh ([`HEARTBEAT_FRESH_NS`]): with no live agent to release it, a
    /// held process would stay frozen, so it runs pending instead (every connect denied in
    /// enforce mode until an agent attests it).
    pub heartbeat_ns: u64,
    pub generations: [GenConfig; GENERATIONS],
}
const _: () = assert!(core::mem::size_of::<Config>() == 24 + 32 * GENERATIONS);

/// How old [`Config::heartbeat_ns`] may be for the kernel to still hold never-seen execs
/// (the agent writes it every 500 ms).
pub const HEARTBEAT_FRESH_NS: u64 = 5_000_000_000;

impl Config {
    /// True when a live agent will release a process held now: its heartbeat is set and at
    /// most [`HEARTBEAT_FRESH_NS`] old at `now_ns` (same clock).
    #[inline(always)]
    pub const fn agent_alive(&self, now_ns: u64) -> bool {
        self.heartbeat_ns != 0 && now_ns.saturating_sub(self.heartbeat_ns) < HEARTBEAT_FRESH_NS
    }
}

/// Kernel struct offsets read from the running kernel's BTF at load time (Rust emits no
/// CO-RE relocations). Value of `ENF_OFFSETS` (index 0). A zero `valid` disables the
/// exec-time lookup: every exec is then pending and attested by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    pub valid: u32,
    /// `linux_binprm.file`
    pub binprm_file: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `inode.i_size`
    pub inode_size: u32,
    /// seconds (i64) and nanoseconds (low 32 bits) of mtime and ctime in `inode`
    pub inode_mtime_sec: u32,
    pub inode_mtime_nsec: u32,
    pub inode_ctime_sec: u32,
    pub inode_ctime_nsec: u32,
    /// `task_struct.pid`, `task_struct.tgid`
    pub task_pid: u32,
    pub task_tgid: u32,
    /// `task_struct.signal` and `signal_struct.live` (atomic_t)
    pub task_signal: u32,
    pub signal_live: u32,
    /// `task_struct.start_boottime` (u64 ns)
    pub task_start_boottime: u32,
    /// `task_struct.mm` and `mm_struct.start_stack` (the new program's initial stack:
    /// argc, argv pointers, NULL, envp pointers, NULL) for the loader-environment check.
    pub task_mm: u32,
    pub mm_start_stack: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 72);

/// Kernel struct offsets of the tamper programs (`ENF_TAMPEROFF`, index 0), read from the
/// running kernel's BTF at load. A zero `valid` leaves the programs seeing only what needs no
/// offset (the pid argument of `process_vm_writev`); `status` says so.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TamperOffsets {
    pub valid: u32,
    /// `task_struct.ptrace` (unsigned int: non-zero while traced)
    pub task_ptrace: u32,
    /// `task_struct.ptraced` (list_head of the tasks this one traces)
    pub task_ptraced: u32,
    /// `task_struct.ptrace_entry` (list_head, in the tracer's `ptraced`)
    pub task_ptrace_entry: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.thread_pid` (struct pid *)
    pub task_thread_pid: u32,
    /// `task_struct.pid_links` (hlist_node[PIDTYPE_MAX]; index 0 = PIDTYPE_PID)
    pub task_pid_links: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_mode`
    pub file_mode: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.f_path` + `path.dentry`
    pub file_dentry: u32,
    /// `file.private_data` (a pidfd's `struct pid` before pidfs, 6.9)
    pub file_private: u32,
    /// `inode.i_private` (a pidfd's `struct pid` on pidfs)
    pub inode_private: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_magic`
    pub sb_magic: u32,
    /// `dentry.d_name` + `qstr.name`
    pub dentry_name: u32,
    /// `proc_inode.pid` minus `proc_inode.vfs_inode`: from a procfs inode to its `struct pid`
    pub proc_inode_pid: i32,
    /// `pid.tasks` (hlist_head[PIDTYPE_MAX]; index 0 = PIDTYPE_PID)
    pub pid_tasks: u32,
    /// `task_struct.thread_info` + `thread_info.status` (x86: `TS_COMPAT` in a 32-bit syscall)
    pub ti_status: u32,
}
const _: () = assert!(core::mem::size_of::<TamperOffsets>() == 88);

/// Data of an `ENF_RULES` LPM-trie key (after the 4-byte prefix length). The first
/// [`RULE_FIXED_BITS`] bits are always matched in full; the address follows, IPv4 in its
/// first 4 bytes (the other 12 zero). Prefix length = `RULE_FIXED_BITS + cidr bits`.
///
/// Entries for a single host (/32, /128) live in `ENF_HOSTS` instead, keyed by this struct
/// alone: an exact hash lookup (and a batched insert) instead of a trie walk. A host entry is
/// always the longest match of its (generation, identity, proto, family, port), so the kernel
/// tries `ENF_HOSTS` before the trie for the real port, then for port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RuleKeyData {
    pub generation: u32,
    pub ident: u32,
    pub proto: u8,
    pub family: u8,
    /// Destination port in host order; 0 = the entries that hold for every port.
    pub port: u16,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<RuleKeyData>() == 28);
pub const RULE_FIXED_BITS: u32 = 96;

/// Prefix length of a single-host entry of `family`: such entries belong in `ENF_HOSTS`.
pub const fn host_prefix_len(family: u8) -> u32 {
    RULE_FIXED_BITS + if family == FAMILY_V4 { 32 } else { 128 }
}

/// Full LPM key as the kernel sees it (`struct bpf_lpm_trie_key` + data).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RuleKey {
    pub prefix_len: u32,
    pub data: RuleKeyData,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 32);

/// Value of `ENF_RULES` and `ENF_HOSTS`: the verdict for destinations whose longest match is
/// this entry. Deny precedence is compiled in (an allow inside a deny prefix is stored as deny).
///
/// A time-bound entry (`expires:` / `notBefore:` in the policy, or a grant) holds `verdict`
/// and `rule` only inside its window `[not_before_ns, expires_ns)` of the kernel boot clock
/// (`CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns`); outside it the entry gives
/// `fallback_verdict` / `fallback_rule`, what the permanent entries decide. 0 in either bound
/// means "no bound", so a zeroed value is a permanent entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    pub verdict: u32,
    /// Index of the policy rule entry that gave it (for `explain` and events).
    pub rule: u32,
    /// Boot-clock ns before which the entry gives the fallback (0: no lower bound).
    pub not_before_ns: u64,
    /// Boot-clock ns from which the entry gives the fallback (0: never expires).
    pub expires_ns: u64,
    pub fallback_verdict: u32,
    pub fallback_rule: u32,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 32);

impl RuleValue {
    /// A permanent entry.
    #[inline(always)]
    pub const fn permanent(verdict: u32, rule: u32) -> Self {
        Self {
            verdict,
            rule,
            not_before_ns: 0,
            expires_ns: 0,
            fallback_verdict: 0,
            fallback_rule: 0,
        }
    }

    /// True when the entry has a window (the decision must read the clock).
    #[inline(always)]
    pub const fn is_timed(&self) -> bool {
        self.not_before_ns != 0 || self.expires_ns != 0
    }

    /// True when `now_ns` (boot clock) lies inside the entry's window.
    #[inline(always)]
    pub const fn in_window(&self, now_ns: u64) -> bool {
        now_ns >= self.not_before_ns && (self.expires_ns == 0 || now_ns < self.expires_ns)
    }

    /// The entry as it decides at `now_ns`: itself inside its window, else a permanent entry
    /// with the fallback verdict and rule.
    #[inline(always)]
    pub const fn at(&self, now_ns: u64) -> Self {
        if !self.is_timed() || self.in_window(now_ns) {
            *self
        } else {
            Self::permanent(self.fallback_verdict, self.fallback_rule)
        }
    }
}

/// Key of `ENF_UNCOVERED`: where connects with no identity come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct UncoveredKey {
    pub exe_id: u32,
    pub _pad0: u32,
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<UncoveredKey>() == 16);

/// Value of `ENF_UNCOVERED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UncoveredValue {
    pub connects: u64,
    /// Boot-clock time of the last one.
    pub last_ns: u64,
    pub last_dst: [u8; 16],
    pub last_port: u16,
    pub last_proto: u8,
    pub last_family: u8,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<UncoveredValue>() == 40);

/// One record of the `ENF_EVENTS` ring buffer. For process events `verdict`, `rule`, `dst`,
/// `port`, `proto`, `family` are zero; for exec, `exe` is the key the kernel saw.
/// For socket events ([`EventKind::Socket`]): `family` is [`FAMILY_V4`]/[`FAMILY_V6`],
/// `port` the socket type (`SOCK_*`), `dst[0..4]` the protocol (`u32`, native order: it
/// may exceed 255) and `dst[4]` the [`SocketKind`]; `proto` is the protocol's low byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// An [`EventKind`].
    pub kind: u32,
    pub tgid: u32,
    /// Parent tgid (fork) or the [`Hook`] (connect).
    pub aux: u32,
    pub uid: u32,
    pub gid: u32,
    pub ident: u32,
    /// A [`Verdict`] (connect).
    pub verdict: u32,
    pub rule: u32,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    /// `task->start_boottime` of the process (pid reuse check).
    pub start_ns: u64,
    pub flags: u32,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub dst: [u8; 16],
    pub exe: ExeKey,
}
const _: () = assert!(core::mem::size_of::<Event>() == 128);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these types are repr(C), made only of integers, with every padding byte named.
    unsafe impl aya::Pod for ExeKey {}
    unsafe impl aya::Pod for CgroupValue {}
    unsafe impl aya::Pod for IdMatchKey {}
    unsafe impl aya::Pod for ProcState {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for TamperOffsets {}
    unsafe impl aya::Pod for RuleKeyData {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UncoveredKey {}
    unsafe impl aya::Pod for UncoveredValue {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for EnvSlot {}
}

/// Convert a user-space `st_dev` (glibc encoding) to the kernel's `s_dev` encoding.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

//! Every map of the object, and the lookup traits of the decision function over them.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{Array, CgroupArray, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};
use enforcer_common::{
    COUNTERS, CgroupValue, Config, Counter, ENV_SLOTS, EVENTS_BYTES, EnvSlot, ExeId, ExeKey,
    GENERATIONS, IdMatchKey, IdentityMaps, KernelOffsets, MAX_CGROUPS, MAX_EXES, MAX_IDMATCH,
    MAX_PROCS, MAX_RULES, MAX_SCOPES, MAX_SOCKET_RULES, MAX_UNCOVERED, ProcState, RuleKeyData,
    RuleMaps, RuleValue, SocketKey, SocketMaps, TamperOffsets, UncoveredKey, UncoveredValue,
};

const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "ENF_LOADENV")]
pub static LOADENV: Array<EnvSlot> = Array::pinned(ENV_SLOTS as u32, 0);
#[map(name = "ENF_PROCS")]
pub static PROCS: HashMap<u32, ProcState> = HashMap::pinned(MAX_PROCS, 0);
#[map(name = "ENF_EXES")]
pub static EXES: HashMap<ExeKey, ExeId> = HashMap::pinned(MAX_EXES, 0);
#[map(name = "ENF_BINCLASS")]
pub static BINCLASS: Array<u32> = Array::pinned(MAX_EXES * GENERATIONS as u32, 0);
#[map(name = "ENF_CGROUPS")]
pub static CGROUPS: HashMap<u64, CgroupValue> = HashMap::pinned(MAX_CGROUPS, 0);
#[map(name = "ENF_IDMATCH")]
pub static IDMATCH: HashMap<IdMatchKey, u32> = HashMap::pinned(MAX_IDMATCH, 0);
#[map(name = "ENF_RULES")]
pub static RULES: LpmTrie<RuleKeyData, RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
/// Single-host entries (see `RuleKeyData`); allocated as written, never preallocated.
#[map(name = "ENF_HOSTS")]
pub static HOSTS: HashMap<RuleKeyData, RuleValue> = HashMap::pinned(MAX_RULES, BPF_F_NO_PREALLOC);
#[map(name = "ENF_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "ENF_OFFSETS")]
pub static OFFSETS: Array<KernelOffsets> = Array::pinned(1, 0);
#[map(name = "ENF_TAMPEROFF")]
pub static TAMPER_OFFSETS: Array<TamperOffsets> = Array::pinned(1, 0);
#[map(name = "ENF_COUNTERS")]
pub static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);
#[map(name = "ENF_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map(name = "ENF_UNCOVERED")]
pub static UNCOVERED: LruHashMap<UncoveredKey, UncoveredValue> =
    LruHashMap::pinned(MAX_UNCOVERED, 0);
/// (generation, identity) -> socket kinds its `sockets:` list allows.
#[map(name = "ENF_SOCKETS")]
pub static SOCKETS: HashMap<SocketKey, u32> = HashMap::pinned(MAX_SOCKET_RULES, 0);
#[map(name = "ENF_SCOPES")]
pub static SCOPES: CgroupArray = CgroupArray::pinned(MAX_SCOPES, 0);

/// Adds one to a counter of this CPU.
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(c as u32) {
        // SAFETY: the per-CPU slot of this CPU; no other writer while we run.
        unsafe { *p += 1 };
    }
}

/// Tgid of the calling process.
#[inline(always)]
pub fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Boot-clock time in ns.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The object's maps, as the decision function of `enforcer-common` reads them.
pub struct KernelMaps;

impl IdentityMaps for KernelMaps {
    #[inline(always)]
    fn binclass(&self, index: u32) -> Option<u32> {
        BINCLASS.get(index).copied()
    }

    #[inline(always)]
    fn cgroup(&self, cgroup_id: u64) -> Option<CgroupValue> {
        // SAFETY: the value is copied out at once; a deleted element is freed only after an
        // RCU grace period, and this program runs inside one.
        unsafe { CGROUPS.get(&cgroup_id) }.copied()
    }

    #[inline(always)]
    fn idmatch(&self, key: &IdMatchKey) -> Option<u32> {
        // SAFETY: as for `cgroup`: copied out at once, inside the RCU read section.
        unsafe { IDMATCH.get(key) }.copied()
    }
}

impl RuleMaps for KernelMaps {
    #[inline(always)]
    fn host(&self, key: &RuleKeyData) -> Option<RuleValue> {
        // SAFETY: as for `cgroup`: copied out at once, inside the RCU read section.
        unsafe { HOSTS.get(key) }.copied()
    }

    #[inline(always)]
    fn prefix(&self, prefix_len: u32, key: &RuleKeyData) -> Option<RuleValue> {
        RULES.get(&Key::new(prefix_len, *key)).copied()
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        now_ns()
    }
}

impl SocketMaps for KernelMaps {
    #[inline(always)]
    fn sockets(&self, key: &SocketKey) -> Option<u32> {
        // SAFETY: as for `cgroup`: copied out at once, inside the RCU read section.
        unsafe { SOCKETS.get(key) }.copied()
    }
}

//! Kernel programs of the enforcer.
//!
//! * `enf_connect4/6`, `enf_sendmsg4/6` (cgroup sock_addr): judge each connect / unconnected
//!   send from the calling process's identity and the compiled rules.
//! * `enf_fork`, `enf_exec`, `enf_exit` (raw tracepoints): keep process -> identity current in
//!   the kernel itself, so the identity changes at exec, not when user space catches up.
//!
//! Every entry point is a thin wrapper around a `try_` function. All maps are pinned by name
//! under the agent's versioned bpffs folder, so enforcement outlives the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        generated::bpf_send_signal,
    },
    macros::{cgroup_sock_addr, map, raw_tracepoint},
    maps::{Array, CgroupArray, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{RawTracePointContext, SockAddrContext},
};
use enforcer_common::*;

/// The ABI version this object was built with; the agent checks it before use.
#[unsafe(no_mangle)]
static ENF_ABI: u32 = ABI_VERSION;

#[map(name = "ENF_PROCS")]
static PROCS: HashMap<u32, ProcState> = HashMap::pinned(MAX_PROCS, 0);
#[map(name = "ENF_EXES")]
static EXES: HashMap<ExeKey, ExeId> = HashMap::pinned(MAX_EXES, 0);
#[map(name = "ENF_BINCLASS")]
static BINCLASS: Array<u32> = Array::pinned(MAX_EXES * GENERATIONS as u32, 0);
#[map(name = "ENF_CGROUPS")]
static CGROUPS: HashMap<u64, CgroupValue> = HashMap::pinned(MAX_CGROUPS, 0);
#[map(name = "ENF_IDMATCH")]
static IDMATCH: HashMap<IdMatchKey, u32> = HashMap::pinned(MAX_IDMATCH, 0);
#[map(name = "ENF_RULES")]
static RULES: LpmTrie<RuleKeyData, RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
/// Single-host entries (see `RuleKeyData`); allocated as written, never preallocated.
#[map(name = "ENF_HOSTS")]
static HOSTS: HashMap<RuleKeyData, RuleValue> = HashMap::pinned(MAX_RULES, BPF_F_NO_PREALLOC);
#[map(name = "ENF_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "ENF_OFFSETS")]
static OFFSETS: Array<KernelOffsets> = Array::pinned(1, 0);
#[map(name = "ENF_COUNTERS")]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);
#[map(name = "ENF_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map(name = "ENF_UNCOVERED")]
static UNCOVERED: LruHashMap<UncoveredKey, UncoveredValue> = LruHashMap::pinned(MAX_UNCOVERED, 0);
#[map(name = "ENF_SCOPES")]
static SCOPES: CgroupArray = CgroupArray::pinned(MAX_SCOPES, 0);

const SIGSTOP: u32 = 19;
const BPF_F_NO_PREALLOC: u32 = 1;
const NSEC_MASK: u32 = 0x3fff_ffff;
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of this CPU; no other writer while we run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn gen_config(cfg: &Config, generation: u32) -> &GenConfig {
    if generation == 0 {
        &cfg.generations[0]
    } else {
        &cfg.generations[1]
    }
}

// ---------------------------------------------------------------- connect / sendmsg

#[cgroup_sock_addr(connect4)]
pub fn enf_connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn enf_connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enf_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enf_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, HOOK_SENDMSG6)
}

/// Destination of a sock_addr call, IPv4-mapped IPv6 folded to IPv4.
#[inline(always)]
fn destination(sa: *const bpf_sock_addr, hook: u32) -> RuleKeyData {
    let mut d = RuleKeyData {
        generation: 0,
        ident: 0,
        proto: 0,
        family: FAMILY_V4,
        port: 0,
        addr: [0; 16],
    };
    // SAFETY: `sa` is the context the kernel gave us; these are 4-byte context loads.
    unsafe {
        d.proto = (*sa).protocol as u8;
        d.port = u16::from_be((*sa).user_port as u16);
        if hook == HOOK_CONNECT4 || hook == HOOK_SENDMSG4 {
            let a = (*sa).user_ip4.to_ne_bytes();
            d.addr[..4].copy_from_slice(&a);
        } else {
            let w0 = (*sa).user_ip6[0];
            let w1 = (*sa).user_ip6[1];
            let w2 = (*sa).user_ip6[2];
            let w3 = (*sa).user_ip6[3];
            if w0 == 0 && w1 == 0 && w2 == u32::to_be(0xffff) {
                d.addr[..4].copy_from_slice(&w3.to_ne_bytes());
            } else {
                d.family = FAMILY_V6;
                d.addr[0..4].copy_from_slice(&w0.to_ne_bytes());
                d.addr[4..8].copy_from_slice(&w1.to_ne_bytes());
                d.addr[8..12].copy_from_slice(&w2.to_ne_bytes());
                d.addr[12..16].copy_from_slice(&w3.to_ne_bytes());
            }
        }
    }
    d
}

/// Longest match for (identity, proto, port, address): the host entry, else the trie (when
/// the generation has prefixes); then the same for the all-ports entries (port 0).
#[inline(always)]
fn lookup_rule(g: &GenConfig, mut data: RuleKeyData) -> RuleValue {
    let bits = host_prefix_len(data.family);
    // SAFETY: the value is copied out at once; a deleted element is freed only after an RCU
    // grace period, and this program runs inside one.
    if let Some(v) = unsafe { HOSTS.get(&data) } {
        return *v;
    }
    if g.prefix_rules != 0
        && let Some(v) = RULES.get(&Key::new(bits, data))
    {
        return *v;
    }
    data.port = 0;
    if let Some(v) = unsafe { HOSTS.get(&data) } {
        return *v;
    }
    if g.prefix_rules != 0
        && let Some(v) = RULES.get(&Key::new(bits, data))
    {
        return *v;
    }
    RuleValue {
        verdict: VERDICT_DENY,
        rule: RULE_DEFAULT_DENY,
    }
}

fn try_sock_addr(ctx: &SockAddrContext, hook: u32) -> i32 {
    let mut dst = destination(ctx.sock_addr, hook);
    let pid = tgid();
    let Some(cfg) = CONFIG.get(0) else {
        count(CNT_NO_CONFIG);
        return DENY;
    };
    let generation = cfg.active & 1;
    let g = gen_config(cfg, generation);
    if g.loaded == 0 {
        count(CNT_NO_CONFIG);
        return if g.mode == MODE_AUDIT { ALLOW } else { DENY };
    }
    let mut ident = IDENT_NONE;
    let mut flags = 0;
    let decision = match unsafe { PROCS.get(&pid) } {
        None => {
            count(CNT_UNTRACKED);
            RuleValue {
                verdict: VERDICT_DENY,
                rule: RULE_UNTRACKED,
            }
        }
        Some(p) if p.flags & PROC_PENDING != 0 => {
            flags = p.flags;
            count(CNT_PENDING);
            RuleValue {
                verdict: VERDICT_DENY,
                rule: RULE_PENDING,
            }
        }
        Some(p) => {
            flags = p.flags;
            ident = identity(g, generation, p);
            if ident == IDENT_NONE {
                count(CNT_UNATTESTED);
                tally_uncovered(p, &dst);
                let verdict = match g.unattested {
                    ACTION_ALLOW => VERDICT_ALLOW,
                    ACTION_AUDIT => VERDICT_AUDIT,
                    _ => VERDICT_DENY,
                };
                RuleValue {
                    verdict,
                    rule: RULE_UNATTESTED,
                }
            } else {
                dst.generation = generation;
                dst.ident = ident;
                lookup_rule(g, dst)
            }
        }
    };
    let mut verdict = decision.verdict;
    if verdict == VERDICT_DENY && g.mode != MODE_ENFORCE {
        verdict = VERDICT_AUDIT;
    }
    count(match verdict {
        VERDICT_ALLOW => CNT_ALLOW,
        VERDICT_AUDIT => CNT_AUDIT,
        _ => CNT_DENY,
    });
    if verdict != VERDICT_ALLOW || g.report_allow != 0 {
        report_connect(pid, hook, ident, verdict, decision.rule, flags, &dst);
    }
    if verdict == VERDICT_DENY { DENY } else { ALLOW }
}

/// Coverage: count connects with no identity per (executable, cgroup), in the kernel, so the
/// report costs no event per connect.
#[inline(always)]
fn tally_uncovered(p: &ProcState, dst: &RuleKeyData) {
    let key = UncoveredKey {
        exe_id: p.exe_id,
        _pad0: 0,
        cgroup_id: p.cgroup_id,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    match UNCOVERED.get_ptr_mut(&key) {
        Some(v) => {
            // SAFETY: a map value; concurrent updates from other CPUs only race on statistics.
            unsafe {
                (*v).connects += 1;
                (*v).last_ns = now;
                (*v).last_dst = dst.addr;
                (*v).last_port = dst.port;
                (*v).last_proto = dst.proto;
                (*v).last_family = dst.family;
            }
        }
        None => {
            let v = UncoveredValue {
                connects: 1,
                last_ns: now,
                last_dst: dst.addr,
                last_port: dst.port,
                last_proto: dst.proto,
                last_family: dst.family,
                _pad0: 0,
            };
            let _ = UNCOVERED.insert(&key, &v, 0);
        }
    }
}

#[inline(always)]
fn report_connect(
    pid: u32,
    hook: u32,
    ident: u32,
    verdict: u32,
    rule: u32,
    flags: u32,
    dst: &RuleKeyData,
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(CNT_EVENTS_LOST);
        return;
    };
    let ug = bpf_get_current_uid_gid();
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind: EV_CONNECT,
        tgid: pid,
        aux: hook,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        ident,
        verdict,
        rule,
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: plain helper call.
        ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
        start_ns: 0,
        flags,
        port: dst.port,
        proto: dst.proto,
        family: dst.family,
        dst: dst.addr,
        exe: ExeKey::default(),
    };
    entry.submit(0);
}

// ---------------------------------------------------------------- benchmark floor

// Programs that only allow: the cost any cgroup hook pays, for `cargo xtask bench`. The agent
// never loads them.
#[cgroup_sock_addr(connect4)]
pub fn bench_allow4(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn bench_allow6(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bench_sm_allow4(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bench_sm_allow6(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

// A program the verifier must refuse (it reads far past the end of its context). The agent
// never loads it in production: the tests load it through the agent's own loader to check
// what an operator sees when the kernel rejects a program.
#[cgroup_sock_addr(connect4)]
pub fn enf_reject(ctx: SockAddrContext) -> i32 {
    // SAFETY: none, on purpose: the verifier rejects this load ("invalid bpf_context access").
    let v =
        unsafe { core::ptr::read_volatile((ctx.sock_addr as *const u8).add(4000).cast::<u32>()) };
    (v & 1) as i32
}

// ---------------------------------------------------------------- process tracking

#[inline(always)]
unsafe fn read<T: Copy>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an Err.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

#[inline(always)]
fn offsets() -> Option<&'static KernelOffsets> {
    let o = OFFSETS.get(0)?;
    if o.valid == 0 { None } else { Some(o) }
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn enf_fork(ctx: RawTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i32> {
    let o = offsets().ok_or(0)?;
    let child: u64 = ctx.arg(1);
    // SAFETY: reads through bpf_probe_read_kernel.
    let (pid, child_tgid, start_ns) = unsafe {
        (
            read::<i32>(child, o.task_pid)? as u32,
            read::<i32>(child, o.task_tgid)? as u32,
            read::<u64>(child, o.task_start_boottime)?,
        )
    };
    if pid != child_tgid {
        return Ok(()); // a new thread: same process, same identity
    }
    let parent = tgid();
    let mut st = match unsafe { PROCS.get(&parent) } {
        Some(p) => *p,
        None => ProcState {
            exe_id: EXE_UNKNOWN,
            uid: bpf_get_current_uid_gid() as u32,
            // SAFETY: plain helper call.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            flags: PROC_PENDING,
            _pad0: 0,
            start_ns: 0,
        },
    };
    st.start_ns = start_ns;
    // A held parent cannot fork; the child of a pending parent is pending too.
    st.flags &= !PROC_HELD;
    if PROCS.insert(&child_tgid, &st, 0).is_err() {
        count(CNT_PROC_INSERT_FAIL);
        let _ = PROCS.remove(&child_tgid);
    }
    emit_proc(EV_FORK, child_tgid, parent, &st, &ExeKey::default());
    Ok(())
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn enf_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(_ctx: &RawTracePointContext) -> Result<(), i32> {
    let live = match offsets() {
        // SAFETY: plain helper call and probe reads.
        Some(o) => unsafe {
            let task = bpf_get_current_task();
            let signal = read::<u64>(task, o.task_signal)?;
            read::<i32>(signal, o.signal_live)?
        },
        // No offsets (no usable BTF): the main thread's exit ends the entry; a process that
        // lives on without its main thread is then untracked, so denied (fail closed).
        None => i32::from(bpf_get_current_pid_tgid() as u32 != tgid()),
    };
    if live != 0 {
        return Ok(()); // a thread ended; the process lives on
    }
    let pid = tgid();
    let _ = PROCS.remove(&pid);
    let st = ProcState::default();
    emit_proc(EV_EXIT, pid, 0, &st, &ExeKey::default());
    Ok(())
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn enf_exec(ctx: RawTracePointContext) -> i32 {
    let _ = try_exec(&ctx);
    0
}

#[inline(always)]
fn exe_key(o: &KernelOffsets, bprm: u64) -> Result<ExeKey, i32> {
    // SAFETY: reads through bpf_probe_read_kernel.
    unsafe {
        let file = read::<u64>(bprm, o.binprm_file)?;
        let inode = read::<u64>(file, o.file_inode)?;
        let sb = read::<u64>(inode, o.inode_sb)?;
        Ok(ExeKey {
            dev: read::<u32>(sb, o.sb_dev)?,
            _pad0: 0,
            ino: read::<u64>(inode, o.inode_ino)?,
            size: read::<u64>(inode, o.inode_size)?,
            mtime_sec: read::<i64>(inode, o.inode_mtime_sec)?,
            // Multigrain timestamps (6.13+) keep a "queried" flag in bit 31 of the ctime
            // nanoseconds; nanoseconds never reach bit 30, so the mask only drops flags.
            mtime_nsec: read::<u32>(inode, o.inode_mtime_nsec)? & NSEC_MASK,
            ctime_nsec: read::<u32>(inode, o.inode_ctime_nsec)? & NSEC_MASK,
            ctime_sec: read::<i64>(inode, o.inode_ctime_sec)?,
        })
    }
}

/// Identity of a process in one generation, from the facts recorded at its exec: binary
/// class and cgroup class of that generation, then (class, class, uid), then (class, class, any).
#[inline(always)]
fn identity(g: &GenConfig, generation: u32, p: &ProcState) -> u32 {
    let bin = match BINCLASS.get(generation * MAX_EXES + (p.exe_id & (MAX_EXES - 1))) {
        Some(b) => *b,
        None => BIN_NONE,
    };
    let cg = if g.uses_cgroups == 0 {
        CG_NONE
    } else {
        match unsafe { CGROUPS.get(&p.cgroup_id) } {
            Some(c) => {
                if generation == 0 {
                    c.class[0]
                } else {
                    c.class[1]
                }
            }
            None => CG_NONE,
        }
    };
    let mut k = IdMatchKey {
        generation,
        bin,
        cg,
        uid: p.uid,
    };
    if g.uses_uids != 0
        && let Some(id) = unsafe { IDMATCH.get(&k) }
    {
        return *id;
    }
    k.uid = ANY;
    match unsafe { IDMATCH.get(&k) } {
        Some(id) => *id,
        None => IDENT_NONE,
    }
}

#[inline(always)]
fn in_scope(cfg: &Config) -> bool {
    let n = cfg.scope_count;
    let mut i = 0;
    while i < MAX_SCOPES {
        if i >= n {
            return false;
        }
        if let Ok(true) = SCOPES.current_task_under_cgroup(i) {
            return true;
        }
        i += 1;
    }
    false
}

fn try_exec(ctx: &RawTracePointContext) -> Result<(), i32> {
    // Without offsets (no usable BTF) the file is never recognised: every exec is pending,
    // and held in an enforced scope until the agent attests it (fail closed, never open).
    let o = offsets();
    let cfg = CONFIG.get(0).ok_or(0)?;
    let pid = tgid();
    let bprm: u64 = ctx.arg(2);
    let key = match o {
        Some(o) => exe_key(o, bprm).unwrap_or_default(),
        None => ExeKey::default(),
    };
    // SAFETY: plain helper calls and probe reads.
    let (cgroup_id, uid, start_ns) = unsafe {
        let task = bpf_get_current_task();
        (
            bpf_get_current_cgroup_id(),
            bpf_get_current_uid_gid() as u32,
            match o {
                Some(o) => read::<u64>(task, o.task_start_boottime).unwrap_or(0),
                None => 0,
            },
        )
    };
    let exe_id = match (o, unsafe { EXES.get(&key) }) {
        (Some(_), Some(id)) => *id,
        _ => EXE_UNKNOWN,
    };
    let uses_cgroups = cfg.generations[0].uses_cgroups | cfg.generations[1].uses_cgroups;
    let cgroup_unknown = uses_cgroups != 0 && unsafe { CGROUPS.get(&cgroup_id) }.is_none();
    let mut st = ProcState {
        exe_id,
        uid,
        cgroup_id,
        flags: 0,
        _pad0: 0,
        start_ns,
    };
    if exe_id == EXE_UNKNOWN || cgroup_unknown {
        st.flags |= PROC_PENDING;
        count(CNT_EXEC_PENDING);
        let active = gen_config(cfg, cfg.active & 1);
        if active.loaded != 0
            && active.mode == MODE_ENFORCE
            && pid != cfg.agent_tgid
            && in_scope(cfg)
        {
            // Hold the process before it runs a single instruction of the new program; the
            // agent attests it and sends SIGCONT. Fail closed if the agent is away.
            // SAFETY: plain helper call.
            if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
                st.flags |= PROC_HELD;
                count(CNT_HELD);
            }
        }
    } else {
        count(CNT_EXEC_KNOWN);
    }
    if PROCS.insert(&pid, &st, 0).is_err() {
        // Never leave the pre-exec facts in place: no entry means deny.
        count(CNT_PROC_INSERT_FAIL);
        let _ = PROCS.remove(&pid);
    }
    emit_proc(EV_EXEC, pid, 0, &st, &key);
    Ok(())
}

#[inline(always)]
fn emit_proc(kind: u32, pid: u32, aux: u32, st: &ProcState, exe: &ExeKey) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(CNT_EVENTS_LOST);
        return;
    };
    let ug = bpf_get_current_uid_gid();
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind,
        tgid: pid,
        aux,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        ident: st.exe_id,
        verdict: 0,
        rule: 0,
        // SAFETY: plain helper call.
        cgroup_id: st.cgroup_id,
        // SAFETY: plain helper call.
        ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
        start_ns: st.start_ns,
        flags: st.flags,
        port: 0,
        proto: 0,
        family: 0,
        dst: [0; 16],
        exe: *exe,
    };
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

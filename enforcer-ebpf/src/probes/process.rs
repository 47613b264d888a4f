//! Raw tracepoint programs: keep `ENF_PROCS` (process -> facts of its last exec) current.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_probe_read_user_str, bpf_send_signal},
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use enforcer_common::{
    Config, Counter, ENV_PREFIX, EXE_UNKNOWN, EnvPrefix, Event, EventKind, ExeKey, KernelOffsets,
    LOADER_PRELOAD, MAX_ENV_VARS, MAX_SCOPES, Mode, PROC_ENV_UNREAD, PROC_HELD, PROC_PENDING,
    PROC_TAMPERED, PROC_WITHHELD, ProcState, WITHHELD_UNREADABLE, loader_var_in,
};

use crate::maps::{
    CGROUPS, CONFIG, EVENTS, EXES, LOADENV, OFFSETS, PROCS, SCOPES, count, now_ns, tgid,
};

const SIGSTOP: u32 = 19;
const NSEC_MASK: u32 = 0x3fff_ffff;

/// Reads a `T` at `base + off` in kernel memory.
///
/// # Safety
/// None needed beyond the signature: `bpf_probe_read_kernel` checks the address and a fault
/// is an `Err`; it is `unsafe` because it dereferences a raw kernel address.
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
    // SAFETY: the entry is copied out at once, inside the RCU read section.
    let mut st = match unsafe { PROCS.get(&parent) } {
        Some(p) => *p,
        None => ProcState {
            exe_id: EXE_UNKNOWN,
            uid: bpf_get_current_uid_gid() as u32,
            // SAFETY: a helper without arguments or side effects.
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
        count(Counter::ProcInsertFail);
        let _ = PROCS.remove(&child_tgid);
    }
    emit_proc(EventKind::Fork, child_tgid, parent, &st, &ExeKey::default());
    Ok(())
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn enf_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(_ctx: &RawTracePointContext) -> Result<(), i32> {
    let live = match offsets() {
        // SAFETY: a helper without arguments, then reads through bpf_probe_read_kernel.
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
    if let Some(cfg) = CONFIG.get_ptr_mut(0) {
        // SAFETY: the map's only value, written in place; a racing agent write is a whole
        // value of the same layout.
        unsafe {
            if pid == (*cfg).agent_tgid {
                // The agent is gone: nobody would release a process held from now on.
                (*cfg).heartbeat_ns = 0;
            }
        }
    }
    let st = ProcState::default();
    emit_proc(EventKind::Exit, pid, 0, &st, &ExeKey::default());
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

/// The loader-environment check (SECURITY.md guarantee 3): walks the envp array of the new
/// program's initial stack (`mm->start_stack` points at argc, then argv pointers, NULL, envp
/// pointers, NULL: what `ld.so` and every runtime read) and matches the first
/// [`ENV_PREFIX`] bytes of each string against `LOADER_ENV`. Returns 0 when clean, `1 +
/// index` of the first variable found, or [`WITHHELD_UNREADABLE`] when the environment could
/// not be read in full (a fault, more than [`MAX_ENV_VARS`] strings, no offsets): never trust
/// what was not seen.
#[inline(always)]
fn scan_env(o: Option<&KernelOffsets>) -> u32 {
    let Some(o) = o else {
        // No offsets (no usable BTF): the exec is pending whatever its file (held while a live
        // agent exists), and the agent decides from /proc/PID/environ.
        return 0;
    };
    if o.task_mm == 0 && o.mm_start_stack == 0 {
        return WITHHELD_UNREADABLE;
    }
    // SAFETY: a helper without arguments, then reads through bpf_probe_read_kernel.
    let sp = match unsafe {
        let task = bpf_get_current_task();
        read::<u64>(task, o.task_mm).and_then(|mm| read::<u64>(mm, o.mm_start_stack))
    } {
        Ok(sp) => sp,
        Err(_) => return WITHHELD_UNREADABLE,
    };
    // SAFETY: bpf_probe_read_user checks the address; a fault is an Err.
    let argc = match unsafe { bpf_probe_read_user(sp as *const u64) } {
        Ok(n) => n,
        Err(_) => return WITHHELD_UNREADABLE,
    };
    let envp = sp.wrapping_add(8u64.wrapping_mul(argc.wrapping_add(2)));
    let mut buf = EnvPrefix::default();
    let mut i: u32 = 0;
    while i < MAX_ENV_VARS {
        let at = envp.wrapping_add(8 * i as u64);
        // SAFETY: bpf_probe_read_user checks the address; a fault is an Err.
        let ptr = match unsafe { bpf_probe_read_user(at as *const u64) } {
            Ok(p) => p,
            Err(_) => return WITHHELD_UNREADABLE,
        };
        if ptr == 0 {
            return 0;
        }
        // SAFETY: the helper writes at most ENV_PREFIX bytes into `buf` and checks `ptr`.
        let n = unsafe {
            bpf_probe_read_user_str(
                &mut buf as *mut EnvPrefix as *mut _,
                ENV_PREFIX as u32,
                ptr as *const _,
            )
        };
        if n < 0 {
            return WITHHELD_UNREADABLE;
        }
        let found = loader_var_in(&buf, &|i| LOADENV.get(i));
        if found != 0 {
            return found;
        }
        i += 1;
    }
    WITHHELD_UNREADABLE
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
    // SAFETY: helpers without arguments, then a read through bpf_probe_read_kernel.
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
    // SAFETY: the value is copied out at once, inside the RCU read section.
    let exe_id = match (o, unsafe { EXES.get(&key) }) {
        (Some(_), Some(id)) => *id,
        _ => EXE_UNKNOWN,
    };
    let uses_cgroups = cfg.generations[0].uses_cgroups | cfg.generations[1].uses_cgroups;
    // SAFETY: only the presence of the entry is used, inside the RCU read section.
    let cgroup_unknown = uses_cgroups != 0 && unsafe { CGROUPS.get(&cgroup_id) }.is_none();
    let mut st = ProcState {
        exe_id,
        uid,
        cgroup_id,
        flags: 0,
        _pad0: 0,
        start_ns,
    };
    // An exec clears tampering, unless the process is traced now: the tracer can still
    // write into the new program.
    if super::tamper::current_traced() {
        st.flags |= PROC_TAMPERED;
    }
    let withheld = scan_env(o);
    if withheld == WITHHELD_UNREADABLE {
        // Not seen in full: the agent decides (pending, held while it lives).
        st.flags |= PROC_ENV_UNREAD;
    } else if withheld != 0 {
        st.flags |= PROC_WITHHELD;
    }
    let must_attest = exe_id == EXE_UNKNOWN || cgroup_unknown || st.flags & PROC_ENV_UNREAD != 0;
    // LD_PRELOAD first among the loader variables, and a policy that may grant preloads:
    // held (not pending unless held) so that the agent hashes the preloads before they run.
    let preload =
        withheld == LOADER_PRELOAD + 1 && cfg.generation(cfg.active & 1).preload_hold != 0;
    if must_attest || preload {
        st.flags |= PROC_PENDING;
        count(Counter::ExecPending);
        let active = cfg.generation(cfg.active & 1);
        if active.loaded != 0
            && active.mode == Mode::Enforce as u32
            && pid != cfg.agent_tgid
            && in_scope(cfg)
        {
            if cfg.agent_alive(now_ns()) {
                // Hold the process before it runs a single instruction of the new program;
                // the agent attests it and sends SIGCONT.
                // SAFETY: a helper that signals the current task only.
                if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
                    st.flags |= PROC_HELD;
                    count(Counter::Held);
                }
            } else {
                // No live agent would release it: run it pending (every connect denied)
                // until an agent attests it, instead of leaving it frozen.
                count(Counter::HoldSkipped);
            }
        }
        if !must_attest && st.flags & PROC_HELD == 0 {
            // Not held: nothing can grant the preload; withheld as without `preload:`.
            st.flags &= !PROC_PENDING;
        }
    } else {
        count(Counter::ExecKnown);
    }
    if PROCS.insert(&pid, &st, 0).is_err() {
        // Never leave the pre-exec facts in place: no entry means deny.
        count(Counter::ProcInsertFail);
        let _ = PROCS.remove(&pid);
    }
    emit_proc(EventKind::Exec, pid, withheld, &st, &key);
    Ok(())
}

#[inline(always)]
fn emit_proc(kind: EventKind, pid: u32, aux: u32, st: &ProcState, exe: &ExeKey) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let ug = bpf_get_current_uid_gid();
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind: kind as u32,
        tgid: pid,
        aux,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        ident: st.exe_id,
        verdict: 0,
        rule: 0,
        cgroup_id: st.cgroup_id,
        ktime_ns: now_ns(),
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

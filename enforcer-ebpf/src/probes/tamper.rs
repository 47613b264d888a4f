//! Tampering: a process that attaches to another with ptrace, writes its memory or takes its
//! file descriptors strips the target of its identity ([`PROC_TAMPERED`] in `ENF_PROCS`).
//!
//! Two raw tracepoints, `sys_enter` and `sys_exit` (x86_64 numbers, and the ia32 ones of
//! 32-bit syscalls made by any process): both return after one comparison for every other
//! syscall. What each one sees:
//!
//! * `ptrace` (exit): every task the caller traces now (the kernel's `ptraced` list of the
//!   calling thread) is marked, so an attach or seize that succeeded marks its tracee whatever
//!   thread id it named, and a failed one marks nothing.
//! * `open`, `openat`, `openat2`, `creat` (exit): the descriptor returned is looked up; a
//!   procfs file named `mem` opened for writing marks the process it belongs to (so a relative
//!   path, a symlink or `/proc/PID/task/TID/mem` are all seen: the check is on the file, not
//!   the path string).
//! * `process_vm_writev` (enter, before any byte is written): the pid argument, when it is a
//!   process in `ENF_PROCS` of the caller's uid (or the caller is root).
//! * `pidfd_getfd` (enter): the process the pidfd refers to, on the same uid condition.
//!
//! Marking at enter needs the uid condition: without it a process of another uid could strip
//! a service of its identity by a call the kernel then refuses. A process's tampering with
//! itself is not tampering.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use enforcer_common::{Counter, Event, EventKind, ExeKey, PROC_TAMPERED, TamperOffsets};

use crate::maps::{PROCS, TAMPER_OFFSETS, count, now_ns, tgid};

// x86_64 syscall numbers.
const NR_OPEN: u64 = 2;
const NR_CREAT: u64 = 85;
const NR_PTRACE: u64 = 101;
const NR_OPENAT: u64 = 257;
const NR_PROCESS_VM_WRITEV: u64 = 311;
const NR_OPENAT2: u64 = 437;
const NR_PIDFD_GETFD: u64 = 438;
// ia32 numbers (int 0x80 from any process); 437 and 438 are the same in both tables.
const NR32_OPEN: u64 = 5;
const NR32_CREAT: u64 = 8;
const NR32_PTRACE: u64 = 26;
const NR32_OPENAT: u64 = 295;
const NR32_PROCESS_VM_WRITEV: u64 = 348;

// `struct pt_regs` of x86_64: the registers that carry the arguments.
const REGS_BX: u64 = 40;
const REGS_DI: u64 = 112;
const REGS_ORIG_AX: u64 = 120;

/// `thread_info.status` bit of a task inside a 32-bit syscall.
const TS_COMPAT: u32 = 2;
/// `file.f_mode` bit of a file open for writing.
const FMODE_WRITE: u32 = 2;
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// Largest ptraced list walked at one exit (a tracer of more tasks is marked at later calls).
const MAX_TRACEES: u32 = 16;

#[inline(always)]
fn read<T: Copy>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an Err.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn offsets() -> Option<&'static TamperOffsets> {
    let o = TAMPER_OFFSETS.get(0)?;
    if o.valid == 0 { None } else { Some(o) }
}

#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_get_current_task() }
}

/// True when the calling task is inside a 32-bit (ia32) syscall.
#[inline(always)]
fn in_compat(o: &TamperOffsets) -> bool {
    read::<u32>(current_task() + o.ti_status as u64).is_some_and(|s| s & TS_COMPAT != 0)
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn enf_tamper_in(ctx: RawTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    // Everything else returns here.
    if nr != NR_PROCESS_VM_WRITEV && nr != NR_PIDFD_GETFD && nr != NR32_PROCESS_VM_WRITEV {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let _ = try_enter(regs, nr);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn enf_tamper_out(ctx: RawTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0; // failed: nothing happened to anyone
    }
    let regs: u64 = ctx.arg(0);
    let Some(nr) = read::<u64>(regs + REGS_ORIG_AX) else {
        return 0;
    };
    match nr {
        NR_PTRACE | NR32_PTRACE => {
            let _ = after_ptrace(nr);
        }
        NR_OPEN | NR_OPENAT | NR_OPENAT2 | NR_CREAT | NR32_OPEN | NR32_OPENAT | NR32_CREAT => {
            let _ = after_open(nr, ret as u64);
        }
        _ => {}
    }
    0
}

fn try_enter(regs: u64, nr: u64) -> Option<()> {
    match nr {
        NR_PROCESS_VM_WRITEV => {
            // 311 is set_robust_list in the ia32 table.
            if offsets().is_some_and(in_compat) {
                return None;
            }
            let pid = read::<u64>(regs + REGS_DI)? as u32;
            mark(pid, NR_PROCESS_VM_WRITEV, true);
        }
        NR32_PROCESS_VM_WRITEV => {
            let o = offsets()?;
            if !in_compat(o) {
                return None;
            }
            let pid = read::<u64>(regs + REGS_BX)? as u32;
            mark(pid, NR_PROCESS_VM_WRITEV, true);
        }
        _ => {
            // pidfd_getfd: the same number in both tables, the pidfd in another register.
            let o = offsets()?;
            let reg = if in_compat(o) { REGS_BX } else { REGS_DI };
            let fd = read::<u64>(regs + reg)? as u32;
            let file = fd_file(o, fd)?;
            // Before pidfs (6.9) the pidfd's file holds the `struct pid`; on pidfs its inode
            // does. Each candidate is checked (its task's `thread_pid` points back at it).
            let inode = read::<u64>(file + o.file_inode as u64).unwrap_or(0);
            let candidates = [
                read::<u64>(file + o.file_private as u64).unwrap_or(0),
                if inode == 0 {
                    0
                } else {
                    read::<u64>(inode + o.inode_private as u64).unwrap_or(0)
                },
            ];
            for pid in candidates {
                if let Some(target) = pid_tgid(o, pid) {
                    mark(target, NR_PIDFD_GETFD, true);
                    return Some(());
                }
            }
        }
    }
    Some(())
}

/// The file of descriptor `fd` of the calling process.
#[inline(always)]
fn fd_file(o: &TamperOffsets, fd: u32) -> Option<u64> {
    let files = read::<u64>(current_task() + o.task_files as u64)?;
    let fdt = read::<u64>(files + o.files_fdt as u64)?;
    let max = read::<u32>(fdt + o.fdt_max_fds as u64)?;
    if fd >= max {
        return None;
    }
    let fds = read::<u64>(fdt + o.fdt_fd as u64)?;
    let file = read::<u64>(fds + 8 * fd as u64)?;
    if file == 0 { None } else { Some(file) }
}

/// Tgid of the task a `struct pid` stands for, when `pid` is one (its task's `thread_pid`
/// points back at it).
#[inline(always)]
fn pid_tgid(o: &TamperOffsets, pid: u64) -> Option<u32> {
    if pid == 0 {
        return None;
    }
    // pid->tasks[PIDTYPE_PID].first is &task->pid_links[PIDTYPE_PID].
    let first = read::<u64>(pid + o.pid_tasks as u64)?;
    if first == 0 {
        return None;
    }
    let task = first - o.task_pid_links as u64;
    if read::<u64>(task + o.task_thread_pid as u64)? != pid {
        return None;
    }
    read::<i32>(task + o.task_tgid as u64).map(|t| t as u32)
}

fn after_ptrace(nr: u64) -> Option<()> {
    let o = offsets()?;
    if (nr == NR32_PTRACE) != in_compat(o) {
        return None; // 26 is msync in the 64-bit table
    }
    // Every task this thread traces: a list_head whose entries are `task->ptrace_entry`.
    let head = current_task() + o.task_ptraced as u64;
    let mut node = read::<u64>(head)?;
    let mut i = 0;
    while i < MAX_TRACEES {
        if node == head || node == 0 {
            break;
        }
        let task = node - o.task_ptrace_entry as u64;
        if let Some(t) = read::<i32>(task + o.task_tgid as u64) {
            mark(t as u32, NR_PTRACE, false);
        }
        node = read::<u64>(node)?;
        i += 1;
    }
    Some(())
}

fn after_open(nr: u64, fd: u64) -> Option<()> {
    let o = offsets()?;
    // 5, 8 and 295 are fstat, lseek and preadv in the 64-bit table.
    let ia32 = matches!(nr, NR32_OPEN | NR32_OPENAT | NR32_CREAT);
    if ia32 != in_compat(o) && nr != NR_OPENAT2 {
        return None;
    }
    let file = fd_file(o, fd as u32)?;
    let mode = read::<u32>(file + o.file_mode as u64)?;
    if mode & FMODE_WRITE == 0 {
        return None;
    }
    let inode = read::<u64>(file + o.file_inode as u64)?;
    let sb = read::<u64>(inode + o.inode_sb as u64)?;
    if read::<u64>(sb + o.sb_magic as u64)? != PROC_SUPER_MAGIC {
        return None;
    }
    let dentry = read::<u64>(file + o.file_dentry as u64)?;
    let name = read::<u64>(dentry + o.dentry_name as u64)?;
    // "mem\0": the only procfs file of that name is a process's (or thread's) memory.
    if read::<[u8; 4]>(name)? != *b"mem\0" {
        return None;
    }
    let pid = read::<u64>((inode as i64 + o.proc_inode_pid as i64) as u64)?;
    let target = pid_tgid(o, pid)?;
    mark(target, NR_OPENAT, false);
    Some(())
}

/// Marks process `target` tampered (once) and reports it. With `same_uid`, only when the
/// caller is root or of the uid the target runs as (the call may still fail: see the module).
#[inline(always)]
fn mark(target: u32, syscall: u64, same_uid: bool) {
    let me = tgid();
    if target == me || target == 0 {
        return;
    }
    let Some(p) = PROCS.get_ptr_mut(&target) else {
        return;
    };
    let ug = bpf_get_current_uid_gid();
    let uid = ug as u32;
    // SAFETY: a pointer into the map value, valid inside this program's RCU section.
    let (flags, target_uid, start_ns) = unsafe { ((*p).flags, (*p).uid, (*p).start_ns) };
    if same_uid && uid != 0 && uid != target_uid {
        return;
    }
    if flags & PROC_TAMPERED != 0 {
        return;
    }
    // SAFETY: as above; a plain store of the flags word (a concurrent exec rewrites the whole
    // entry, and an exec clears the flag anyway).
    unsafe { (*p).flags = flags | PROC_TAMPERED };
    count(Counter::Tampered);
    let Some(mut entry) = crate::maps::EVENTS.reserve::<Event>(0) else {
        count(Counter::EventsLost);
        return;
    };
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind: EventKind::Tamper as u32,
        tgid: target,
        aux: me,
        uid,
        gid: (ug >> 32) as u32,
        ident: 0,
        verdict: 0,
        rule: 0,
        // SAFETY: a helper without arguments or side effects.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ktime_ns: now_ns(),
        start_ns,
        flags: syscall as u32,
        port: 0,
        proto: 0,
        family: 0,
        dst: [0; 16],
        exe: ExeKey::default(),
    };
    entry.submit(0);
}

/// True when the calling task is traced now (`task->ptrace`): its exec keeps it tampered.
#[inline(always)]
pub fn current_traced() -> bool {
    match offsets() {
        Some(o) => read::<u32>(current_task() + o.task_ptrace as u64).is_none_or(|p| p != 0),
        None => false,
    }
}

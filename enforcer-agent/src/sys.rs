//! Every raw system call of the agent, each behind a safe function: `bpf()` commands that
//! aya does not offer (map batches, the probe's tiny program loads and link creation),
//! pidfds, `uname`, the bpffs check and `RLIMIT_MEMLOCK`. Nothing else in the crate calls
//! `libc::syscall`.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_int = 5;
pub const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_int = 27;
const BPF_LINK_CREATE: libc::c_int = 28;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `ENOTSUPP`, the kernel-internal errno a map without batch operations answers.
pub const ENOTSUPP: i32 = 524;

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `T` must be a `repr(C)` prefix of `union bpf_attr` for `cmd`, and every pointer it holds
/// must be valid for what the kernel reads or writes through it during the call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr` (see above); its size is passed along.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One `BPF_MAP_{UPDATE,DELETE}_BATCH` call over `keys` (and `values` for an update). On
/// error: how many elements the kernel processed before it stopped, and the error.
///
/// # Safety
/// `map` must be a map whose key size is `size_of::<K>()` and value size `size_of::<V>()`:
/// the kernel reads `keys.len()` keys and values of its own sizes from these buffers.
pub unsafe fn map_batch<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_int,
    map: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), (usize, io::Error)> {
    let invalid = |what: &str| {
        (
            0,
            io::Error::new(io::ErrorKind::InvalidInput, what.to_string()),
        )
    };
    if cmd != BPF_MAP_UPDATE_BATCH && cmd != BPF_MAP_DELETE_BATCH {
        return Err(invalid("not a batch command"));
    }
    if values.is_some_and(|v| v.len() != keys.len()) {
        return Err(invalid("as many values as keys are needed"));
    }
    if cmd == BPF_MAP_UPDATE_BATCH && values.is_none() {
        return Err(invalid("an update batch needs values"));
    }
    let count = u32::try_from(keys.len()).map_err(|_| invalid("batch too large"))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the batch member of `bpf_attr`; `keys` and `values` hold `count`
    // plain-old-data elements (checked above) of the map's key and value sizes (the caller's
    // contract), alive for the duration of the call.
    match unsafe { bpf(cmd, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) => Err((attr.count as usize, e)),
    }
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads `insns` as a cgroup_sock_addr program for `attach_type`; the program's fd.
pub fn load_sock_addr(insns: &[u64], license: &CStr, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = ProgLoadAttr {
        prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program too long"))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    // SAFETY: a BPF_PROG_LOAD prefix; `insns` and `license` outlive the call; no log buffer.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }?;
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// BPF_LINK_CREATE of `prog` on the target fd `target` (raw: the probe passes an invalid one
/// on purpose); the link's fd.
pub fn link_create(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target,
        attach_type,
        flags: 0,
    };
    // SAFETY: a BPF_LINK_CREATE prefix holding only integers.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The `obj` member of `union bpf_attr` (BPF_OBJ_GET).
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_UPDATE: libc::c_int = 29;

/// `BPF_LINK_UPDATE` of the link pinned at `pin` to run `prog` (atomically: no instant
/// without a program). For link types aya has no `attach_to_link` for (cgroup sock).
pub fn link_update_pinned(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path holds a NUL"))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: a BPF_OBJ_GET prefix; `path` outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: a new fd the kernel just gave us.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut upd = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: a BPF_LINK_UPDATE prefix holding only integers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut upd) }?;
    Ok(())
}

/// `pidfd_open(pid, 0)` (5.3).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: a syscall on integers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`: signals exactly the process the pidfd refers to.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a pidfd we hold, a signal number, no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The running kernel's release (`uname -r`).
/// `CLOCK_BOOTTIME` in ns: the clock of the kernel programs' `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_BOOTTIME exists since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0; // a zero heartbeat means "no agent": never more holding, never less enforcement
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

pub fn kernel_release() -> String {
    // SAFETY: uname fills a struct we own; its fields are NUL-terminated on success.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// True when `path` is on a bpffs. (nix's constant: the field's integer type differs between
/// glibc and musl, the static build of the image.)
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Joins the cgroup namespace of PID 1 when this process is in another one, and says whether
/// it did. `/proc/PID/cgroup` shows paths relative to the reader's cgroup namespace, so an
/// agent in a container with a private cgroup namespace (cgroup v2 hosts give unprivileged
/// containers one) would read other processes' paths as `/../..`. Needs the host's PID 1 in
/// view (`hostPID`) and CAP_SYS_ADMIN; call it before any thread starts (a namespace is per
/// thread, and threads inherit it).
pub fn join_init_cgroup_namespace() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let mine = std::fs::metadata("/proc/self/ns/cgroup")?;
    // Already in the initial cgroup namespace: nothing to join, and PID 1's need not be
    // readable (a sandbox's PID 1 in another user namespace refuses it with EACCES).
    if is_initial_cgroup_namespace(mine.ino()) {
        return Ok(false);
    }
    let init = std::fs::metadata("/proc/1/ns/cgroup")?;
    if (mine.dev(), mine.ino()) == (init.dev(), init.ino()) {
        return Ok(false);
    }
    let ns = std::fs::File::open("/proc/1/ns/cgroup")?;
    // SAFETY: a syscall on an fd we hold and a flag.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The inode number of the initial cgroup namespace (`PROC_CGROUP_INIT_INO` in the kernel's
/// include/linux/proc_ns.h): the same on every kernel, whatever the PID or user namespace.
const INITIAL_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// True when a cgroup namespace's inode number (of `/proc/PID/ns/cgroup`) is the initial one.
fn is_initial_cgroup_namespace(ino: u64) -> bool {
    ino == INITIAL_CGROUP_NS_INO
}

/// Raises `RLIMIT_MEMLOCK` to unlimited. Kernels before 5.11 charge BPF maps and programs
/// to it (newer ones to the memory cgroup, and this changes nothing there). Raising the hard
/// limit needs CAP_SYS_RESOURCE; without it the limit stays as it was.
pub fn raise_memlock() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one `rlimit` through the pointer, valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// In the initial cgroup namespace there is nothing to join, and PID 1's namespace is not
    /// read (a sandbox may refuse it): this machine's tests run there, so `run` must start.
    #[test]
    fn the_initial_cgroup_namespace_needs_no_join() {
        assert!(is_initial_cgroup_namespace(0xEFFF_FFFB));
        assert!(!is_initial_cgroup_namespace(0xF000_0000));
        let mine = std::fs::metadata("/proc/self/ns/cgroup").expect("/proc/self/ns/cgroup");
        if is_initial_cgroup_namespace(mine.ino()) {
            assert!(matches!(join_init_cgroup_namespace(), Ok(false)));
        }
    }
}

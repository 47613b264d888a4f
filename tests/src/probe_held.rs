//! enf-probe commands of the adversarial `held` module (issue 12 items 6 and 7): connects
//! through io_uring, TCP Fast Open and MPTCP, a connect / gate / connect sequence, and the
//! load client of `kill9_restart_under_load`. Included by `src/bin/enf-probe.rs`.
//!
//!   enf-probe uring-tcp ADDR:PORT    connect through io_uring (IORING_OP_CONNECT)
//!   enf-probe tfo ADDR:PORT          sendto(MSG_FASTOPEN) on a fresh TCP socket
//!   enf-probe mptcp ADDR:PORT        connect a socket(.., SOCK_STREAM, IPPROTO_MPTCP)
//!   enf-probe tcp-gate-tcp ADDR:PORT connect, print `first=CODE`, wait for a byte on stdin,
//!                                    connect again; exit with the second code
//!   enf-probe load PHASEFILE ADDR:PORT
//!                                    TCP connects (closed with RST: no TIME_WAIT) in a tight
//!                                    loop; the phase is the u32 at offset 0 of PHASEFILE
//!                                    (mapped shared), u32::MAX stops it; prints one line
//!                                    `phase P ok N eperm N other N` per phase seen
//!
//! Exit codes as enf-probe's, plus 4: the kernel has no such facility (io_uring disabled or
//! absent, no TFO, no MPTCP), with the reason on stderr.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
};

/// The kernel lacks the facility the command needs.
pub const UNSUPPORTED: i32 = 4;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn code_of(err: i32) -> i32 {
    if err == libc::EPERM { 13 } else { 2 }
}

/// A socket address for the raw system calls.
fn raw_addr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family's struct is written into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn family(a: &SocketAddr) -> libc::c_int {
    if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// An owned descriptor, closed on drop (with RST when `reset`).
struct Fd {
    fd: libc::c_int,
    reset: bool,
}

impl Drop for Fd {
    fn drop(&mut self) {
        if self.reset {
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our own descriptor with a linger struct.
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const l).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
        // SAFETY: closing our own descriptor once.
        unsafe { libc::close(self.fd) };
    }
}

fn socket(fam: libc::c_int, proto: libc::c_int) -> Result<Fd, i32> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(Fd { fd, reset: true })
    }
}

/// connect(2) on a fresh TCP socket, closed with RST; Err(errno).
fn tcp_connect(a: &SocketAddr) -> Result<(), i32> {
    let s = socket(family(a), 0)?;
    let (ss, len) = raw_addr(a);
    // SAFETY: connect with a sockaddr of `len` bytes.
    if unsafe { libc::connect(s.fd, (&raw const ss).cast(), len) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn tfo(a: &SocketAddr) -> i32 {
    let s = match socket(family(a), 0) {
        Ok(s) => s,
        Err(e) => return code_of(e),
    };
    let (ss, len) = raw_addr(a);
    let msg = b"tfo";
    // SAFETY: sendto with a buffer and a sockaddr of `len` bytes.
    let n = unsafe {
        libc::sendto(
            s.fd,
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_FASTOPEN,
            (&raw const ss).cast(),
            len,
        )
    };
    if n >= 0 {
        return 0;
    }
    match errno() {
        libc::EOPNOTSUPP => {
            eprintln!("enf-probe: tfo: MSG_FASTOPEN not supported (EOPNOTSUPP)");
            UNSUPPORTED
        }
        e => {
            if e != libc::EPERM {
                eprintln!("enf-probe: tfo: {}", std::io::Error::from_raw_os_error(e));
            }
            code_of(e)
        }
    }
}

fn mptcp(a: &SocketAddr) -> i32 {
    const IPPROTO_MPTCP: libc::c_int = 262;
    let s = match socket(family(a), IPPROTO_MPTCP) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "enf-probe: mptcp: socket: {} (no MPTCP in this kernel, or net.mptcp.enabled=0)",
                std::io::Error::from_raw_os_error(e)
            );
            return if e == libc::EPERM { 13 } else { UNSUPPORTED };
        }
    };
    let (ss, len) = raw_addr(a);
    // SAFETY: connect with a sockaddr of `len` bytes.
    if unsafe { libc::connect(s.fd, (&raw const ss).cast(), len) } != 0 {
        let e = errno();
        if e != libc::EPERM {
            eprintln!("enf-probe: mptcp: {}", std::io::Error::from_raw_os_error(e));
        }
        return code_of(e);
    }
    0
}

// ---- io_uring, raw (no crate: the probe is copied into the VM guests as one binary) ----

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct UringParams {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}
const _: () = assert!(size_of::<UringParams>() == 120);

const IORING_OP_CONNECT: u8 = 16;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;

struct Map(*mut libc::c_void, usize);

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping a mapping we made.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn map(fd: libc::c_int, len: usize, off: i64) -> Result<Map, i32> {
    // SAFETY: a shared mapping of the ring fd at a documented offset.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(Map(p, len))
    }
}

/// One IORING_OP_CONNECT on a fresh TCP socket; the completion's result (0 or -errno), or
/// Err(reason) when io_uring itself is unavailable.
fn uring_connect(a: &SocketAddr) -> Result<i32, String> {
    let s = socket(family(a), 0).map_err(|e| format!("socket: errno {e}"))?;
    let mut p = UringParams::default();
    // SAFETY: io_uring_setup writes the params struct we pass.
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &raw mut p) };
    if ring < 0 {
        let e = std::io::Error::last_os_error();
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| format!("kernel.io_uring_disabled={}", s.trim()))
            .unwrap_or_else(|_| "no kernel.io_uring_disabled sysctl".into());
        return Err(format!("io_uring_setup: {e} ({sysctl})"));
    }
    let ring = Fd {
        fd: ring as libc::c_int,
        reset: false,
    };
    let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
    let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * 16;
    let err = |e: i32| format!("mmap of the io_uring rings: errno {e}");
    let sq = map(ring.fd, sq_len, IORING_OFF_SQ_RING).map_err(err)?;
    let cq = map(ring.fd, cq_len, IORING_OFF_CQ_RING).map_err(err)?;
    let sqes = map(ring.fd, p.sq_entries as usize * 64, IORING_OFF_SQES).map_err(err)?;
    let (ss, len) = raw_addr(a);
    // SAFETY: offsets the kernel gave for the mappings above; the sockaddr outlives the
    // io_uring_enter that waits for the completion.
    unsafe {
        let sqe = sqes.0.cast::<u8>();
        std::ptr::write_bytes(sqe, 0, 64);
        *sqe = IORING_OP_CONNECT;
        *sqe.add(4).cast::<i32>() = s.fd;
        *sqe.add(8).cast::<u64>() = u64::from(len);
        *sqe.add(16).cast::<u64>() = (&raw const ss) as u64;
        *sqe.add(32).cast::<u64>() = 0x5eed;
        let base = sq.0.cast::<u8>();
        let tail = &*base
            .add(p.sq_off.tail as usize)
            .cast::<std::sync::atomic::AtomicU32>();
        let mask = *base.add(p.sq_off.ring_mask as usize).cast::<u32>();
        let t = tail.load(std::sync::atomic::Ordering::Acquire);
        *base
            .add(p.sq_off.array as usize)
            .cast::<u32>()
            .add((t & mask) as usize) = 0;
        tail.store(t.wrapping_add(1), std::sync::atomic::Ordering::Release);
        let r = libc::syscall(
            libc::SYS_io_uring_enter,
            ring.fd,
            1u32,
            1u32,
            IORING_ENTER_GETEVENTS,
            std::ptr::null::<libc::c_void>(),
            0usize,
        );
        if r < 0 {
            return Err(format!(
                "io_uring_enter: {}",
                std::io::Error::last_os_error()
            ));
        }
        let cbase = cq.0.cast::<u8>();
        let head = &*cbase
            .add(p.cq_off.head as usize)
            .cast::<std::sync::atomic::AtomicU32>();
        let ctail = &*cbase
            .add(p.cq_off.tail as usize)
            .cast::<std::sync::atomic::AtomicU32>();
        let cmask = *cbase.add(p.cq_off.ring_mask as usize).cast::<u32>();
        let h = head.load(std::sync::atomic::Ordering::Acquire);
        if ctail.load(std::sync::atomic::Ordering::Acquire) == h {
            return Err("io_uring_enter returned without a completion".into());
        }
        let cqe = cbase
            .add(p.cq_off.cqes as usize)
            .add(((h & cmask) as usize) * 16);
        let user = *cqe.cast::<u64>();
        let res = *cqe.add(8).cast::<i32>();
        head.store(h.wrapping_add(1), std::sync::atomic::Ordering::Release);
        if user != 0x5eed {
            return Err(format!("unexpected completion {user:#x}"));
        }
        Ok(res)
    }
}

fn uring(a: &SocketAddr) -> i32 {
    match uring_connect(a) {
        Ok(0) => 0,
        Ok(res) if res == -libc::EINVAL || res == -libc::EOPNOTSUPP => {
            eprintln!("enf-probe: uring-tcp: IORING_OP_CONNECT unsupported (result {res})");
            UNSUPPORTED
        }
        Ok(res) => {
            if res != -libc::EPERM {
                eprintln!(
                    "enf-probe: uring-tcp: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            code_of(-res)
        }
        Err(why) => {
            eprintln!("enf-probe: uring-tcp: {why}");
            UNSUPPORTED
        }
    }
}

fn connect_code(a: &SocketAddr) -> i32 {
    match tcp_connect(a) {
        Ok(()) => 0,
        Err(e) => code_of(e),
    }
}

/// `load PHASEFILE ADDR`: see the module comment.
fn load(phase_file: &str, a: &SocketAddr) -> i32 {
    let f = match std::fs::OpenOptions::new().read(true).open(phase_file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("enf-probe: load: opening {phase_file}: {e}");
            return 2;
        }
    };
    let m = match map_readonly(&f) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("enf-probe: load: mapping {phase_file}: errno {e}");
            return 2;
        }
    };
    // SAFETY: the mapping is at least 4 bytes (a page) and lives as long as `m`.
    let phase = unsafe { &*m.0.cast::<std::sync::atomic::AtomicU32>() };
    // phase -> [ok, eperm, other]
    let mut counts: std::collections::BTreeMap<u32, [u64; 3]> = Default::default();
    loop {
        let p = phase.load(std::sync::atomic::Ordering::Acquire);
        if p == u32::MAX {
            break;
        }
        let k = match tcp_connect(a) {
            Ok(()) => 0,
            Err(libc::EPERM) => 1,
            Err(_) => 2,
        };
        counts.entry(p).or_default()[k] += 1;
    }
    let mut out = std::io::stdout().lock();
    for (p, [ok, eperm, other]) in counts {
        let _ = writeln!(out, "phase {p} ok {ok} eperm {eperm} other {other}");
    }
    let _ = out.flush();
    0
}

fn map_readonly(f: &std::fs::File) -> Result<Map, i32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a shared read-only mapping of the first page of a file we opened.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(Map(p, 4096))
    }
}

/// Runs one of this module's commands; None when `cmd` is not one of them.
pub fn run(cmd: &str, args: &[String]) -> Option<i32> {
    let addr = |i: usize| -> Result<SocketAddr, i32> {
        args.get(i).and_then(|a| a.parse().ok()).ok_or_else(|| {
            eprintln!("enf-probe: {cmd}: bad address {:?}", args.get(i));
            2
        })
    };
    let r = match cmd {
        "uring-tcp" => addr(0).map(|a| uring(&a)),
        "tfo" => addr(0).map(|a| tfo(&a)),
        "mptcp" => addr(0).map(|a| mptcp(&a)),
        "tcp-gate-tcp" => addr(0).map(|a| {
            let first = connect_code(&a);
            println!("first={first}");
            let _ = std::io::stdout().flush();
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
            connect_code(&a)
        }),
        "load" => addr(1).map(|a| load(args.first().map(String::as_str).unwrap_or(""), &a)),
        _ => return None,
    };
    Some(r.unwrap_or_else(|c| c))
}

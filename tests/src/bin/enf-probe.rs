//! A tiny real binary the kernel tests run (and copy, and patch) as a workload.
//!
//! usage:
//!   enf-probe tcp ADDR:PORT          connect() a TCP socket
//!   enf-probe udp ADDR:PORT          connect() a UDP socket, then send
//!   enf-probe sendto ADDR:PORT       sendto() on an unconnected UDP socket
//!   enf-probe fork CMD...            fork; the child runs `enf-probe CMD...` without exec
//!   enf-probe exec PATH ARGS...      exec PATH ARGS (to test re-attestation at exec)
//!   enf-probe loop-until PATH CMD... run CMD until PATH exists; 13 at the first denial
//!   enf-probe count-until PATH ALLOWED DENIED
//!                                    TCP connects to ALLOWED and DENIED in turn until PATH
//!                                    exists; prints how each ended (the no-window count of a
//!                                    rolling update), exit 0
//!   enf-probe listen ADDR:PORT SECS  a TCP listener, accepting for SECS seconds
//!   enf-probe gate CMD...            wait for a byte (or EOF) on stdin, then run CMD: the test
//!                                    opens the gate once the agent is up (never a fixed delay)
//!   enf-probe socket FAMILY TYPE PROTO
//!                                    socket(FAMILY, TYPE, PROTO) (numbers), then close it
//!   enf-probe unshare-net CMD...     a new user and network namespace (as an unprivileged
//!                                    user gets CAP_NET_RAW in it), uid 0 mapped to the
//!                                    caller, ICMP ping sockets allowed for it, then run CMD
//!   enf-probe hold tcp|udp ADDR:PORT one long-lived connection: prints `ready LOCAL`, then
//!                                    for each byte on stdin sends it and waits for the echo,
//!                                    printing `ok` or `err ERRNO` (a pending socket error,
//!                                    SO_ERROR, first); exit 0 at EOF (the revoke suite)
//!   enf-probe hold-self tcp|udp PORT `hold` to an echo server this process runs on
//!                                    127.0.0.1:PORT, loopback brought up first (for a new
//!                                    network namespace: `unshare-net hold-self ...`)
//!   enf-probe sleep SECS             sleep (a process to inspect)
//!   enf-probe pause                  wait for SIGTERM or SIGINT, then exit 0 (the node suite's
//!                                    pod sandbox process, as Kubernetes' pause)
//!   enf-probe uring-tcp|tfo|mptcp|tcp-gate-tcp|load ...
//!                                    the adversarial `held` module's commands (probe_held.rs)
//!   enf-probe victim PORT [CMD...]   the tamper suite's service: keeps PORT in memory, prints
//!                                    `ready PID ADDR FD` (ADDR of the port in hex, FD an
//!                                    unconnected TCP socket), waits for its gate (stdin), TCP
//!                                    connects to 127.0.0.1:<the port now in memory>, prints
//!                                    `first PORT CODE`, then execs itself with CMD if given
//!   enf-probe poke-mem PID ADDR PORT write PORT (u16) at ADDR through /proc/PID/mem
//!   enf-probe poke-vm PID ADDR PORT  the same with process_vm_writev
//!   enf-probe poke-ptrace attach|seize PID ADDR PORT
//!                                    the same with ptrace (attach or seize+interrupt), PEEK/
//!                                    POKEDATA, then detach
//!   enf-probe steal-fd PID FD ADDR:PORT
//!                                    pidfd_getfd the process's FD and connect it to ADDR:PORT
//! Exit status: 0 connected/sent, 13 EPERM (the kernel denied), 2 any other failure.

use std::{
    hint::black_box,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::exit,
    time::Duration,
};

/// Patched by tests to make a copy with one byte changed (a different sha256, same size).
#[unsafe(no_mangle)]
pub static ENF_PROBE_MARKER: [u8; 16] = *b"ENFPROBE-MARKER0";

#[path = "../probe_held.rs"]
mod probe_held;

fn code(e: &std::io::Error) -> i32 {
    if e.raw_os_error() == Some(libc::EPERM) {
        13
    } else {
        2
    }
}

/// An unconnected UDP socket of the destination's family, bound to any port.
fn udp_for(a: &SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if a.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(any)
}

/// The port the `victim` connects to: written by the attacker through its memory.
static VICTIM_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn num<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    match args.get(i).and_then(|a| a.parse().ok()) {
        Some(v) => v,
        None => {
            eprintln!("enf-probe: bad argument {i}: {:?}", args.get(i));
            exit(2)
        }
    }
}

fn hex_addr(args: &[String], i: usize) -> usize {
    match args
        .get(i)
        .and_then(|a| usize::from_str_radix(a.trim_start_matches("0x"), 16).ok())
    {
        Some(v) => v,
        None => {
            eprintln!("enf-probe: bad address argument {i}: {:?}", args.get(i));
            exit(2)
        }
    }
}

fn os_fail(what: &str) -> i32 {
    let e = std::io::Error::last_os_error();
    eprintln!("enf-probe: {what}: {e}");
    code(&e)
}

/// `hold tcp|udp ADDR:PORT`: one long-lived connection (TCP, or a connected UDP socket).
/// Prints `ready LOCAL` once connected (`err ERRNO` and exit on failure), then for each byte
/// on stdin sends it and waits up to 2 s for the echo, printing `ok` or `err ERRNO` (a socket
/// error the kernel left pending, SO_ERROR, first: a destroyed socket shows ECONNABORTED);
/// exits 0 at EOF.
fn hold(args: &[String]) -> i32 {
    use std::io::{Read as _, Write as _};
    let Some(to) = args.get(2).and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("enf-probe: hold tcp|udp ADDR:PORT");
        return 2;
    };
    let say = |line: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let errno = |e: &std::io::Error| e.raw_os_error().unwrap_or(0);
    let timeout = Some(Duration::from_secs(2));
    enum Conn {
        Tcp(TcpStream),
        Udp(UdpSocket),
    }
    let conn = match args.get(1).map(String::as_str) {
        Some("tcp") => TcpStream::connect_timeout(&to, Duration::from_secs(5)).map(Conn::Tcp),
        Some("udp") => udp_for(&to).and_then(|s| s.connect(to).map(|()| Conn::Udp(s))),
        other => {
            eprintln!("enf-probe: hold: {other:?} is neither tcp nor udp");
            return 2;
        }
    };
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            say(format!("err {}", errno(&e)));
            return code(&e);
        }
    };
    let local = match &conn {
        Conn::Tcp(s) => s.set_read_timeout(timeout).and_then(|()| s.local_addr()),
        Conn::Udp(s) => s.set_read_timeout(timeout).and_then(|()| s.local_addr()),
    };
    match local {
        Ok(l) => say(format!("ready {l}")),
        Err(e) => {
            say(format!("err {}", errno(&e)));
            return 2;
        }
    }
    let mut b = [0u8; 1];
    while let Ok(1) = std::io::stdin().read(&mut b) {
        let mut echo = [0u8; 16];
        let res = match &mut conn {
            Conn::Tcp(s) => s
                .take_error()
                .and_then(|pending| pending.map_or(Ok(()), Err))
                .and_then(|()| s.write_all(&b))
                .and_then(|()| s.read(&mut echo))
                .and_then(|n| {
                    if n == 0 {
                        Err(std::io::ErrorKind::UnexpectedEof.into())
                    } else {
                        Ok(())
                    }
                }),
            Conn::Udp(s) => s
                .take_error()
                .and_then(|pending| pending.map_or(Ok(()), Err))
                .and_then(|()| s.send(&b))
                .and_then(|_| s.recv(&mut echo))
                .map(|_| ()),
        };
        match res {
            Ok(()) => say("ok".to_string()),
            Err(e) => say(format!("err {}", errno(&e))),
        }
    }
    0
}

/// `hold-self tcp|udp PORT`: see the usage.
fn hold_self(args: &[String]) -> i32 {
    use std::io::{Read as _, Write as _};
    let port: u16 = num(args, 2);
    if let Err(e) = loopback_up() {
        eprintln!("enf-probe: hold-self: bringing lo up: {e}");
        return 2;
    }
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    match args.get(1).map(String::as_str) {
        Some("tcp") => {
            let l = match std::net::TcpListener::bind(at) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("enf-probe: hold-self: binding {at}: {e}");
                    return 2;
                }
            };
            std::thread::spawn(move || {
                while let Ok((mut s, _)) = l.accept() {
                    std::thread::spawn(move || {
                        let mut b = [0u8; 64];
                        while let Ok(n) = s.read(&mut b) {
                            if n == 0 || s.write_all(&b[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        Some("udp") => {
            let u = match UdpSocket::bind(at) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("enf-probe: hold-self: binding {at}: {e}");
                    return 2;
                }
            };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok((n, from)) = u.recv_from(&mut b) {
                    let _ = u.send_to(&b[..n], from);
                }
            });
        }
        other => {
            eprintln!("enf-probe: hold-self: {other:?} is neither tcp nor udp");
            return 2;
        }
    }
    let mut held = vec!["hold".to_string(), args[1].clone(), at.to_string()];
    held.extend_from_slice(&args[3..]);
    hold(&held)
}

/// `ip link set lo up` (SIOCGIFFLAGS / SIOCSIFFLAGS).
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a socket we close below; the ioctls read and write one ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, c) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *c as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}

fn victim(args: &[String]) -> i32 {
    use std::io::{Read as _, Write as _};
    VICTIM_PORT.store(num(args, 1), std::sync::atomic::Ordering::SeqCst);
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    println!(
        "ready {} {:x} {fd}",
        std::process::id(),
        std::ptr::addr_of!(VICTIM_PORT) as usize
    );
    let _ = std::io::stdout().flush();
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b);
    let port = VICTIM_PORT.load(std::sync::atomic::Ordering::SeqCst);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let c = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(_) => 0,
        Err(e) => code(&e),
    };
    println!("first {port} {c}");
    let _ = std::io::stdout().flush();
    if args.len() > 2 {
        use std::os::unix::process::CommandExt as _;
        let e = std::process::Command::new("/proc/self/exe")
            .args(&args[2..])
            .exec();
        eprintln!("enf-probe: re-exec: {e}");
        return 2;
    }
    c
}

fn poke(args: &[String]) -> i32 {
    let how = args[0].as_str();
    let (args, mode) = if how == "poke-ptrace" {
        (&args[1..], args.get(1).cloned().unwrap_or_default())
    } else {
        (args, String::new())
    };
    let pid: i32 = num(args, 1);
    let addr = hex_addr(args, 2);
    let port: u16 = num(args, 3);
    let bytes = port.to_ne_bytes();
    match how {
        "poke-mem" => {
            use std::os::unix::fs::FileExt as _;
            let f = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/mem"))
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("enf-probe: open /proc/{pid}/mem: {e}");
                    return code(&e);
                }
            };
            match f.write_at(&bytes, addr as u64) {
                Ok(2) => 0,
                Ok(n) => {
                    eprintln!("enf-probe: short write {n}");
                    2
                }
                Err(e) => {
                    eprintln!("enf-probe: write /proc/{pid}/mem: {e}");
                    code(&e)
                }
            }
        }
        "poke-vm" => {
            let local = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: 2,
            };
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: 2,
            };
            // SAFETY: one local and one remote iovec of 2 bytes; the local one is ours.
            let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
            if n == 2 {
                0
            } else {
                os_fail("process_vm_writev")
            }
        }
        _ => {
            // SAFETY: ptrace requests on a process of our uid; every pointer argument is an
            // address in the tracee, passed as a number.
            unsafe {
                let null = std::ptr::null_mut::<libc::c_void>();
                if mode == "seize" {
                    if libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) != 0 {
                        return os_fail("PTRACE_SEIZE");
                    }
                    if libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) != 0 {
                        return os_fail("PTRACE_INTERRUPT");
                    }
                } else if libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) != 0 {
                    return os_fail("PTRACE_ATTACH");
                }
                let mut status = 0;
                if libc::waitpid(pid, &mut status, libc::__WALL) != pid {
                    return os_fail("waitpid");
                }
                let at = (addr & !7) as *mut libc::c_void;
                *libc::__errno_location() = 0;
                let word = libc::ptrace(libc::PTRACE_PEEKDATA, pid, at, null);
                if word == -1 && *libc::__errno_location() != 0 {
                    return os_fail("PTRACE_PEEKDATA");
                }
                let mut w = (word as u64).to_ne_bytes();
                let off = addr & 7;
                if off > 6 {
                    eprintln!("enf-probe: the port straddles two words");
                    return 2;
                }
                w[off..off + 2].copy_from_slice(&bytes);
                let new = u64::from_ne_bytes(w) as usize as *mut libc::c_void;
                if libc::ptrace(libc::PTRACE_POKEDATA, pid, at, new) != 0 {
                    return os_fail("PTRACE_POKEDATA");
                }
                if libc::ptrace(libc::PTRACE_DETACH, pid, null, null) != 0 {
                    return os_fail("PTRACE_DETACH");
                }
                0
            }
        }
    }
}

fn steal_fd(args: &[String]) -> i32 {
    let pid: i32 = num(args, 1);
    let fd: i32 = num(args, 2);
    let to: SocketAddr = num(args, 3);
    // SAFETY: raw syscalls with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return os_fail("pidfd_open");
    }
    // SAFETY: as above.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
    if got < 0 {
        return os_fail("pidfd_getfd");
    }
    let SocketAddr::V4(v4) = to else {
        eprintln!("enf-probe: steal-fd connects IPv4 only");
        return 2;
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) on the stolen descriptor with a sockaddr_in of the right length.
    let r = unsafe {
        libc::connect(
            got,
            std::ptr::addr_of!(sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        0
    } else {
        os_fail("connect with the stolen socket")
    }
}

fn run(args: &[String]) -> i32 {
    black_box(&ENF_PROBE_MARKER);
    let Some(cmd) = args.first() else {
        eprintln!("enf-probe: missing command");
        return 2;
    };
    let addr = || -> SocketAddr {
        match args.get(1).and_then(|a| a.parse().ok()) {
            Some(a) => a,
            None => {
                eprintln!("enf-probe: bad address {:?}", args.get(1));
                exit(2)
            }
        }
    };
    match cmd.as_str() {
        "tcp" => match TcpStream::connect_timeout(&addr(), Duration::from_secs(5)) {
            Ok(_) => 0,
            Err(e) => code(&e),
        },
        "udp" => {
            let a = addr();
            let s = match udp_for(&a) {
                Ok(s) => s,
                Err(e) => return code(&e),
            };
            match s.connect(a).and_then(|()| s.send(b"x")) {
                Ok(_) => 0,
                Err(e) => code(&e),
            }
        }
        "sendto" => {
            let a = addr();
            let s = match udp_for(&a) {
                Ok(s) => s,
                Err(e) => return code(&e),
            };
            match s.send_to(b"x", a) {
                Ok(_) => 0,
                Err(e) => code(&e),
            }
        }
        "fork" => {
            // SAFETY: single-threaded program; the child only runs plain Rust then exits.
            match unsafe { libc::fork() } {
                -1 => 2,
                0 => exit(run(&args[1..])),
                child => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        2
                    }
                }
            }
        }
        "exec" => {
            use std::os::unix::process::CommandExt as _;
            let Some(path) = args.get(1) else { return 2 };
            let e = std::process::Command::new(path).args(&args[2..]).exec();
            eprintln!("enf-probe: exec {path}: {e}");
            2
        }
        "loop-until" => {
            // loop-until PATH CMD...: run CMD until PATH exists; 13 at the first denial.
            let stop = std::path::Path::new(args.get(1).map(String::as_str).unwrap_or("/"));
            let mut n = 0u64;
            let mut worst = 0;
            loop {
                if n.is_multiple_of(64) && stop.exists() {
                    return worst;
                }
                n += 1;
                match run(&args[2..]) {
                    13 => return 13,
                    0 => {}
                    c => worst = c,
                }
            }
        }
        "count-until" => {
            // count-until PATH ALLOWED DENIED: connect to each in turn until PATH exists;
            // count the outcomes (ok / EPERM / other) per address.
            let stop = std::path::Path::new(args.get(1).map(String::as_str).unwrap_or("/"));
            let targets: Vec<SocketAddr> =
                args[2..].iter().filter_map(|a| a.parse().ok()).collect();
            if targets.len() != 2 {
                eprintln!("enf-probe: count-until PATH ALLOWED DENIED: two addresses");
                return 2;
            }
            // [target][ok, eperm, other]
            let mut n = [[0u64; 3]; 2];
            eprintln!("count-until: running");
            while !stop.exists() {
                for (i, a) in targets.iter().enumerate() {
                    let k = match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                        Ok(_) => 0,
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => 1,
                        Err(_) => 2,
                    };
                    n[i][k] += 1;
                }
            }
            println!(
                "count-until: allowed ok={} eperm={} other={}; denied ok={} eperm={} other={}",
                n[0][0], n[0][1], n[0][2], n[1][0], n[1][1], n[1][2]
            );
            0
        }
        "listen" => {
            // listen ADDR:PORT SECS: a TCP listener that accepts for SECS seconds.
            let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
            let l = match std::net::TcpListener::bind(addr()) {
                Ok(l) => l,
                Err(e) => return code(&e),
            };
            let _ = l.set_nonblocking(true);
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_secs(secs) {
                if l.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            0
        }
        "gate" => {
            // gate CMD...: block on stdin until the test writes a byte (or closes it), then run
            // CMD. A read error (no stdin at all) is a failure, never an early start.
            use std::io::Read as _;
            let mut b = [0u8; 1];
            match std::io::stdin().read_exact(&mut b) {
                Ok(()) => run(&args[1..]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => run(&args[1..]),
                Err(e) => {
                    eprintln!("enf-probe: gate: reading stdin: {e}");
                    2
                }
            }
        }
        "victim" => victim(args),
        "hold" => hold(args),
        "hold-self" => hold_self(args),
        "poke-mem" | "poke-vm" | "poke-ptrace" => poke(args),
        "steal-fd" => steal_fd(args),
        "socket" => {
            let n = |i: usize| -> i32 { args.get(i).and_then(|a| a.parse().ok()).unwrap_or(-1) };
            // SAFETY: socket(2) with plain integers; the fd is closed at once.
            let fd = unsafe { libc::socket(n(1), n(2), n(3)) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                eprintln!("enf-probe: socket({} {} {}): {e}", n(1), n(2), n(3));
                return code(&e);
            }
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
            0
        }
        "unshare-net" => {
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            // SAFETY: unshare(2) of this single-threaded process.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
                eprintln!("enf-probe: unshare: {}", std::io::Error::last_os_error());
                return 2;
            }
            let _ = std::fs::write("/proc/self/setgroups", "deny");
            let maps = std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
                .and_then(|()| std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")));
            if let Err(e) = maps {
                eprintln!("enf-probe: writing the id maps: {e}");
                return 2;
            }
            // ICMP ping sockets for our group in this network namespace (its own sysctl).
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 0") {
                eprintln!("enf-probe: ping_group_range: {e}");
            }
            run(&args[1..])
        }
        "sleep" => {
            let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
            std::thread::sleep(Duration::from_secs(secs));
            0
        }
        "pause" => {
            // Block SIGTERM and SIGINT and wait for one (as PID 1 of a pod sandbox, a signal
            // with no handler would be ignored).
            // SAFETY: a sigset on the stack, filled and passed by pointer to the libc calls.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
            }
            0
        }
        other => probe_held::run(other, &args[1..]).unwrap_or_else(|| {
            eprintln!("enf-probe: unknown command {other}");
            2
        }),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    exit(run(&args));
}

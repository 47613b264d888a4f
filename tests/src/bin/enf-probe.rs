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
//!   enf-probe sleep SECS             sleep (a process to inspect)
//!   enf-probe pause                  wait for SIGTERM or SIGINT, then exit 0 (the node suite's
//!                                    pod sandbox process, as Kubernetes' pause)
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
        other => {
            eprintln!("enf-probe: unknown command {other}");
            2
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    exit(run(&args));
}

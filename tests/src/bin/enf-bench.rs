//! `cargo xtask bench`: connect()/sendto() latency with no program, an allow-only program, the
//! enforcer at 10 / 10,000 / 1,000,000 rules over 1,000 identities, and packet-filter peers,
//! interleaved over rounds against the same round's baseline. Writes results JSON.
//!
//! usage: enf-bench run OUT_DIR [ROUNDS]      (root; ENFORCER_EBPF_OBJ and ENFORCER_AGENT_BIN set)
//!        enf-bench container-start OUT_DIR [ROUNDS]  (container start on the containerd node
//!                                    only, merged into OUT_DIR/results.json)
//!        enf-bench syscall-cost OUT_DIR [ROUNDS]  (the tamper programs' cost on unrelated
//!                                    syscalls only, merged into OUT_DIR/results.json)
//!        enf-bench time-bound OUT_DIR [ROUNDS]  (what time-bound entries cost a UDP connect
//!                                    only, merged into OUT_DIR/results.json)
//!        enf-bench apply                     (policy compile/apply with connects in flight only)
//!        enf-bench worker OP ADDR N          (one measurement; prints "p50_ns mean_ns")

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use enforcer_agent::policy::{self, Action, Identity, MatchEntry, Mode, Policy, Protocol, Rule};
use enforcer_tests::*;

#[path = "enf-bench/container_start.rs"]
mod container_start;
#[path = "enf-bench/opensnitch.rs"]
mod opensnitch;
#[path = "enf-bench/syscall_cost.rs"]
mod syscall_cost;
#[path = "enf-bench/time_bound.rs"]
mod time_bound;

/// Patched in the unattested copy of the worker.
#[unsafe(no_mangle)]
pub static ENF_BENCH_MARKER: [u8; 16] = *b"ENFBENCH-MARKER0";

fn main() {
    std::hint::black_box(&ENF_BENCH_MARKER);
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("worker") => worker(&args[1..]),
        Some("run") => {
            let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/bench"));
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
            if let Err(e) = run(&out, rounds) {
                eprintln!("enf-bench: {e}");
                std::process::exit(1);
            }
        }
        Some("container-start") => {
            // Only the container-start part, merged into OUT_DIR/results.json (the other
            // parts of an earlier full run are kept).
            let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/bench"));
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
            if let Err(e) = container_start_only(&out, rounds) {
                eprintln!("enf-bench: {e}");
                std::process::exit(1);
            }
        }
        Some("syscall-cost") => {
            // Only the tamper programs' cost on unrelated syscalls, merged into results.json.
            let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/bench"));
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
            if let Err(e) = syscall_cost_only(&out, rounds) {
                eprintln!("enf-bench: {e}");
                std::process::exit(1);
            }
        }
        Some("time-bound") => {
            // Only what time-bound entries cost a connect, merged into results.json.
            let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/bench"));
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
            if let Err(e) = time_bound_only(&out, rounds) {
                eprintln!("enf-bench: {e}");
                std::process::exit(1);
            }
        }
        Some("apply") => {
            // The compile/apply part alone (for working on apply speed).
            // Listener threads on CPU 0, workers measured on CPU 1.
            let l = Listeners::on_cpu(Some(0));
            let dir = TempDir::new("bench-apply");
            let worker = dir.path("worker");
            let run = || -> Result<Vec<String>, String> {
                let me = std::env::current_exe().map_err(|e| e.to_string())?;
                let bytes = fs::read(&me).map_err(|e| e.to_string())?;
                write_exe(&worker, &bytes)?;
                Ok(apply_benchmark(&l, &worker, sha256(&bytes), &dir)?.0)
            };
            match run() {
                Ok(notes) => notes.iter().for_each(|n| println!("- {n}")),
                Err(e) => {
                    eprintln!("enf-bench: {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => {
            eprintln!(
                "usage: enf-bench run OUT_DIR [ROUNDS] | enf-bench container-start OUT_DIR [ROUNDS] | enf-bench syscall-cost OUT_DIR [ROUNDS] | enf-bench time-bound OUT_DIR [ROUNDS] | enf-bench apply | enf-bench worker OP ADDR N"
            );
            std::process::exit(2);
        }
    }
}

// ------------------------------------------------------------------ worker

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific prefix.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Runs OP N times (after a warm-up) and prints the median and mean of one call in ns. The
/// result of each call (allowed or EPERM) does not matter: its cost does.
fn worker(args: &[String]) {
    let op = args.first().map(String::as_str).unwrap_or("getpid");
    if op == "storm" {
        // storm N BIN: fork+exec+wait BIN N times; prints the elapsed seconds.
        let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
        let bin = std::ffi::CString::new(args.get(2).map(String::as_str).unwrap_or("/bin/true"))
            .expect("path");
        let argv = [bin.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        let t0 = Instant::now();
        for _ in 0..n {
            // SAFETY: the child only calls execve/_exit.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::execve(bin.as_ptr(), argv.as_ptr(), envp.as_ptr());
                    libc::_exit(127);
                }
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
        println!("{}", t0.elapsed().as_secs_f64());
        return;
    }
    if op == "trace" {
        trace(args);
        return;
    }
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:9".parse().expect("addr"));
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10000);
    let (sa, len, fam, udp) = worker_setup(&addr);
    let sap = (&sa as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
    if op == "udp-send-connected4" || op == "udp-send-connected6" {
        // SAFETY: as above.
        unsafe { libc::connect(udp, sap, len) };
    }
    let once = || -> u64 {
        let t0 = Instant::now();
        // SAFETY: syscalls on our own fds and our own sockaddr.
        unsafe {
            match op {
                "udp-connect4" | "udp-connect6" => {
                    libc::connect(udp, sap, len);
                }
                "sendto4" | "sendto6" => {
                    libc::sendto(udp, b"x".as_ptr().cast(), 1, 0, sap, len);
                }
                "udp-send-connected4" | "udp-send-connected6" => {
                    libc::send(udp, b"x".as_ptr().cast(), 1, 0);
                }
                "tcp-connect4" | "tcp-connect6" => {
                    let s = libc::socket(fam, libc::SOCK_STREAM, 0);
                    // Close with RST: no TIME_WAIT, so thousands of runs never run out of ports.
                    let lg = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    libc::setsockopt(
                        s,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&lg as *const libc::linger).cast(),
                        size_of::<libc::linger>() as u32,
                    );
                    libc::connect(s, sap, len);
                    libc::close(s);
                }
                _ => {
                    libc::getpid();
                }
            }
        }
        t0.elapsed().as_nanos() as u64
    };
    for _ in 0..n.min(2000) {
        once();
    }
    let mut v: Vec<u64> = (0..n).map(|_| once()).collect();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    v.sort_unstable();
    let p50 = v.get(v.len() / 2).copied().unwrap_or(0);
    println!("{p50} {mean:.1}");
}

/// A measuring worker's set-up: pinned to CPU 1 (one CPU for every measurement, no migration
/// noise between configurations), the destination as a sockaddr, its address family, and a
/// UDP socket of that family.
fn worker_setup(
    addr: &SocketAddr,
) -> (
    libc::sockaddr_storage,
    libc::socklen_t,
    libc::c_int,
    libc::c_int,
) {
    pin_thread(Some(1));
    let (sa, len) = sockaddr(addr);
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: a new socket, owned by the caller.
    let udp = unsafe { libc::socket(fam, libc::SOCK_DGRAM, 0) };
    (sa, len, fam, udp)
}

/// Writes an executable file (mode 0755).
fn write_exe(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("making {} executable: {e}", path.display()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `trace ADDR STOP_FILE WINDOW_FILE`: UDP connect() to ADDR in a loop until STOP_FILE exists,
/// timing each call; then read "start_ns end_ns" (CLOCK_MONOTONIC) from WINDOW_FILE and print,
/// for the calls that started inside the window and for those outside it:
/// `n p50 p99 max failed` (ns), inside first.
fn trace(args: &[String]) {
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:9".parse().expect("addr"));
    let stop = PathBuf::from(args.get(2).map(String::as_str).unwrap_or("/nonexistent"));
    let window = PathBuf::from(args.get(3).map(String::as_str).unwrap_or("/nonexistent"));
    let (sa, len, _, udp) = worker_setup(&addr);
    let sap = (&sa as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
    // (start, latency, failed)
    let mut v: Vec<(u64, u32, bool)> = Vec::with_capacity(1 << 22);
    'outer: loop {
        for _ in 0..1024 {
            let t0 = monotonic_ns();
            // SAFETY: our own fd and sockaddr.
            let r = unsafe { libc::connect(udp, sap, len) };
            let t1 = monotonic_ns();
            v.push((t0, (t1 - t0).min(u64::from(u32::MAX)) as u32, r != 0));
        }
        if stop.exists() || v.len() > 60_000_000 {
            break 'outer;
        }
    }
    let w = fs::read_to_string(&window).unwrap_or_default();
    let mut it = w.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let stats = |inside: bool| {
        let mut lat: Vec<u32> = Vec::new();
        let mut failed = 0u64;
        for &(t, l, f) in &v {
            if (t >= a && t <= b) == inside {
                lat.push(l);
                failed += u64::from(f);
            }
        }
        lat.sort_unstable();
        let q = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0)
        };
        format!(
            "{} {} {} {} {failed}",
            lat.len(),
            q(0.5),
            q(0.99),
            lat.last().copied().unwrap_or(0)
        )
    };
    println!("{} {}", stats(true), stats(false));
}

// ------------------------------------------------------------------ runner

/// `container-start`: measures container start alone and puts it into OUT_DIR/results.json
/// (an earlier full run's other results are kept; with none, the file holds only this part).
fn container_start_only(out: &Path, rounds: usize) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the benchmark needs root (it runs containers and agents)".into());
    }
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let path = out.join("results.json");
    let mut results: serde_json::Value = fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({"rows": [], "command": "cargo xtask bench --only container-start"}));
    results["container_start"] = container_start::run(rounds)?;
    fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!("enf-bench: wrote {}", path.display());
    Ok(())
}

/// `syscall-cost`: measures the tamper programs' cost alone and puts it into
/// OUT_DIR/results.json (an earlier full run's other results are kept).
fn syscall_cost_only(out: &Path, rounds: usize) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the benchmark needs root (it runs agents)".into());
    }
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let path = out.join("results.json");
    let mut results: serde_json::Value = fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(
            || serde_json::json!({"rows": [], "command": "cargo xtask bench --only syscall-cost"}),
        );
    results["syscall_cost"] = syscall_cost::run(rounds)?;
    fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!("enf-bench: wrote {}", path.display());
    Ok(())
}

/// `time-bound`: measures what time-bound entries cost a connect alone and puts it into
/// OUT_DIR/results.json (an earlier full run's other results are kept).
fn time_bound_only(out: &Path, rounds: usize) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the benchmark needs root (it runs agents)".into());
    }
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let path = out.join("results.json");
    let mut results: serde_json::Value = fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(
            || serde_json::json!({"rows": [], "command": "cargo xtask bench --only time-bound"}),
        );
    let mut tb = time_bound::run_alone(rounds)?;
    tb["command"] = format!("cargo xtask bench --only time-bound {rounds}").into();
    results["time_bound"] = tb;
    fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!("enf-bench: wrote {}", path.display());
    Ok(())
}

struct Config {
    name: String,
    config: &'static str,
    rules: Option<u64>,
    caller: &'static str,
    cg: PathBufCg,
    worker: PathBuf,
    /// Use the denied destination instead of the allowed one.
    denied: bool,
}

/// One round of one (configuration, workload): (p50, mean, baseline p50, baseline mean), ns.
type Sample = (f64, f64, f64, f64);

/// The cgroup a configuration's worker runs in.
type PathBufCg = std::rc::Rc<TestCgroup>;

/// Rule counts of the enforcer's configurations (one agent each).
const RULE_COUNTS: [u64; 4] = [10, 10_000, 100_000, 1_000_000];

const WORKLOADS: [(&str, usize); 9] = [
    ("udp-connect4", 50000),
    ("udp-connect6", 50000),
    ("sendto4", 30000),
    ("sendto6", 30000),
    ("tcp-connect4", 6000),
    ("tcp-connect6", 6000),
    ("udp-send-connected4", 30000),
    ("getpid", 50000),
    ("udp-connect4-mapped", 50000),
];

fn measure(cfg: &Config, op: &str, addr: &SocketAddr, n: usize) -> Result<(f64, f64), String> {
    let op = if op == "udp-connect4-mapped" {
        "udp-connect6"
    } else {
        op
    };
    let procs = cfg.cg.dir.join("cgroup.procs");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec {} worker {op} '{addr}' {n}",
            procs.display(),
            cfg.worker.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running the worker: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    match (
        it.next().and_then(|a| a.parse().ok()),
        it.next().and_then(|a| a.parse().ok()),
    ) {
        (Some(p50), Some(mean)) => Ok((p50, mean)),
        _ => Err(format!("worker {op} in {} printed {text:?}", cfg.name)),
    }
}

/// The number after ` key=` in a log line.
fn log_number(line: &str, key: &str) -> Option<f64> {
    line.split(&format!(" {key}="))
        .nth(1)?
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

fn fake_sha(i: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&i.to_be_bytes());
    s[31] = 0xee;
    s
}

/// A policy of `rules` rules over 1,000 identities; identity 1 is the worker's binary and may
/// reach the listeners; every other rule is a /32 on port 9 somewhere in 10.0.0.0/8.
fn bench_policy(scope: &str, worker_sha: [u8; 32], l: &Listeners, rules: u64) -> Policy {
    let mut identities = vec![Identity {
        name: "worker".into(),
        spiffe_id: "spiffe://bench.local/worker".into(),
        sockets: 0,
        matches: vec![MatchEntry {
            binary_sha256: vec![worker_sha],
            ..Default::default()
        }],
    }];
    for i in 1..1000u64 {
        identities.push(Identity {
            name: format!("id{i}"),
            spiffe_id: format!("spiffe://bench.local/id{i}"),
            sockets: 0,
            matches: vec![MatchEntry {
                binary_sha256: vec![fake_sha(i)],
                ..Default::default()
            }],
        });
    }
    let rule = |ident: u32, cidr: &str, port: u16, protocol: Protocol| Rule {
        ident,
        deny: false,
        cidr: cidr.parse().expect("cidr"),
        to_ident: 0,
        ports: vec![(port, port)],
        protocol,
        line: 0,
        text: format!("id{ident} {cidr}:{port}"),
        timing: Default::default(),
    };
    let mut out = vec![
        rule(1, "127.0.0.1/32", l.udp4.port(), Protocol::Udp),
        rule(1, "::1/128", l.udp6.port(), Protocol::Udp),
        rule(1, "127.0.0.1/32", l.tcp4.port(), Protocol::Tcp),
        rule(1, "::1/128", l.tcp6.port(), Protocol::Tcp),
    ];
    let mut k: u64 = 0;
    while (out.len() as u64) < rules {
        let ident = (k % 1000) as u32 + 1;
        let a = 0x0a00_0000u32 + (k as u32 & 0x00ff_ffff);
        let ip = std::net::Ipv4Addr::from(a);
        out.push(rule(ident, &format!("{ip}/32"), 9, Protocol::Tcp));
        k += 1;
    }
    Policy {
        trust_domain: "bench.local".into(),
        mode: Mode::Enforce,
        unattested: Action::Allow,
        scope: vec![scope.to_string()],
        report_allow: false,
        revoke_connections: true,
        identities,
        rules: out,
        max_grant_secs: enforcer_agent::policy::DEFAULT_MAX_GRANT_SECS,
    }
}

/// The YAML an operator would write for [`bench_policy`] (same identities and rules), with the
/// rule destinations of the filler rules shifted by `shift` (so two texts differ in every
/// filler rule when `shift` differs).
fn bench_yaml(scope: &str, worker_sha: [u8; 32], l: &Listeners, rules: u64, shift: u32) -> String {
    use std::fmt::Write as _;
    let mut y = String::with_capacity(rules as usize * 64 + 200_000);
    let _ = write!(
        y,
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: bench.local\nmode: enforce\nunattested: allow\nscope: [\"{scope}\"]\nidentities:\n  - name: worker\n    match:\n      - binarySha256: [{}]\n",
        hex::encode(worker_sha)
    );
    for i in 1..1000u64 {
        let _ = write!(
            y,
            "  - name: id{i}\n    match:\n      - binarySha256: [{}]\n",
            hex::encode(fake_sha(i))
        );
    }
    y.push_str("rules:\n  - identity: worker\n    egress:\n");
    let _ = write!(
        y,
        "      - to: {{cidr: 127.0.0.1/32, ports: [{}], protocol: udp}}\n      - to: {{cidr: \"::1/128\", ports: [{}], protocol: udp}}\n      - to: {{cidr: 127.0.0.1/32, ports: [{}], protocol: tcp}}\n      - to: {{cidr: \"::1/128\", ports: [{}], protocol: tcp}}\n",
        l.udp4.port(),
        l.udp6.port(),
        l.tcp4.port(),
        l.tcp6.port()
    );
    // Filler rules grouped by identity, as an operator's file would be.
    let filler = rules.saturating_sub(4);
    let mut by_ident: Vec<Vec<u64>> = vec![Vec::new(); 1000];
    for k in 0..filler {
        by_ident[(k % 1000) as usize].push(k);
    }
    for (i, ks) in by_ident.iter().enumerate() {
        if ks.is_empty() {
            continue;
        }
        let name = if i == 0 {
            "worker".to_string()
        } else {
            format!("id{i}")
        };
        let _ = write!(y, "  - identity: {name}\n    egress:\n");
        for k in ks {
            let a = 0x0a00_0000u32 + ((*k as u32).wrapping_add(shift) & 0x00ff_ffff);
            let _ = writeln!(
                y,
                "      - to: {{cidr: {}/32, ports: [9], protocol: tcp}}",
                std::net::Ipv4Addr::from(a)
            );
        }
    }
    y
}

/// Policy compile (YAML -> bundle, the CLI) and apply (to the flip, in the agent) at 10,000,
/// 100,000 and 1,000,000 rules, with UDP connect latency measured while each apply is in
/// flight: notes lines and JSON rows.
fn apply_benchmark(
    l: &Listeners,
    worker: &Path,
    worker_sha: [u8; 32],
    dir: &TempDir,
) -> Result<(Vec<String>, Vec<serde_json::Value>), String> {
    let cg = TestCgroup::new("b-apply");
    let agent = Agent::start_bytes(
        &policy::encode_bundle(&bench_policy(&cg.rel, worker_sha, l, 10)),
        &["--max-rules", "1100000"],
    );
    let_settle();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let steps: [(u64, u32, &str); 4] = [
        (10_000, 0, "apply"),
        (100_000, 0, "apply"),
        (1_000_000, 0, "apply"),
        (1_000_000, 1, "re-apply, every filler rule moved"),
    ];
    for (i, (n, shift, what)) in steps.into_iter().enumerate() {
        let yaml = dir.path(&format!("apply-{i}.yaml"));
        let bundle = dir.path(&format!("apply-{i}.bundle"));
        fs::write(&yaml, bench_yaml(&cg.rel, worker_sha, l, n, shift))
            .map_err(|e| format!("writing {}: {e}", yaml.display()))?;
        let t = Instant::now();
        let (code, _, err) = run_cmd(
            &agent_bin(),
            &[
                "policy",
                "compile",
                &yaml.to_string_lossy(),
                "-o",
                &bundle.to_string_lossy(),
            ],
        );
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        if code != 0 {
            return Err(format!("policy compile of {n} rules failed: {err}"));
        }
        let yaml_mb = fs::metadata(&yaml).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
        let bundle_mb = fs::metadata(&bundle).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
        // A worker connects (UDP, allowed in every policy) throughout the apply.
        let stop = dir.path(&format!("stop-{i}"));
        let window = dir.path(&format!("window-{i}"));
        let tracer = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec {} worker trace '{}' {} {}",
                cg.dir.join("cgroup.procs").display(),
                worker.display(),
                l.udp4,
                stop.display(),
                window.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the trace worker: {e}"))?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let before = agent.log().matches("policy in force").count();
        let api_before = agent
            .log()
            .matches("policy applied through the API")
            .count();
        let a = monotonic_ns();
        let t = Instant::now();
        let (code, _, err) = agent.cli(&["policy", "apply", &bundle.to_string_lossy()]);
        let cli_ms = t.elapsed().as_secs_f64() * 1e3;
        let b = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(500));
        fs::write(&window, format!("{a} {b}")).map_err(|e| e.to_string())?;
        fs::write(&stop, "").map_err(|e| e.to_string())?;
        let out = tracer
            .wait_with_output()
            .map_err(|e| format!("trace worker: {e}"))?;
        if code != 0 {
            return Err(format!("policy apply of {n} rules failed: {err}"));
        }
        let log = agent.log();
        let line = log
            .lines()
            .filter(|l| l.contains("policy in force"))
            .nth(before)
            .ok_or("the agent logged no \"policy in force\" for the apply")?
            .to_string();
        let agent_ms = log_number(&line, "ms").unwrap_or(f64::NAN);
        let agent_compile_ms = log_number(&line, "compile_ms").unwrap_or(f64::NAN);
        let writes = log_number(&line, "kernel_writes").unwrap_or(f64::NAN);
        let decode_ms = log
            .lines()
            .filter(|l| l.contains("policy applied through the API"))
            .nth(api_before)
            .and_then(|l| log_number(l, "decode_ms"))
            .unwrap_or(f64::NAN);
        let f: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() != 10 {
            return Err(format!(
                "trace worker printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        notes.push(format!(
            "{what} of {n} rules: `policy compile` {compile_ms:.0} ms ({yaml_mb:.1} MB YAML -> {bundle_mb:.1} MB bundle); in the agent {decode_ms:.0} ms to decode the bundle, then {agent_ms:.1} ms to the flip ({agent_compile_ms:.1} ms compile to map entries, {writes:.0} kernel writes); {cli_ms:.0} ms for `policy apply` end to end; UDP connect during the apply: p50 {:.2} us, p99 {:.2} us, max {:.0} us over {:.0} calls, {:.0} failed (outside it: p50 {:.2} us, p99 {:.2} us, max {:.0} us).",
            f[1] / 1e3,
            f[2] / 1e3,
            f[3] / 1e3,
            f[0],
            f[4],
            f[6] / 1e3,
            f[7] / 1e3,
            f[8] / 1e3
        ));
        rows.push(serde_json::json!({
            "rules": n, "what": what, "compile_ms": compile_ms, "apply_ms": agent_ms,
            "agent_compile_ms": agent_compile_ms, "decode_ms": decode_ms, "kernel_writes": writes, "cli_ms": cli_ms,
            "inflight": {"n": f[0], "p50_ns": f[1], "p99_ns": f[2], "max_ns": f[3], "failed": f[4]},
            "outside": {"n": f[5], "p50_ns": f[6], "p99_ns": f[7], "max_ns": f[8], "failed": f[9]},
        }));
        let _ = fs::remove_file(&yaml);
    }
    drop(agent);
    Ok((notes, rows))
}

fn sh(cmd: &str) -> Result<(), String> {
    let s = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed ({s})"))
    }
}

/// nftables output chain: for the worker's cgroup, accept (daddr . dport) in a set of `n`
/// elements, drop the rest.
fn nft_setup(table: &str, cg_name: &str, l: &Listeners, n: u64) -> Result<(), String> {
    let mut elems = vec![
        format!("127.0.0.1 . {}", l.tcp4.port()),
        format!("127.0.0.1 . {}", l.udp4.port()),
    ];
    let mut k = 0u32;
    while (elems.len() as u64) < n {
        elems.push(format!(
            "{} . 9",
            std::net::Ipv4Addr::from(0x0a00_0000u32 + k)
        ));
        k += 1;
    }
    let mut elems6 = vec![
        format!("::1 . {}", l.tcp6.port()),
        format!("::1 . {}", l.udp6.port()),
    ];
    elems6.push("fd00::9 . 9".into());
    let text = format!(
        "table inet {table} {{\n set a4 {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n set a6 {{ type ipv6_addr . inet_service; elements = {{ {} }} }}\n chain out {{ type filter hook output priority 0; policy accept;\n  socket cgroupv2 level 1 \"{cg_name}\" meta skuid 0 ip daddr . th dport @a4 accept\n  socket cgroupv2 level 1 \"{cg_name}\" meta skuid 0 ip6 daddr . th dport @a6 accept\n  socket cgroupv2 level 1 \"{cg_name}\" drop\n }}\n}}\n",
        elems.join(", "),
        elems6.join(", ")
    );
    let f = std::env::temp_dir().join(format!("{table}.nft"));
    fs::write(&f, text).map_err(|e| format!("writing {}: {e}", f.display()))?;
    let r = sh(&format!("nft -f {}", f.display()));
    let _ = fs::remove_file(&f);
    r
}

fn ipt_setup(cg_name: &str, l: &Listeners, n: u64) -> Result<(), String> {
    sh(
        "iptables -N ENFBENCH && iptables -A OUTPUT -j ENFBENCH && ip6tables -N ENFBENCH && ip6tables -A OUTPUT -j ENFBENCH",
    )?;
    for i in 0..n.saturating_sub(2) {
        sh(&format!(
            "iptables -A ENFBENCH -m cgroup --path {cg_name} -m owner --uid-owner 0 -d {} -p tcp --dport 9 -j ACCEPT",
            std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32)
        ))?;
    }
    for (port, p) in [(l.tcp4.port(), "tcp"), (l.udp4.port(), "udp")] {
        sh(&format!(
            "iptables -A ENFBENCH -m cgroup --path {cg_name} -m owner --uid-owner 0 -d 127.0.0.1 -p {p} --dport {port} -j ACCEPT"
        ))?;
    }
    for (port, p) in [(l.tcp6.port(), "tcp"), (l.udp6.port(), "udp")] {
        sh(&format!(
            "ip6tables -A ENFBENCH -m cgroup --path {cg_name} -m owner --uid-owner 0 -d ::1 -p {p} --dport {port} -j ACCEPT"
        ))?;
    }
    sh(&format!(
        "iptables -A ENFBENCH -m cgroup --path {cg_name} -j DROP && ip6tables -A ENFBENCH -m cgroup --path {cg_name} -j DROP"
    ))
}

fn ipt_teardown() {
    let _ = sh(
        "iptables -D OUTPUT -j ENFBENCH 2>/dev/null; iptables -F ENFBENCH 2>/dev/null; iptables -X ENFBENCH 2>/dev/null; ip6tables -D OUTPUT -j ENFBENCH 2>/dev/null; ip6tables -F ENFBENCH 2>/dev/null; ip6tables -X ENFBENCH 2>/dev/null",
    );
}

/// Loads the allow-only programs and attaches them to `cg` (links dropped = detached).
fn attach_floor(cg: &TestCgroup) -> Result<aya::Ebpf, String> {
    // The test object (enforcer-ebpf-test) holds them, and no maps.
    let mut ebpf = aya::EbpfLoader::new()
        .load(enforcer_tests::test_object()?)
        .map_err(|e| format!("loading the test kernel object: {e}"))?;
    let f = fs::File::open(&cg.dir).map_err(|e| format!("{e}"))?;
    for (_, name) in enforcer_common::BENCH_PROGS {
        let p: &mut aya::programs::CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(format!("no program {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        p.load().map_err(|e| format!("loading {name}: {e}"))?;
        p.attach(&f, aya::programs::CgroupAttachMode::Single)
            .map_err(|e| format!("attaching {name}: {e}"))?;
    }
    Ok(ebpf)
}

struct MapMem {
    map_type: u32,
    key_size: u64,
    value_size: u64,
    max_entries: u64,
    memlock: u64,
}

/// Every BPF map a process holds (each map once, however many fds point at it).
fn map_memory(pid: u32) -> Vec<MapMem> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    for e in rd.flatten() {
        if fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-map") {
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            out.insert(
                field("map_id:"),
                MapMem {
                    map_type: field("map_type:") as u32,
                    key_size: field("key_size:"),
                    value_size: field("value_size:"),
                    max_entries: field("max_entries:"),
                    memlock: field("memlock:"),
                },
            );
        }
    }
    out.into_values().collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime and stime (fields 14, 15) are at 11 and 12.
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Exec storm, exec-to-identity time, agent CPU/RSS, kernel memory per rule: notes lines.
fn exec_and_memory(
    agents: &[Agent],
    enf10: &TestCgroup,
    dir: &TempDir,
) -> Result<(Vec<String>, serde_json::Value), String> {
    let mut notes = Vec::new();
    let agent = &agents[0];
    let apid = agent
        .child
        .as_ref()
        .map(|c| c.id())
        .ok_or("agent not running")?;
    // Kernel memory: the rule maps (host hash, LPM trie) grow per rule; the others are
    // preallocated.
    // ENF_HOSTS (hash, 28-byte key, 8-byte value) and ENF_RULES (LPM trie).
    let is_rule_map =
        |m: &MapMem| m.map_type == 11 || (m.map_type == 1 && m.key_size == 28 && m.value_size == 8);
    let mut rule_mem = Vec::new();
    let mut mem_notes = Vec::new();
    for (a, rules) in agents.iter().zip(RULE_COUNTS) {
        let Some(pid) = a.child.as_ref().map(|c| c.id()) else {
            continue;
        };
        let maps: Vec<MapMem> = map_memory(pid)
            .into_iter()
            .filter(|m| is_rule_map(m))
            .collect();
        let bytes: u64 = maps.iter().map(|m| m.memlock).sum();
        let capacity = maps.iter().map(|m| m.max_entries).max().unwrap_or(0) / 2;
        mem_notes.push(format!(
            "{} rules ({} per policy of room): {:.1} MiB ({:.0} B per rule)",
            rules,
            capacity,
            bytes as f64 / 1048576.0,
            bytes as f64 / rules as f64
        ));
        rule_mem.push(
            serde_json::json!({"rules": rules, "max_rules": capacity, "memlock_bytes": bytes}),
        );
    }
    let memory = serde_json::json!({"rule_maps": rule_mem});
    notes.push(format!(
        "Kernel memory of the rule maps (memlock from fdinfo; ENF_HOSTS hash for single hosts, allocated per entry, plus its bucket array sized by `--max-rules` x 2 policies; ENF_RULES LPM trie for prefixes, per entry): {}.",
        mem_notes.join("; ")
    ));
    let prealloc: u64 = map_memory(apid)
        .iter()
        .filter(|m| !is_rule_map(m) && m.map_type != 27)
        .map(|m| m.memlock)
        .sum();
    notes.push(format!("Kernel memory of the preallocated maps (processes, executables, cgroups, identity classes: up to 65,536 identity match keys, config, counters): {} KiB in all, whatever the policy, so an identity costs no kernel memory beyond its share of those tables.", prealloc / 1024));
    let mut memory = memory;
    memory["prealloc_bytes"] = prealloc.into();

    // Exec storm with a known binary, 2 spawners (one per core), as fast as they go.
    let tru = PathBuf::from("/bin/true");
    let _ = wait_traced(spawn_in(enf10, &tru, &[]));
    let_settle();
    let _ = wait_traced(spawn_in(enf10, &tru, &[]));
    let lost0 = agent.status_counter("events_lost");
    let cpu0 = cpu_seconds(apid);
    let n = 20_000;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let storms: Vec<_> = (0..2)
        .map(|_| {
            spawn_in(
                enf10,
                &me,
                &["worker", "storm", &(n / 2).to_string(), "/bin/true"],
            )
        })
        .collect();
    for c in storms {
        let _ = wait_traced(c);
    }
    let secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let cpu = cpu_seconds(apid) - cpu0;
    let lost = agent.status_counter("events_lost") - lost0;
    let rate = n as f64 / secs;
    let cpu_pct = 100.0 * cpu / secs;
    let rss = rss_kib(apid);
    notes.push(format!(
        "Exec storm: {n} fork+exec+exit of a known binary in an enforced cgroup by 2 spawners (one per core) at {rate:.0} exec/s, the most this machine sustains: {lost} events lost; agent CPU {cpu_pct:.1}% of one core ({:.1}% per 1k exec/s); agent RSS {:.1} MiB.",
        cpu_pct * 1000.0 / rate,
        rss as f64 / 1024.0
    ));
    // Bursts: 10x the spawners at once (20 on 2 cores), a short burst each, 5 times; every
    // process must still be tracked (events lost stays 0, nothing left pending).
    let lost0 = agent.status_counter("events_lost");
    let known0 = agent.status_counter("exec_known");
    let failed0 = agent.status_counter("proc_insert_failed");
    let mut burst_rates = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let burst: Vec<_> = (0..20)
            .map(|_| spawn_in(enf10, &me, &["worker", "storm", "250", "/bin/true"]))
            .collect();
        for c in burst {
            let _ = wait_traced(c);
        }
        burst_rates.push(5000.0 / t0.elapsed().as_secs_f64());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let burst_lost = agent.status_counter("events_lost") - lost0;
    let burst_known = agent.status_counter("exec_known") - known0;
    let burst_failed = agent.status_counter("proc_insert_failed") - failed0;
    notes.push(format!(
        "Exec bursts: 5 bursts of 20 concurrent spawners (10x the sustained run's 2) x 250 fork+exec each: {} exec/s; {burst_lost} events lost, {burst_known} execs given their identity in the kernel at exec (of 25,000 plus the spawners), {burst_failed} process-table insert failures.",
        burst_rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    let exec = serde_json::json!({"execs": n, "rate_per_s": rate, "events_lost": lost, "agent_cpu_pct": cpu_pct, "agent_rss_kib": rss, "burst_rates_per_s": burst_rates, "burst_events_lost": burst_lost});

    // Exec to identity: a known binary is resolved in the kernel at exec (no hold); a
    // never-seen one is held until hashed: time its first exec against its second.
    let base = fs::read(&tru).map_err(|e| e.to_string())?;
    let mut sizes = Vec::new();
    for (label, size) in [
        ("50 KB", 50_000usize),
        ("1 MB", 1_000_000),
        ("10 MB", 10_000_000),
        ("100 MB", 100_000_000),
    ] {
        let p = dir.path(&format!("true-{size}"));
        let mut b = base.clone();
        b.resize(size.max(base.len()), 0);
        write_exe(&p, &b)?;
        sizes.push((label, p));
    }
    let_settle();
    let mut held = Vec::new();
    for (label, p) in &sizes {
        let t = Instant::now();
        let _ = wait_traced(spawn_in(enf10, p, &[]));
        let first = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let _ = wait_traced(spawn_in(enf10, p, &[]));
        let second = t.elapsed().as_secs_f64() * 1e3;
        held.push(format!("{label}: {:.2} ms", first - second));
    }
    notes.push(format!(
        "Exec to identity: a known binary gets its identity in the kernel at exec (no hold, no user-space round trip). A never-seen binary is held at exec until hashed; extra time of its first exec: {}.",
        held.join(", ")
    ));
    Ok((notes, serde_json::json!({"memory": memory, "exec": exec})))
}

fn run(out: &Path, rounds: usize) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the benchmark needs root (it attaches programs and creates cgroups)".into());
    }
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    // Listener threads on CPU 0, workers measured on CPU 1.
    let l = Listeners::on_cpu(Some(0));
    let dir = TempDir::new("bench");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let worker = dir.path("worker");
    let unattested = dir.path("worker-unattested");
    let bytes = fs::read(&me).map_err(|e| e.to_string())?;
    write_exe(&worker, &bytes)?;
    let mut other = bytes.clone();
    let pat = b"ENFBENCH-MARKER0";
    let at = other
        .windows(pat.len())
        .position(|w| w == pat)
        .ok_or("no marker in the bench binary")?;
    other[at + pat.len() - 1] = b'1';
    write_exe(&unattested, &other)?;
    let worker_sha = sha256(&bytes);

    let mut configs: Vec<Config> = Vec::new();
    let base = std::rc::Rc::new(TestCgroup::new("b-none"));
    configs.push(Config {
        name: "none".into(),
        config: "none",
        rules: None,
        caller: "-",
        cg: base.clone(),
        worker: worker.clone(),
        denied: false,
    });
    let floor_cg = std::rc::Rc::new(TestCgroup::new("b-floor"));
    let _floor = attach_floor(&floor_cg)?;
    configs.push(Config {
        name: "empty-prog".into(),
        config: "empty-prog",
        rules: None,
        caller: "-",
        cg: floor_cg.clone(),
        worker: worker.clone(),
        denied: false,
    });

    let mut agents = Vec::new();
    let mut apply = Vec::new();
    for rules in RULE_COUNTS {
        let cg = std::rc::Rc::new(TestCgroup::new(&format!("b-enf{rules}")));
        let p = bench_policy(&cg.rel, worker_sha, &l, rules);
        let bundle = policy::encode_bundle(&p);
        eprintln!("enf-bench: starting an agent with {rules} rules");
        let t0 = Instant::now();
        // Room for the policy (the default --max-rules is 131,072).
        let room = (rules + rules / 10).max(u64::from(enforcer_common::DEFAULT_MAX_RULES));
        let agent = Agent::start_bytes(&bundle, &["--max-rules", &room.to_string()]);
        let start_ms = t0.elapsed().as_secs_f64() * 1e3;
        let apply_ms = agent
            .log()
            .lines()
            .find(|l| l.contains("policy in force"))
            .and_then(|l| log_number(l, "ms"))
            .unwrap_or(f64::NAN);
        apply.push(
            serde_json::json!({"rules": rules, "apply_ms": apply_ms, "agent_start_ms": start_ms}),
        );
        for (caller, bin, denied) in [
            ("attested", &worker, false),
            ("unattested", &unattested, false),
            ("denied", &worker, true),
        ] {
            if rules == 100_000 && caller != "attested" {
                continue; // the TCP target's point: one caller keeps the run short
            }
            configs.push(Config {
                name: format!("enforcer-{rules}-{caller}"),
                config: "enforcer",
                rules: Some(rules),
                caller,
                cg: cg.clone(),
                worker: bin.clone(),
                denied,
            });
        }
        agents.push(agent);
    }
    // Peers from Debian's packages.
    let mut notes = Vec::new();
    let mut nft_tables = Vec::new();
    for n in [10u64, 10_000] {
        let cg = std::rc::Rc::new(TestCgroup::new(&format!("b-nft{n}")));
        let table = format!("enfbench{n}");
        // nft resolves the path under /sys/fs/cgroup (unified/... on a hybrid layout).
        let nft_path = cg
            .dir
            .strip_prefix("/sys/fs/cgroup")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| cg.rel.trim_start_matches('/').to_string());
        match nft_setup(&table, &nft_path, &l, n) {
            Ok(()) => {
                nft_tables.push(table);
                configs.push(Config {
                    name: format!("nftables-{n}"),
                    config: "nftables",
                    rules: Some(n),
                    caller: "-",
                    cg,
                    worker: worker.clone(),
                    denied: false,
                });
            }
            Err(e) => notes.push(format!("nftables with {n} rules not measured: {e}")),
        }
    }
    ipt_teardown();
    let ipt_cg = std::rc::Rc::new(TestCgroup::new("b-ipt"));
    match ipt_setup(ipt_cg.rel.trim_start_matches('/'), &l, 10) {
        Ok(()) => configs.push(Config {
            name: "iptables-10".into(),
            config: "iptables",
            rules: Some(10),
            caller: "-",
            cg: ipt_cg.clone(),
            worker: worker.clone(),
            denied: false,
        }),
        Err(e) => notes.push(format!("iptables not measured: {e}")),
    }
    // OpenSnitch: per-binary allow of the worker, default deny, interception scoped to its
    // own cgroup so the other configurations of this run see no NFQUEUE rule.
    let osn_cg = std::rc::Rc::new(TestCgroup::new("b-osn"));
    let mut osn = match opensnitch::OpenSnitch::start(&worker, &osn_cg.rel, &osn_cg.dir) {
        Ok(o) => {
            notes.push(o.describe());
            configs.push(Config {
                name: "opensnitch-1".into(),
                config: "opensnitch",
                rules: Some(1),
                caller: "-",
                cg: osn_cg.clone(),
                worker: worker.clone(),
                denied: false,
            });
            Some(o)
        }
        Err(e) => {
            notes.push(format!("OpenSnitch not measured: {e}"));
            None
        }
    };
    // The kernel's own run time of each program (BPF_ENABLE_STATS while this fd lives).
    // Let every binary settle and be attested before measuring.
    let_settle();
    for c in &configs {
        let _ = measure(c, "getpid", &l.udp4, 10);
    }

    let denied4: SocketAddr = format!("127.0.0.2:{}", l.udp4.port())
        .parse()
        .expect("addr");
    let denied6: SocketAddr = "[::2]:9".parse().expect("addr");
    let target = |w: &str, denied: bool| -> SocketAddr {
        match (w, denied) {
            ("udp-connect4" | "sendto4" | "udp-send-connected4", false) => l.udp4,
            ("udp-connect6" | "sendto6", false) => l.udp6,
            ("tcp-connect4", false) => l.tcp4,
            ("tcp-connect6", false) => l.tcp6,
            ("udp-connect4-mapped", false) => format!("[::ffff:127.0.0.1]:{}", l.udp4.port())
                .parse()
                .expect("addr"),
            ("udp-connect6" | "sendto6" | "tcp-connect6", true) => denied6,
            (_, true) => denied4,
            _ => l.udp4,
        }
    };
    // samples[(config, workload)] = per round (p50, mean, baseline p50, baseline mean)
    let mut samples: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!("enf-bench: round {}/{rounds}", round + 1);
        for (w, n) in WORKLOADS {
            // Every configuration, the no-program baseline included, at a place that moves
            // each round by an equal share of the round, so over the rounds each one is
            // measured at places spread across the round and none is always first (the first
            // of a workload ran slower: a baseline always first made ratios below 1). Each is
            // then compared with the baseline measured in the same round.
            let k = configs.len();
            let shift = round * k / rounds;
            let mut measured: Vec<(&Config, f64, f64)> = Vec::with_capacity(k);
            for i in 0..k {
                let c = &configs[(i + shift) % k];
                if c.denied && matches!(w, "udp-send-connected4" | "getpid") {
                    continue; // nothing to deny there
                }
                let (p50, mean) = measure(c, w, &target(w, c.denied), n)?;
                if c.config == "opensnitch"
                    && let Some(o) = osn.as_mut()
                {
                    o.check()?; // a dead daemon (queue bypass) would measure nothing
                }
                measured.push((c, p50, mean));
            }
            let (_, bp50, bmean) = *measured
                .iter()
                .find(|(c, _, _)| c.name == "none")
                .ok_or("the no-program baseline is not among the configurations")?;
            for (c, p50, mean) in measured {
                samples
                    .entry((c.name.clone(), w.to_string()))
                    .or_default()
                    .push((p50, mean, bp50, bmean));
            }
        }
    }
    // The kernel's own run time of each program, in a phase of its own: BPF_ENABLE_STATS
    // adds two clock reads to every program run, so the latency rounds above ran without it.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| format!("BPF_ENABLE_STATS: {e}"))?;
    for c in configs
        .iter()
        .filter(|c| c.config == "enforcer" || c.config == "empty-prog")
    {
        for w in ["udp-connect4", "sendto4"] {
            measure(c, w, &target(w, c.denied), 20_000)?;
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    };
    let mut rows = Vec::new();
    for c in &configs {
        for (w, _) in WORKLOADS {
            let Some(s) = samples.get(&(c.name.clone(), w.to_string())) else {
                continue;
            };
            let p50 = median(s.iter().map(|x| x.0).collect());
            let mean = median(s.iter().map(|x| x.1).collect());
            let added = median(s.iter().map(|x| x.0 - x.2).collect());
            let ratio = median(s.iter().map(|x| x.1 / x.3).collect());
            let mut row = serde_json::json!({
                "workload": w, "config": c.config, "caller": c.caller,
                "p50_ns": p50, "mean_ns": mean, "added_p50_ns": added, "ratio_mean": ratio,
            });
            if let Some(r) = c.rules {
                row["rules"] = r.into();
            }
            rows.push(row);
        }
    }
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    notes.push("Added latency = median over rounds of (p50 of the configuration - p50 of the same round's no-program baseline). In each round every configuration, the baseline included, is measured once per workload, in an order that rotates by k/rounds places each round (k configurations), so over the rounds each is measured at places spread across the round and none is always first. Worker processes are fresh per measurement; the unattested caller is the same binary with one byte changed; the denied caller connects to a destination no rule allows (EPERM).".into());
    notes.push("nftables/iptables/OpenSnitch see packets, not connect(): a UDP connect() sends nothing, so they add nothing there and cannot decide it; the enforcer decides in connect() itself.".into());
    notes.push("OpenSnitch queues the first packet of each new flow to its daemon: a TCP connect waits for the verdict; an unconnected UDP sendto returns before it (every datagram is a new flow until a reply comes), so its cost shows in the mean and the tail (queued packets fill the send buffer), not in the p50. It matches the binary by path, not content.".into());
    // Program run time: ns per run of connect4/sendmsg4, per rule count (all callers mixed).
    let mut prog_run = serde_json::Map::new();
    let run_ns = |prog_id: u32| -> Option<f64> {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == prog_id)
            .filter(|p| p.run_count() > 0)
            .map(|p| p.run_time().as_nanos() as f64 / p.run_count() as f64)
    };
    let mut run_notes = Vec::new();
    for (agent, rules) in agents.iter().zip(RULE_COUNTS) {
        for hook in ["connect4", "sendmsg4"] {
            let Some(cg) = configs
                .iter()
                .find(|c| c.rules == Some(rules) && c.config == "enforcer")
                .map(|c| c.cg.clone())
            else {
                continue;
            };
            let cg_id = std::os::unix::fs::MetadataExt::ino(
                &fs::metadata(&cg.dir).map_err(|e| e.to_string())?,
            );
            let pin = agent
                .pin_dir
                .join("links")
                .join(format!("cg_{cg_id}_{hook}"));
            let link: aya::programs::links::FdLink =
                aya::programs::links::PinnedLink::from_pin(&pin)
                    .map_err(|e| format!("{}: {e}", pin.display()))?
                    .into();
            let prog = link.info().map_err(|e| e.to_string())?.program_id();
            if let Some(ns) = run_ns(prog) {
                prog_run.insert(format!("enforcer-{rules}-{hook}"), ns.into());
                run_notes.push(format!("{hook} {rules} rules: {ns:.0} ns"));
            }
        }
    }
    for (hook, name) in [
        ("connect4", "bench_allow4"),
        ("sendmsg4", "bench_sm_allow4"),
    ] {
        let ns = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| p.name_as_str() == Some(name) && p.run_count() > 0)
            .map(|p| p.run_time().as_nanos() as f64 / p.run_count() as f64)
            .next();
        if let Some(ns) = ns {
            prog_run.insert(format!("empty-prog-{hook}"), ns.into());
            run_notes.push(format!("allow-only {hook}: {ns:.0} ns"));
        }
    }
    drop(stats);
    notes.push(format!(
        "Program run time measured by the kernel (BPF_ENABLE_STATS, enabled only in a phase after the latency rounds: 20,000 UDP connects and sendto per caller of each configuration; mean per run, all callers mixed; the stats themselves add ~2 clock reads per run): {}.",
        run_notes.join("; ")
    ));
    let enf10 = configs
        .iter()
        .find(|c| c.rules == Some(10))
        .map(|c| c.cg.clone())
        .ok_or("no 10-rule config")?;
    let (more, extra) = exec_and_memory(&agents, &enf10, &dir)?;
    notes.extend(more);
    drop(agents);
    eprintln!("enf-bench: policy compile and apply, with connects in flight");
    let (more, apply_runs) = apply_benchmark(&l, &worker, worker_sha, &dir)?;
    notes.extend(more);
    eprintln!("enf-bench: what time-bound entries cost a connect");
    let mut time_bound = time_bound::run(&l, &worker, worker_sha, rounds)?;
    time_bound["command"] = format!("cargo xtask bench {rounds}").into();
    eprintln!("enf-bench: the tamper programs' cost on unrelated syscalls");
    let syscall_cost = syscall_cost::run(rounds)?;
    // Last, with no other agent running: container start on the containerd node.
    let container_start = container_start::run(rounds)?;
    let results = serde_json::json!({
        "machine": {"kernel": kernel, "cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "command": "cargo xtask bench",
        "rounds": rounds,
        "rows": rows,
        "apply": apply,
        "apply_runs": apply_runs,
        "notes": notes,
        "extra": extra,
        "prog_run_ns": prog_run,
        "container_start": container_start,
        "syscall_cost": syscall_cost,
        "time_bound": time_bound,
    });
    let path = out.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    for t in &nft_tables {
        let _ = sh(&format!("nft delete table inet {t}"));
    }
    ipt_teardown();
    drop(osn);
    eprintln!("enf-bench: wrote {}", path.display());
    Ok(())
}

//! Harness of the real-kernel tests: cgroups they create, a real agent process, listeners on
//! loopback, copies of a real binary. Everything a test creates is removed when it drops.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, Instant},
};

pub mod cri;

/// Whether this runs under CI (`CI=true` or `CI=1`): then a test that cannot run fails.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Removes from this test process's environment what would make the enforcer withhold the
/// identity of every workload the tests spawn: `cargo test` sets `LD_LIBRARY_PATH` for test
/// binaries, and an exec whose environment sets it gets no identity (SECURITY.md guarantee 3).
/// Called (once) by the harness's entry points, before any of them starts a thread.
pub fn scrub_loader_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: called at a test's start, before the harness starts threads; libtest's
        // main thread only waits for the test.
        unsafe { std::env::remove_var("LD_LIBRARY_PATH") };
    });
}

/// True when the kernel tests can run. Not root: under CI=true this panics (a kernel test
/// never skips in CI); locally it prints why and the test returns early.
pub fn require_root(test: &str) -> bool {
    scrub_loader_env();
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test}: real-kernel tests need root and CI=true forbids skipping; run as root");
    }
    eprintln!("SKIP {test}: needs root (loads BPF programs, creates cgroups)");
    false
}

#[cfg(enforcer_ebpf_test)]
static TEST_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ENFORCER_EBPF_TEST_OBJ"));
#[cfg(not(enforcer_ebpf_test))]
static TEST_OBJECT: &[u8] = &[];

/// The test-only kernel object (`enforcer-ebpf-test`: the bench's allow-only programs and
/// the program the verifier must reject), embedded at build time. Not embedded: an error
/// saying how to build it (`cargo xtask` sets ENFORCER_EBPF_TEST_OBJ).
pub fn test_object() -> Result<&'static [u8], String> {
    if TEST_OBJECT.is_empty() {
        return Err(
            "the test kernel object was not embedded (ENFORCER_EBPF_TEST_OBJ unset at build); build through `cargo xtask test` or `cargo xtask bench`"
                .to_string(),
        );
    }
    Ok(TEST_OBJECT)
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return PathBuf::from(mp);
        }
    }
    panic!("no cgroup2 mount in /proc/self/mountinfo: the kernel tests need cgroup v2");
}

/// A number not returned before in this process.
pub fn unique_n() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A unique name for this test run.
pub fn unique(tag: &str) -> String {
    format!("enftest-{}-{tag}-{}", std::process::id(), unique_n())
}

/// A cgroup created under the cgroup2 mount; removed on drop (after its processes ended).
pub struct TestCgroup {
    pub dir: PathBuf,
    /// Path relative to the cgroup2 root, as a policy's `scope` names it.
    pub rel: String,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        scrub_loader_env();
        let mount = cgroup2_mount();
        let name = unique(tag);
        let dir = mount.join(&name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self {
            dir,
            rel: format!("/{name}"),
        }
    }
}

impl TestCgroup {
    /// A cgroup below this one (drop it before its parent).
    pub fn child(&self, name: &str) -> Self {
        let dir = self.dir.join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self {
            dir,
            rel: format!("{}/{name}", self.rel),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove cgroup {}", self.dir.display());
    }
}

/// Listeners on loopback that accept (TCP) or receive (UDP) until dropped.
pub struct Listeners {
    pub tcp4: SocketAddr,
    pub tcp6: SocketAddr,
    pub udp4: SocketAddr,
    pub udp6: SocketAddr,
    /// A TCP listener on 127.0.0.1 that test policies do not allow.
    pub extra4: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// Pins the calling thread to one CPU (best effort).
pub fn pin_thread(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

impl Listeners {
    pub fn new() -> Self {
        Self::on_cpu(None)
    }

    /// Listeners whose threads run on `cpu` only (the benchmark keeps them off the CPU its
    /// workers are measured on).
    pub fn on_cpu(cpu: Option<usize>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let t4 = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
        let t6 = TcpListener::bind("[::1]:0").expect("binding [::1]");
        let x4 = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
        let u4 = UdpSocket::bind("127.0.0.1:0").expect("binding udp 127.0.0.1");
        let u6 = UdpSocket::bind("[::1]:0").expect("binding udp [::1]");
        let me = Self {
            tcp4: t4.local_addr().expect("addr"),
            tcp6: t6.local_addr().expect("addr"),
            udp4: u4.local_addr().expect("addr"),
            udp6: u6.local_addr().expect("addr"),
            extra4: x4.local_addr().expect("addr"),
            stop: stop.clone(),
        };
        for l in [t4, t6, x4] {
            // A deep accept queue: a burst of connects must never wait for SYN retransmits.
            // SAFETY: listen() on a listening socket we own only changes its backlog.
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
            // Blocking accept: a polling accept loop makes every connect wait for it.
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_thread(cpu);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = l.accept();
                }
            });
        }
        for u in [u4, u6] {
            u.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_thread(cpu);
                let mut buf = [0u8; 64];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = u.recv(&mut buf);
                }
            });
        }
        me
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the blocking accepts so their threads see `stop`.
        for a in [self.tcp4, self.tcp6, self.extra4] {
            let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100));
        }
    }
}

/// The agent binary: ENFORCER_AGENT_BIN (set by `cargo xtask test`) or target/release.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENFORCER_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/enforcer-agent");
    assert!(
        p.exists(),
        "no agent binary at {}: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest as _;
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// A folder for this test's files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(unique(tag));
        fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        Self(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies the probe binary (`env!("CARGO_BIN_EXE_enf-probe")` of the test) to `dst`; with `marker` set, patches the marker's last byte so the copy
/// has another sha256 but the same size.
pub fn copy_probe(probe: &Path, dst: &Path, marker: Option<u8>) {
    let mut bytes = fs::read(probe).expect("reading the probe binary");
    if let Some(m) = marker {
        let pat = b"ENFPROBE-MARKER0";
        let at = bytes
            .windows(pat.len())
            .position(|w| w == pat)
            .expect("the probe binary holds its marker");
        bytes[at + pat.len() - 1] = m;
    }
    fs::write(dst, &bytes).unwrap_or_else(|e| panic!("writing {}: {e}", dst.display()));
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Two workloads in `dir`: `app` (a copy of the probe) and `other` (the same binary with one
/// byte changed: same size, another sha256).
pub fn probe_pair(probe: &Path, dir: &TempDir) -> (PathBuf, PathBuf) {
    let app = dir.path("app");
    let other = dir.path("other");
    copy_probe(probe, &app, None);
    copy_probe(probe, &other, Some(b'1'));
    (app, other)
}

/// Waits until a file's mtime/ctime are older than the agent's racy-timestamp window, so the
/// kernel may cache its identity by inode.
pub fn let_settle() {
    std::thread::sleep(Duration::from_millis(2200));
}

/// How long a probe may take before the test kills it and fails (a held process that is
/// never released must fail the test, not hang it).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `bin args...` inside `cg` (moved there before exec) and returns its exit code.
pub fn run_in(cg: &TestCgroup, bin: &Path, args: &[&str]) -> i32 {
    wait_traced(spawn_in(cg, bin, args)).0
}

/// Spawns `bin args...` inside `cg`.
pub fn spawn_in(cg: &TestCgroup, bin: &Path, args: &[&str]) -> Child {
    spawn_in_as(cg, bin, args, None)
}

/// Runs `bin args...` inside `cg` as `uid` (set before exec) and returns its exit code.
pub fn run_in_as(cg: &TestCgroup, bin: &Path, args: &[&str], uid: u32) -> i32 {
    wait_traced(spawn_in_as(cg, bin, args, Some(uid))).0
}

/// Spawns `bin args...` inside `cg`, optionally as another uid (and gid).
pub fn spawn_in_as(cg: &TestCgroup, bin: &Path, args: &[&str], uid: Option<u32>) -> Child {
    spawn_with(cg, bin, args, uid, Stdio::null())
}

/// Spawns the probe `bin gate args...` inside `cg`: it execs at once (so it is attested as any
/// process is) but runs `args` only when the test calls [`open_gate`]. Tests use it where a
/// process must act after something else happened (the agent is up, `explain` has answered),
/// instead of a fixed delay that races it.
pub fn spawn_gated_in(cg: &TestCgroup, bin: &Path, args: &[&str]) -> Child {
    let mut all = vec!["gate"];
    all.extend_from_slice(args);
    spawn_with(cg, bin, &all, None, Stdio::piped())
}

/// Lets a process from [`spawn_gated_in`] run its command (writes a byte and closes its stdin).
pub fn open_gate(child: &mut Child) {
    use std::io::Write as _;
    let mut stdin = child
        .stdin
        .take()
        .expect("a gated process (spawn_gated_in) whose gate is still closed");
    stdin
        .write_all(b"g")
        .unwrap_or_else(|e| panic!("opening the gate of {}: {e}", child.id()));
}

/// Polls `probe` every 10 ms until it returns `Some`, and panics with `what` and the last
/// state `show` describes after `timeout`. The tests wait for the agent with this, never with
/// a fixed sleep.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long a test waits for something the agent does asynchronously (an event, a metric, a
/// listing) before it fails: far above any normal delay, even in a TCG guest.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until `pid` (a child of ours) is stopped (`T` in /proc/PID/stat), e.g. held by the
/// kernel at exec; panics with `what` after [`AGENT_TIMEOUT`].
pub fn wait_stopped(pid: u32, what: &str) {
    wait_for(
        &format!("{what} (process {pid} stopped)"),
        AGENT_TIMEOUT,
        || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            (state == 'T').then_some(())
        },
    );
}

/// Spawns `bin args...` inside `cg` with its stdin and stdout piped to the test.
pub fn spawn_piped_in(cg: &TestCgroup, bin: &Path, args: &[&str]) -> Child {
    spawn_with_out(cg, bin, args, None, Stdio::piped(), Stdio::piped())
}

fn spawn_with(cg: &TestCgroup, bin: &Path, args: &[&str], uid: Option<u32>, stdin: Stdio) -> Child {
    spawn_with_out(cg, bin, args, uid, stdin, Stdio::null())
}

fn spawn_with_out(
    cg: &TestCgroup,
    bin: &Path,
    args: &[&str],
    uid: Option<u32>,
    stdin: Stdio,
    stdout: Stdio,
) -> Child {
    let procs = cg.dir.join("cgroup.procs");
    let mut c = Command::new(bin);
    c.args(args)
        .env_remove("LD_LIBRARY_PATH")
        .stdin(stdin)
        .stdout(stdout);
    // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
    unsafe {
        let path = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).expect("path");
        c.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid
                && (libc::setgid(uid) != 0 || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn()
        .unwrap_or_else(|e| panic!("spawning {} in {}: {e}", bin.display(), cg.rel))
}

/// Waits for a child and tells whether it was ever stopped (held by the kernel at exec).
/// Kills it (it is ours) and panics after [`PROBE_TIMEOUT`].
pub fn wait_traced(child: Child) -> (i32, bool) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut stopped = false;
    let t0 = Instant::now();
    loop {
        if t0.elapsed() > PROBE_TIMEOUT {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
            panic!(
                "probe {pid} did not finish within {PROBE_TIMEOUT:?} (held and never released?)"
            );
        }
        match waitpid(
            pid,
            Some(WaitPidFlag::WUNTRACED | WaitPidFlag::WCONTINUED | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(2)),
            Ok(WaitStatus::Exited(_, code)) => return (code, stopped),
            Ok(WaitStatus::Signaled(_, sig, _)) => panic!("probe killed by {sig}"),
            // A stop the kernel lifted before we looked is reported as Continued.
            Ok(WaitStatus::Stopped(..) | WaitStatus::Continued(_)) => stopped = true,
            Ok(_) => {}
            Err(e) => panic!("waitpid: {e}"),
        }
    }
}

/// A running agent, started with a policy and its own bpffs pins; stopped (and its pins
/// removed) on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub pin_dir: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: TempDir,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub policy_path: PathBuf,
    /// Extra `run` arguments.
    pub extra: Vec<String>,
    /// Extra environment of the agent process (e.g. `ENFORCER_PROBE_DENY`).
    pub env: Vec<(String, String)>,
    /// Set by [`Agent::start_stdout_unread`]: the read end of the agent's stdout, which
    /// nobody reads (the pipe fills up).
    pub unread_stdout: Option<std::process::ChildStdout>,
    keep_stdout_unread: bool,
    /// Set by [`Agent::start_with_caps`]: the only capabilities the agent may hold (a bit per
    /// capability number), in a session of its own; None: all of root's.
    pub bounding_caps: Option<u64>,
}

impl Agent {
    /// Starts `enforcer-agent run --policy <yaml>` and waits until it says it is ready.
    pub fn start(policy_yaml: &str) -> Self {
        Self::start_with(policy_yaml, &[])
    }

    /// [`Agent::start`] with extra `run` arguments.
    pub fn start_with(policy_yaml: &str, extra: &[&str]) -> Self {
        Self::start_bytes(policy_yaml.as_bytes(), extra)
    }

    /// Starts an agent on a policy given as bytes (YAML or a compiled bundle).
    pub fn start_bytes(policy: &[u8], extra: &[&str]) -> Self {
        Self::start_env(policy, extra, &[])
    }

    /// [`Agent::start_bytes`] with extra environment for the agent process.
    pub fn start_env(policy: &[u8], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut a = Self::unspawned(policy, extra, env);
        a.spawn();
        a
    }

    fn unspawned(policy: &[u8], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let state_dir = TempDir::new("state");
        let policy_path = state_dir.path("policy.yaml");
        fs::write(&policy_path, policy).expect("writing the policy");
        let pin_root = PathBuf::from("/sys/fs/bpf").join(unique("pins"));
        let pin_dir = pin_root.join("v1");
        Self {
            child: None,
            pin_dir,
            pin_root,
            state_dir,
            stdout: Arc::default(),
            stderr: Arc::default(),
            policy_path,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unread_stdout: None,
            keep_stdout_unread: false,
            bounding_caps: None,
        }
    }

    /// Starts an agent that holds only the capabilities in `caps` (bit N = capability N), as
    /// a container given exactly those would: its bounding set is cut to them, its
    /// inheritable and ambient sets emptied, before exec.
    pub fn start_with_caps(policy_yaml: &str, extra: &[&str], caps: u64) -> Self {
        let mut a = Self::unspawned(policy_yaml.as_bytes(), extra, &[]);
        a.bounding_caps = Some(caps);
        a.spawn();
        a
    }

    /// Starts an agent whose stdout is a pipe nobody reads, its capacity cut to one page
    /// (the read end is kept in [`Agent::unread_stdout`]): decision lines fill it quickly.
    pub fn start_stdout_unread(policy_yaml: &str) -> Self {
        let mut a = Self::unspawned(policy_yaml.as_bytes(), &[], &[]);
        a.keep_stdout_unread = true;
        a.spawn();
        a
    }

    /// Bytes waiting in the unread stdout pipe.
    pub fn unread_stdout_bytes(&self) -> usize {
        let pipe = self
            .unread_stdout
            .as_ref()
            .expect("started with start_stdout_unread");
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, on a descriptor we own.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(pipe),
                libc::FIONREAD,
                &raw mut n,
            )
        };
        assert!(r == 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    }

    /// (Re)starts the agent process on the same pins and state.
    pub fn spawn(&mut self) {
        // A restart: wait for this process's "agent ready", not the previous one's.
        let ready_before = self.count_log("agent ready");
        let mut c = Command::new(agent_bin());
        c.arg("run")
            .arg("--policy")
            .arg(&self.policy_path)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir.0)
            .arg("--api-socket")
            .arg(self.api_socket())
            .arg("--unpin-on-exit")
            .args(&self.extra)
            .env("ENFORCER_LOG", "enforcer_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(keep) = self.bounding_caps {
            // SAFETY: the closure makes only async-signal-safe system calls.
            unsafe {
                c.pre_exec(move || {
                    // Its own session, as in a container: the kernel lets any process send
                    // SIGCONT within its session, so only then does resuming held processes
                    // of other users show whether CAP_KILL is there.
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit_capabilities(keep)
                });
            }
        }
        let mut child = c.spawn().expect("spawning enforcer-agent");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        if self.keep_stdout_unread {
            // One page: the smallest pipe, full after a dozen decision lines.
            // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
            let r = unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&out),
                    libc::F_SETPIPE_SZ,
                    4096,
                )
            };
            assert!(r >= 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
            self.unread_stdout = Some(out);
        } else {
            let so = self.stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    so.lock().expect("lock").push(line);
                }
            });
        }
        let se = self.stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                se.lock().expect("lock").push(line);
            }
        });
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if self.count_log("agent ready") > ready_before {
                // Past libtest's capture, so `cargo xtask vm-test` can tabulate start times
                // per kernel and a slow start is visible, not hidden by a timeout.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "vm-test: agent ready in {} ms",
                    t0.elapsed().as_millis()
                );
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the agent exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            if t0.elapsed() > Duration::from_secs(60) {
                panic!("the agent was not ready within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lines of the agent's log (all its runs) that contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.stderr
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// This agent's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.state_dir.path("api.sock")
    }

    /// Runs `enforcer-agent ARGS --api-socket <this agent's>`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let sock = self.api_socket();
        let mut all: Vec<&str> = args.to_vec();
        all.push("--api-socket");
        all.push(sock.to_str().expect("socket path"));
        run_cmd(&agent_bin(), &all)
    }

    /// `cli` with `--json`, parsed; panics with the output when it fails.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "enforcer-agent {args:?} failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("enforcer-agent {args:?}: not JSON ({e}): {out}"))
    }

    /// One counter of `status --json` (kernel counters and the agent's own); panics when
    /// `status` has no counter of that name, so a renamed counter never reads as 0.
    pub fn status_counter(&self, name: &str) -> u64 {
        let status = self.cli_json(&["status"]);
        status["counters"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .and_then(|c| c["value"].as_u64())
            .unwrap_or_else(|| panic!("status has no counter {name}: {status}"))
    }

    /// True when the agent's kernel probe (`status --json`) found `feature`. When it did not,
    /// prints `vm-test: skipped: kernel lacks FEATURE (test TEST)` past the test harness's
    /// output capture (so `cargo xtask vm-test` shows the cell as skipped) and the test returns.
    /// A missing kernel feature is a reason to skip even under CI=true; nothing else is.
    pub fn has_feature(&self, feature: &str, test: &str) -> bool {
        let status = self.cli_json(&["status"]);
        let features = status["features"]
            .as_array()
            .unwrap_or_else(|| panic!("status --json has no `features` list: {status}"));
        let f = features
            .iter()
            .find(|f| f["name"] == feature)
            .unwrap_or_else(|| panic!("the agent probed no feature named {feature:?}: {status}"));
        if f["found"] == true {
            return true;
        }
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "vm-test: skipped: kernel lacks {feature} (test {test}): {}",
            f["detail"]
        );
        false
    }

    pub fn log(&self) -> String {
        self.stderr.lock().expect("lock").join("\n")
    }

    /// Event lines (JSON) the agent printed so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the events the agent printed so far satisfy `done`, and returns them;
    /// panics with `what` and the events after [`AGENT_TIMEOUT`].
    pub fn wait_events(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            let evs = self.events();
            if done(&evs) {
                return evs;
            }
            assert!(
                t0.elapsed() < AGENT_TIMEOUT,
                "no {what} within {AGENT_TIMEOUT:?} in the events {evs:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replaces the policy file and sends SIGHUP (the agent re-reads it, all or nothing).
    pub fn reload(&self, policy_yaml: &str) {
        self.write_policy(policy_yaml);
        let pid = self.child.as_ref().expect("agent running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP to the agent");
    }

    /// Replaces the policy file atomically (write, then rename), as a ConfigMap update does.
    pub fn write_policy(&self, policy_yaml: &str) {
        let tmp = self.policy_path.with_extension("tmp");
        fs::write(&tmp, policy_yaml).expect("writing the policy");
        fs::rename(&tmp, &self.policy_path).expect("renaming the policy into place");
    }

    /// Waits until the agent's log has `n` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, n: usize) {
        let t0 = Instant::now();
        while self.count_log(needle) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent never logged {needle:?} x{n}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up; pins stay.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // An agent blocked on its unread stdout gets EPIPE and can exit.
        self.unread_stdout = None;
        self.stop();
        // Whatever the agent left (it was killed, or failed): detach by removing the pins.
        remove_pins(&self.pin_root);
    }
}

/// Removes a pin tree (links first: that detaches the programs).
pub fn remove_pins(root: &Path) {
    fn rm(p: &Path) {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                let path = e.path();
                if path.is_dir() {
                    rm(&path);
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let _ = fs::remove_dir(p);
    }
    let links = root.join("v1").join("links");
    rm(&links);
    rm(root);
}

/// Reads a process's entry in the pinned `ENF_PROCS` map, if any.
pub fn kernel_proc(pin_dir: &Path, pid: u32) -> Option<enforcer_common::ProcState> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(enforcer_common::MAP_PROCS))
        .expect("opening pinned ENF_PROCS");
    let map: aya::maps::HashMap<_, u32, enforcer_common::ProcState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .expect("ENF_PROCS is a hash map");
    map.get(&pid, 0).ok()
}

/// Whether the pinned `ENF_CGROUPS` map has an entry for cgroup `id` (a cgroup's id is the
/// inode number of its directory in the cgroup2 tree).
pub fn kernel_knows_cgroup(pin_dir: &Path, id: u64) -> bool {
    let data = aya::maps::MapData::from_pin(pin_dir.join(enforcer_common::MAP_CGROUPS))
        .expect("opening pinned ENF_CGROUPS");
    let map: aya::maps::HashMap<_, u64, enforcer_common::CgroupValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .expect("ENF_CGROUPS is a hash map");
    map.get(&id, 0).is_ok()
}

/// The id of the cgroup at `rel` (relative to the cgroup2 root): its directory's inode number.
pub fn cgroup_id_of(rel: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(cgroup2_mount().join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

/// Sum over CPUs of one pinned `ENF_COUNTERS` counter.
pub fn kernel_counter(pin_dir: &Path, c: enforcer_common::Counter) -> u64 {
    let idx = c as u32;
    let data = aya::maps::MapData::from_pin(pin_dir.join(enforcer_common::MAP_COUNTERS))
        .expect("opening pinned ENF_COUNTERS");
    let map: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .expect("ENF_COUNTERS is a per-CPU array");
    map.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run_cmd(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(bin);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait");
    (status.code().unwrap_or(-1), out, err)
}

/// Capability numbers by name (include/uapi/linux/capability.h), as a DaemonSet names them.
pub fn capability_number(name: &str) -> Option<u32> {
    let name = name.trim().trim_start_matches("CAP_").to_ascii_uppercase();
    Some(match name.as_str() {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "DAC_READ_SEARCH" => 2,
        "FOWNER" => 3,
        "KILL" => 5,
        "NET_ADMIN" => 12,
        "IPC_LOCK" => 14,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => return None,
    })
}

/// In a child before exec: drops every capability not in `keep` from the bounding set and
/// empties the inheritable and ambient sets, so that root's exec gets exactly `keep`.
fn limit_capabilities(keep: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        // EINVAL: no such capability on this kernel.
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset with a version-3 header read or write two `Data`, which `data` holds.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // EINVAL: a kernel without ambient capabilities has none to clear.
        let _ = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    Ok(())
}

//! Adversarial tests: held (see main.rs). Attacks main already stopped, kept as tests so they
//! keep holding (issue 12 item 6): io_uring connect, TCP Fast Open, MPTCP, IPv4-mapped
//! addresses, SIGCONT of a held exec while the agent is down, a full process map, a reused
//! pid; and kill -9 / restart of the agent under connect load (item 7).
//!
//! Every test first shows the attack reaching a listener it must not reach with no agent (or
//! in audit mode), then stopped by the enforcing agent, and what the user sees (the deny
//! event's rule and identity, `status` counters, `identities`).

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::FileExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::*;

use crate::common::{ATTACKER_UID, command_as};

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;
/// enf-probe: the kernel lacks the facility (probe_held.rs).
const UNSUPPORTED: i32 = 4;
const APP_ID: &str = "spiffe://test.example.org/app";

/// `app` (the given hash) may reach `allowed` over TCP and nothing else; `denied` is named by
/// an explicit deny entry (so an event names that entry); unattested processes are denied.
fn policy(scope: &str, mode: &str, sha: &str, l: &Listeners) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: {mode}
unattested: deny
scope: ["{scope}"]
identities:
  - name: app
    match:
      - binarySha256: [{sha}]
rules:
  - identity: app
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{tcp4}], protocol: tcp}}
      - to: {{cidr: "::1/128", ports: [{tcp6}], protocol: tcp}}
    deny:
      - to: {{cidr: 127.0.0.1/32, ports: [{extra}]}}
"#,
        tcp4 = l.tcp4.port(),
        tcp6 = l.tcp6.port(),
        extra = l.extra4.port(),
    )
}

struct Setup {
    cg: TestCgroup,
    l: Listeners,
    dir: TempDir,
    app: PathBuf,
    other: PathBuf,
    sha: String,
}

fn setup(tag: &str) -> Setup {
    let cg = TestCgroup::new(tag);
    let l = Listeners::new();
    let dir = TempDir::new(tag);
    let (app, other) = probe_pair(Path::new(PROBE_BIN), &dir);
    let sha = sha256_file(&app);
    Setup {
        cg,
        l,
        dir,
        app,
        other,
        sha,
    }
}

/// Prints past libtest's capture (as `vm-test:` lines and the load numbers must be seen).
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Skips (returns false) for a missing kernel facility, printing why; under CI a facility the
/// host's kernel advertises (`present`) must work.
fn facility(what: &str, test: &str, present: bool) -> bool {
    assert!(
        !(in_ci() && present),
        "{test}: the kernel advertises {what} but the probe could not use it (CI=true forbids skipping)"
    );
    say(&format!(
        "vm-test: skipped: kernel lacks {what} (test {test})"
    ));
    false
}

/// Spawns `bin args` in `cg` as `uid`, stdin and stdout piped (the attacker's process).
fn spawn_piped(cg: &TestCgroup, bin: &Path, args: &[&str], uid: u32) -> Child {
    command_as(cg, bin, args, uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {} in {}: {e}", bin.display(), cg.rel))
}

/// Runs the attacker `bin args` as [`ATTACKER_UID`] in `cg`: (pid, exit code).
fn attack(cg: &TestCgroup, bin: &Path, args: &[&str]) -> (u32, i32) {
    let child = spawn_in_as(cg, bin, args, Some(ATTACKER_UID));
    let pid = child.id();
    (pid, wait_traced(child).0)
}

/// The deny event of process `pid`, waited for.
fn deny_event_of(agent: &Agent, pid: u32, what: &str) -> serde_json::Value {
    let evs = agent.wait_events(what, |evs| {
        evs.iter()
            .any(|e| e["pid"] == pid && e["verdict"] == "deny")
    });
    evs.into_iter()
        .find(|e| e["pid"] == pid && e["verdict"] == "deny")
        .expect("found above")
}

/// Items 1-4: one connect API against the deny entry on `extra4`. With no agent the attacker
/// (the attested binary, uid 65534) reaches the listener; under the enforcing agent the same
/// API still reaches the allowed listener, is refused at the denied one, and the deny event
/// names the identity and the same deny entry a plain connect() gets. `addrs` gives the
/// (allowed, denied) destinations as the API spells them; `present`: the kernel advertises
/// the facility (then it must work under CI).
fn api_is_judged(
    test: &str,
    cmd: &str,
    present: bool,
    addrs: impl Fn(&Listeners) -> (String, String),
) {
    if !require_root(test) {
        return;
    }
    let st = setup(test);
    let (allowed, denied) = addrs(&st.l);
    // Enforcement off: no agent, the attack reaches a listener the policy denies.
    let (_, before) = attack(&st.cg, &st.app, &[cmd, &denied]);
    if before == UNSUPPORTED {
        facility(cmd, test, present);
        return;
    }
    assert_eq!(
        before, OK,
        "{test}: with no agent, `{cmd} {denied}` must reach the listener (else the test proves nothing)"
    );
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", &st.sha, &st.l));
    let (_, ok) = attack(&st.cg, &st.app, &[cmd, &allowed]);
    assert_eq!(
        ok,
        OK,
        "{test}: `{cmd} {allowed}` (allowed) must connect\n{}",
        agent.log()
    );
    let (plain_pid, plain) = attack(&st.cg, &st.app, &["tcp", &st.l.extra4.to_string()]);
    assert_eq!(plain, EPERM, "a plain connect to the denied listener");
    let (pid, got) = attack(&st.cg, &st.app, &[cmd, &denied]);
    assert_eq!(
        got,
        EPERM,
        "{test}: `{cmd} {denied}` must be refused by the kernel\n{}",
        agent.log()
    );
    let plain_ev = deny_event_of(&agent, plain_pid, "the plain connect's deny event");
    let ev = deny_event_of(&agent, pid, &format!("the deny event of `{cmd}`"));
    assert_eq!(ev["identity"], APP_ID, "{ev}");
    assert_eq!(ev["uid"], ATTACKER_UID, "{ev}");
    assert_eq!(ev["sha256"], st.sha.as_str(), "{ev}");
    assert_eq!(ev["port"], st.l.extra4.port(), "{ev}");
    assert_eq!(
        ev["rule"], plain_ev["rule"],
        "`{cmd}` must be judged by the same deny entry as a plain connect: {ev} vs {plain_ev}"
    );
    assert!(agent.status_counter("denied") >= 2);
    let _ = &st.dir;
    say(&format!(
        "held: {test}: no agent: `{cmd} {denied}` connected; enforcing: EPERM; event rule {} identity {} dst {}",
        ev["rule"], ev["identity"], ev["dst"]
    ));
}

fn v4(l: &Listeners) -> (String, String) {
    (l.tcp4.to_string(), l.extra4.to_string())
}

/// Item 6.1: IORING_OP_CONNECT is judged as connect() is.
#[test]
fn io_uring_connect_is_judged() {
    let t = "io_uring_connect_is_judged";
    match fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(s) if s.trim() != "0" => {
            facility(
                &format!("io_uring (kernel.io_uring_disabled={})", s.trim()),
                t,
                false,
            );
        }
        // No sysctl (before 6.6): io_uring is there unless the kernel was built without it,
        // which the probe's io_uring_setup tells.
        _ => api_is_judged(
            t,
            "uring-tcp",
            Path::new("/proc/sys/kernel/io_uring_disabled").exists(),
            v4,
        ),
    }
}

/// Item 6.2: sendto(MSG_FASTOPEN) (TCP Fast Open's implicit connect) is judged as connect().
#[test]
fn tcp_fast_open_is_judged() {
    let t = "tcp_fast_open_is_judged";
    // Bit 0: client Fast Open (the kernel's default). Changed on the host by nobody here.
    let client = fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|v| v & 1 != 0);
    if !client {
        facility(
            "client TCP Fast Open (net.ipv4.tcp_fastopen bit 0 unset)",
            t,
            false,
        );
        return;
    }
    api_is_judged(t, "tfo", true, v4);
}

/// Item 6.3: an MPTCP socket's connect is judged as a TCP connect.
#[test]
fn mptcp_connect_is_judged() {
    let t = "mptcp_connect_is_judged";
    let enabled = fs::read_to_string("/proc/sys/net/mptcp/enabled").is_ok_and(|s| s.trim() == "1");
    api_is_judged(t, "mptcp", enabled, v4);
}

/// Item 6.4: [::ffff:127.0.0.1]:Q on an AF_INET6 socket is judged as 127.0.0.1:Q.
#[test]
fn ipv4_mapped_connect_is_judged() {
    api_is_judged("ipv4_mapped_connect_is_judged", "tcp", true, |l| {
        (
            format!("[::ffff:127.0.0.1]:{}", l.tcp4.port()),
            format!("[::ffff:127.0.0.1]:{}", l.extra4.port()),
        )
    });
}

/// State letter of a process (/proc/PID/stat).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Item 6.5: a never-seen binary exec'd while no agent runs, continued by the attacker with
/// SIGCONT (when the kernel held it), is pending: its connect is denied even though its
/// content is the allowed binary's. A new agent attests it; then it is allowed.
#[test]
fn sigcont_of_held_exec_with_agent_down_stays_pending() {
    let t = "sigcont_of_held_exec_with_agent_down_stays_pending";
    if !require_root(t) {
        return;
    }
    let st = setup("sigcont");
    let tcp4 = st.l.tcp4.to_string();
    // Enforcement off: a never-seen copy reaches the listener at once.
    let first_copy = st.dir.path("fresh0");
    copy_probe(Path::new(PROBE_BIN), &first_copy, None);
    assert_eq!(attack(&st.cg, &first_copy, &["tcp", &tcp4]).1, OK);
    let mut agent = Agent::start(&policy(&st.cg.rel, "enforce", &st.sha, &st.l));
    if !agent.has_feature("btf", t) {
        return;
    }
    assert_eq!(attack(&st.cg, &st.app, &["tcp", &tcp4]).1, OK);
    let pending_before = agent.status_counter("pending");
    agent.kill9();
    // A file the kernel has never seen, with the allowed content, run by the attacker.
    let fresh = st.dir.path("fresh");
    copy_probe(Path::new(PROBE_BIN), &fresh, None);
    let mut child = spawn_piped(&st.cg, &fresh, &["tcp-gate-tcp", &tcp4], ATTACKER_UID);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Held (stopped at exec) or, with no live agent to attest it, left running pending.
    let t0 = Instant::now();
    let mut held = false;
    let first = loop {
        if let Ok(line) = rx.try_recv() {
            break line;
        }
        if !held && proc_state(pid) == Some('T') {
            held = true;
            // The attacker (same uid, another process) continues it.
            let st = Command::new("/bin/sh")
                .args(["-c", &format!("kill -CONT {pid}")])
                .uid(ATTACKER_UID)
                .gid(ATTACKER_UID)
                .status()
                .expect("running kill -CONT as the attacker");
            assert!(st.success(), "the attacker's SIGCONT failed: {st}");
        }
        assert!(
            t0.elapsed() < AGENT_TIMEOUT,
            "the never-seen process neither stopped nor connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        first,
        format!("first={EPERM}"),
        "a pending process (held: {held}) must be denied after the attacker's SIGCONT"
    );
    let k = kernel_proc(&agent.pin_dir, pid).expect("a kernel entry for the pending process");
    assert!(
        k.flags & enforcer_common::PROC_PENDING != 0,
        "pending while no agent runs: {k:?}"
    );
    // A new agent attests it; its next connect is allowed (the policy allows its content).
    agent.spawn();
    wait_for(
        "the new agent attests the pending process",
        AGENT_TIMEOUT,
        || {
            kernel_proc(&agent.pin_dir, pid)
                .filter(|k| k.flags & enforcer_common::PROC_PENDING == 0)
        },
    );
    let ids = agent.cli_json(&["identities"]);
    let me = ids
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pid"] == pid))
        .unwrap_or_else(|| panic!("identities does not list {pid}: {ids}"));
    assert_eq!(me["identity"], APP_ID, "{me}");
    open_gate(&mut child);
    let (second, _) = wait_traced(child);
    assert_eq!(
        second,
        OK,
        "attested by the new agent: allowed\n{}",
        agent.log()
    );
    // What the user sees: the kernel counted the pending deny (counters survive the agent).
    let pending = agent.status_counter("pending");
    assert!(
        pending > pending_before,
        "status must count the pending deny ({pending_before} -> {pending})"
    );
    // The kernel's deny event waited in the pinned ring buffer; the new agent reports it.
    let ev = deny_event_of(
        &agent,
        pid,
        "the pending deny event (read by the new agent)",
    );
    assert_eq!(ev["rule"], "pending attestation", "{ev}");
    assert!(ev["identity"].is_null(), "{ev}");
    assert_eq!(ev["uid"], ATTACKER_UID, "{ev}");
    say(&format!(
        "held: {t}: held at exec: {held}; after the attacker's SIGCONT: EPERM (pending); status pending {pending_before} -> {pending}; deny event after restart: {ev}"
    ));
}

/// Pids no process has (above any pid_max, 2^22): the keys that fill the map.
const FAKE_PID: u32 = 0x4000_0000;

/// Fills the pinned ENF_PROCS with fake entries until the kernel refuses one; returns how
/// many were added.
fn fill_procs(pin_dir: &Path) -> u32 {
    let data = aya::maps::MapData::from_pin(pin_dir.join(enforcer_common::MAP_PROCS))
        .expect("opening pinned ENF_PROCS");
    let mut map: aya::maps::HashMap<_, u32, enforcer_common::ProcState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    let st = enforcer_common::ProcState {
        flags: enforcer_common::PROC_PENDING,
        ..Default::default()
    };
    let mut n = 0;
    while map.insert(&(FAKE_PID + n), &st, 0).is_ok() {
        n += 1;
        assert!(n <= enforcer_common::MAX_PROCS, "ENF_PROCS never filled up");
    }
    n
}

/// Removes the fake entries of [`fill_procs`].
fn unfill_procs(pin_dir: &Path, n: u32) {
    let data = aya::maps::MapData::from_pin(pin_dir.join(enforcer_common::MAP_PROCS))
        .expect("opening pinned ENF_PROCS");
    let mut map: aya::maps::HashMap<_, u32, enforcer_common::ProcState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    for i in 0..n {
        let _ = map.remove(&(FAKE_PID + i));
    }
}

/// Waits until `pid` has an attested (not pending) kernel entry.
fn wait_attested(agent: &Agent, pid: u32) {
    wait_for(&format!("process {pid} attested"), AGENT_TIMEOUT, || {
        kernel_proc(&agent.pin_dir, pid).filter(|k| k.flags & enforcer_common::PROC_PENDING == 0)
    });
}

/// Item 6.6: a process map filled up (as a fork bomb would: MAX_PROCS entries; filled here
/// through the pinned map rather than by 65536 forks on a 2-core machine). A new process gets
/// no entry: in audit mode its connect goes through (the attack), in enforce mode it is
/// denied as untracked and counted (`proc_insert_failed`); processes attested before keep
/// their enforcement (allowed stays allowed, denied stays denied).
#[test]
fn full_process_map_fails_closed() {
    let t = "full_process_map_fails_closed";
    if !require_root(t) {
        return;
    }
    let st = setup("procfull");
    let tcp4 = st.l.tcp4.to_string();
    let extra4 = st.l.extra4.to_string();
    let agent = Agent::start(&policy(&st.cg.rel, "audit", &st.sha, &st.l));
    let_settle();
    // Attested before the map fills: one to an allowed, one to a denied destination.
    let mut keep_ok = spawn_piped(&st.cg, &st.app, &["gate", "tcp", &tcp4], ATTACKER_UID);
    let mut keep_denied = spawn_piped(&st.cg, &st.app, &["gate", "tcp", &extra4], ATTACKER_UID);
    wait_attested(&agent, keep_ok.id());
    wait_attested(&agent, keep_denied.id());
    let failed_before = agent.status_counter("proc_insert_failed");
    let filled = fill_procs(&agent.pin_dir);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Audit (enforcement off): the process the kernel could not record reaches the denied
        // listener.
        let (pid, code) = attack(&st.cg, &st.app, &["tcp", &extra4]);
        assert_eq!(code, OK, "audit mode: the untracked process connects");
        assert!(kernel_proc(&agent.pin_dir, pid).is_none());
        let failed_audit = agent.status_counter("proc_insert_failed");
        assert!(
            failed_audit > failed_before,
            "inserts that failed are counted"
        );
        // Enforce: the same attack, and even the allowed destination, is denied.
        agent.reload(&policy(&st.cg.rel, "enforce", &st.sha, &st.l));
        agent.wait_log("policy reloaded", 1);
        let (pid, code) = attack(&st.cg, &st.app, &["tcp", &tcp4]);
        assert_eq!(
            code,
            EPERM,
            "a process the kernel could not record must be denied (fail closed)\n{}",
            agent.log()
        );
        let ev = deny_event_of(&agent, pid, "the untracked process's deny event");
        assert_eq!(ev["rule"], "untracked process", "{ev}");
        assert!(ev["identity"].is_null(), "{ev}");
        let failed = agent.status_counter("proc_insert_failed");
        assert!(failed > failed_audit, "status counts proc_insert_failed");
        // A fork of an attested process gets no entry either: denied.
        assert_eq!(attack(&st.cg, &st.app, &["fork", "tcp", &tcp4]).1, EPERM);
        // Processes attested before keep their enforcement.
        open_gate(&mut keep_ok);
        open_gate(&mut keep_denied);
        (failed_audit, failed)
    }));
    unfill_procs(&agent.pin_dir, filled);
    let (failed_audit, failed) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = keep_ok.kill();
            let _ = keep_denied.kill();
            let _ = keep_ok.wait();
            let _ = keep_denied.wait();
            std::panic::resume_unwind(e)
        }
    };
    assert_eq!(
        wait_traced(keep_ok).0,
        OK,
        "an attested process stays allowed"
    );
    assert_eq!(
        wait_traced(keep_denied).0,
        EPERM,
        "an attested process stays denied"
    );
    say(&format!(
        "held: {t}: filled ENF_PROCS with {filled} entries; audit: untracked connect allowed; enforce: denied, rule \"untracked process\"; proc_insert_failed {failed_before} -> {failed_audit} -> {failed}"
    ));
}

/// clone3 with `set_tid`: a child with exactly pid `pid` (in the initial pid namespace), which
/// joins `cg`, takes `stdin_fd` as its stdin, drops to [`ATTACKER_UID`] and execs `bin args`.
/// Err(errno) when the pid could not be had (EEXIST: taken).
fn spawn_with_pid(
    pid: u32,
    cg: &TestCgroup,
    bin: &Path,
    args: &[&str],
    stdin_fd: libc::c_int,
) -> Result<u32, i32> {
    use std::ffi::CString;
    let procs =
        CString::new(cg.dir.join("cgroup.procs").as_os_str().as_encoded_bytes()).expect("path");
    let path = CString::new(bin.as_os_str().as_encoded_bytes()).expect("path");
    let argv_c: Vec<CString> = std::iter::once(path.clone())
        .chain(args.iter().map(|a| CString::new(*a).expect("arg")))
        .collect();
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let tids: [libc::pid_t; 1] = [pid as libc::pid_t];
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
    }
    let ca = CloneArgs {
        flags: 0,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
    };
    // SAFETY: clone3 without CLONE_VM is a fork; the child makes only async-signal-safe system
    // calls on memory prepared above, then execs or exits.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &raw const ca, size_of::<CloneArgs>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if r == 0 {
        // SAFETY: in the child: raw system calls only, then execve or _exit.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(120);
            }
            libc::close(fd);
            if libc::dup2(stdin_fd, 0) < 0
                || libc::setgid(ATTACKER_UID) != 0
                || libc::setuid(ATTACKER_UID) != 0
            {
                libc::_exit(121);
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(122);
        }
    }
    Ok(r as u32)
}

/// A descriptor of ours, closed on drop.
struct Closes(libc::c_int);

impl Drop for Closes {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor once.
        unsafe { libc::close(self.0) };
    }
}

/// Exit code of our child `pid` (from [`spawn_with_pid`]).
fn reap(pid: u32) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    assert_eq!(r, pid as libc::pid_t, "waitpid({pid})");
    assert!(libc::WIFEXITED(status), "child {pid}: status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Runs the attested `app` as the attacker, then puts the unattested `other` on the very pid
/// it had (clone3 set_tid, as a pid wrap-around would): (pid, app's code, other's code,
/// identities entry of the pid while `other` runs, if an agent runs).
fn reuse_pid(st: &Setup, agent: Option<&Agent>) -> (u32, i32, i32, Option<serde_json::Value>) {
    let tcp4 = st.l.tcp4.to_string();
    for _ in 0..20 {
        let (pid, app_code) = attack(&st.cg, &st.app, &["tcp", &tcp4]);
        if let Some(a) = agent {
            assert!(
                kernel_proc(&a.pin_dir, pid).is_none(),
                "the exited process's entry is gone"
            );
        }
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (rd, wr) = (fds[0], Closes(fds[1]));
        let r = spawn_with_pid(pid, &st.cg, &st.other, &["gate", "tcp", &tcp4], rd);
        // SAFETY: our own read end, no longer needed here.
        unsafe { libc::close(rd) };
        let got = match r {
            Ok(p) => p,
            Err(libc::EEXIST) => continue, // another process took the pid first: try again
            Err(e) => panic!("clone3(set_tid={pid}): errno {e}"),
        };
        assert_eq!(got, pid, "clone3 set_tid gave another pid");
        let other_sha = sha256_file(&st.other);
        let ids = agent.map(|a| {
            wait_attested(a, pid);
            // The clone runs this test binary until it execs `other`: wait for the exec's
            // attestation, not the fork's (a loaded machine shows the fork first).
            wait_for(
                &format!("process {pid} listed as the program on the reused pid"),
                AGENT_TIMEOUT,
                || {
                    let ids = a.cli_json(&["identities"]);
                    ids.as_array()
                        .and_then(|p| p.iter().find(|p| p["pid"] == pid))
                        .filter(|p| p["sha256"] == other_sha.as_str())
                        .cloned()
                },
            )
        });
        // Opens the gate (EOF); on a panic above, the drop does.
        drop(wr);
        return (pid, app_code, reap(pid), ids);
    }
    panic!("could not reuse a pid in 20 tries");
}

/// Item 6.7: a pid reused by another program does not inherit the identity of the process
/// that had it (the kernel's entry goes at exit; the agent's facts carry the start time).
#[test]
fn reused_pid_does_not_inherit_identity() {
    let t = "reused_pid_does_not_inherit_identity";
    if !require_root(t) {
        return;
    }
    let st = setup("pidreuse");
    // Enforcement off: both connect, the pid is really reused.
    let (_, a, b, _) = reuse_pid(&st, None);
    assert_eq!((a, b), (OK, OK), "with no agent both reach the listener");
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", &st.sha, &st.l));
    let (pid, a, b, ids) = reuse_pid(&st, Some(&agent));
    assert_eq!(a, OK, "the attested program is allowed");
    assert_eq!(
        b, EPERM,
        "the program on the reused pid must not inherit the identity"
    );
    let ids = ids.expect("listed");
    let other_sha = sha256_file(&st.other);
    assert_eq!(ids["sha256"], other_sha.as_str(), "{ids}");
    assert!(ids["identity"].is_null(), "{ids}");
    let evs = agent.wait_events("the reused pid's deny event", |evs| {
        evs.iter()
            .any(|e| e["pid"] == pid && e["verdict"] == "deny")
    });
    let ev = evs
        .iter()
        .find(|e| e["pid"] == pid && e["verdict"] == "deny")
        .expect("found");
    assert!(ev["identity"].is_null(), "{ev}");
    assert_eq!(ev["rule"], "unattested", "{ev}");
    assert_eq!(ev["sha256"], other_sha.as_str(), "{ev}");
    say(&format!(
        "held: {t}: pid {pid}: app allowed, then `other` on the same pid denied (rule {}, identity {})",
        ev["rule"], ev["identity"]
    ));
}

/// Connect counts of one load client per phase: [ok, eperm, other].
type PhaseCounts = std::collections::BTreeMap<u32, [u64; 3]>;

fn parse_load(out: &str) -> PhaseCounts {
    let mut m = PhaseCounts::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["phase", p, "ok", ok, "eperm", ep, "other", ot] = w[..] {
            let n = |s: &str| s.parse::<u64>().expect("a count");
            m.insert(p.parse().expect("a phase"), [n(ok), n(ep), n(ot)]);
        }
    }
    m
}

/// Wall time after which an unset ENFORCER_LOAD_CYCLES stops adding cycles.
const LOAD_BUDGET: Duration = Duration::from_secs(120);

/// Item 7: kill -9 and restart of the agent, ENFORCER_LOAD_CYCLES times (20 by default, fewer
/// past [`LOAD_BUDGET`]; the issue's long run is 100), while an allowed and a denied client (the attested binary, uid
/// 65534, each one long-lived process attested once) connect in tight loops. Phases: 1 =
/// steady state, 2c+2 = cycle c from just before the kill to the new agent's readiness,
/// 2c+3 = cycle c after readiness. Asserted: no denied connect is ever allowed, and no
/// allowed connect is ever denied (neither after readiness nor while no agent runs: the
/// pinned programs and maps decide alone).
#[test]
fn kill9_restart_under_load() {
    let t = "kill9_restart_under_load";
    if !require_root(t) {
        return;
    }
    // ENFORCER_LOAD_CYCLES=N: exactly N cycles. Unset: 20, or fewer (at least 3) when they
    // pass LOAD_BUDGET (a TCG guest is slow), so the suite stays bounded in CI time.
    let fixed: Option<u32> = std::env::var("ENFORCER_LOAD_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok());
    let planned = fixed.unwrap_or(20);
    let st = setup("load");
    // Decision lines go nowhere: tens of thousands of denies a second would fill the test's
    // memory; `status` still counts them.
    let mut agent = Agent::start_with(
        &policy(&st.cg.rel, "enforce", &st.sha, &st.l),
        &["--events-file", "/dev/null"],
    );
    let_settle();
    let phase_path = st.dir.path("phase");
    fs::write(&phase_path, vec![0u8; 4096]).expect("writing the phase file");
    let phase = fs::OpenOptions::new()
        .write(true)
        .open(&phase_path)
        .expect("opening the phase file");
    let set_phase = |p: u32| {
        phase
            .write_at(&p.to_ne_bytes(), 0)
            .expect("writing the phase");
    };
    let phase_arg = phase_path.to_string_lossy().into_owned();
    let spawn = |dst: &str| spawn_piped(&st.cg, &st.app, &["load", &phase_arg, dst], ATTACKER_UID);
    let allowed = spawn(&st.l.tcp4.to_string());
    let denied = spawn(&st.l.extra4.to_string());
    wait_attested(&agent, allowed.id());
    wait_attested(&agent, denied.id());
    set_phase(1);
    std::thread::sleep(Duration::from_millis(300));
    let denied_before = agent.status_counter("denied");
    let t0 = Instant::now();
    let mut ready_ms = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for c in 0..planned {
            if fixed.is_none() && c >= 3 && t0.elapsed() > LOAD_BUDGET {
                break;
            }
            set_phase(2 * c + 2);
            // Every connect counted in the previous phase started before the kill.
            std::thread::sleep(Duration::from_millis(20));
            agent.kill9();
            // No agent at all for a while (longer every few cycles).
            std::thread::sleep(Duration::from_millis(50 + 100 * u64::from(c % 4)));
            let t1 = Instant::now();
            agent.spawn();
            ready_ms.push(t1.elapsed().as_millis() as u64);
            set_phase(2 * c + 3);
            std::thread::sleep(Duration::from_millis(300));
        }
    }));
    set_phase(u32::MAX);
    let elapsed = t0.elapsed();
    let cycles = ready_ms.len() as u32;
    let collect = |child: Child| {
        let out = child.wait_with_output().expect("waiting for a load client");
        assert!(out.status.success(), "a load client failed: {}", out.status);
        parse_load(&String::from_utf8_lossy(&out.stdout))
    };
    let a = collect(allowed);
    let d = collect(denied);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let denied_after = agent.status_counter("denied");
    let sum = |m: &PhaseCounts, f: &dyn Fn(u32) -> bool, k: usize| -> u64 {
        m.iter().filter(|(p, _)| f(**p)).map(|(_, v)| v[k]).sum()
    };
    let all = |_: u32| true;
    let restart = |p: u32| p >= 2 && p.is_multiple_of(2);
    let ready = |p: u32| p >= 3 && !p.is_multiple_of(2);
    let total = sum(&a, &all, 0)
        + sum(&a, &all, 1)
        + sum(&a, &all, 2)
        + sum(&d, &all, 0)
        + sum(&d, &all, 1)
        + sum(&d, &all, 2);
    let mut per_cycle = String::new();
    for c in 0..cycles {
        let (r, y) = (2 * c + 2, 2 * c + 3);
        let g = |m: &PhaseCounts, p: u32| m.get(&p).copied().unwrap_or_default();
        per_cycle.push_str(&format!(
            "cycle {c}: ready in {} ms; restart window: allowed {:?} denied {:?}; after ready: allowed {:?} denied {:?}\n",
            ready_ms.get(c as usize).copied().unwrap_or(0),
            g(&a, r),
            g(&d, r),
            g(&a, y),
            g(&d, y)
        ));
    }
    let summary = format!(
        "held: {t}: {cycles} cycles in {:.1} s; {total} connects ({:.0}/s); allowed client: ok {} eperm {} (restart windows {}, after ready {}) other {}; denied client: eperm {} ok {} other {}; agent ready in {}..{} ms (mean {} ms); kernel `denied` counter +{}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        sum(&a, &all, 0),
        sum(&a, &all, 1),
        sum(&a, &restart, 1),
        sum(&a, &ready, 1),
        sum(&a, &all, 2),
        sum(&d, &all, 1),
        sum(&d, &all, 0),
        sum(&d, &all, 2),
        ready_ms.iter().min().unwrap_or(&0),
        ready_ms.iter().max().unwrap_or(&0),
        ready_ms.iter().sum::<u64>() / u64::from(cycles.max(1)),
        denied_after - denied_before,
    );
    say(&per_cycle);
    say(&summary);
    assert_eq!(
        sum(&d, &all, 0),
        0,
        "denied connects were allowed\n{per_cycle}"
    );
    assert_eq!(
        sum(&a, &ready, 1),
        0,
        "allowed connects were denied after a restart\n{per_cycle}"
    );
    assert_eq!(
        sum(&a, &restart, 1),
        0,
        "allowed connects were denied while the agent was down or restarting (a product bug)\n{per_cycle}"
    );
    // The load ran through every cycle (a connect may stall a phase on a dropped SYN's
    // 1 s retransmit when the machine is loaded, so per cycle, not per phase).
    for c in 0..cycles {
        for (m, name, k) in [(&a, "allowed", 0), (&d, "denied", 1)] {
            let n: u64 = [2 * c + 2, 2 * c + 3]
                .iter()
                .filter_map(|p| m.get(p))
                .map(|v| v[k])
                .sum();
            assert!(
                n > 0,
                "cycle {c}: the {name} client made no connect: the load did not run\n{per_cycle}"
            );
        }
    }
    assert!(
        sum(&a, &ready, 0) > 0 && sum(&d, &ready, 1) > 0,
        "no connect after any restart\n{per_cycle}"
    );
}

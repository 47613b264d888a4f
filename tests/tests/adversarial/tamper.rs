//! Adversarial tests: tamper (see main.rs). SECURITY.md guarantee 4: a process another one
//! attaches to with ptrace, writes into (`/proc/PID/mem`, `process_vm_writev`) or takes
//! descriptors from (`pidfd_getfd`) loses its identity until it execs again untraced.
//!
//! The service (`enf-probe victim`, attested by its sha256) keeps the port it is about to
//! connect to in memory; the attacker, another binary of the same uid (65534) in the same
//! cgroup, rewrites that port. With no agent the service then connects where the attacker
//! chose; with the enforcing agent that connect is denied (rule `tampered`), the tamper event
//! names both processes, `identities` shows the service tampered, an untouched copy of the
//! service still connects, and the tampered one gets its identity back when it execs again.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
};

use enforcer_common::PROC_TAMPERED;
use enforcer_tests::*;

use crate::common::{ATTACKER_UID, command_as};

const SPIFFE: &str = "spiffe://test.example.org/svc";

/// How the attacker tampers with the service.
#[derive(Clone, Copy, Debug)]
enum Attack {
    ProcMem,
    VmWritev,
    PtraceAttach,
    PtraceSeize,
    /// pidfd_getfd of the service's socket, connected by the attacker.
    StealFd,
}

impl Attack {
    /// What the tamper event's `syscall` says.
    fn syscall(self) -> &'static str {
        match self {
            Self::ProcMem => "open /proc/PID/mem for writing",
            Self::VmWritev => "process_vm_writev",
            Self::PtraceAttach | Self::PtraceSeize => "ptrace",
            Self::StealFd => "pidfd_getfd",
        }
    }
}

fn policy(scope: &str, sha: &str, ports: [u16; 2]) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: enforce
unattested: deny
scope: ["{scope}"]
identities:
  - name: svc
    match:
      - binarySha256: [{sha}]
rules:
  - identity: svc
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{}, {}], protocol: tcp}}
"#,
        ports[0], ports[1]
    )
}

/// A running `enf-probe victim` of uid [`ATTACKER_UID`].
struct Victim {
    child: Option<Child>,
    out: BufReader<ChildStdout>,
    pid: u32,
    /// Address of the port in its memory (hex).
    addr: String,
    /// Its unconnected TCP socket.
    fd: String,
}

impl Victim {
    fn spawn(cg: &TestCgroup, bin: &Path, port: u16, then: &[&str]) -> Self {
        let mut args = vec!["victim".to_string(), port.to_string()];
        args.extend(then.iter().map(|s| s.to_string()));
        let mut child = command_in(cg, bin, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the victim {}: {e}", bin.display()));
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line)
            .expect("reading the victim's ready line");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 4 && f[0] == "ready",
            "victim said {line:?} instead of `ready PID ADDR FD`"
        );
        assert_eq!(f[1], child.id().to_string(), "victim pid");
        Self {
            pid: child.id(),
            addr: f[2].to_string(),
            fd: f[3].to_string(),
            child: Some(child),
            out,
        }
    }

    /// Opens the gate: the victim connects to the port now in its memory. Returns (port,
    /// exit code of that connect: 0 connected, 13 denied) and the process's exit code (its
    /// re-exec's, when it had one).
    fn release(&mut self) -> ((u16, i32), i32) {
        let mut child = self.child.take().expect("released once");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"g")
            .expect("opening the victim's gate");
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .expect("reading the victim's first line");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 3 && f[0] == "first",
            "victim said {line:?} instead of `first PORT CODE`"
        );
        let first = (
            f[1].parse().expect("port"),
            f[2].parse().expect("exit code"),
        );
        (first, wait_traced(child).0)
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `bin args` in `cg` as [`ATTACKER_UID`] (moved and demoted before exec).
fn command_in(cg: &TestCgroup, bin: &Path, args: &[String]) -> Command {
    let mut c = command_as(cg, bin, args, ATTACKER_UID);
    c.stderr(Stdio::inherit());
    c
}

/// Runs the attack on `v` (redirect it to `port`); returns (attacker pid, exit code).
fn attack(cg: &TestCgroup, attacker: &Path, how: Attack, v: &Victim, port: u16) -> (u32, i32) {
    let p = port.to_string();
    let pid = v.pid.to_string();
    let args: Vec<String> = match how {
        Attack::ProcMem => vec!["poke-mem".into(), pid, v.addr.clone(), p],
        Attack::VmWritev => vec!["poke-vm".into(), pid, v.addr.clone(), p],
        Attack::PtraceAttach => vec![
            "poke-ptrace".into(),
            "attach".into(),
            pid,
            v.addr.clone(),
            p,
        ],
        Attack::PtraceSeize => vec!["poke-ptrace".into(), "seize".into(), pid, v.addr.clone(), p],
        Attack::StealFd => vec![
            "steal-fd".into(),
            pid,
            v.fd.clone(),
            format!("127.0.0.1:{port}"),
        ],
    };
    let child = command_in(cg, attacker, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning the attacker: {e}"));
    let id = child.id();
    (id, wait_traced(child).0)
}

/// The service `svc` and the attacker's binary `other` (one byte changed), world-readable
/// in a world-searchable folder: uid 65534 runs them, and a process whose executable it may
/// not read would not be dumpable (ptrace would then fail for another reason).
fn binaries(dir: &TempDir) -> (PathBuf, PathBuf) {
    let probe = Path::new(env!("CARGO_BIN_EXE_enf-probe"));
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    probe_pair(probe, dir)
}

fn identity_of(agent: &Agent, pid: u32) -> Option<serde_json::Value> {
    let ids = agent.cli_json(&["identities"]);
    ids.as_array()?.iter().find(|p| p["pid"] == pid).cloned()
}

fn scenario(how: Attack, test: &str) {
    if !require_root(test) {
        return;
    }
    let l = Listeners::new();
    let (allowed, target) = (l.tcp4.port(), l.extra4.port());
    let cg = TestCgroup::new("tamper");
    let dir = TempDir::new("tamper");
    let (svc, attacker) = binaries(&dir);
    let_settle();

    // 1. No enforcement: the attack redirects the service (or the stolen socket connects).
    {
        let mut v = Victim::spawn(&cg, &svc, allowed, &[]);
        let (_, code) = attack(&cg, &attacker, how, &v, target);
        assert_eq!(
            code, 0,
            "{how:?} without an agent: the attack itself must work"
        );
        let (first, _) = v.release();
        let want = match how {
            Attack::StealFd => allowed, // the stolen socket was the attacker's to connect
            _ => target,
        };
        assert_eq!(
            first,
            (want, 0),
            "{how:?} without an agent: the service connects where the attacker chose"
        );
    }

    // 2. The enforcing agent.
    let agent = Agent::start(&policy(&cg.rel, &sha256_file(&svc), [allowed, target]));
    assert!(
        agent.has_feature("tamper_hook", test),
        "the tamper hook is there on this kernel"
    );
    let mut v = Victim::spawn(
        &cg,
        &svc,
        allowed,
        &["tcp", &format!("127.0.0.1:{allowed}")],
    );
    let mut control = Victim::spawn(&cg, &svc, allowed, &[]);
    for pid in [v.pid, control.pid] {
        let t0 = std::time::Instant::now();
        while identity_of(&agent, pid).is_none_or(|p| p["identity"] != SPIFFE) {
            assert!(
                t0.elapsed() < AGENT_TIMEOUT,
                "process {pid} never attested as svc: {:?}, kernel {:?}\n{}",
                identity_of(&agent, pid),
                kernel_proc(&agent.pin_dir, pid),
                agent.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let tampered_before = agent.status_counter("tampered");
    let (by, code) = attack(&cg, &attacker, how, &v, target);
    match how {
        // The stolen socket's connect is judged as the caller: the attacker, unattested.
        Attack::StealFd => assert_eq!(code, 13, "the attacker's connect on a stolen socket"),
        _ => assert_eq!(code, 0, "{how:?}: the kernel still lets the attack through"),
    }

    // The kernel marked the service, and says who did what.
    let st = kernel_proc(&agent.pin_dir, v.pid).expect("the victim's ENF_PROCS entry");
    assert_ne!(
        st.flags & PROC_TAMPERED,
        0,
        "{how:?}: victim not marked: {st:?}"
    );
    let evs = agent.wait_events("the tamper event", |evs| {
        evs.iter()
            .any(|e| e["event"] == "tamper" && e["pid"] == v.pid)
    });
    let ev = evs
        .iter()
        .find(|e| e["event"] == "tamper" && e["pid"] == v.pid)
        .expect("tamper event");
    assert_eq!(ev["by_pid"], by, "{ev}");
    assert_eq!(ev["by_uid"], ATTACKER_UID, "{ev}");
    assert_eq!(ev["syscall"], how.syscall(), "{ev}");
    assert_eq!(ev["identity"], SPIFFE, "the identity it held: {ev}");
    assert_eq!(ev["sha256"], sha256_file(&svc), "{ev}");
    assert!(agent.status_counter("tampered") > tampered_before);
    let p = identity_of(&agent, v.pid).expect("victim listed");
    assert_eq!(p["tampered"], true, "{p}");
    assert!(p["identity"].is_null(), "{p}");
    assert!(
        p["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("tampered")),
        "{p}"
    );
    let c = identity_of(&agent, control.pid).expect("control listed");
    assert_eq!(c["identity"], SPIFFE, "the untouched service keeps it: {c}");

    // Its connect is denied as tampered; the untouched copy still connects; the re-exec
    // (not traced) has the identity back and connects.
    let (first, after_exec) = v.release();
    let want = match how {
        Attack::StealFd => allowed,
        _ => target,
    };
    assert_eq!(first, (want, 13), "{how:?}: the tampered service is denied");
    assert_eq!(
        after_exec, 0,
        "{how:?}: after an untraced exec it is svc again"
    );
    assert_eq!(control.release().0, (allowed, 0), "the untouched service");
    let evs = agent.wait_events("the tampered deny", |evs| {
        evs.iter().any(|e| {
            e["pid"] == v.pid
                && e["verdict"] == "deny"
                && e["rule"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("tampered"))
        })
    });
    if matches!(how, Attack::StealFd) {
        assert!(
            evs.iter()
                .any(|e| e["pid"] == by && e["verdict"] == "deny" && e["rule"] == "unattested"),
            "the stolen socket's connect is the attacker's: {evs:?}"
        );
    }
}

#[test]
fn tamper_proc_mem_write() {
    scenario(Attack::ProcMem, "tamper_proc_mem_write");
}

#[test]
fn tamper_process_vm_writev() {
    scenario(Attack::VmWritev, "tamper_process_vm_writev");
}

#[test]
fn tamper_ptrace_attach_poke() {
    scenario(Attack::PtraceAttach, "tamper_ptrace_attach_poke");
}

#[test]
fn tamper_ptrace_seize_poke() {
    scenario(Attack::PtraceSeize, "tamper_ptrace_seize_poke");
}

#[test]
fn tamper_pidfd_getfd() {
    scenario(Attack::StealFd, "tamper_pidfd_getfd");
}

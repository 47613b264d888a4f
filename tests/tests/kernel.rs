//! Real-kernel tests: the real agent and kernel programs, cgroups created here, real binaries
//! (copies of `enf-probe`) connecting to listeners on 127.0.0.1 and ::1 over TCP and UDP.
//! Exit codes of the probe: 0 = connected/sent, 13 = EPERM from the kernel.

use std::{fs, path::Path, time::Duration};

use enforcer_tests::*;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;

/// A policy with identity `app` = the given hash, allowed to tcp4/udp6 listener ports.
fn policy(scope: &str, mode: &str, unattested: &str, sha: &str, l: &Listeners) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: {mode}
unattested: {unattested}
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
      - to: {{cidr: "::1/128", ports: [{udp6}], protocol: udp}}
      - to: {{cidr: 127.0.0.0/8, ports: [{udp4}], protocol: udp}}
    deny:
      - to: {{cidr: 127.0.0.2/32}}
"#,
        tcp4 = l.tcp4.port(),
        tcp6 = l.tcp6.port(),
        udp6 = l.udp6.port(),
        udp4 = l.udp4.port(),
    )
}

struct Setup {
    cg: TestCgroup,
    l: Listeners,
    dir: TempDir,
    app: std::path::PathBuf,
    other: std::path::PathBuf,
}

/// A cgroup, listeners, `app` (the allowed binary, settled so the kernel caches it) and
/// `other` (the same binary with one byte changed).
fn setup(tag: &str) -> Setup {
    let cg = TestCgroup::new(tag);
    let l = Listeners::new();
    let dir = TempDir::new(tag);
    let (app, other) = probe_pair(Path::new(PROBE_BIN), &dir);
    Setup {
        cg,
        l,
        dir,
        app,
        other,
    }
}

fn s(a: std::net::SocketAddr) -> String {
    a.to_string()
}

/// Exec re-attests: `app` exec'ing `other` is judged as `other` (unattested: denied), never
/// with the identity of the program before it; `other` exec'ing `app` gains `app`'s identity.
fn assert_exec_reattests(st: &Setup, tcp4: &str) {
    let other = st.other.to_string_lossy().into_owned();
    assert_eq!(
        run_in(&st.cg, &st.app, &["exec", &other, "tcp", tcp4]),
        EPERM,
        "exec must re-attest: the new program never keeps the identity of the one before it"
    );
    let app = st.app.to_string_lossy().into_owned();
    assert_eq!(
        run_in(&st.cg, &st.other, &["exec", &app, "tcp", tcp4]),
        OK,
        "exec of the allowed binary gains its identity"
    );
}

#[test]
fn enforce_tcp_udp_ipv4_ipv6() {
    if !require_root("enforce_tcp_udp_ipv4_ipv6") {
        return;
    }
    let st = setup("v4v6");
    let sha = sha256_file(&st.app);
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    let l = &st.l;
    let wrong_tcp4 = format!("127.0.0.1:{}", l.tcp6.port());
    let mapped_ok = format!("[::ffff:127.0.0.1]:{}", l.tcp4.port());
    let mapped_udp_ok = format!("[::ffff:127.0.0.1]:{}", l.udp4.port());
    let mapped_bad = format!("[::ffff:127.0.0.1]:{}", l.tcp6.port());
    let denied_host = format!("127.0.0.2:{}", l.udp4.port());
    let cases: Vec<(&str, String, i32)> = vec![
        ("tcp", s(l.tcp4), OK),
        ("tcp", s(l.tcp6), OK),
        ("tcp", wrong_tcp4, EPERM),
        ("tcp", s(l.extra4), EPERM),
        ("udp", s(l.udp6), OK),
        ("sendto", s(l.udp6), OK),
        ("udp", s(l.udp4), OK),
        ("sendto", s(l.udp4), OK),
        // protocol matters: the tcp4 port over udp is not allowed
        ("sendto", format!("127.0.0.1:{}", l.tcp4.port()), EPERM),
        // IPv4-mapped IPv6 is judged as the IPv4 address it carries
        ("tcp", mapped_ok, OK),
        ("tcp", mapped_bad, EPERM),
        ("udp", mapped_udp_ok.clone(), OK),
        ("sendto", mapped_udp_ok, OK),
        // a deny entry wins over the 127.0.0.0/8 allow
        ("sendto", denied_host, EPERM),
    ];
    for (cmd, addr, want) in &cases {
        let got = run_in(&st.cg, &st.app, &[cmd, addr]);
        assert_eq!(
            got,
            *want,
            "app {cmd} {addr}: got exit {got}, want {want}\n{}",
            agent.log()
        );
    }
    // The same binary with one byte changed is unattested, and unattested is denied.
    for (cmd, addr) in [
        ("tcp", s(l.tcp4)),
        ("udp", s(l.udp6)),
        ("sendto", s(l.udp4)),
    ] {
        let got = run_in(&st.cg, &st.other, &[cmd, &addr]);
        assert_eq!(
            got,
            EPERM,
            "modified copy {cmd} {addr} must be denied\n{}",
            agent.log()
        );
    }
    // Outside the scope nothing is enforced.
    let outside = std::process::Command::new(&st.other)
        .args(["tcp", &s(l.tcp4)])
        .status()
        .expect("running the probe outside the scope");
    assert_eq!(
        outside.code(),
        Some(OK),
        "a process outside the scope must not be judged"
    );
    // Deny events name the identity and the rule.
    let is_app_deny = |e: &serde_json::Value| {
        e["verdict"] == "deny" && e["identity"] == "spiffe://test.example.org/app"
    };
    let is_unattested_deny = |e: &serde_json::Value| {
        e["verdict"] == "deny" && e["identity"].is_null() && e["rule"] == "unattested"
    };
    let evs = agent.wait_events("deny events for app and for the unattested copy", |evs| {
        evs.iter().any(is_app_deny) && evs.iter().any(is_unattested_deny)
    });
    let deny = evs
        .iter()
        .find(|e| e["verdict"] == "deny" && e["identity"] == "spiffe://test.example.org/app")
        .unwrap_or_else(|| panic!("no deny event for the app identity in {evs:?}"));
    for key in [
        "pid", "exe", "sha256", "cgroup", "uid", "dst", "port", "protocol", "rule",
    ] {
        assert!(!deny[key].is_null(), "event key {key} missing in {deny}");
    }
    assert_eq!(deny["sha256"], sha.as_str());
    assert!(
        evs.iter().any(|e| e["verdict"] == "deny"
            && e["identity"].is_null()
            && e["rule"] == "unattested"),
        "no unattested deny event in {evs:?}"
    );
}

#[test]
fn audit_mode_allows_and_reports() {
    if !require_root("audit_mode_allows_and_reports") {
        return;
    }
    let st = setup("audit");
    let sha = sha256_file(&st.app);
    let agent = Agent::start(&policy(&st.cg.rel, "audit", "deny", &sha, &st.l));
    let bad = s(st.l.extra4);
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &bad]),
        OK,
        "audit mode must not deny"
    );
    assert_eq!(
        run_in(&st.cg, &st.other, &["sendto", &s(st.l.udp4)]),
        OK,
        "audit mode must not deny unattested"
    );
    let would_deny = |e: &serde_json::Value| {
        e["verdict"] == "audit" && e["port"] == st.l.extra4.port() && e["protocol"] == "tcp"
    };
    let unattested = |e: &serde_json::Value| {
        e["verdict"] == "audit" && e["identity"].is_null() && e["protocol"] == "udp"
    };
    agent.wait_events(
        "audit events for the would-be deny and for the unattested sendto",
        |evs| evs.iter().any(would_deny) && evs.iter().any(unattested),
    );
}

/// 5a: identity from the very first connect after exec, for a file the kernel knows by inode
/// (never held) and for a file never seen before (held at exec until attested).
#[test]
fn identity_in_force_at_first_connect_after_exec() {
    if !require_root("identity_in_force_at_first_connect_after_exec") {
        return;
    }
    let st = setup("exec");
    let sha = sha256_file(&st.app);
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    if !agent.has_feature("btf", "identity_in_force_at_first_connect_after_exec") {
        return;
    }
    let held = || kernel_counter(&agent.pin_dir, enforcer_common::Counter::Held);
    let tcp4 = s(st.l.tcp4);
    // A file never seen before: a fresh copy with the allowed content, new inode.
    let fresh = st.dir.path("fresh");
    copy_probe(Path::new(PROBE_BIN), &fresh, None);
    let before = held();
    assert_eq!(
        run_in(&st.cg, &fresh, &["tcp", &tcp4]),
        OK,
        "a never-seen copy of the allowed binary must be allowed at its first connect"
    );
    assert_eq!(
        held() - before,
        1,
        "a never-seen binary must be held at exec until attested"
    );
    // A file the kernel knows: settle it, run it once (attested and cached by inode), then
    // again: allowed with no hold at all, the kernel resolved it at exec.
    let known = st.dir.path("known");
    copy_probe(Path::new(PROBE_BIN), &known, None);
    let_settle();
    assert_eq!(run_in(&st.cg, &known, &["tcp", &tcp4]), OK);
    let before = held();
    for _ in 0..5 {
        assert_eq!(
            run_in(&st.cg, &known, &["tcp", &tcp4]),
            OK,
            "a known binary must be allowed at its first connect"
        );
    }
    assert_eq!(
        held(),
        before,
        "a known binary must not be held: its identity is resolved in the kernel at exec"
    );
    // And the kernel denies a never-seen unattested binary from its first connect too.
    let fresh_bad = st.dir.path("fresh-bad");
    copy_probe(Path::new(PROBE_BIN), &fresh_bad, Some(b'7'));
    assert_eq!(run_in(&st.cg, &fresh_bad, &["tcp", &tcp4]), EPERM);
}

/// 5c: a binary rewritten in place (same inode, same size) after attestation does not keep
/// the old identity.
#[test]
fn rewritten_in_place_loses_identity() {
    if !require_root("rewritten_in_place_loses_identity") {
        return;
    }
    let st = setup("rewrite");
    let sha = sha256_file(&st.app);
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    if !agent.has_feature("btf", "rewritten_in_place_loses_identity") {
        return;
    }
    let tcp4 = s(st.l.tcp4);
    let target = st.dir.path("target");
    copy_probe(Path::new(PROBE_BIN), &target, None);
    let_settle();
    assert_eq!(run_in(&st.cg, &target, &["tcp", &tcp4]), OK);
    let before = kernel_counter(&agent.pin_dir, enforcer_common::Counter::Held);
    assert_eq!(run_in(&st.cg, &target, &["tcp", &tcp4]), OK);
    assert_eq!(
        kernel_counter(&agent.pin_dir, enforcer_common::Counter::Held),
        before,
        "the settled file should be known to the kernel by now"
    );
    // Rewrite in place: same inode, same size, one byte different.
    let ino_before = fs::metadata(&target)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("stat");
    let new = fs::read(&st.other).expect("reading other");
    {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open for rewrite");
        f.write_all(&new).expect("rewrite");
    }
    let ino_after = fs::metadata(&target)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("stat");
    assert_eq!(ino_before, ino_after, "the rewrite must keep the inode");
    assert_eq!(
        run_in(&st.cg, &target, &["tcp", &tcp4]),
        EPERM,
        "rewritten file kept the old identity"
    );
    // Even once settled (cacheable again), the new content never gets the old identity.
    let_settle();
    assert_eq!(run_in(&st.cg, &target, &["tcp", &tcp4]), EPERM);
    assert_eq!(run_in(&st.cg, &target, &["tcp", &tcp4]), EPERM);
}

/// 5d: a child keeps its parent's identity until it execs; exec re-attests; an exited
/// process's kernel entry is gone at once.
#[test]
fn fork_inherits_exec_reattests_exit_removes() {
    if !require_root("fork_inherits_exec_reattests_exit_removes") {
        return;
    }
    let st = setup("fork");
    let sha = sha256_file(&st.app);
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    if !agent.has_feature("btf", "fork_inherits_exec_reattests_exit_removes") {
        return;
    }
    let tcp4 = s(st.l.tcp4);
    // forked child of app, no exec: app's identity
    assert_eq!(
        run_in(&st.cg, &st.app, &["fork", "tcp", &tcp4]),
        OK,
        "a forked child keeps its parent's identity"
    );
    assert_exec_reattests(&st, &tcp4);
    // A forked child of an unattested parent stays unattested.
    assert_eq!(run_in(&st.cg, &st.other, &["fork", "tcp", &tcp4]), EPERM);
    // exit removes the entry at once
    let mut child = spawn_in(&st.cg, &st.app, &["sleep", "30"]);
    let pid = child.id();
    let t0 = std::time::Instant::now();
    while kernel_proc(&agent.pin_dir, pid)
        .is_none_or(|p| p.flags & enforcer_common::PROC_PENDING != 0)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no attested kernel entry for a live process"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("killing our probe");
    child.wait().expect("reaping our probe");
    assert!(
        kernel_proc(&agent.pin_dir, pid).is_none(),
        "the entry of an exited process must be gone at once"
    );
}

/// 5e: kill -9 of the agent leaves enforcement in force (links are pinned); a never-seen
/// binary started meanwhile is not held (no agent would release it) but runs pending, every
/// connect denied; a restarted agent takes over and attests it.
#[test]
fn kill9_keeps_enforcement_and_restart_takes_over() {
    if !require_root("kill9_keeps_enforcement_and_restart_takes_over") {
        return;
    }
    let st = setup("kill9");
    let sha = sha256_file(&st.app);
    let mut agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    if !agent.has_feature("btf", "kill9_keeps_enforcement_and_restart_takes_over") {
        return;
    }
    let tcp4 = s(st.l.tcp4);
    let_settle();
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), OK);
    assert_eq!(run_in(&st.cg, &st.other, &["tcp", &tcp4]), EPERM);
    agent.kill9();
    // Still enforced with no agent at all.
    assert_eq!(
        run_in(&st.cg, &st.other, &["tcp", &tcp4]),
        EPERM,
        "kill -9 of the agent must not lift a deny"
    );
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        OK,
        "a known binary keeps its identity without the agent"
    );
    // A never-seen binary with no agent alive is not held (nobody would release it): it runs
    // pending, and every connect it makes is denied until an agent attests it.
    let fresh = st.dir.path("fresh");
    copy_probe(Path::new(PROBE_BIN), &fresh, None);
    let counter = |c| kernel_counter(&agent.pin_dir, c);
    let (held0, skipped0) = (
        counter(enforcer_common::Counter::Held),
        counter(enforcer_common::Counter::HoldSkipped),
    );
    assert_eq!(
        run_in(&st.cg, &fresh, &["tcp", &tcp4]),
        EPERM,
        "a never-seen binary exec'd while the agent is down must be denied (pending)"
    );
    assert_eq!(
        counter(enforcer_common::Counter::Held),
        held0,
        "with no live agent the kernel must not hold (the process would stay frozen)"
    );
    assert!(
        counter(enforcer_common::Counter::HoldSkipped) > skipped0,
        "the skipped hold must be counted"
    );
    // The same binary, alive when a new agent starts: attested, then allowed.
    let mut child = spawn_gated_in(&st.cg, &fresh, &["tcp", &tcp4]);
    let pid = child.id();
    wait_for(
        "the gated probe's exec recorded as pending",
        AGENT_TIMEOUT,
        || {
            kernel_proc(&agent.pin_dir, pid)
                .filter(|p| p.flags & enforcer_common::PROC_PENDING != 0)
                .map(|_| ())
        },
    );
    agent.spawn();
    wait_for(
        "the restarted agent attests the pending process",
        AGENT_TIMEOUT,
        || {
            kernel_proc(&agent.pin_dir, pid)
                .filter(|p| p.flags & enforcer_common::PROC_PENDING == 0)
                .map(|_| ())
        },
    );
    open_gate(&mut child);
    let (code, _) = wait_traced(child);
    assert_eq!(
        code,
        OK,
        "the restarted agent must attest the process that ran pending\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("taking over pinned kernel state"),
        "{}",
        agent.log()
    );
    assert_eq!(run_in(&st.cg, &st.other, &["tcp", &tcp4]), EPERM);
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), OK);
}

/// 5f: bad input gets one clear sentence, changes nothing, never panics.
#[test]
fn bad_input_is_refused_clearly() {
    let dir = TempDir::new("bad");
    let bin = agent_bin();
    let bad = dir.path("bad.yaml");
    fs::write(
        &bad,
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: x.org\nbogus: 1\nrules:\n  - identity: nobody\n    egress:\n      - to: {cidr: 10.0.0.1/8, ports: [70000]}\n",
    )
    .expect("write");
    let (code, _, err) = run_cmd(&bin, &["policy", "check", bad.to_str().expect("path")]);
    assert_eq!(code, 1, "{err}");
    let name = bad.display().to_string();
    for (line, what) in [(4, "bogus"), (6, "nobody"), (8, "10.0.0.1/8"), (8, "70000")] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("{name}:{line}:")) && l.contains(what)),
            "no FILE:{line}:COL diagnostic mentioning {what} in:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    // compile refuses the same file and writes nothing
    let out = dir.path("out.bundle");
    let (code, _, err) = run_cmd(
        &bin,
        &[
            "policy",
            "compile",
            bad.to_str().expect("path"),
            "-o",
            out.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(!out.exists(), "a rejected policy must not produce a bundle");
    // missing file, bad flag, bad pid
    let (code, _, err) = run_cmd(&bin, &["policy", "check", "/nonexistent/p.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/p.yaml") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = run_cmd(&bin, &["run", "--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = run_cmd(&bin, &["attest", "--pid", "notanumber"]);
    assert_eq!(code, 2, "{err}");
    // a good policy compiles, and the bundle checks back through `run --policy` parsing
    let good = dir.path("good.yaml");
    fs::write(
        &good,
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: x.org\nmode: audit\n",
    )
    .expect("write");
    let (code, _, err) = run_cmd(
        &bin,
        &[
            "policy",
            "compile",
            good.to_str().expect("p"),
            "-o",
            out.to_str().expect("p"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.exists());
}

/// A policy the agent refuses at start leaves nothing behind (no pins, no attachment).
#[test]
fn rejected_policy_changes_nothing() {
    if !require_root("rejected_policy_changes_nothing") {
        return;
    }
    let dir = TempDir::new("reject");
    let p = dir.path("p.yaml");
    let pins = Path::new("/sys/fs/bpf").join(unique("rejected"));
    let pin_dir = pins.join("v1");
    let state = dir.path("s");
    // Runs the agent on `p` with `extra` flags: it must exit 1 and leave no pin behind.
    let refused = |extra: &[&str]| -> String {
        let mut args = vec![
            "run",
            "--policy",
            p.to_str().expect("p"),
            "--bpffs-dir",
            pin_dir.to_str().expect("p"),
            "--state-dir",
            state.to_str().expect("p"),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = run_cmd(&agent_bin(), &args);
        let left = pins.exists();
        remove_pins(&pins);
        assert!(!left, "a refused policy left pins under {}", pins.display());
        assert_eq!(code, 1, "{err}");
        err
    };
    fs::write(&p, "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: x.org\nscope: [\"/no-such-cgroup-enftest\"]\n").expect("w");
    let err = refused(&[]);
    assert!(err.contains("no-such-cgroup-enftest"), "{err}");

    // More rule entries than --max-rules gives room for: refused before the kernel is touched.
    let cg = TestCgroup::new("reject-big");
    let egress: String = (1..=10)
        .map(|i| format!("      - to: {{cidr: 10.0.0.{i}/32, ports: [80]}}\n"))
        .collect();
    fs::write(&p, format!("apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: x.org\nscope: [\"{}\"]\nidentities:\n  - name: a\n    match:\n      - uid: [4242]\nrules:\n  - identity: a\n    egress:\n{egress}", cg.rel)).expect("w");
    let err = refused(&["--max-rules", "8"]);
    assert!(
        err.contains("more than 8 kernel rule entries") && err.contains("--max-rules"),
        "{err}"
    );
}

/// Two policies that give `app` and `other` the same verdicts but swap their identity
/// numbers: a connect that saw the new identity numbers with the old rules (or the reverse)
/// would be denied.
fn swap_policy(scope: &str, app_sha: &str, other_sha: &str, port: u16, app_first: bool) -> String {
    let app = format!("  - name: app\n    match:\n      - binarySha256: [{app_sha}]\n");
    let other = format!("  - name: other\n    match:\n      - binarySha256: [{other_sha}]\n");
    let ids = if app_first {
        format!("{app}{other}")
    } else {
        format!("{other}{app}")
    };
    // Bulk, so writing a generation takes a while: a non-atomic apply would be seen.
    let bulk: String = (0..3000)
        .map(|i| {
            format!(
                "      - to: {{cidr: 10.{}.{}.0/24, ports: [9], protocol: udp}}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmode: enforce\nunattested: deny\nscope: [\"{scope}\"]\nidentities:\n{ids}rules:\n  - identity: app\n    egress:\n      - to: {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}\n{bulk}  - identity: other\n    deny:\n      - to: {{cidr: 127.0.0.1/32}}\n"
    )
}

/// Applying a policy is atomic: connects running through many applies never see a mix of
/// the old and the new policy; a rejected policy changes nothing.
#[test]
fn policy_apply_is_atomic_and_all_or_nothing() {
    if !require_root("policy_apply_is_atomic_and_all_or_nothing") {
        return;
    }
    let st = setup("apply");
    let app_sha = sha256_file(&st.app);
    let other_sha = sha256_file(&st.other);
    let port = st.l.tcp4.port();
    let p1 = swap_policy(&st.cg.rel, &app_sha, &other_sha, port, true);
    let p2 = swap_policy(&st.cg.rel, &app_sha, &other_sha, port, false);
    let agent = Agent::start(&p1);
    let tcp4 = s(st.l.tcp4);
    // One process connecting until told to stop while 20 applies swap the identity
    // numbering under it (it stops at its first denied connect).
    let stop = st.dir.path("stop");
    let stop_s = stop.to_string_lossy().into_owned();
    let allowed = || kernel_counter(&agent.pin_dir, enforcer_common::Counter::Allow);
    let before = allowed();
    let mut looper = spawn_in(&st.cg, &st.app, &["loop-until", &stop_s, "tcp", &tcp4]);
    // The swaps start once the looper is connecting (the kernel counts its allows).
    wait_for("the looper's first allowed connects", AGENT_TIMEOUT, || {
        (allowed() >= before + 10).then_some(())
    });
    let mut ended = None;
    for i in 0..20 {
        agent.reload(if i % 2 == 0 { &p2 } else { &p1 });
        agent.wait_log("policy reloaded", i + 1);
        if let Some(status) = looper.try_wait().expect("try_wait") {
            ended = Some(status.code().unwrap_or(-1)); // denied: reported below
            break;
        }
    }
    fs::write(&stop, b"").expect("creating the stop file");
    let code = match ended {
        Some(code) => code,
        None => wait_traced(looper).0,
    };
    assert_eq!(
        code,
        OK,
        "a connect saw half of a policy during an apply\n{}",
        agent.log()
    );
    assert_eq!(run_in(&st.cg, &st.other, &["tcp", &tcp4]), EPERM);
    // A rejected policy (bad CIDR) leaves the policy in force untouched.
    agent.reload("apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nrules:\n  - identity: app\n    egress:\n      - to: {cidr: 300.1.1.1/8}\n");
    agent.wait_log("policy rejected", 1);
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        OK,
        "a rejected policy must change nothing"
    );
    assert_eq!(
        run_in(&st.cg, &st.other, &["tcp", &tcp4]),
        EPERM,
        "a rejected policy must change nothing"
    );
    // A policy naming a missing scope cgroup is rejected too, nothing changes.
    agent.reload(&swap_policy(
        "/no-such-cgroup-enftest",
        &app_sha,
        &other_sha,
        port,
        true,
    ));
    agent.wait_log("policy rejected", 2);
    assert_eq!(run_in(&st.cg, &st.other, &["tcp", &tcp4]), EPERM);
    // A good new policy takes effect: now `other` may connect and `app` may not.
    let p3 = swap_policy(&st.cg.rel, &other_sha, &app_sha, port, true);
    agent.reload(&p3);
    agent.wait_log("policy reloaded", 21);
    assert_eq!(run_in(&st.cg, &st.other, &["tcp", &tcp4]), OK);
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
}

/// cgroup and uid selectors: the same binary is an identity only in the named cgroups (a
/// cgroup created after the agent started included) and only as the named uid.
#[test]
fn cgroup_and_uid_selectors() {
    if !require_root("cgroup_and_uid_selectors") {
        return;
    }
    let st = setup("sel");
    let cg_b = TestCgroup::new("sel-b");
    let app_sha = sha256_file(&st.app);
    let other_sha = sha256_file(&st.other);
    let port = st.l.tcp4.port();
    let a = &st.cg.rel;
    let b = &cg_b.rel;
    let yaml = format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmode: enforce\nunattested: deny\nscope: [\"{a}\", \"{b}\"]\nidentities:\n  - name: in-a\n    match:\n      - binarySha256: [{app_sha}]\n        cgroup: [\"{a}/**\"]\n  - name: as-1000\n    match:\n      - binarySha256: [{other_sha}]\n        uid: [1000]\nrules:\n  - identity: in-a\n    egress:\n      - to: {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}\n  - identity: as-1000\n    egress:\n      - to: {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}\n"
    );
    let agent = Agent::start(&yaml);
    let tcp4 = s(st.l.tcp4);
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        OK,
        "app in its cgroup\n{}",
        agent.log()
    );
    assert_eq!(
        run_in(&cg_b, &st.app, &["tcp", &tcp4]),
        EPERM,
        "app outside its cgroup is unattested"
    );
    // A cgroup created after the agent started, below the allowed one.
    let sub = st.cg.child("sub");
    assert_eq!(
        run_in(&sub, &st.app, &["tcp", &tcp4]),
        OK,
        "app in a new sub-cgroup of its cgroup\n{}",
        agent.log()
    );
    assert_eq!(run_in(&sub, &st.other, &["tcp", &tcp4]), EPERM);
    // uid selector
    assert_eq!(
        run_in_as(&cg_b, &st.other, &["tcp", &tcp4], 1000),
        OK,
        "other as uid 1000\n{}",
        agent.log()
    );
    assert_eq!(
        run_in(&cg_b, &st.other, &["tcp", &tcp4]),
        EPERM,
        "other as root is unattested"
    );
    assert_eq!(
        run_in_as(&cg_b, &st.other, &["tcp", &tcp4], 1001),
        EPERM,
        "other as uid 1001 is unattested"
    );
    drop(sub);
}

/// Processes already running when the agent starts are attested too.
#[test]
fn processes_running_before_the_agent_are_attested() {
    if !require_root("processes_running_before_the_agent_are_attested") {
        return;
    }
    let st = setup("prior");
    let sha = sha256_file(&st.app);
    let tcp4 = s(st.l.tcp4);
    // Started (and exec'd) before any agent; they connect only when the test opens their
    // gate, after the agent is up and answers `status` (never after a fixed delay, which a
    // slow start would outrun).
    let mut early_app = spawn_gated_in(&st.cg, &st.app, &["tcp", &tcp4]);
    let mut early_other = spawn_gated_in(&st.cg, &st.other, &["tcp", &tcp4]);
    let agent = Agent::start(&policy(&st.cg.rel, "enforce", "deny", &sha, &st.l));
    assert!(
        agent.log().contains("attested running processes"),
        "{}",
        agent.log()
    );
    let status = agent.cli_json(&["status"]);
    assert!(
        status["attached"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["program"] == "cgroup/connect4"
                && a["target"].as_str().is_some_and(|t| t.contains(&st.cg.rel)))),
        "connect4 must be attached to the scope before the gates open: {status}"
    );
    open_gate(&mut early_app);
    open_gate(&mut early_other);
    let (app_code, _) = wait_traced(early_app);
    let (other_code, _) = wait_traced(early_other);
    assert_eq!(
        app_code,
        OK,
        "a process started before the agent keeps its identity\n{}",
        agent.log()
    );
    assert_eq!(
        other_code, EPERM,
        "an unattested process started before the agent is denied"
    );
}

/// `to: {identity: db}`: allowed exactly where a process of identity db listens, for as long
/// as it listens.
#[test]
fn identity_destination_follows_listeners() {
    if !require_root("identity_destination_follows_listeners") {
        return;
    }
    let st = setup("todb");
    let db = st.dir.path("db");
    copy_probe(Path::new(PROBE_BIN), &db, Some(b'2'));
    let (app_sha, db_sha) = (sha256_file(&st.app), sha256_file(&db));
    let yaml = format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmode: enforce\nunattested: deny\nscope: [\"{}\"]\nidentities:\n  - name: api\n    match:\n      - binarySha256: [{app_sha}]\n  - name: db\n    match:\n      - binarySha256: [{db_sha}]\nrules:\n  - identity: api\n    egress:\n      - to: {{identity: db, protocol: tcp}}\n",
        st.cg.rel
    );
    let agent = Agent::start(&yaml);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dst = format!("127.0.0.1:{port}");
    // Nothing of identity db listens yet: denied by the kernel.
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &dst]), EPERM);
    // db listens (outside the enforced scope; tracked node-wide).
    let mut server = std::process::Command::new(&db)
        .args(["listen", &dst, "30"])
        .spawn()
        .expect("starting the db probe");
    agent.wait_log("identity destinations updated", 1);
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &dst]),
        OK,
        "api may reach db's listener\n{}",
        agent.log()
    );
    assert_eq!(
        run_in(&st.cg, &st.other, &["tcp", &dst]),
        EPERM,
        "an unattested process may not"
    );
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &s(st.l.extra4)]),
        EPERM,
        "a listener that is not db's"
    );
    // db stops listening: the rule goes away (EPERM, not a refused connection).
    server.kill().expect("stopping our db probe");
    server.wait().expect("reaping our db probe");
    agent.wait_log("identity destinations updated", 2);
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &dst]),
        EPERM,
        "db is gone: nothing to allow"
    );
}

/// Without usable kernel BTF (forced with the `ENFORCER_PROBE_DENY=btf` test knob, which can
/// only take trust away) the agent starts, says what it loses, and still fails closed: every
/// exec is held until the agent hashes it, a known binary is then allowed, an unknown one
/// denied, an exec never keeps the old program's identity, and a forked child with no exec
/// is denied.
#[test]
fn without_btf_every_exec_is_held_and_enforcement_holds() {
    if !require_root("without_btf_every_exec_is_held_and_enforcement_holds") {
        return;
    }
    let st = setup("nobtf");
    let sha = sha256_file(&st.app);
    let yaml = policy(&st.cg.rel, "enforce", "deny", &sha, &st.l);
    let agent = Agent::start_env(yaml.as_bytes(), &[], &[("ENFORCER_PROBE_DENY", "btf")]);
    let status = agent.cli_json(&["status"]);
    let btf = status["features"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "btf"))
        .unwrap_or_else(|| panic!("status --json lists no btf feature: {status}"));
    assert_eq!(btf["found"], false, "{btf}");
    assert!(
        btf["without"].as_str().is_some_and(|w| w.contains("held")),
        "status must say what the agent does without BTF: {btf}"
    );
    assert!(
        agent.log().contains("lacks btf"),
        "the agent must log the degradation:\n{}",
        agent.log()
    );
    let (code, out, _) = agent.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("btf") && out.contains("MISSING"), "{out}");

    let held = || kernel_counter(&agent.pin_dir, enforcer_common::Counter::Held);
    let tcp4 = s(st.l.tcp4);
    let_settle();
    for round in 0..3 {
        let before = held();
        assert_eq!(
            run_in(&st.cg, &st.app, &["tcp", &tcp4]),
            OK,
            "round {round}: the allowed binary must be allowed once attested\n{}",
            agent.log()
        );
        assert_eq!(
            held() - before,
            1,
            "round {round}: without BTF even a known file must be held at exec (the kernel cannot recognise it)"
        );
    }
    assert_eq!(
        run_in(&st.cg, &st.other, &["tcp", &tcp4]),
        EPERM,
        "an unknown binary must stay denied without BTF"
    );
    assert_exec_reattests(&st, &tcp4);
    assert_eq!(
        run_in(&st.cg, &st.app, &["fork", "tcp", &tcp4]),
        EPERM,
        "without BTF a forked child that does not exec has no kernel entry: denied (fail closed)"
    );
}

/// When the kernel verifier refuses a program, the agent's loader names the program, its
/// type and the kernel release, and carries the verifier's own words. `enf_reject` (in the
/// test object, never in the production one) reads past the end of its context on purpose.
#[test]
fn rejected_program_prints_name_kernel_and_verifier_log() {
    if !require_root("rejected_program_prints_name_kernel_and_verifier_log") {
        return;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease")
        .trim()
        .to_string();
    let check = |msg: &str| {
        for needle in [
            enforcer_common::PROG_REJECT,
            "cgroup_sock_addr",
            release.as_str(),
            "invalid bpf_context access",
            "verifier log",
            "5.10 or later",
        ] {
            assert!(msg.contains(needle), "no {needle:?} in:\n{msg}");
        }
    };
    // The library's loader, as the agent calls it.
    let object = enforcer_tests::test_object().unwrap_or_else(|e| panic!("{e}"));
    let err =
        enforcer_agent::kernel::load_sock_addr_program_from(object, enforcer_common::PROG_REJECT)
            .expect_err("the verifier must reject enf_reject");
    check(&err.to_string());
    // The agent binary prints it as one error on stderr and exits 1.
    let file = std::env::temp_dir().join(format!("enforcer-test-obj-{}", std::process::id()));
    fs::write(&file, object).expect("writing the test object");
    let file_arg = file.to_string_lossy().into_owned();
    let (code, _, stderr) = run_cmd(
        &agent_bin(),
        &["load-program", "enf_reject", "--object", &file_arg],
    );
    let _ = fs::remove_file(&file);
    assert_eq!(code, 1, "{stderr}");
    check(&stderr);
    // The production object does not hold it.
    let (code, _, stderr) = run_cmd(&agent_bin(), &["load-program", "enf_reject"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("enf_reject"), "{stderr}");
    // The same loader accepts a real program, and leaves no pin behind.
    let (code, _, stderr) = run_cmd(&agent_bin(), &["load-program", "enf_connect4"]);
    assert_eq!(code, 0, "{stderr}");
    let leftover: Vec<_> = fs::read_dir("/sys/fs/bpf")
        .expect("reading /sys/fs/bpf")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("enforcer-load-")
        })
        .map(|e| e.path())
        .collect();
    assert!(leftover.is_empty(), "scratch pins left: {leftover:?}");
}

/// A kernel that lacks a required feature is refused before anything is loaded, with one
/// message naming the feature, the kernel release and the minimum supported kernel.
#[test]
fn missing_required_feature_refuses_to_start() {
    if !require_root("missing_required_feature_refuses_to_start") {
        return;
    }
    let (code, out, err) = run_cmd(&agent_bin(), &["probe", "--json"]);
    assert_eq!(code, 0, "this kernel must be supported: {out}\n{err}");
    let probe: serde_json::Value = serde_json::from_str(&out).expect("probe --json is JSON");
    assert_eq!(probe["supported"], true, "{probe}");
    let release = probe["release"].as_str().expect("release").to_string();
    let dir = TempDir::new("refuse");
    let policy_path = dir.path("p.yaml");
    fs::write(
        &policy_path,
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.example.org\nmode: audit\n",
    )
    .expect("writing the policy");
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("refuse"));
    let out = std::process::Command::new(agent_bin())
        .arg("run")
        .arg("--policy")
        .arg(&policy_path)
        .arg("--bpffs-dir")
        .arg(pins.join("v1"))
        .arg("--state-dir")
        .arg(dir.path("state"))
        .arg("--api-socket")
        .arg(dir.path("api.sock"))
        .env("ENFORCER_PROBE_DENY", "map_ringbuf")
        .output()
        .expect("running the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let pinned = pins.exists();
    remove_pins(&pins);
    assert!(!out.status.success(), "must refuse: {stderr}");
    for needle in [
        "map_ringbuf",
        release.as_str(),
        "5.10",
        "nothing was loaded",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "one clear message: {stderr}"
    );
    assert!(!pinned, "nothing may be pinned: {}", pins.display());
}

/// `systemdUnit`: the unit that owns the process's cgroup, derived from the cgroup path by the
/// agent, gives the identity in the kernel (through the cgroup's class): any binary in the
/// unit and in a sub-cgroup the unit delegates; nothing in another unit or outside any unit.
#[test]
fn systemd_unit_selector_from_the_cgroup_path() {
    if !require_root("systemd_unit_selector_from_the_cgroup_path") {
        return;
    }
    let st = setup("unit");
    let me = std::process::id();
    let unit = format!("enftest-web-{me}.service");
    let web = st.cg.child(&unit);
    let worker = web.child("worker");
    let db = st.cg.child(&format!("enftest-db-{me}.service"));
    let tcp4 = s(st.l.tcp4);
    let yaml = format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmode: enforce\nunattested: deny\nscope: [\"{}\"]\nidentities:\n  - name: web\n    match:\n      - systemdUnit: [\"enftest-web-*.service\"]\nrules:\n  - identity: web\n    egress:\n      - to: {{cidr: 127.0.0.1/32, ports: [{}], protocol: tcp}}\n",
        st.cg.rel,
        st.l.tcp4.port()
    );
    let agent = Agent::start(&yaml);
    for (cg, want, what) in [
        (&web, OK, "a process of the unit"),
        (&worker, OK, "a process in a sub-cgroup the unit delegates"),
        (&db, EPERM, "a process of another unit"),
        (&st.cg, EPERM, "a process outside any unit"),
    ] {
        for bin in [&st.app, &st.other] {
            assert_eq!(
                run_in(cg, bin, &["tcp", &tcp4]),
                want,
                "{what} ({}, {})\n{}",
                cg.rel,
                bin.display(),
                agent.log()
            );
        }
    }
    // The identity is the unit's, and `attest` shows the unit to paste into a policy.
    let mut sleeper = spawn_in(&worker, &st.app, &["sleep", "20"]);
    let listed = wait_for("the unit's process in `identities`", AGENT_TIMEOUT, || {
        let ids = agent.cli_json(&["identities"]);
        ids.as_array()?
            .iter()
            .find(|p| p["pid"] == sleeper.id())
            .cloned()
    });
    assert_eq!(listed["identity"], "spiffe://t.org/web", "{listed}");
    let (code, out, err) = run_cmd(
        &agent_bin(),
        &["attest", "--pid", &sleeper.id().to_string(), "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let a: serde_json::Value = serde_json::from_str(&out).expect("attest --json");
    assert_eq!(a["systemd_unit"], unit.as_str(), "{a}");
    sleeper.kill().expect("kill our sleeper");
    sleeper.wait().expect("reap");
}

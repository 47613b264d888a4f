//! Adversarial tests: loader (see main.rs). Code that the environment makes the loader or a
//! runtime load (`LD_PRELOAD`, `LD_AUDIT`, `LD_LIBRARY_PATH`, `NODE_OPTIONS`, ...) must not run
//! with the identity of the attested program (SECURITY.md guarantee 3).
//!
//! `svc` (tests/loader-c/svc.c, built by tests/build.rs) is a small dynamically linked C
//! program allowed to reach 127.0.0.1:P; `evil.so` (evil.c) connects to 127.0.0.1:P from its
//! constructor, before svc's main, and exits 42 (connected) or 43 (EPERM). The attacker runs
//! as [`ATTACKER_UID`] in svc's cgroup.

#[cfg(loader_c)]
mod with_c {
    use std::{
        collections::HashMap,
        fs,
        net::TcpListener,
        os::unix::fs::PermissionsExt as _,
        path::{Path, PathBuf},
        process::Stdio,
    };

    use enforcer_tests::*;

    use crate::common::{ATTACKER_UID, command_as};

    const SVC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/loader/svc"));
    const HELPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/loader/libhelper.so"));
    const EVIL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/loader/evil.so"));

    /// Exit codes: svc's own connect, and evil.so's constructor.
    const OK: i32 = 0;
    const EPERM: i32 = 13;
    const EVIL_CONNECTED: i32 = 42;
    const EVIL_DENIED: i32 = 43;

    struct Files {
        dir: TempDir,
        svc: PathBuf,
        evil: PathBuf,
        /// A folder holding a rogue `libhelper.so` (evil.so under svc's library's name).
        evil_lib: PathBuf,
    }

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    }

    fn files() -> Files {
        let dir = TempDir::new("loader");
        let open = |p: &Path| {
            fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        };
        open(&dir.0);
        open(&dir.path("lib"));
        open(&dir.path("evil"));
        let svc = dir.path("svc");
        write(&svc, SVC, 0o755);
        write(&dir.path("lib/libhelper.so"), HELPER, 0o755);
        let evil = dir.path("evil.so");
        write(&evil, EVIL, 0o755);
        write(&dir.path("evil/libhelper.so"), EVIL, 0o755);
        let evil_lib = dir.path("evil");
        Files {
            dir,
            svc,
            evil,
            evil_lib,
        }
    }

    /// Runs `bin args` in `cg` as the attacker, with exactly `env` (plus PATH).
    fn run_env(cg: &TestCgroup, bin: &Path, args: &[&str], env: &[(&str, String)]) -> i32 {
        wait_traced(spawn_env(cg, bin, args, env)).0
    }

    fn spawn_env(
        cg: &TestCgroup,
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> std::process::Child {
        let mut c = command_as(cg, bin, args, ATTACKER_UID);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn()
            .unwrap_or_else(|e| panic!("spawning {} in {}: {e}", bin.display(), cg.rel))
    }

    fn policy(scope: &str, sha: &str, port: u16) -> String {
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
      - to: {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}
"#
        )
    }

    /// `policy` with `preload: [HASH...]` on svc's match entry.
    fn policy_preload(scope: &str, sha: &str, port: u16, preload: &[&str]) -> String {
        policy(scope, sha, port).replace(
            &format!("      - binarySha256: [{sha}]\n"),
            &format!(
                "      - binarySha256: [{sha}]\n        preload: [{}]\n",
                preload.join(", ")
            ),
        )
    }

    /// The `preload:` grant (SECURITY.md guarantee 3): an LD_PRELOAD whose file root alone can
    /// change and whose sha256 svc's entry lists keeps svc's identity; anything else withholds
    /// it as before.
    #[test]
    fn preload_grant_by_sha256() {
        if !require_root("preload_grant_by_sha256") {
            return;
        }
        let f = files();
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let p = port.to_string();
        let cg = TestCgroup::new("preload");
        let svc = &f.svc;
        // The granted object: svc's own harmless library, in a folder only root can change.
        let good = f.dir.path("lib/libhelper.so");
        let good_s = good.to_string_lossy().into_owned();
        let good_sha = sha256_file(&good);
        let evil_s = f.evil.to_string_lossy().into_owned();
        let evil_sha = sha256_file(&f.evil);
        // The same bytes where the attacker can swap them: a folder of its own, and a
        // root-owned copy in it.
        let mine = f.dir.path("mine");
        fs::create_dir_all(&mine).expect("mkdir");
        write(&mine.join("good.so"), HELPER, 0o755);
        std::os::unix::fs::chown(&mine, Some(ATTACKER_UID), Some(ATTACKER_UID)).expect("chown");
        let swappable = mine.join("good.so").to_string_lossy().into_owned();
        assert_eq!(sha256_file(&mine.join("good.so")), good_sha);

        let with_good = || vec![("LD_PRELOAD", good_s.clone())];
        let with_evil = || vec![("LD_PRELOAD", evil_s.clone()), ("EVIL_PORT", p.clone())];
        // Enforcement off: the preloads load (good is harmless, evil connects).
        assert_eq!(run_env(&cg, svc, &[&p], &with_good()), OK, "svc with good");
        assert_eq!(
            run_env(&cg, svc, &[&p], &with_evil()),
            EVIL_CONNECTED,
            "without enforcement evil.so connects (else this test proves nothing)"
        );

        let_settle();
        let sha = sha256_file(svc);
        let mut agent = Agent::start(&policy(&cg.rel, &sha, port));
        // Without `preload:` the good preload withholds svc's identity.
        assert_eq!(
            run_env(&cg, svc, &[&p], &with_good()),
            EPERM,
            "without preload: an LD_PRELOAD withholds the identity\n{}",
            agent.log()
        );
        // A second identity for a long-lived process, to read `identities` of a grant.
        let sleep = Path::new("/bin/sleep");
        let sleeper = format!(
            "  - name: sleeper\n    match:\n      - binarySha256: [{}]\n        preload: [{good_sha}]\nrules:\n",
            sha256_file(sleep)
        );
        let granting =
            policy_preload(&cg.rel, &sha, port, &[&good_sha]).replacen("rules:\n", &sleeper, 1);
        agent.reload(&granting);
        agent.wait_log("policy reloaded", 1);
        // (a) Listed: svc keeps its identity, twice (held and attested, then known).
        for round in 0..2 {
            assert_eq!(
                run_env(&cg, svc, &[&p], &with_good()),
                OK,
                "round {round}: a granted preload keeps the identity\n{}",
                agent.log()
            );
        }
        assert_eq!(run_env(&cg, svc, &[&p], &[]), OK, "plain svc");
        // `identities` shows the grant of a live process.
        let mut live = spawn_env(&cg, sleep, &["30"], &with_good());
        let pid = u64::from(live.id());
        let (identity, reason) =
            wait_for("the granted process in `identities`", AGENT_TIMEOUT, || {
                let ids = agent.cli_json(&["identities"]);
                let p = ids
                    .as_array()?
                    .iter()
                    .find(|p| p["pid"].as_u64() == Some(pid))?
                    .clone();
                let r = p["reason"].as_str()?.to_string();
                r.contains("preload granted")
                    .then_some((p["identity"].clone(), r))
            });
        let _ = live.kill();
        let _ = live.wait();
        assert!(
            identity.as_str().is_some_and(|i| i.ends_with("/sleeper")),
            "{identity} {reason}"
        );
        assert!(
            reason.contains(&format!("preload granted: {good_s} sha256 {good_sha}")),
            "{reason}"
        );
        // (b) Not listed: withheld, and the reason names the file and its hash.
        assert_eq!(
            run_env(&cg, svc, &[&p], &with_evil()),
            EVIL_DENIED,
            "an unlisted preload must not get svc's identity\n{}",
            agent.log()
        );
        assert_eq!(
            run_env(
                &cg,
                svc,
                &[&p],
                &[
                    ("LD_PRELOAD", format!("{good_s}:{evil_s}")),
                    ("EVIL_PORT", p.clone())
                ]
            ),
            EVIL_DENIED,
            "one unlisted preload among listed ones withholds\n{}",
            agent.log()
        );
        let not_granted =
            format!("withheld: LD_PRELOAD {evil_s} sha256 {evil_sha} not in preload: of svc");
        agent.wait_events("the deny event naming the unlisted preload", |evs| {
            evs.iter()
                .any(|e| e["verdict"] == "deny" && e["rule"] == not_granted.as_str())
        });
        // (c) The granted bytes where the attacker can swap them between the hash and
        // ld.so's open: refused, whatever the content.
        assert_eq!(
            run_env(&cg, svc, &[&p], &[("LD_PRELOAD", swappable.clone())]),
            EPERM,
            "a preload in a folder the attacker owns must withhold\n{}",
            agent.log()
        );
        assert!(
            agent
                .log()
                .contains("only a file that root alone can change"),
            "the log says why\n{}",
            agent.log()
        );
        // Another loader variable next to a granted preload withholds.
        assert_eq!(
            run_env(
                &cg,
                svc,
                &[&p],
                &[
                    ("LD_PRELOAD", good_s.clone()),
                    ("LD_LIBRARY_PATH", f.evil_lib.to_string_lossy().into_owned()),
                    ("EVIL_PORT", p.clone()),
                ]
            ),
            EVIL_DENIED,
            "LD_LIBRARY_PATH beside a granted preload\n{}",
            agent.log()
        );
        // A bare name (searched by ld.so) is refused.
        assert_eq!(
            run_env(&cg, svc, &[&p], &[("LD_PRELOAD", "libhelper.so".into())]),
            EPERM,
            "a bare LD_PRELOAD name withholds\n{}",
            agent.log()
        );
        // (d) No agent alive: nothing holds the exec, so nothing can grant: withheld.
        agent.kill9();
        assert_eq!(
            run_env(&cg, svc, &[&p], &with_good()),
            EPERM,
            "with the agent dead a preload withholds (fail closed)"
        );
        assert_eq!(run_env(&cg, svc, &[&p], &[]), OK, "plain svc, agent dead");
        drop(agent);
        drop(listener);
        drop(f.dir);
    }

    /// An environment too large for the kernel to read at exec is read by the agent while the
    /// exec is held; a process another one continues (SIGCONT) before that read has run
    /// ld.so, and evil.so rewrites the environment (hides LD_PRELOAD): it must stay withheld.
    #[test]
    fn sigcont_before_the_environment_is_read_withholds() {
        if !require_root("sigcont_before_the_environment_is_read_withholds") {
            return;
        }
        let f = files();
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let p = port.to_string();
        let cg = TestCgroup::new("sigcont-env");
        let svc = &f.svc;
        let fillers: Vec<String> = (0..200).map(|i| format!("FILLER_{i:03}")).collect();
        let mut env: Vec<(&str, String)> =
            fillers.iter().map(|n| (n.as_str(), "x".into())).collect();
        env.push(("LD_PRELOAD", f.evil.to_string_lossy().into_owned()));
        env.push(("EVIL_PORT", p.clone()));
        env.push(("EVIL_REWRITE", "1".into()));
        // Enforcement off: evil.so connects.
        assert_eq!(
            run_env(&cg, svc, &[&p], &env),
            EVIL_CONNECTED,
            "no enforcement"
        );

        let_settle();
        let sha = sha256_file(svc);
        let agent = Agent::start(&policy(&cg.rel, &sha, port));
        let agent_pid =
            nix::unistd::Pid::from_raw(agent.child.as_ref().expect("agent").id() as i32);
        // The agent is frozen (its heartbeat stays fresh for a few seconds, so the kernel
        // still holds execs), the attacker's exec is held, and the attacker continues it.
        nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).expect("stop agent");
        let child = spawn_env(&cg, svc, &[&p], &env);
        let pid = child.id();
        wait_stopped(pid, "the exec with a large environment is held");
        let target = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        // Let evil.so rewrite the environment before the agent reads it.
        wait_for(
            "LD_PRELOAD hidden in /proc/PID/environ",
            AGENT_TIMEOUT,
            || {
                let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
                env.windows(11).any(|w| w == b"XD_PRELOAD=").then_some(())
            },
        );
        nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT).expect("cont agent");
        assert_eq!(
            wait_traced(child).0,
            EVIL_DENIED,
            "a held exec continued before the agent read its environment must stay withheld\n{}",
            agent.log()
        );
        drop(agent);
        drop(listener);
        drop(f.dir);
    }

    /// The attacks of the loader family, as (name, environment, what evil's code reaches).
    fn attacks(f: &Files, port: u16) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
        let evil = f.evil.to_string_lossy().into_owned();
        let p = port.to_string();
        vec![
            (
                "LD_PRELOAD",
                vec![("LD_PRELOAD", evil.clone()), ("EVIL_PORT", p.clone())],
            ),
            (
                "LD_AUDIT",
                vec![("LD_AUDIT", evil), ("EVIL_PORT", p.clone())],
            ),
            (
                "LD_LIBRARY_PATH",
                vec![
                    ("LD_LIBRARY_PATH", f.evil_lib.to_string_lossy().into_owned()),
                    ("EVIL_PORT", p),
                ],
            ),
        ]
    }

    #[test]
    fn loader_environment_withholds_the_identity() {
        if !require_root("loader_environment_withholds_the_identity") {
            return;
        }
        let f = files();
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let p = port.to_string();
        let cg = TestCgroup::new("loader");
        let svc = &f.svc;

        // Enforcement off (no agent): each attack loads evil.so, whose connect succeeds.
        assert_eq!(run_env(&cg, svc, &[&p], &[]), OK, "svc connects");
        let mut working = Vec::new();
        for (name, env) in attacks(&f, port) {
            let got = run_env(&cg, svc, &[&p], &env);
            if name == "LD_AUDIT" && got == OK {
                // The 5.10 guest's ld.so refuses the audit module ("cannot be loaded as
                // audit interface": no ld.so.cache there): the attack cannot run, so there
                // is nothing to stop. Where it runs (the host) it is checked below.
                eprintln!(
                    "LD_AUDIT: this loader does not load the audit module here; case not run"
                );
                continue;
            }
            assert_eq!(
                got, EVIL_CONNECTED,
                "{name}: without enforcement the attacker's code must load and connect \
                 (else this test proves nothing)"
            );
            working.push((name, env));
        }
        // The same attack hidden past the strings the kernel reads at exec (Command sorts the
        // variables: LD_PRELOAD comes after 200 fillers).
        let fillers: Vec<String> = (0..200).map(|i| format!("FILLER_{i:03}")).collect();
        let big: Vec<(&str, String)> = fillers.iter().map(|n| (n.as_str(), "x".into())).collect();
        let (_, preload) = working
            .iter()
            .find(|(name, _)| *name == "LD_PRELOAD")
            .expect("the LD_PRELOAD attack is in the list");
        let mut big_preload = big.clone();
        big_preload.extend(preload.iter().cloned());
        assert_eq!(
            run_env(&cg, svc, &[&p], &big_preload),
            EVIL_CONNECTED,
            "LD_PRELOAD after 200 variables: without enforcement evil.so connects"
        );

        let_settle();
        let sha = sha256_file(svc);
        let agent = Agent::start(&policy(&cg.rel, &sha, port));

        // svc itself keeps its identity (and its rights).
        assert_eq!(
            run_env(&cg, svc, &[&p], &[]),
            OK,
            "plain svc must stay allowed\n{}",
            agent.log()
        );
        // Each attack twice: the first exec may be held and attested by the agent, the
        // second is resolved by the kernel from its cache; both must withhold.
        for (name, env) in &working {
            for round in 0..2 {
                assert_eq!(
                    run_env(&cg, svc, &[&p], env),
                    EVIL_DENIED,
                    "{name} (round {round}): the attacker's code must not get svc's identity\n{}",
                    agent.log()
                );
            }
        }
        assert_eq!(run_env(&cg, svc, &[&p], &[]), OK, "plain svc, after");
        // A runtime variable withholds too (svc's own connect is denied: no identity).
        for (var, val) in [
            ("NODE_OPTIONS", "--require=/tmp/x.js"),
            ("PYTHONPATH", "/tmp"),
            ("BASH_ENV", "/tmp/x.sh"),
        ] {
            assert_eq!(
                run_env(&cg, svc, &[&p], &[(var, val.to_string())]),
                EPERM,
                "{var}: a process whose environment loads code has no identity\n{}",
                agent.log()
            );
        }
        // An environment larger than the kernel reads at exec (MAX_ENV_VARS strings): the exec
        // is held and the agent reads /proc/PID/environ in full.
        assert_eq!(
            run_env(&cg, svc, &[&p], &big),
            OK,
            "a large environment without loader variables keeps the identity\n{}",
            agent.log()
        );
        assert_eq!(
            run_env(&cg, svc, &[&p], &big_preload),
            EVIL_DENIED,
            "LD_PRELOAD past the strings the kernel reads must still withhold the identity\n{}",
            agent.log()
        );
        // ld.so run directly on svc is ld.so, not svc (already held before this work).
        let ldso = Path::new("/lib64/ld-linux-x86-64.so.2");
        if ldso.exists() {
            let svc_arg = svc.to_string_lossy().into_owned();
            assert_eq!(
                run_env(&cg, ldso, &[&svc_arg, &p], &[]),
                EPERM,
                "ld.so svc must not be svc's identity\n{}",
                agent.log()
            );
        } else {
            eprintln!("no {} here: the ld.so case is not run", ldso.display());
        }

        // What the user sees: deny events with no identity and the withheld rule.
        let svc_path = svc.to_string_lossy().into_owned();
        let withheld = |e: &serde_json::Value| {
            e["verdict"] == "deny"
                && e["identity"].is_null()
                && e["rule"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("withheld"))
                && e["exe"].as_str() == Some(svc_path.as_str())
                && e["uid"] == ATTACKER_UID
        };
        // Two per working attack, one per runtime variable.
        let expected = 2 * working.len() + 3;
        let evs = agent.wait_events("deny events with the withheld rule", |evs| {
            evs.iter().filter(|e| withheld(e)).count() >= expected
        });
        let sample = evs.iter().find(|e| withheld(e)).expect("a withheld event");
        for key in [
            "pid", "exe", "sha256", "cgroup", "uid", "dst", "port", "rule",
        ] {
            assert!(
                !sample[key].is_null(),
                "event key {key} missing in {sample}"
            );
        }
        assert_eq!(sample["sha256"], sha.as_str());
        assert!(
            agent.status_counter("withheld") >= expected as u64,
            "status counts withheld decisions"
        );

        // `identities` names the variable of a live withheld process.
        let mut live = spawn_env(
            &cg,
            Path::new("/bin/sleep"),
            &["30"],
            &[("LD_PRELOAD", f.evil.to_string_lossy().into_owned())],
        );
        let pid = live.id();
        let reason = wait_for(
            "the withheld process in `identities`",
            AGENT_TIMEOUT,
            || {
                let ids = agent.cli_json(&["identities"]);
                let procs: HashMap<u64, serde_json::Value> = ids
                    .as_array()?
                    .iter()
                    .filter_map(|p| Some((p["pid"].as_u64()?, p.clone())))
                    .collect();
                let p = procs.get(&u64::from(pid))?;
                let r = p["reason"].as_str()?.to_string();
                r.starts_with("withheld")
                    .then_some((r, p["identity"].clone()))
            },
        );
        let _ = live.kill();
        let _ = live.wait();
        assert_eq!(reason.0, "withheld: LD_PRELOAD");
        assert!(reason.1.is_null(), "a withheld process has no identity");
        drop(agent);
        drop(listener);
        drop(f.dir);
    }
}

#[cfg(not(loader_c))]
#[test]
fn loader_environment_withholds_the_identity() {
    // tests/build.rs could not compile tests/loader-c with `cc`.
    assert!(
        !enforcer_tests::in_ci(),
        "the loader tests' C programs were not built (no `cc` when the tests were compiled)"
    );
    eprintln!("skipped: no `cc` when the tests were compiled (install gcc)");
}

#[cfg(not(loader_c))]
#[test]
fn preload_grant_by_sha256() {
    assert!(
        !enforcer_tests::in_ci(),
        "the loader tests' C programs were not built (no `cc` when the tests were compiled)"
    );
    eprintln!("skipped: no `cc` when the tests were compiled (install gcc)");
}

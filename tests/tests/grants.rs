//! Time-bound entries and grants (issue 13) on the real kernel: the kernel itself stops
//! honouring an entry at its instant, with the agent dead; grants are listed, shown in status
//! and explain, revoked at once, and survive a restart.
//! Exit codes of the probe: 0 = connected/sent, 13 = EPERM from the kernel.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use enforcer_tests::*;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;

/// `app` may send UDP to the udp4 listener and nothing else; `extra` is appended to its
/// egress list (time-bound entries).
fn policy(scope: &str, sha: &str, l: &Listeners, extra: &str, max_grant: &str) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: enforce
unattested: deny
scope: ["{scope}"]
maxGrant: {max_grant}
identities:
  - name: app
    match:
      - binarySha256: [{sha}]
rules:
  - identity: app
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{udp4}], protocol: udp}}
{extra}"#,
        udp4 = l.udp4.port(),
    )
}

fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC of Unix seconds, as the agent writes instants.
fn rfc3339(secs: i64) -> String {
    enforcer_agent::policy::rfc3339(secs * 1_000_000_000)
}

struct Setup {
    cg: TestCgroup,
    l: Listeners,
    _dir: TempDir,
    app: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let cg = TestCgroup::new(tag);
    let l = Listeners::new();
    let dir = TempDir::new(tag);
    let (app, _) = probe_pair(Path::new(PROBE_BIN), &dir);
    Setup {
        cg,
        l,
        _dir: dir,
        app,
    }
}

/// Connects `app` to `tcp4` every 20 ms until the verdict is `want`; returns the wall-clock
/// time (Unix ns) of the first such connect, or panics after `limit`.
fn first_time(st: &Setup, tcp4: &str, want: i32, limit: Duration) -> i64 {
    let t0 = Instant::now();
    loop {
        let before = wall_ns();
        let code = run_in(&st.cg, &st.app, &["tcp", tcp4]);
        if code == want {
            return before;
        }
        assert!(
            t0.elapsed() < limit,
            "no connect gave {want} within {limit:?} (last: {code})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(4_099_831_200), "2099-12-01T18:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}

/// Issue 13 item 3: a 3-second grant, the agent killed with kill -9 right after it: a
/// connect at +1 s is allowed, one at +5 s denied, and the change happens within 1 s of the
/// grant's instant; the next agent reports the grant as expired while it was down.
#[test]
fn a_grant_lapses_in_the_kernel_with_the_agent_dead() {
    if !require_root("a_grant_lapses_in_the_kernel_with_the_agent_dead") {
        return;
    }
    let st = setup("grant-kill9");
    let sha = sha256_file(&st.app);
    let mut agent = Agent::start(&policy(&st.cg.rel, &sha, &st.l, "", "1h"));
    let tcp4 = st.l.tcp4.to_string();
    let_settle();
    // Without the grant the connect is denied: the grant is what allows it.
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
    let g = agent.cli_json(&[
        "grant",
        "--identity",
        "app",
        "--to",
        &tcp4,
        "--protocol",
        "tcp",
        "--for",
        "3s",
        "--reason",
        "INC-1234 break-glass",
    ]);
    let t0 = Instant::now();
    let expires = g["expires_unix_ns"].as_i64().expect("expires_unix_ns");
    assert_eq!(g["reason"], "INC-1234 break-glass");
    assert_eq!(g["spiffe_id"], "spiffe://test.example.org/app");
    agent.kill9();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        OK,
        "at +1 s the grant is in force (the agent is dead: the kernel holds it)"
    );
    // The kernel stops honouring it at its instant: the first denied connect is within 1 s.
    let denied_at = first_time(&st, &tcp4, EPERM, Duration::from_secs(8));
    let late_ms = (denied_at - expires) / 1_000_000;
    eprintln!("grant expired at {expires}; first denied connect {late_ms} ms after");
    assert!(
        (-100..1000).contains(&late_ms),
        "the kernel must stop honouring the grant within 1 s of its instant: {late_ms} ms"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(t0.elapsed()));
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        EPERM,
        "at +5 s the grant is over"
    );
    // The permanent entry never changed.
    assert_eq!(
        run_in(&st.cg, &st.app, &["udp", &st.l.udp4.to_string()]),
        OK
    );
    // The next agent reports what expired while no agent ran, and lists no grant.
    agent.spawn();
    agent.wait_events("the grant reported expired at start", |evs| {
        evs.iter().any(|e| {
            e["verdict"] == "expired"
                && e["grant"] == 1
                && e["reason"] == "INC-1234 break-glass"
                && e["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("while the agent was not running"))
        })
    });
    assert_eq!(agent.cli_json(&["grants"]), serde_json::json!([]));
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
}

/// Grants from the command line: bounded by maxGrant, shown by grants/status/explain,
/// revoked at once, kept across a restart and a re-apply, dropped by a policy that no longer
/// has the identity.
#[test]
fn grants_are_listed_explained_revoked_and_kept() {
    if !require_root("grants_are_listed_explained_revoked_and_kept") {
        return;
    }
    let st = setup("grants");
    let sha = sha256_file(&st.app);
    let yaml = policy(&st.cg.rel, &sha, &st.l, "", "1h");
    let mut agent = Agent::start(&yaml);
    let tcp4 = st.l.tcp4.to_string();
    let_settle();
    let grant = |agent: &Agent, dur: &str, ident: &str| {
        agent.cli(&[
            "grant",
            "--identity",
            ident,
            "--to",
            &tcp4,
            "--protocol",
            "tcp",
            "--for",
            dur,
            "--reason",
            "INC-7",
        ])
    };
    // Refused, with the reason, changing nothing.
    let (code, _, err) = grant(&agent, "2h", "app");
    assert_ne!(code, 0);
    assert!(err.contains("maxGrant (1h)"), "{err}");
    let (code, _, err) = grant(&agent, "10m", "nobody");
    assert_ne!(code, 0);
    assert!(err.contains("no identity \"nobody\""), "{err}");
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
    // Granted for 30 minutes.
    let (code, out, err) = grant(&agent, "30m", "app");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("grant 1 in force"), "{out}");
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), OK);
    let list = agent.cli_json(&["grants"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let left = list[0]["seconds_left"].as_u64().unwrap_or(0);
    assert!((1790..=1800).contains(&left), "{list}");
    assert_eq!(
        list[0]["destination"],
        format!("tcp {}/32 ports {}", st.l.tcp4.ip(), st.l.tcp4.port())
    );
    assert!(
        list[0]["by"].as_str().is_some_and(|b| b.contains("uid 0")),
        "{list}"
    );
    let status = agent.cli_json(&["status"]);
    assert_eq!(
        status["grants"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status["next_expiry"], list[0]["expires_at"], "{status}");
    let (_, text, _) = agent.cli(&["status"]);
    assert!(text.contains("time-bound: 1 grant(s)"), "{text}");
    // explain names the grant, its reason and its instant.
    let mut child = spawn_gated_in(&st.cg, &st.app, &["tcp", &tcp4]);
    let pid = child.id().to_string();
    wait_for("the gated probe attested", AGENT_TIMEOUT, || {
        let (c, out, _) = agent.cli(&["explain", "--pid", &pid, "--to", &tcp4, "--json"]);
        (c == 0 && out.contains("\"allow\"")).then_some(())
    });
    let e = agent.cli_json(&["explain", "--pid", &pid, "--to", &tcp4]);
    assert_eq!(e["verdict"], "allow", "{e}");
    assert_eq!(e["grant"], 1, "{e}");
    assert_eq!(e["reason"], "INC-7", "{e}");
    assert_eq!(e["expires"], list[0]["expires_at"], "{e}");
    open_gate(&mut child);
    assert_eq!(wait_traced(child).0, OK);
    // A restart keeps it (state folder), and so does a re-apply of the same policy.
    agent.stop();
    agent.spawn();
    assert_eq!(agent.cli_json(&["grants"])[0]["id"], 1);
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), OK);
    let again = st._dir.path("again.yaml");
    std::fs::write(&again, &yaml).expect("writing the policy");
    let (code, _, err) = agent.cli(&["policy", "apply", again.to_str().expect("path")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(agent.cli_json(&["grants"])[0]["id"], 1);
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), OK);
    // Revoked: denied at once, reported.
    let r = agent.cli_json(&["revoke", "1"]);
    assert_eq!(r["id"], 1);
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
    assert_eq!(agent.cli_json(&["grants"]), serde_json::json!([]));
    let (code, _, err) = agent.cli(&["revoke", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("no grant 1"), "{err}");
    agent.wait_events("grant and revoke events with the reason", |evs| {
        let has = |v: &str| {
            evs.iter()
                .any(|e| e["verdict"] == v && e["grant"] == 1 && e["reason"] == "INC-7")
        };
        has("grant") && has("revoked")
    });
    let (_, events, _) = agent.cli(&["events"]);
    assert!(events.contains("revoked: grant 1 (INC-7)"), "{events}");
    // A policy without the identity drops a grant (reported), and never widens anything.
    let (code, _, err) = grant(&agent, "30m", "app");
    assert_eq!(code, 0, "{err}");
    let renamed = yaml
        .replace("name: app", "name: app2")
        .replace("identity: app", "identity: app2");
    agent.reload(&renamed);
    agent.wait_events("the grant dropped by the apply", |evs| {
        evs.iter().any(|e| {
            e["verdict"] == "revoked"
                && e["grant"] == 2
                && e["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("no identity \"app\""))
        })
    });
    assert_eq!(agent.cli_json(&["grants"]), serde_json::json!([]));
    assert_eq!(run_in(&st.cg, &st.app, &["tcp", &tcp4]), EPERM);
}

/// Issue 13 items 1 and 3 with the agent running: a policy entry with `notBefore` and
/// `expires` holds only between them; the expiry is reported with the entry's reason.
#[test]
fn a_policy_entry_holds_between_not_before_and_expires() {
    if !require_root("a_policy_entry_holds_between_not_before_and_expires") {
        return;
    }
    let st = setup("timed-entry");
    let sha = sha256_file(&st.app);
    let tcp4 = st.l.tcp4.to_string();
    let agent = Agent::start(&policy(&st.cg.rel, &sha, &st.l, "", "1h"));
    let_settle();
    // Whole seconds: from 2 to 4 seconds ahead (a window of 1 to 2 s), applied now.
    let now_s = wall_ns() / 1_000_000_000;
    let (from, until) = (now_s + 3, now_s + 5);
    let entry = format!(
        "      - to: {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}\n        notBefore: {nb}\n        expires: {ex}\n        reason: \"maintenance window\"\n",
        port = st.l.tcp4.port(),
        nb = rfc3339(from),
        ex = rfc3339(until),
    );
    let file = st._dir.path("timed.yaml");
    std::fs::write(&file, policy(&st.cg.rel, &sha, &st.l, &entry, "1h")).expect("policy");
    let (code, _, err) = agent.cli(&["policy", "apply", file.to_str().expect("path")]);
    assert_eq!(code, 0, "{err}");
    let status = agent.cli_json(&["status"]);
    assert_eq!(status["timed_entries"], 1, "{status}");
    assert_eq!(status["next_expiry"], rfc3339(from), "{status}");
    assert_eq!(
        run_in(&st.cg, &st.app, &["tcp", &tcp4]),
        EPERM,
        "before notBefore"
    );
    let allowed_at = first_time(&st, &tcp4, OK, Duration::from_secs(8));
    let early_ms = (allowed_at - from * 1_000_000_000) / 1_000_000;
    assert!(
        (-100..1000).contains(&early_ms),
        "allowed {early_ms} ms after notBefore"
    );
    let denied_at = first_time(&st, &tcp4, EPERM, Duration::from_secs(8));
    let late_ms = (denied_at - until * 1_000_000_000) / 1_000_000;
    eprintln!("entry: allowed {early_ms} ms after notBefore, denied {late_ms} ms after expires");
    assert!(
        (-100..1000).contains(&late_ms),
        "denied {late_ms} ms after expires"
    );
    agent.wait_events("the entry's expiry reported", |evs| {
        evs.iter()
            .any(|e| e["verdict"] == "expired" && e["reason"] == "maintenance window")
    });
    let status = agent.cli_json(&["status"]);
    assert_eq!(status["timed_entries"], 0, "{status}");
    assert!(
        status["drift"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
}

//! Adversarial tests: socket kinds the connect hooks never judge (SECURITY.md guarantee 6).
//! Raw sockets (an unprivileged user gets `CAP_NET_RAW` in a user namespace of its own), ICMP
//! ping sockets (its own network namespace lets it set `ping_group_range`), UDP-Lite and SCTP
//! send without passing connect4/6 or sendmsg4/6 the way TCP and UDP do: they are refused
//! at creation (cgroup `sock_create`) unless the identity's `sockets:` list names the kind.

use std::path::Path;

use enforcer_tests::*;

use crate::common::ATTACKER_UID;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;

/// One socket the attacker creates: (kind name in the policy and events, family, type,
/// protocol, needs its own user and network namespace).
struct Case {
    kind: &'static str,
    family: &'static str,
    sock_type: &'static str,
    protocol: &'static str,
    args: [&'static str; 3],
    userns: bool,
}

const CASES: [Case; 6] = [
    Case {
        kind: "icmp",
        family: "inet",
        sock_type: "dgram",
        protocol: "icmp",
        args: ["2", "2", "1"],
        userns: true,
    },
    Case {
        kind: "icmp",
        family: "inet6",
        sock_type: "dgram",
        protocol: "icmpv6",
        args: ["10", "2", "58"],
        userns: true,
    },
    Case {
        kind: "raw",
        family: "inet",
        sock_type: "raw",
        protocol: "icmp",
        args: ["2", "3", "1"],
        userns: true,
    },
    Case {
        kind: "raw",
        family: "inet6",
        sock_type: "raw",
        protocol: "udp",
        args: ["10", "3", "17"],
        userns: true,
    },
    Case {
        kind: "udplite",
        family: "inet",
        sock_type: "dgram",
        protocol: "udplite",
        args: ["2", "2", "136"],
        userns: false,
    },
    Case {
        kind: "sctp",
        family: "inet",
        sock_type: "stream",
        protocol: "sctp",
        args: ["2", "1", "132"],
        userns: false,
    },
];

impl Case {
    fn argv(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.userns {
            v.push("unshare-net");
        }
        v.push("socket");
        v.extend_from_slice(&self.args);
        v
    }

    fn name(&self) -> String {
        format!("{} ({} {})", self.kind, self.family, self.sock_type)
    }
}

fn policy(scope: &str, sha: &str, tcp_port: u16, sockets: &str) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: enforce
unattested: deny
scope: ["{scope}"]
identities:
  - name: app
    match:
      - binarySha256: [{sha}]
{sockets}rules:
  - identity: app
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{tcp_port}], protocol: tcp}}
"#
    )
}

#[test]
fn unjudged_socket_kinds_are_refused_at_creation() {
    if !require_root("unjudged_socket_kinds_are_refused_at_creation") {
        return;
    }
    let cg = TestCgroup::new("sockets");
    let dir = TempDir::new("sockets");
    let (app, other) = probe_pair(Path::new(PROBE_BIN), &dir);
    let sha = sha256_file(&app);
    let l = Listeners::new();
    let tcp4 = l.tcp4.to_string();

    // Enforcement off (no agent): the attacker, uid 65534 running the attested binary,
    // creates each kind. A kind this kernel lacks (SCTP without its module, an unprivileged
    // user namespace switched off) is skipped with the reason; the attack needs it too.
    let mut cases: Vec<&Case> = Vec::new();
    for c in &CASES {
        let got = run_in_as(&cg, &app, &c.argv(), ATTACKER_UID);
        if got == OK {
            cases.push(c);
        } else {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "vm-test: skipped: this kernel does not let uid {ATTACKER_UID} create a {} socket even with no agent (exit {got}; test unjudged_socket_kinds_are_refused_at_creation)",
                c.name()
            );
        }
    }
    assert!(
        cases
            .iter()
            .any(|c| c.kind == "udplite" || c.kind == "icmp"),
        "neither UDP-Lite nor ICMP ping sockets could be created with no agent: nothing to attack"
    );

    // Enforce: every kind refused with EPERM, for the identity and for an unattested binary.
    let mut agent = Agent::start(&policy(&cg.rel, &sha, l.tcp4.port(), ""));
    for c in &cases {
        let got = run_in_as(&cg, &app, &c.argv(), ATTACKER_UID);
        assert_eq!(
            got,
            EPERM,
            "enforce: app must not create a {} socket\n{}",
            c.name(),
            agent.log()
        );
        let got = run_in_as(&cg, &other, &c.argv(), ATTACKER_UID);
        assert_eq!(
            got,
            EPERM,
            "enforce: an unattested binary under `unattested: deny` must not create a {} socket",
            c.name()
        );
    }
    // TCP and UDP sockets are the connect hooks' business: created as before, and the
    // allowed connect still works.
    for args in [["2", "1", "6"], ["10", "2", "17"], ["10", "1", "6"]] {
        let argv = ["socket", args[0], args[1], args[2]];
        assert_eq!(
            run_in_as(&cg, &app, &argv, ATTACKER_UID),
            OK,
            "{argv:?} must be unaffected"
        );
    }
    assert_eq!(run_in_as(&cg, &app, &["tcp", &tcp4], ATTACKER_UID), OK);
    // Each refusal is an event: identity, kind, family, type, protocol, rule.
    for c in &cases {
        let is_it = |e: &serde_json::Value| {
            e["verdict"] == "deny"
                && e["socket"] == c.kind
                && e["family"] == c.family
                && e["type"] == c.sock_type
                && e["protocol"] == c.protocol
        };
        let evs = agent.wait_events(&format!("socket refusal events for {}", c.name()), |evs| {
            evs.iter()
                .any(|e| is_it(e) && e["identity"] == "spiffe://test.example.org/app")
                && evs
                    .iter()
                    .any(|e| is_it(e) && e["identity"].is_null() && e["rule"] == "unattested")
        });
        let e = evs
            .iter()
            .find(|e| is_it(e) && !e["identity"].is_null())
            .expect("found above");
        assert_eq!(e["uid"], ATTACKER_UID, "{e}");
        assert_eq!(e["sha256"], sha.as_str(), "{e}");
        assert!(
            e["rule"]
                .as_str()
                .is_some_and(|r| r.contains("sockets:") && r.contains(c.kind)),
            "the rule names the list: {e}"
        );
    }
    let refused = agent.status_counter("socket_refused");
    assert!(
        refused >= 2 * cases.len() as u64,
        "status counts every refusal: {refused} for {} attempts",
        2 * cases.len()
    );

    // The identity's `sockets:` list allows the kinds it names, and only for the identity.
    agent.reload(&policy(
        &cg.rel,
        &sha,
        l.tcp4.port(),
        "    sockets: [icmp, raw, udplite, sctp]\n",
    ));
    agent.wait_log("policy reloaded", 1);
    for c in &cases {
        assert_eq!(
            run_in_as(&cg, &app, &c.argv(), ATTACKER_UID),
            OK,
            "`sockets:` lists {}: app may create it\n{}",
            c.kind,
            agent.log()
        );
        assert_eq!(
            run_in_as(&cg, &other, &c.argv(), ATTACKER_UID),
            EPERM,
            "the list is the identity's: the unattested binary is still refused a {}",
            c.name()
        );
    }
    // A list without a kind refuses it again.
    agent.reload(&policy(
        &cg.rel,
        &sha,
        l.tcp4.port(),
        "    sockets: [sctp]\n",
    ));
    agent.wait_log("policy reloaded", 2);
    if let Some(c) = cases.iter().find(|c| c.kind != "sctp") {
        assert_eq!(
            run_in_as(&cg, &app, &c.argv(), ATTACKER_UID),
            EPERM,
            "{} is no longer listed",
            c.name()
        );
    }
    agent.stop();
}

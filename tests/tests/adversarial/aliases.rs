//! Adversarial tests: address aliases (SECURITY.md guarantee 5). The kernel sends a connect or
//! send to `0.0.0.0` to 127.0.0.1 (the socket's source address when it has one), `::` to
//! `::1` and `::ffff:0.0.0.0` to 127.0.0.1: a policy that allows everything but denies
//! loopback port Q must deny those too.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use enforcer_tests::*;

use crate::common::ATTACKER_UID;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;

/// Loopback listeners the attacker aims at: TCP and UDP on 127.0.0.1 and ::1.
struct Targets {
    tcp4: TcpListener,
    tcp6: TcpListener,
    udp4: UdpSocket,
    udp6: UdpSocket,
}

impl Targets {
    fn new() -> Self {
        let t = Self {
            tcp4: TcpListener::bind("127.0.0.1:0").expect("binding tcp 127.0.0.1"),
            tcp6: TcpListener::bind("[::1]:0").expect("binding tcp [::1]"),
            udp4: UdpSocket::bind("127.0.0.1:0").expect("binding udp 127.0.0.1"),
            udp6: UdpSocket::bind("[::1]:0").expect("binding udp [::1]"),
        };
        for l in [&t.tcp4, &t.tcp6] {
            l.set_nonblocking(true).expect("nonblocking listener");
        }
        for u in [&t.udp4, &t.udp6] {
            u.set_nonblocking(true).expect("nonblocking udp");
        }
        t
    }

    fn port(&self, which: &str) -> u16 {
        let a: SocketAddr = match which {
            "tcp4" => self.tcp4.local_addr(),
            "tcp6" => self.tcp6.local_addr(),
            "udp4" => self.udp4.local_addr(),
            _ => self.udp6.local_addr(),
        }
        .expect("local addr");
        a.port()
    }

    /// Whether the listener `which` got a connection (TCP) or a datagram (UDP) within `wait`;
    /// takes it.
    fn reached(&self, which: &str, wait: Duration) -> bool {
        let t0 = Instant::now();
        let mut buf = [0u8; 16];
        loop {
            let got = match which {
                "tcp4" => self.tcp4.accept().is_ok(),
                "tcp6" => self.tcp6.accept().is_ok(),
                "udp4" => self.udp4.recv(&mut buf).is_ok(),
                _ => self.udp6.recv(&mut buf).is_ok(),
            };
            if got {
                return true;
            }
            if t0.elapsed() > wait {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// (probe command, written destination, listener it reaches, address judged, address the
/// hook saw written).
type Attack = (
    &'static str,
    String,
    &'static str,
    &'static str,
    &'static str,
);

fn attacks(t: &Targets) -> Vec<Attack> {
    let (t4, t6, u4, u6) = (
        t.port("tcp4"),
        t.port("tcp6"),
        t.port("udp4"),
        t.port("udp6"),
    );
    vec![
        (
            "tcp",
            format!("0.0.0.0:{t4}"),
            "tcp4",
            "127.0.0.1",
            "0.0.0.0",
        ),
        ("tcp", format!("[::]:{t6}"), "tcp6", "::1", "::"),
        (
            "tcp",
            format!("[::ffff:0.0.0.0]:{t4}"),
            "tcp4",
            "127.0.0.1",
            "::ffff:0.0.0.0",
        ),
        (
            "udp",
            format!("0.0.0.0:{u4}"),
            "udp4",
            "127.0.0.1",
            "0.0.0.0",
        ),
        (
            "sendto",
            format!("0.0.0.0:{u4}"),
            "udp4",
            "127.0.0.1",
            "0.0.0.0",
        ),
        ("udp", format!("[::]:{u6}"), "udp6", "::1", "::"),
        ("sendto", format!("[::]:{u6}"), "udp6", "::1", "::"),
        // An unconnected IPv4-mapped send is handed to the IPv4 path by the kernel: the
        // sendmsg4 hook sees (and judges) 0.0.0.0.
        (
            "sendto",
            format!("[::ffff:0.0.0.0]:{u4}"),
            "udp4",
            "127.0.0.1",
            "0.0.0.0",
        ),
    ]
}

/// Allows all of IPv4 and IPv6 to the attested `app`, but denies 127.0.0.1 and ::1 on the
/// listeners' ports.
fn policy(mode: &str, scope: &str, sha: &str, t: &Targets) -> String {
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
      - to: {{cidr: 0.0.0.0/0}}
      - to: {{cidr: "::/0"}}
    deny:
      - to: {{cidr: 127.0.0.1/32, ports: [{t4}, {u4}]}}
      - to: {{cidr: "::1/128", ports: [{t6}, {u6}]}}
"#,
        t4 = t.port("tcp4"),
        u4 = t.port("udp4"),
        t6 = t.port("tcp6"),
        u6 = t.port("udp6"),
    )
}

#[test]
fn unspecified_addresses_cannot_bypass_a_loopback_deny() {
    if !require_root("unspecified_addresses_cannot_bypass_a_loopback_deny") {
        return;
    }
    let cg = TestCgroup::new("alias");
    let dir = TempDir::new("alias");
    let app = dir.path("app");
    copy_probe(Path::new(PROBE_BIN), &app, None);
    let sha = sha256_file(&app);
    let t = Targets::new();
    let cases = attacks(&t);

    // Enforcement off (no agent): every alias reaches the loopback listener it names.
    for (cmd, addr, target, _, _) in &cases {
        let got = run_in_as(&cg, &app, &[cmd, addr], ATTACKER_UID);
        assert_eq!(got, OK, "no agent: {cmd} {addr} must work");
        assert!(
            t.reached(target, Duration::from_secs(5)),
            "no agent: {cmd} {addr} must reach the {target} listener (the attack works)"
        );
    }
    // The real loopback addresses are denied as the policy says, and a port the policy
    // does not deny stays allowed through the alias too (0.0.0.0/0 allows it).
    let spare = TcpListener::bind("127.0.0.1:0").expect("binding a spare listener");
    let spare_alias = format!("0.0.0.0:{}", spare.local_addr().expect("addr").port());

    // Audit: allowed, and reported as the loopback address it reaches.
    let agent = Agent::start(&policy("audit", &cg.rel, &sha, &t));
    let (cmd, addr, target, _, _) = &cases[0];
    assert_eq!(run_in_as(&cg, &app, &[cmd, addr], ATTACKER_UID), OK);
    assert!(t.reached(target, Duration::from_secs(5)));
    agent.wait_events("an audit event judged as 127.0.0.1", |evs| {
        evs.iter().any(|e| {
            e["verdict"] == "audit" && e["dst"] == "127.0.0.1" && e["written"] == "0.0.0.0"
        })
    });
    drop(agent);

    // Enforce: each alias is denied (EPERM), nothing reaches the listener, and the deny
    // event reports the address judged, the one written, the identity and the rule.
    let agent = Agent::start(&policy("enforce", &cg.rel, &sha, &t));
    for (cmd, addr, target, _, _) in &cases {
        let got = run_in_as(&cg, &app, &[cmd, addr], ATTACKER_UID);
        assert_eq!(
            got,
            EPERM,
            "enforce: {cmd} {addr} must be denied (it reaches the denied {target})\n{}",
            agent.log()
        );
        assert!(
            !t.reached(target, Duration::from_millis(200)),
            "enforce: {cmd} {addr} reached {target}"
        );
    }
    assert_eq!(
        run_in_as(&cg, &app, &["tcp", &spare_alias], ATTACKER_UID),
        OK,
        "an alias of an allowed destination stays allowed\n{}",
        agent.log()
    );
    for (cmd, addr, _, judged, written) in &cases {
        let port: u16 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        let proto = if *cmd == "tcp" { "tcp" } else { "udp" };
        let evs = agent.wait_events(
            &format!("a deny event for {cmd} {addr} judged as {judged}"),
            |evs| {
                evs.iter().any(|e| {
                    e["verdict"] == "deny"
                        && e["dst"] == *judged
                        && e["written"] == *written
                        && e["port"] == port
                        && e["protocol"] == proto
                })
            },
        );
        let e = evs
            .iter()
            .find(|e| e["verdict"] == "deny" && e["dst"] == *judged && e["port"] == port)
            .expect("found above");
        assert_eq!(e["identity"], "spiffe://test.example.org/app", "{e}");
        assert_eq!(e["uid"], ATTACKER_UID, "{e}");
        assert!(
            e["rule"].as_str().is_some_and(|r| r.contains("deny")),
            "the deny entry decided: {e}"
        );
    }
    drop(spare);
}

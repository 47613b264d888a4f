use std::net::IpAddr;

use super::*;
use crate::policy::{Action, Identity, MatchEntry, Mode, check};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

const NETS: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.168.0.0/16",
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::1/128",
];
const ADDRS: &[&str] = &[
    "10.1.2.3",
    "10.1.2.4",
    "10.1.9.9",
    "10.9.9.9",
    "192.168.1.1",
    "8.8.8.8",
    "2001:db8:1::5",
    "2001:db8:2::1",
    "::1",
    "2001:dead::1",
];
const PORT_SETS: &[&[(u16, u16)]] = &[
    &[],
    &[(22, 22)],
    &[(80, 80)],
    &[(80, 90)],
    &[(443, 443), (22, 22)],
    &[(1, 65535)],
    &[(85, 85)],
];
const PORTS: &[u16] = &[22, 80, 85, 91, 443, 1000];

fn policy_with(rules: Vec<Rule>, idents: usize) -> Policy {
    Policy {
        trust_domain: "t".into(),
        mode: Mode::Enforce,
        unattested: Action::Deny,
        scope: vec!["/".into()],
        report_allow: false,
        revoke_connections: true,
        identities: (0..idents)
            .map(|i| Identity {
                name: format!("i{i}"),
                spiffe_id: format!("spiffe://t/i{i}"),
                sockets: 0,
                matches: vec![MatchEntry {
                    uid: vec![u32::try_from(i).unwrap_or(0)],
                    ..MatchEntry::default()
                }],
            })
            .collect(),
        rules,
        max_grant_secs: crate::policy::DEFAULT_MAX_GRANT_SECS,
    }
}

/// A rule to `cidr` for one of `idents` identities, a deny one time in `deny_one_in`, with
/// random ports and protocol.
fn random_rule(r: &mut Rng, cidr: IpNet, idents: usize, deny_one_in: usize) -> Rule {
    Rule {
        to_ident: 0,
        ident: 1 + u32::try_from(r.below(idents)).unwrap_or(0),
        deny: r.below(deny_one_in) == 0,
        cidr,
        ports: PORT_SETS[r.below(PORT_SETS.len())].to_vec(),
        protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Any][r.below(3)],
        line: 0,
        text: String::new(),
        timing: Default::default(),
    }
}

fn random_policy(r: &mut Rng) -> Policy {
    let n = r.below(8);
    let rules = (0..n)
        .filter_map(|_| {
            let cidr: IpNet = NETS[r.below(NETS.len())].parse().ok()?;
            Some(random_rule(r, cidr, 2, 3))
        })
        .collect();
    policy_with(rules, 2)
}

fn applies(rule: &Rule, ident: u32, proto: u8, addr: IpAddr, port: u16) -> bool {
    rule.ident == ident
        && proto_applies(rule.protocol, proto)
        && rule.cidr.contains(&addr)
        && (rule.ports.is_empty() || rule.ports.iter().any(|&(a, b)| (a..=b).contains(&port)))
}

/// SPEC semantics: allowed iff some egress entry allows and no deny entry matches.
fn naive(p: &Policy, ident: u32, proto: u8, addr: IpAddr, port: u16) -> bool {
    let m = |deny| {
        p.rules
            .iter()
            .any(|r| r.deny == deny && applies(r, ident, proto, addr, port))
    };
    m(false) && !m(true)
}

#[test]
fn kernel_lookup_equals_spec() -> Result<(), PolicyError> {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..400 {
        let p = random_policy(&mut r);
        let generation = u32::try_from(r.below(2)).unwrap_or(0);
        let entries = rule_entries(&p, generation)?;
        for e in &entries {
            assert!(e.0.prefix_len >= RULE_FIXED_BITS);
        }
        for _ in 0..60 {
            let ident = u32::try_from(r.below(4)).unwrap_or(0);
            let proto = [PROTO_TCP, PROTO_UDP][r.below(2)];
            let addr: IpAddr = ADDRS[r.below(ADDRS.len())]
                .parse()
                .map_err(|_| PolicyError::NotABundle)?;
            let port = PORTS[r.below(PORTS.len())];
            let v = kernel_verdict(&entries, generation, ident, proto, addr, port);
            let kernel = v.is_some_and(|v| v.verdict == Verdict::Allow as u32);
            assert_eq!(
                kernel,
                naive(&p, ident, proto, addr, port),
                "{p:#?}\n{ident} {proto} {addr} {port} -> {v:?}"
            );
            if let Some(v) = v {
                let rule = &p.rules[usize::try_from(v.rule).unwrap_or(usize::MAX)];
                assert!(applies(rule, ident, proto, addr, port), "{v:?} {rule:?}");
                assert_eq!(
                    rule.deny,
                    v.verdict == Verdict::Deny as u32,
                    "{v:?} {rule:?}"
                );
            }
            // The other generation sees nothing.
            assert_eq!(
                kernel_verdict(&entries, 1 - generation, ident, proto, addr, port),
                None
            );
        }
    }
    Ok(())
}

#[test]
fn example_policy_entries() -> Result<(), PolicyError> {
    let p = match check(crate::policy::check::tests::FULL) {
        Ok((p, _)) => p,
        Err(d) => panic!("{d:?}"),
    };
    let e = rule_entries(&p, 0)?;
    let v = |proto, a: &str, port| {
        a.parse()
            .ok()
            .and_then(|a| kernel_verdict(&e, 0, 1, proto, a, port))
            .map(|v| (v.verdict, v.rule))
    };
    assert_eq!(
        v(PROTO_TCP, "10.20.3.4", 5432),
        Some((Verdict::Allow as u32, 0))
    );
    assert_eq!(
        v(PROTO_TCP, "10.20.3.4", 8050),
        Some((Verdict::Allow as u32, 0))
    );
    assert_eq!(v(PROTO_TCP, "10.20.3.4", 8101), None);
    assert_eq!(v(PROTO_UDP, "10.20.3.4", 5432), None);
    assert_eq!(v(PROTO_UDP, "::1", 53), Some((Verdict::Allow as u32, 1)));
    // rules[2] is the identity destination: expanded by the agent, no entry here.
    assert_eq!(
        v(PROTO_TCP, "169.254.169.254", 80),
        Some((Verdict::Deny as u32, 3))
    );
    assert_eq!(
        v(PROTO_TCP, "10.20.3.4", 25),
        Some((Verdict::Deny as u32, 4))
    );
    assert_eq!(
        v(PROTO_UDP, "2001:db8::1", 25),
        Some((Verdict::Deny as u32, 5))
    );
    // A deny on a port and an allow on a range: every port of the range is a group.
    assert!(e.iter().any(|(k, _)| k.data.port == 8100));
    assert!(e.iter().all(|(k, _)| k.data.ident == 1));
    Ok(())
}

#[test]
fn key_layout() -> Result<(), PolicyError> {
    let net: IpNet = "10.20.0.0/16"
        .parse()
        .map_err(|_| PolicyError::NotABundle)?;
    let rule = Rule {
        to_ident: 0,
        ident: 1,
        deny: false,
        cidr: net,
        ports: vec![],
        protocol: Protocol::Tcp,
        line: 1,
        text: String::new(),
        timing: Default::default(),
    };
    let e = rule_entries(&policy_with(vec![rule], 1), 1)?;
    assert_eq!(e.len(), 1);
    let (k, v) = e[0];
    assert_eq!(k.prefix_len, 96 + 16);
    assert_eq!(k.data.generation, 1);
    assert_eq!(
        (k.data.proto, k.data.family, k.data.port),
        (PROTO_TCP, FAMILY_V4, 0)
    );
    assert_eq!(k.data.addr[..4], [10, 20, 0, 0]);
    assert!(k.data.addr[4..].iter().all(|b| *b == 0));
    assert_eq!(v, RuleValue::permanent(Verdict::Allow as u32, 0));
    Ok(())
}

#[test]
fn too_many_rules() {
    let rules = (0..40u8)
        .filter_map(|i| {
            Some(Rule {
                to_ident: 0,
                ident: 1,
                deny: false,
                cidr: format!("10.{i}.0.0/16").parse().ok()?,
                ports: vec![(1, 65000)],
                protocol: Protocol::Any,
                line: 0,
                text: String::new(),
                timing: Default::default(),
            })
        })
        .collect();
    let p = policy_with(rules, 1);
    // Beyond the agent's capacity (`--max-rules`): refused, naming the limit.
    let e = rule_entries_of(&p.rules, &[], 0, 100_000, Clock::now());
    assert!(
        matches!(e, Err(PolicyError::TooManyRules { limit: 100_000 })),
        "{:?}",
        e.map(|v| v.len())
    );
    // Within it: compiled.
    let small = policy_with(p.rules[..1].to_vec(), 1);
    let ok = rule_entries_of(&small.rules, &[], 0, 200_000, Clock::now()).map(|v| v.len());
    assert!(matches!(ok, Ok(n) if n > 100_000), "{ok:?}");
}

#[test]
fn large_policies_compile_the_same_on_several_threads() -> Result<(), PolicyError> {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let rules: Vec<Rule> = (0..PARALLEL_FROM * 2)
        .filter_map(|i| {
            let cidr: IpNet = if r.below(4) == 0 {
                NETS[r.below(NETS.len())].parse().ok()?
            } else {
                format!("10.{}.{}.{}/32", i % 200, r.below(250), r.below(250))
                    .parse()
                    .ok()?
            };
            Some(random_rule(&mut r, cidr, 300, 20))
        })
        .collect();
    let p = policy_with(rules, 300);
    let parallel = rule_entries(&p, 1)?;
    let mut sequential = compile_groups(
        &group_rules(&p.rules, &[], LIMIT, Clock::now())?,
        1,
        LIMIT,
        Clock::now(),
    )?;
    sequential.sort_unstable_by_key(|(k, _)| (k.data, k.prefix_len));
    assert!(parallel.len() > PARALLEL_FROM);
    assert!(
        parallel == sequential,
        "parallel and sequential compiles differ"
    );
    Ok(())
}

fn timed(cidr: &str, port: u16, deny: bool, not_before: Option<i64>, expires: Option<i64>) -> Rule {
    Rule {
        to_ident: 0,
        ident: 1,
        deny,
        cidr: cidr.parse().unwrap_or_else(|_| panic!("{cidr}")),
        ports: if port == 0 {
            vec![]
        } else {
            vec![(port, port)]
        },
        protocol: Protocol::Tcp,
        line: 0,
        text: String::new(),
        timing: crate::policy::Timing {
            not_before,
            expires,
            ..Default::default()
        },
    }
}

/// Wall clock 1000 s after the epoch read together with boot clock 50 s.
const CLOCK: Clock = Clock {
    wall_ns: 1_000_000_000_000,
    boot_ns: 50_000_000_000,
};
const S: i64 = 1_000_000_000;

fn verdict_at(e: &[(RuleKey, RuleValue)], addr: &str, port: u16, boot_s: u64) -> (u32, u32) {
    let addr: IpAddr = addr.parse().unwrap_or_else(|_| panic!("{addr}"));
    match kernel_verdict_at(e, 0, 1, PROTO_TCP, addr, port, boot_s * 1_000_000_000) {
        Some(v) => (v.verdict, v.rule),
        None => (Verdict::Deny as u32, RULE_DEFAULT_DENY),
    }
}

#[test]
fn a_time_bound_allow_holds_only_in_its_window_on_the_boot_clock() -> Result<(), PolicyError> {
    let w = CLOCK.wall_ns;
    // Rule 0: permanent allow 10.0.0.0/8 port 80; rule 1: 10.1.2.3:22 from +5 s to +10 s.
    let rules = vec![
        timed("10.0.0.0/8", 80, false, None, None),
        timed("10.1.2.3/32", 22, false, Some(w + 5 * S), Some(w + 10 * S)),
    ];
    let e = rule_entries_of(&rules, &[], 0, 1000, CLOCK)?;
    let allow = Verdict::Allow as u32;
    let deny = Verdict::Deny as u32;
    // Boot 50 s is wall 1000 s: the window is boot [55 s, 60 s).
    assert_eq!(
        verdict_at(&e, "10.1.2.3", 22, 54),
        (deny, RULE_DEFAULT_DENY)
    );
    assert_eq!(verdict_at(&e, "10.1.2.3", 22, 55), (allow, 1));
    assert_eq!(verdict_at(&e, "10.1.2.3", 22, 59), (allow, 1));
    assert_eq!(
        verdict_at(&e, "10.1.2.3", 22, 60),
        (deny, RULE_DEFAULT_DENY)
    );
    // The permanent entry is untouched, whatever the time.
    for t in [0, 57, 1 << 30] {
        assert_eq!(verdict_at(&e, "10.1.2.3", 80, t), (allow, 0));
    }
    // Over at the clock's reading: left out.
    let e = rule_entries_of(
        &rules,
        &[],
        0,
        1000,
        Clock {
            wall_ns: w + 10 * S,
            ..CLOCK
        },
    )?;
    assert_eq!(e.len(), 1);
    Ok(())
}

#[test]
fn a_time_bound_deny_gives_back_what_it_covered() -> Result<(), PolicyError> {
    let w = CLOCK.wall_ns;
    // Rule 0: permanent allow of one host; rule 1: a deny of its /8 until +10 s.
    let rules = vec![
        timed("10.1.2.3/32", 443, false, None, None),
        timed("10.0.0.0/8", 0, true, None, Some(w + 10 * S)),
    ];
    let e = rule_entries_of(&rules, &[], 0, 1000, CLOCK)?;
    let allow = Verdict::Allow as u32;
    let deny = Verdict::Deny as u32;
    assert_eq!(verdict_at(&e, "10.1.2.3", 443, 59), (deny, 1));
    assert_eq!(verdict_at(&e, "10.1.2.3", 443, 60), (allow, 0));
    // The rest of the /8 is denied by the default after the deny is over.
    assert_eq!(verdict_at(&e, "10.9.9.9", 443, 59), (deny, 1));
    assert_eq!(verdict_at(&e, "10.9.9.9", 443, 61).0, deny);
    Ok(())
}

#[test]
fn a_time_bound_allow_inside_a_permanent_allow_changes_nothing_when_over() -> Result<(), PolicyError>
{
    let w = CLOCK.wall_ns;
    let rules = vec![
        timed("10.0.0.0/8", 0, false, None, None),
        timed("10.1.2.3/32", 0, false, None, Some(w + S)),
    ];
    let e = rule_entries_of(&rules, &[], 0, 1000, CLOCK)?;
    // Same verdict both ways: no window at all (the kernel never reads the clock for it).
    assert!(e.iter().all(|(_, v)| !v.is_timed()), "{e:?}");
    assert_eq!(
        verdict_at(&e, "10.1.2.3", 9, 1 << 30).0,
        Verdict::Allow as u32
    );
    Ok(())
}

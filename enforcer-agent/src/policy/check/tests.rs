use super::*;

pub(crate) const FULL: &str = r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: prod.example.org
mode: enforce
unattested: allow
scope: ["/"]
identities:
  - name: payments-api
    spiffeId: spiffe://prod.example.org/ns/payments/sa/api
    match:
      - binarySha256: [9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08]
        cgroup: ["/system.slice/payments.service", "/kubepods.slice/**"]
        uid: [1000]
  - name: payments-db
    match:
      - binarySha256: ["0000000000000000000000000000000000000000000000000000000000000001"]
rules:
  - identity: payments-api
    egress:
      - to: {cidr: 10.20.0.0/16, ports: [5432, "8000-8100"], protocol: tcp}
      - to: {cidr: "::1/128", ports: [53], protocol: udp}
      - to: {identity: payments-db}
    deny:
      - to: {cidr: 169.254.169.254/32}
      - to: {ports: [25]}
"#;

fn errors(src: &str) -> Vec<Diagnostic> {
    match check(src) {
        Ok((p, w)) => panic!("expected errors, got {p:?} {w:?}"),
        Err(d) => d,
    }
}

fn ok(src: &str) -> (Policy, Vec<Diagnostic>) {
    match check(src) {
        Ok(v) => v,
        Err(d) => panic!("{d:#?}"),
    }
}

const HEAD: &str = "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\n";

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

fn has(d: &[Diagnostic], line: usize, col: usize, sev: Severity, needle: &str) -> bool {
    d.iter()
        .any(|x| x.line == line && x.col == col && x.severity == sev && x.message.contains(needle))
}

#[test]
fn full_example() {
    let (p, w) = ok(FULL);
    assert_eq!(p.trust_domain, "prod.example.org");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.unattested, Action::Allow);
    assert!(!p.report_allow);
    assert_eq!(p.identities.len(), 2);
    assert_eq!(
        p.identities[1].spiffe_id,
        "spiffe://prod.example.org/payments-db"
    );
    assert_eq!(
        p.identities[0].matches[0].cgroup,
        vec!["/system.slice/payments.service", "/kubepods.slice/**"]
    );
    assert_eq!(p.identities[0].matches[0].uid, vec![1000]);
    assert_eq!(p.rules.len(), 6);
    let r = &p.rules[0];
    assert_eq!(
        r.text,
        "payments-api egress[0]: tcp 10.20.0.0/16 ports 5432,8000-8100"
    );
    assert_eq!((r.ident, r.deny, r.line), (1, false, 20));
    assert_eq!(r.ports, vec![(5432, 5432), (8000, 8100)]);
    assert_eq!(p.rules[1].protocol, Protocol::Udp);
    // `to: {identity: payments-db}`: a rule the agent expands from live listeners.
    assert_eq!((p.rules[2].to_ident, p.rules[2].deny), (2, false));
    assert_eq!(
        p.rules[2].text,
        "payments-api egress[2]: any identity payments-db all ports"
    );
    assert!(p.rules[3].deny);
    assert_eq!(p.rules[3].protocol, Protocol::Any);
    assert_eq!(p.rules[4].cidr.to_string(), "0.0.0.0/0");
    assert_eq!(p.rules[5].cidr.to_string(), "::/0");
    assert_eq!(p.rules[5].text, "payments-api deny[1]: any ::/0 ports 25");
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn malformed_yaml() {
    let d = errors("apiVersion: enforcer/v1\nkind: [Policy\n");
    assert_eq!(d.len(), 1);
    assert!(d[0].message.starts_with("malformed YAML"), "{d:?}");
    assert_eq!(d[0].line, 3);
    let d = errors("");
    assert!(d[0].message.contains("empty"));
    let d = errors("- a\n- b\n");
    assert!(d[0].message.contains("must be a mapping"));
}

#[test]
fn reports_every_problem_in_order() {
    let src = with_head(
        r#"mode: enforcing
unattested: maybe
colour: blue
scope: ["system.slice", "/a/../b"]
reportAllow: "yes"
identities:
  - name: a
    match: []
  - name: b
    match:
      - {}
      - binarySha256: [abc]
        uid: [-1]
  - name: a
    match:
      - binaryPath: [/usr/bin/x]
  - name: c
    spiffeId: spiffe://other.org/c
    match:
      - uid: [5]
rules:
  - identity: nobody
    egress:
      - to: {cidr: 10.0.0.1/8, ports: [0, 70000, "90-80", "x"]}
      - to: {cidr: 300.0.0.0/8, protocol: sctp}
      - to: {cidr: 10.0.0.0/8, identity: c}
      - from: {cidr: 10.0.0.0/8}
"#,
    );
    let d = errors(&src);
    let expect: &[(usize, usize, Severity, &str)] = &[
        (4, 7, Severity::Error, "mode must be"),
        (5, 13, Severity::Error, "unattested must be"),
        (6, 1, Severity::Error, "unknown key `colour`"),
        (7, 9, Severity::Error, "must start with"),
        (7, 25, Severity::Error, "\"..\""),
        (8, 14, Severity::Error, "reportAllow must be true or false"),
        (11, 12, Severity::Error, "match is empty"),
        (14, 9, Severity::Error, "match[0] is empty"),
        (15, 24, Severity::Error, "not a sha256"),
        (16, 15, Severity::Error, "uid must be a number"),
        (17, 11, Severity::Error, "duplicate identity name \"a\""),
        (19, 21, Severity::Warning, "binaryPath trusts a path"),
        (21, 15, Severity::Error, "spiffe://t.org/<path>"),
        (25, 15, Severity::Error, "unknown identity \"nobody\""),
        (
            27,
            20,
            Severity::Error,
            "write the network address 10.0.0.0/8",
        ),
        (27, 40, Severity::Error, "port 0 is out of range"),
        (27, 43, Severity::Error, "port 70000 is out of range"),
        (27, 50, Severity::Error, "backwards"),
        (27, 59, Severity::Error, "not a number or a range"),
        (28, 20, Severity::Error, "not a CIDR"),
        (28, 43, Severity::Error, "protocol must be"),
        (29, 20, Severity::Error, "either a cidr or an identity"),
        (30, 9, Severity::Error, "unknown key `from`"),
        (30, 9, Severity::Error, "missing the required key `to`"),
    ];
    for (line, col, sev, needle) in expect {
        assert!(
            has(&d, *line, *col, *sev, needle),
            "missing {line}:{col} {needle:?} in {d:#?}"
        );
    }
    assert_eq!(d.len(), expect.len(), "{d:#?}");
    let mut sorted = d.clone();
    sorted.sort_by_key(|x| (x.line, x.col));
    assert_eq!(sorted, d);
}

#[test]
fn missing_keys_and_versions() {
    let d = errors("kind: Pod\n");
    assert!(has(
        &d,
        1,
        1,
        Severity::Error,
        "missing the required key `apiVersion`"
    ));
    assert!(has(
        &d,
        1,
        1,
        Severity::Error,
        "missing the required key `trustDomain`"
    ));
    assert!(has(&d, 1, 7, Severity::Error, "unknown kind \"Pod\""));
    let d = errors("apiVersion: enforcer/v2\nkind: Policy\ntrustDomain: T\n");
    assert!(has(&d, 1, 13, Severity::Error, "unknown apiVersion"));
    assert!(has(&d, 3, 14, Severity::Error, "not a SPIFFE trust domain"));
    let d = errors(&with_head("identities:\n  - name: x\n"));
    assert!(has(
        &d,
        5,
        5,
        Severity::Error,
        "missing the required key `match`"
    ));
    let d = errors(&with_head("identities: {}\n"));
    assert!(has(&d, 4, 13, Severity::Error, "identities must be a list"));
    let d = errors(&with_head("apiVersion: enforcer/v1\n"));
    assert!(has(&d, 4, 1, Severity::Error, "duplicate key `apiVersion`"));
}

#[test]
fn defaults() {
    let (p, w) = ok(HEAD);
    assert!(w.is_empty());
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.unattested, Action::Allow);
    assert_eq!(p.scope, vec!["/"]);
    assert!(!p.report_allow);
}

#[test]
fn cidr_forms() {
    let src = with_head(
        "identities:\n  - name: a\n    match: [{uid: [1]}]\nrules:\n  - identity: a\n    egress:\n      - to: {cidr: 10.1.2.3}\n      - to: {cidr: \"::ffff:10.0.0.0/104\", ports: [\"1-65535\"]}\n      - to: {cidr: \"2001:db8::/32\", ports: [\"443\"]}\n",
    );
    let (p, _) = ok(&src);
    assert_eq!(p.rules[0].cidr.to_string(), "10.1.2.3/32");
    assert_eq!(p.rules[1].cidr.to_string(), "10.0.0.0/8");
    assert_eq!(p.rules[2].ports, vec![(443, 443)]);
    assert_eq!(p.rules[2].text, "a egress[2]: any 2001:db8::/32 ports 443");
}

fn two(a: &str, b: &str) -> String {
    with_head(&format!(
        "identities:\n  - name: a\n    match:\n      - {a}\n  - name: b\n    match:\n      - {b}\n"
    ))
}

const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

#[test]
fn overlaps() {
    let overlapping = [
        (
            format!("binarySha256: [{H1}]"),
            format!("binarySha256: [{H1}, {H2}]"),
        ),
        (format!("binarySha256: [{H1}]"), "uid: [0]".to_string()),
        (
            "cgroup: [\"/a/**\"]".to_string(),
            "cgroup: [\"/a/b/*\"]".to_string(),
        ),
        ("uid: [1, 2]".to_string(), "uid: [2]".to_string()),
        (
            "systemdUnit: [\"nginx*\"]".to_string(),
            "systemdUnit: [nginx.service]".to_string(),
        ),
        (
            format!("{{binarySha256: [{H1}], systemdUnit: [a.service]}}"),
            format!("binarySha256: [{H1}]"),
        ),
        (
            "binaryPath: [/x]".to_string(),
            "binaryPath: [/x, /y]".to_string(),
        ),
        (
            format!("{{binarySha256: [{H1}], binaryPath: [/x]}}"),
            "binaryPath: [/x]".to_string(),
        ),
    ];
    for (a, b) in &overlapping {
        let d = errors(&two(a, b));
        assert!(
            d.iter().any(|x| x.line == 10
                && x.severity == Severity::Error
                && x.message.contains("can match the same process")),
            "{a} / {b}: {d:#?}"
        );
    }
    let disjoint = [
        (
            format!("binarySha256: [{H1}]"),
            format!("binarySha256: [{H2}]"),
        ),
        (
            format!("binarySha256: [{H1}]"),
            "binaryPath: [/x]".to_string(),
        ),
        (
            "cgroup: [\"/a/**\"]".to_string(),
            "cgroup: [\"/b/**\"]".to_string(),
        ),
        (
            "{cgroup: [\"/a/**\"], uid: [1]}".to_string(),
            "uid: [2]".to_string(),
        ),
        (
            "binaryPath: [/x]".to_string(),
            "binaryPath: [/y]".to_string(),
        ),
        (
            "systemdUnit: [a.service]".to_string(),
            "systemdUnit: [\"b*\"]".to_string(),
        ),
        (
            format!("{{binarySha256: [{H1}], cgroup: [\"/a/**\"]}}"),
            format!("{{binarySha256: [{H1}], cgroup: [\"/b\"]}}"),
        ),
    ];
    for (a, b) in &disjoint {
        if let Err(d) = check(&two(a, b)) {
            panic!("{a} / {b}: {d:#?}");
        }
    }
}

#[test]
fn empty_selector_lists_and_bad_globs() {
    let src = with_head(
        "identities:\n  - name: a\n    match:\n      - binarySha256: []\n      - cgroup: [\"system.slice\", \"/a/x**\"]\n      - binaryPath: [bin/x]\n",
    );
    let d = errors(&src);
    assert!(has(&d, 7, 23, Severity::Error, "empty list"));
    assert!(has(&d, 8, 18, Severity::Error, "must start with \"/\""));
    assert!(has(&d, 8, 34, Severity::Error, "whole path segment"));
    assert!(has(&d, 9, 22, Severity::Error, "absolute path"));
}

#[test]
fn systemd_unit_selector() {
    let src = with_head(
        "identities:\n  - name: a\n    match:\n      - systemdUnit: [nginx.service, \"worker@*.service\"]\n        uid: [33]\n",
    );
    let (p, warnings) = match check(&src) {
        Ok(v) => v,
        Err(d) => panic!("{d:#?}"),
    };
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        p.identities[0].matches[0].systemd_unit,
        vec!["nginx.service".to_string(), "worker@*.service".to_string()]
    );
    let src = with_head(
        "identities:\n  - name: a\n    match:\n      - systemdUnit: [nginx, \"/system.slice/x.service\", []]\n",
    );
    let d = errors(&src);
    assert!(
        has(&d, 7, 23, Severity::Error, "\"nginx.service\""),
        "{d:#?}"
    );
    assert!(has(&d, 7, 30, Severity::Error, "is a path"), "{d:#?}");
    assert!(has(&d, 7, 57, Severity::Error, "not a list"), "{d:#?}");
}

#[test]
fn every_cgroup_attribute_is_a_match_key() {
    for attr in crate::policy::CgroupAttr::ALL {
        assert!(MATCH_KEYS.contains(&attr.key()), "{attr:?}");
    }
}

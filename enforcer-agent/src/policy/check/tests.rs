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
    assert!(p.revoke_connections, "revokeConnections defaults to true");
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
        match attr.yaml_key() {
            (None, key) => assert!(MATCH_KEYS.contains(&key), "{attr:?}"),
            (Some(parent), key) => {
                assert!(MATCH_KEYS.contains(&parent), "{attr:?}");
                assert!(K8S_KEYS.contains(&key), "{attr:?}");
                assert_eq!(attr.key(), format!("{parent}.{key}"));
            }
        }
    }
    for key in K8S_KEYS {
        assert!(
            crate::policy::CgroupAttr::ALL
                .iter()
                .any(|a| a.yaml_key() == (Some(K8S_KEY), *key)),
            "{key}"
        );
    }
}

/// (line, col) of the first occurrence of `needle` in `src`, 1-based.
fn at(src: &str, needle: &str) -> (usize, usize) {
    let Some(i) = src.find(needle) else {
        panic!("{needle:?} not in {src}")
    };
    let line = src[..i].matches('\n').count() + 1;
    let col = i - src[..i].rfind('\n').map_or(0, |n| n + 1) + 1;
    (line, col)
}

#[test]
fn k8s_selectors() {
    let src = with_head(&format!(
        "identities:\n  - name: web\n    match:\n      - binarySha256: [{H1}]\n        k8s:\n          namespace: [payments]\n          serviceAccount: [api]\n          podLabels: {{app: web, \"app.kubernetes.io/tier\": \"back*\", version: 2, empty: \"\"}}\n          container: [\"app*\", sidecar]\n  - name: other\n    match:\n      - k8s: {{namespace: [\"team-*\"]}}\n"
    ));
    let (p, warnings) = ok(&src);
    assert!(warnings.is_empty(), "{warnings:?}");
    let e = &p.identities[0].matches[0];
    assert_eq!(e.k8s_namespace, vec!["payments"]);
    assert_eq!(e.k8s_service_account, vec!["api"]);
    assert_eq!(
        e.k8s_pod_labels,
        vec![
            "app=web",
            "app.kubernetes.io/tier=back*",
            "version=2",
            "empty="
        ]
    );
    assert_eq!(e.k8s_container, vec!["app*", "sidecar"]);
    // No spiffeId: SPIRE's k8s shape when one namespace and one account are pinned.
    assert_eq!(
        p.identities[0].spiffe_id,
        "spiffe://t.org/ns/payments/sa/api"
    );
    assert_eq!(p.identities[1].spiffe_id, "spiffe://t.org/other");
    assert_eq!(p.identities[1].matches[0].k8s_namespace, vec!["team-*"]);
}

#[test]
fn k8s_selector_errors() {
    let long = "a".repeat(64);
    let entries = [
        (
            "k8s: {Namespace: [x]}",
            "Namespace",
            "did you mean `namespace`?",
        ),
        (
            "k8s: {names: [x]}",
            "names",
            "unknown key `names` in match[2].k8s",
        ),
        ("k8s: {}", "{}", "is empty, so it selects nothing"),
        ("k8s: [payments]", "[payments]", "must be a mapping"),
        ("k8s: {namespace: []}", "[]", "empty list"),
        ("k8s: {namespace: payments}", "payments}", "must be a list"),
        (
            "k8s: {namespace: [Payments]}",
            "Payments",
            "upper-case letter 'P'",
        ),
        (
            "k8s: {namespace: [\"pay_ments\"]}",
            "\"pay_ments\"",
            "DNS-1123 label",
        ),
        (
            "k8s: {namespace: [\"-pay\"]}",
            "\"-pay\"",
            "starts with '-'",
        ),
        (
            &format!("k8s: {{namespace: [{long}]}}"),
            &long,
            "longer than 63",
        ),
        (
            "k8s: {namespace: [\"\"]}",
            "\"\"]",
            "must be a non-empty string",
        ),
        (
            "k8s: {serviceAccount: [\"api..x\"]}",
            "\"api..x\"",
            "empty part between dots",
        ),
        (
            "k8s: {serviceAccount: [\"api.-x\"]}",
            "\"api.-x\"",
            "DNS-1123 subdomain",
        ),
        (
            "k8s: {container: [\"app/1\"]}",
            "\"app/1\"",
            "container name",
        ),
        (
            "k8s: {podLabels: [app]}",
            "[app]",
            "must be a mapping of label keys",
        ),
        ("k8s: {podLabels: {}}", "{}}", "give at least one label"),
        (
            "k8s: {podLabels: {\"app*\": web}}",
            "\"app*\"",
            "label keys are exact",
        ),
        (
            "k8s: {podLabels: {\"Example.com/app\": web}}",
            "\"Example.com",
            "prefix",
        ),
        (
            "k8s: {podLabels: {\"-app\": web}}",
            "\"-app\"",
            "not a Kubernetes label key",
        ),
        (
            "k8s: {podLabels: {app: \"web app\"}}",
            "\"web app\"",
            "label value",
        ),
        ("k8s: {podLabels: {app: null}}", "null", "must be a string"),
        (
            "k8s: {podLabels: {app: [web]}}",
            "[web]",
            "must be a string",
        ),
        (
            "k8s: {podLabels: {app: a, app: b}}",
            "app: b",
            "duplicate label key \"app\"",
        ),
    ];
    let mut src = with_head("identities:\n  - name: a\n    match:\n      - uid: [0]\n");
    for (e, _, _) in &entries {
        src.push_str(&format!("      - {e}\n"));
    }
    let d = errors(&src);
    for (i, (e, needle, message)) in entries.iter().enumerate() {
        let line_start = src
            .find(&format!("      - {e}\n"))
            .unwrap_or_else(|| panic!("{e}"));
        let (line, _) = at(&src, &format!("      - {e}\n"));
        let col = e.find(needle).unwrap_or_else(|| panic!("{needle} in {e}")) + 9;
        assert!(line_start > 0);
        assert!(
            has(&d, line, col, Severity::Error, message),
            "entry {i} {e}: expected {line}:{col} {message:?} in {d:#?}"
        );
    }
    // One diagnostic per wrong entry (each reported where it stands, no cascade).
    assert_eq!(d.len(), entries.len(), "{d:#?}");
}

#[test]
fn k8s_default_spiffe_id() {
    let id = |matches: &str, spiffe: &str| -> String {
        let src = with_head(&format!(
            "identities:\n  - name: web\n{spiffe}    match:\n{matches}"
        ));
        ok(&src).0.identities[0].spiffe_id.clone()
    };
    let pinned = "      - k8s: {namespace: [prod], serviceAccount: [api]}\n";
    assert_eq!(id(pinned, ""), "spiffe://t.org/ns/prod/sa/api");
    // Every entry with k8s pins the same pair; an entry without k8s does not count.
    assert_eq!(
        id(
            &format!(
                "{pinned}      - {{binarySha256: [{H1}], k8s: {{namespace: [prod], serviceAccount: [api], container: [app]}}}}\n      - uid: [5]\n"
            ),
            ""
        ),
        "spiffe://t.org/ns/prod/sa/api"
    );
    for other in [
        "      - k8s: {namespace: [dev], serviceAccount: [api]}\n",
        "      - k8s: {namespace: [prod]}\n",
    ] {
        assert_eq!(id(&format!("{pinned}{other}"), ""), "spiffe://t.org/web");
    }
    for m in [
        "      - k8s: {namespace: [\"prod*\"], serviceAccount: [api]}\n",
        "      - k8s: {namespace: [prod, dev], serviceAccount: [api]}\n",
        "      - k8s: {namespace: [prod], serviceAccount: [\"*\"]}\n",
        "      - k8s: {namespace: [prod], podLabels: {app: web}}\n",
        "      - uid: [5]\n",
    ] {
        assert_eq!(id(m, ""), "spiffe://t.org/web", "{m}");
    }
    // An explicit spiffeId always wins.
    assert_eq!(
        id(pinned, "    spiffeId: spiffe://t.org/payments/api\n"),
        "spiffe://t.org/payments/api"
    );
}

#[test]
fn k8s_overlaps() {
    let k = |s: &str| format!("{{binarySha256: [{H1}], k8s: {s}}}");
    for (a, b) in [
        (k("{namespace: [prod]}"), k("{namespace: [\"p*\"]}")),
        (k("{podLabels: {app: web}}"), k("{podLabels: {tier: back}}")),
        (k("{podLabels: {app: web}}"), k("{namespace: [prod]}")),
        (
            k("{podLabels: {app: \"w*\"}}"),
            format!("binarySha256: [{H1}]"),
        ),
    ] {
        let d = errors(&two(&a, &b));
        assert!(
            d.iter()
                .any(|x| x.line == 10 && x.message.contains("can match the same process")),
            "{a} / {b}: {d:#?}"
        );
    }
    for (a, b) in [
        (k("{namespace: [prod]}"), k("{namespace: [dev]}")),
        (
            k("{podLabels: {app: web, tier: back}}"),
            k("{podLabels: {app: db, tier: back}}"),
        ),
        (
            k("{serviceAccount: [api]}"),
            k("{serviceAccount: [\"db*\"]}"),
        ),
        (k("{container: [app]}"), k("{container: [sidecar]}")),
    ] {
        if let Err(d) = check(&two(&a, &b)) {
            panic!("{a} / {b}: {d:#?}");
        }
    }
}

#[test]
fn sockets_list() {
    let src = with_head(
        "identities:\n  - name: a\n    match:\n      - uid: [1]\n    sockets: [icmp, raw, udplite]\n  - name: b\n    match:\n      - uid: [2]\n",
    );
    let (p, w) = ok(&src);
    assert!(w.is_empty(), "{w:?}");
    use enforcer_common::SocketKind;
    assert_eq!(
        p.identities[0].sockets,
        SocketKind::Icmp.bit() | SocketKind::Raw.bit() | SocketKind::UdpLite.bit()
    );
    assert_eq!(p.identities[1].sockets, 0);
    let entries = crate::policy::socket_entries(&p, 1);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0.ident, 1);
    // A bundle keeps the list.
    let back = crate::policy::decode_bundle(&crate::policy::encode_bundle(&p));
    assert_eq!(
        back.map(|b| b.identities[0].sockets),
        Ok(p.identities[0].sockets)
    );
    let d = errors(&with_head(
        "identities:\n  - name: a\n    match:\n      - uid: [1]\n    sockets: [icmp, tcp]\n",
    ));
    assert!(
        has(&d, 8, 21, Severity::Error, "unknown socket kind"),
        "{d:#?}"
    );
    let d = errors(&with_head(
        "identities:\n  - name: a\n    match:\n      - uid: [1]\n    sockets: icmp\n",
    ));
    assert!(has(&d, 8, 14, Severity::Error, "must be a list"), "{d:#?}");
}

#[test]
fn revoke_connections_is_a_boolean() {
    let off = FULL.replace(
        "scope: [\"/\"]\n",
        "scope: [\"/\"]\nrevokeConnections: false\n",
    );
    assert!(!ok(&off).0.revoke_connections);
    let bad = FULL.replace(
        "scope: [\"/\"]\n",
        "scope: [\"/\"]\nrevokeConnections: no\n",
    );
    let d = errors(&bad);
    assert!(
        d.iter().any(|d| d
            .message
            .contains("revokeConnections must be true or false")),
        "{d:?}"
    );
}

const TIMED_IDS: &str = "identities:\n  - name: api\n    match: [{uid: [1000]}]\n";

#[test]
fn time_bound_entries() {
    let src = with_head(&format!(
        "maxGrant: 4h\n{TIMED_IDS}rules:\n  - identity: api\n    egress:\n      - to: {{cidr: 10.20.5.7/32, ports: [22], protocol: tcp}}\n        expires: 2099-12-01T18:00:00Z\n        notBefore: \"2099-12-01T17:00:00+01:00\"\n        reason: \"INC-1234 break-glass\"\n    deny:\n      - to: {{cidr: 10.0.0.0/8}}\n        expires: 2099-01-01T00:00:00Z\n"
    ));
    let (p, w) = ok(&src);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.max_grant_secs, 4 * 3600);
    let t = &p.rules[0].timing;
    assert_eq!(t.expires, Some(4_099_831_200 * 1_000_000_000));
    assert_eq!(t.not_before, Some(4_099_824_000 * 1_000_000_000));
    assert_eq!(t.reason.as_deref(), Some("INC-1234 break-glass"));
    assert!(
        p.rules[0]
            .text
            .ends_with("from 2099-12-01T16:00:00Z until 2099-12-01T18:00:00Z"),
        "{}",
        p.rules[0].text
    );
    assert!(p.rules[1].deny && p.rules[1].timing.expires.is_some());
    // Without maxGrant: one hour.
    let (p, _) = ok(&with_head(TIMED_IDS));
    assert_eq!(p.max_grant_secs, crate::policy::DEFAULT_MAX_GRANT_SECS);
}

#[test]
fn time_bound_entries_report_bad_instants_where_they_are() {
    let entry = |extra: &str| {
        with_head(&format!(
            "{TIMED_IDS}rules:\n  - identity: api\n    egress:\n      - to: {{cidr: 10.0.0.1}}\n{extra}"
        ))
    };
    // Line 11, column 18: the value.
    let d = errors(&entry("        expires: tomorrow\n"));
    assert!(
        has(&d, 11, 18, Severity::Error, "not an RFC 3339 instant"),
        "{d:?}"
    );
    let d = errors(&entry("        expires: 2026-13-01T00:00:00Z\n"));
    assert!(
        has(&d, 11, 18, Severity::Error, "not an RFC 3339 instant"),
        "{d:?}"
    );
    // An instant without an offset is ambiguous: refused.
    let d = errors(&entry("        expires: 2099-12-01T18:00:00\n"));
    assert!(has(&d, 11, 18, Severity::Error, "RFC 3339"), "{d:?}");
    let d = errors(&entry(
        "        expires: 2099-12-01T18:00:00Z\n        notBefore: 2099-12-01T18:00:00Z\n",
    ));
    assert!(
        has(&d, 11, 18, Severity::Error, "is not after notBefore"),
        "{d:?}"
    );
    let d = errors(&entry("        reason: \"\"\n"));
    assert!(
        d.iter()
            .any(|x| x.line == 11 && x.message.contains("reason")),
        "{d:?}"
    );
    let d = errors(&with_head("maxGrant: forever\n"));
    assert!(has(&d, 4, 11, Severity::Error, "not a duration"), "{d:?}");
    // Already expired: a warning, the policy is valid.
    let (_, w) = ok(&entry("        expires: 2020-01-01T00:00:00Z\n"));
    assert!(
        has(
            &w,
            11,
            18,
            Severity::Warning,
            "expired at 2020-01-01T00:00:00Z"
        ),
        "{w:?}"
    );
}

#[test]
fn preload_modifier() {
    let h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let src = with_head(&format!(
        "identities:\n  - name: a\n    match:\n      - binarySha256: [{h}]\n        preload: [{h}]\n"
    ));
    let (p, _) = ok(&src);
    assert_eq!(p.identities[0].matches[0].preload.len(), 1);
    assert!(crate::policy::has_preload(&p));
    assert!(!crate::policy::has_preload(&ok(FULL).0));

    let bad = with_head(&format!(
        "identities:\n  - name: a\n    match:\n      - binarySha256: [{h}]\n        preload: [abc]\n      - preload: [{h}]\n      - uid: [1]\n        preload: []\n"
    ));
    let d = errors(&bad);
    let (l, c) = at(&bad, "abc");
    assert!(
        has(
            &d,
            l,
            c,
            Severity::Error,
            "preload entry \"abc\" is not a sha256"
        ),
        "{d:#?}"
    );
    let (l, c) = at(&bad, "preload: [9f");
    assert!(
        has(&d, l, c, Severity::Error, "has only preload:"),
        "{d:#?}"
    );
    let (l, c) = at(&bad, "[]");
    assert!(has(&d, l, c, Severity::Error, "empty list"), "{d:#?}");
}

use super::*;
use crate::policy::{MatchEntry, Policy};

const K8S: &str = include_str!("../../../tests/fixtures/spire/k8s.json");
const UNIX: &str = include_str!("../../../tests/fixtures/spire/unix.json");
const SHA_API: &str = "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479";
const SHA_DB: &str = "7bdc25d1694ef984782a16f6f1710c1c6bc83ba7a131b515baf532bea021d011";

fn run(json: &str) -> Import {
    import(json.as_bytes(), &Options::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The written policy, through the real checker.
fn checked(i: &Import) -> Policy {
    match policy::check(&i.yaml) {
        Ok((p, _)) => p,
        Err(d) => panic!("{d:?}\n{}", i.yaml),
    }
}

fn skip_reason<'a>(i: &'a Import, entry_id: &str) -> &'a str {
    i.skipped
        .iter()
        .find(|s| s.entry_id == entry_id)
        .map(|s| s.reason.as_str())
        .unwrap_or_else(|| panic!("{entry_id} not skipped: {:?}", i.skipped))
}

fn sha(hex: &str) -> [u8; 32] {
    let mut out = [0; 32];
    hex::decode_to_slice(hex, &mut out).expect("hex");
    out
}

#[test]
fn kubernetes_entries() {
    let i = run(K8S);
    assert_eq!(i.trust_domain, "example.org");
    assert!(i.passes_check(), "{:?}", i.diagnostics);
    let p = checked(&i);
    assert_eq!(p.trust_domain, "example.org");
    assert_eq!(p.mode, policy::Mode::Audit);
    assert_eq!(p.unattested, policy::Action::Allow);
    assert!(p.rules.is_empty());
    let names: Vec<(&str, &str)> = p
        .identities
        .iter()
        .map(|id| (id.name.as_str(), id.spiffe_id.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            (
                "ns-payments-sa-api",
                "spiffe://example.org/ns/payments/sa/api"
            ),
            (
                "ns-payments-sa-db",
                "spiffe://example.org/ns/payments/sa/db"
            ),
        ]
    );
    // Two entries of one SPIFFE ID: one identity, two match entries (OR), by entry id.
    let api = &p.identities[0];
    assert_eq!(
        api.matches,
        [
            MatchEntry {
                k8s_namespace: vec!["payments".into()],
                k8s_service_account: vec!["api".into()],
                k8s_container: vec!["api-canary".into()],
                ..MatchEntry::default()
            },
            MatchEntry {
                k8s_namespace: vec!["payments".into()],
                k8s_service_account: vec!["api".into()],
                k8s_pod_labels: vec![
                    policy_label("app.kubernetes.io/name", "payments-api"),
                    policy_label("tier", "backend"),
                ],
                k8s_container: vec!["api".into()],
                ..MatchEntry::default()
            },
        ]
    );
    assert_eq!(
        p.identities[1].matches,
        [MatchEntry {
            binary_sha256: vec![sha(SHA_DB)],
            k8s_namespace: vec!["payments".into()],
            k8s_service_account: vec!["db".into()],
            ..MatchEntry::default()
        }]
    );
    let imported: Vec<&str> = i.imported.iter().map(|e| e.entry_id.as_str()).collect();
    assert_eq!(
        imported,
        [
            "1a2b3c4d-0000-4000-8000-000000000003",
            "2c4d8a10-0000-4000-8000-000000000002",
            "3d5e7f90-0000-4000-8000-000000000004"
        ]
    );
    // The comments name each source entry.
    for id in &imported {
        assert!(
            i.yaml.contains(&format!(
                "# SPIRE entry {id} (parent spiffe://example.org/ns/spire/sa/spire-agent)"
            )),
            "{}",
            i.yaml
        );
    }

    // Every other entry is skipped, with the reason.
    assert_eq!(i.skipped.len(), 7, "{:?}", i.skipped);
    assert!(skip_reason(&i, "0b1e6c9e-0000-4000-8000-000000000001").contains("node registration"));
    let r = skip_reason(&i, "4e6f8a01-0000-4000-8000-000000000005");
    assert!(
        r.contains("k8s:pod-uid:7f3c2a51") && r.contains("widen"),
        "{r}"
    );
    let r = skip_reason(&i, "5f708b12-0000-4000-8000-000000000006");
    assert!(
        r.contains("docker:label") && r.contains("\"docker\" attestor"),
        "{r}"
    );
    let r = skip_reason(&i, "60819c23-0000-4000-8000-000000000007");
    assert!(
        r.contains("never match") && r.contains("ops-staging"),
        "{r}"
    );
    let r = skip_reason(&i, "7192ad34-0000-4000-8000-000000000008");
    assert!(r.contains("expires_at 1893456000"), "{r}");
    let r = skip_reason(&i, "82a3be45-0000-4000-8000-000000000009");
    assert!(r.contains("Bad_NS") && r.contains("namespace"), "{r}");
    let r = skip_reason(&i, "93b4cf56-0000-4000-8000-00000000000a");
    assert!(r.contains("k8s:node-name:worker-1"), "{r}");
    // Nothing of a skipped entry reaches the policy.
    for s in &i.skipped {
        assert!(!i.yaml.contains(&s.entry_id), "{}", s.entry_id);
    }
}

fn policy_label(k: &str, v: &str) -> String {
    format!("{k}={v}")
}

#[test]
fn unix_and_systemd_entries_golden() {
    let i = run(UNIX);
    let expected = format!(
        r#"# Identities imported from SPIRE registration entries by `enforcer-agent import spire`.
# The selectors of one SPIRE entry all hold: they are the keys of one match entry; the
# entries of one SPIFFE ID are the identity's match entries (any one holds). A SPIRE
# entry's parent_id (the nodes it is issued on) is not translated: this policy holds on
# every node it is given to.
# Next: write each identity's egress under `rules:`, run `enforcer-agent policy check`,
# then set `mode: enforce` and narrow `scope`.
apiVersion: enforcer/v1
kind: Policy
trustDomain: "example.org"
mode: audit            # no rules yet: enforced, every imported identity would be denied every connect
unattested: allow
scope: ["/"]
identities:
  - name: "legacy-batch"
    spiffeId: "spiffe://example.org/legacy/batch"
    match:
      # SPIRE entry host-0002 (parent spiffe://example.org/spire/agent/x509pop/4f0c2e6b1a): unix:path:/opt/batch/bin/run unix:uid:0
      - binaryPath: ["/opt/batch/bin/run"]
        uid: [0]
  - name: "payments-api"
    spiffeId: "spiffe://example.org/payments/api"
    match:
      # SPIRE entry host-0001 (parent spiffe://example.org/spire/agent/x509pop/4f0c2e6b1a): unix:sha256:{SHA_API} unix:uid:1000
      - binarySha256: ["{SHA_API}"]
        uid: [1000]
  - name: "web-nginx"
    spiffeId: "spiffe://example.org/web/nginx"
    match:
      # SPIRE entry host-0003 (parent spiffe://example.org/spire/agent/x509pop/node-a): systemd:id:nginx.service unix:uid:33
      # SPIRE entry host-0004 (parent spiffe://example.org/spire/agent/x509pop/node-b): systemd:id:nginx.service unix:uid:33
      - uid: [33]
        systemdUnit: ["nginx.service"]
rules: []              # e.g. - identity: NAME
#                               egress: [{{to: {{cidr: 10.0.0.0/8, ports: [443], protocol: tcp}}}}]
"#
    );
    assert_eq!(i.yaml, expected);
    let p = checked(&i);
    assert_eq!(p.identities.len(), 3);
    // unix:path is a binaryPath: it checks, with the checker's warning.
    assert!(i.passes_check());
    assert_eq!(i.diagnostics.len(), 1, "{:?}", i.diagnostics);
    assert!(
        i.diagnostics[0]
            .message
            .contains("binaryPath trusts a path")
    );
    let r = skip_reason(&i, "host-0005");
    assert!(
        r.contains("unix:user:www-data") && r.contains("unix:uid"),
        "{r}"
    );
    let r = skip_reason(&i, "host-0006");
    assert!(r.contains("unix:gid:1000") && r.contains("groups"), "{r}");
    assert_eq!(i.skipped.len(), 2);
    assert_eq!(i.imported.len(), 4);
}

#[test]
fn output_does_not_depend_on_entry_order() {
    for fixture in [K8S, UNIX] {
        let mut v: serde_json::Value = serde_json::from_str(fixture).expect("fixture");
        let a = run(fixture);
        if let Some(list) = v["entries"].as_array_mut() {
            list.reverse();
        }
        let b = run(&v.to_string());
        assert_eq!(a.yaml, b.yaml);
        assert_eq!(a.imported, b.imported);
    }
}

#[test]
fn trust_domains() {
    let two = r#"{"entries": [
        {"id": "a", "spiffe_id": {"trust_domain": "example.org", "path": "/a"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "unix", "value": "uid:1"}]},
        {"id": "b", "spiffe_id": {"trust_domain": "other.org", "path": "/b"},
         "parent_id": {"trust_domain": "other.org", "path": "/agent"},
         "selectors": [{"type": "unix", "value": "uid:2"}]}]}"#;
    assert_eq!(
        import(two.as_bytes(), &Options::default()).map(|i| i.yaml),
        Err(SpireError::SeveralTrustDomains(vec![
            "example.org".into(),
            "other.org".into()
        ]))
    );
    let pick = Options {
        trust_domain: Some("other.org".into()),
    };
    let i = import(two.as_bytes(), &pick).expect("import");
    assert_eq!(checked(&i).identities[0].spiffe_id, "spiffe://other.org/b");
    assert!(skip_reason(&i, "a").contains("trust domain \"example.org\""));
    let bad = Options {
        trust_domain: Some("Other.org".into()),
    };
    assert!(matches!(
        import(two.as_bytes(), &bad),
        Err(SpireError::BadTrustDomain(_))
    ));
}

#[test]
fn bad_input_is_an_error() {
    let err = |s: &str| {
        import(s.as_bytes(), &Options::default())
            .err()
            .unwrap_or_else(|| panic!("{s} imported"))
    };
    assert!(matches!(err("Found 2 entries"), SpireError::NotJson(_)));
    assert!(matches!(err("[]"), SpireError::NotEntries(_)));
    assert!(matches!(err(r#"{"id": "x"}"#), SpireError::NotEntries(_)));
    assert!(matches!(
        err(r#"{"entries": {"id": "x"}}"#),
        SpireError::NotEntries(_)
    ));
    assert!(matches!(
        err(r#"{"entries": [{"id": "x", "selectors": "unix:uid:0"}]}"#),
        SpireError::NotEntries(_)
    ));
    assert_eq!(
        err(r#"{"entries": [], "next_page_token": ""}"#),
        SpireError::NoTrustDomain
    );
    // An empty list with a trust domain is an empty, valid policy.
    let i = import(
        br#"{"entries": []}"#,
        &Options {
            trust_domain: Some("example.org".into()),
        },
    )
    .expect("import");
    assert!(checked(&i).identities.is_empty());
    assert!(i.passes_check() && i.skipped.is_empty());
}

#[test]
fn entry_create_data_form_with_uri_ids() {
    let json = r#"{"entries": [{"selectors": [{"type": "unix", "value": "uid:1000"},
        {"type": "k8s", "value": "ns:web"}], "spiffe_id": "spiffe://example.org/web",
        "parent_id": "spiffe://example.org/spire/agent/k8s_psat/c/n", "x509_svid_ttl": 3600,
        "expires_at": 0}]}"#;
    let i = run(json);
    let p = checked(&i);
    assert_eq!(p.identities[0].name, "web");
    assert_eq!(p.identities[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(p.identities[0].matches[0].uid, [1000]);
    assert_eq!(p.identities[0].matches[0].k8s_namespace, ["web"]);
}

#[test]
fn selectors_that_would_widen_are_skipped() {
    let entry = |id: &str, path: &str, sels: &[(&str, &str)]| {
        let sels: Vec<serde_json::Value> = sels
            .iter()
            .map(|(t, v)| serde_json::json!({"type": t, "value": v}))
            .collect();
        serde_json::json!({"id": id, "spiffe_id": {"trust_domain": "example.org", "path": path},
            "parent_id": {"trust_domain": "example.org", "path": "/agent"}, "selectors": sels})
    };
    let entries = vec![
        entry("glob", "/g", &[("k8s", "ns:pay*")]),
        entry("two-uids", "/u", &[("unix", "uid:1"), ("unix", "uid:2")]),
        entry(
            "same-uid-twice",
            "/same",
            &[("unix", "uid:7"), ("unix", "uid:7")],
        ),
        entry(
            "label-twice",
            "/l",
            &[("k8s", "pod-label:app:a"), ("k8s", "pod-label:app:b")],
        ),
        entry("bad-label", "/bl", &[("k8s", "pod-label:app")]),
        entry(
            "upper-sha",
            "/s",
            &[("unix", &format!("sha256:{}", SHA_API.to_uppercase()))],
        ),
        entry("uid-max", "/m", &[("unix", "uid:4294967295")]),
        entry("uid-text", "/t", &[("unix", "uid:root")]),
        entry("relative-path", "/r", &[("unix", "path:bin/x")]),
        entry("slice", "/sl", &[("systemd", "id:system.slice")]),
        entry(
            "fragment",
            "/f",
            &[("systemd", "fragment_path:/lib/systemd/system/x.service")],
        ),
        entry("no-selectors", "/n", &[]),
        entry("empty-path", "", &[("unix", "uid:3")]),
        entry("no-slash", "x", &[("unix", "uid:4")]),
        serde_json::json!({"id": "no-id", "selectors": [{"type": "unix", "value": "uid:5"}]}),
        entry("ok", "/ok", &[("unix", "uid:8"), ("k8s", "pod-label:app:")]),
    ];
    let i = run(&serde_json::json!({ "entries": entries }).to_string());
    let p = checked(&i);
    let ids: Vec<&str> = p.identities.iter().map(|id| id.name.as_str()).collect();
    assert_eq!(ids, ["ok", "same"]);
    assert_eq!(p.identities[0].matches[0].k8s_pod_labels, ["app="]);
    assert_eq!(p.identities[1].matches[0].uid, [7]);
    for (id, needle) in [
        ("glob", "'*'"),
        ("two-uids", "never match"),
        ("label-twice", "never match"),
        ("bad-label", "KEY:VALUE"),
        ("upper-sha", "lower-case"),
        ("uid-max", "not a uid"),
        ("uid-text", "not a uid"),
        ("relative-path", "absolute"),
        ("slice", "system.slice"),
        ("fragment", "systemd:fragment_path"),
        ("no-selectors", "no selectors"),
        ("empty-path", "no path"),
        ("no-slash", "does not start with \"/\""),
        ("no-id", "no spiffe_id"),
    ] {
        let r = skip_reason(&i, id);
        assert!(r.contains(needle), "{id}: {r}");
    }
}

#[test]
fn overlapping_identities_fail_the_check() {
    let json = r#"{"entries": [
        {"id": "broad", "spiffe_id": {"trust_domain": "example.org", "path": "/ns/web"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "k8s", "value": "ns:web"}]},
        {"id": "narrow", "spiffe_id": {"trust_domain": "example.org", "path": "/ns/web/sa/api"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "k8s", "value": "ns:web"}, {"type": "k8s", "value": "sa:api"}]}]}"#;
    let i = run(json);
    assert!(!i.passes_check());
    assert!(
        i.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error
                && d.message.contains("can match the same process")),
        "{:?}",
        i.diagnostics
    );
    assert_eq!(i.imported.len(), 2);
}

#[test]
fn input_text_cannot_inject_yaml() {
    let json = serde_json::json!({"entries": [
        {"id": "x\nrules: [{identity: a}]\n#", "spiffe_id": {"trust_domain": "example.org", "path": "/a"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent\n  - name: evil"},
         "selectors": [{"type": "unix", "value": "uid:1"}]},
        {"id": "y", "spiffe_id": {"trust_domain": "example.org", "path": "/b"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "k8s", "value": "container-name:api\"]\n  uid: [0"}]},
    ]});
    let i = run(&json.to_string());
    let p = checked(&i);
    assert_eq!(p.identities.len(), 1);
    assert_eq!(
        p.identities[0].matches,
        [MatchEntry {
            uid: vec![1],
            ..MatchEntry::default()
        }]
    );
    assert!(
        i.yaml
            .contains("# SPIRE entry x\\nrules: [{identity: a}]\\n#"),
        "{}",
        i.yaml
    );
    assert!(skip_reason(&i, "y").contains("container"));
}

#[test]
fn names_are_unique() {
    let json = r#"{"entries": [
        {"id": "1", "spiffe_id": {"trust_domain": "example.org", "path": "/a-b/c"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "unix", "value": "uid:1"}]},
        {"id": "2", "spiffe_id": {"trust_domain": "example.org", "path": "/a/b-c"},
         "parent_id": {"trust_domain": "example.org", "path": "/agent"},
         "selectors": [{"type": "unix", "value": "uid:2"}]}]}"#;
    let p = checked(&run(json));
    let names: Vec<(&str, &str)> = p
        .identities
        .iter()
        .map(|id| (id.name.as_str(), id.spiffe_id.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("a-b-c", "spiffe://example.org/a-b/c"),
            ("a-b-c-2", "spiffe://example.org/a/b-c")
        ]
    );
}

//! The policy shown in the README must stay valid.

#[test]
fn readme_policy_checks() {
    let readme = include_str!("../../README.md");
    let start = readme.find("```yaml\n").expect("README has a yaml block") + "```yaml\n".len();
    let len = readme[start..].find("```").expect("the yaml block ends");
    let yaml = &readme[start..start + len];
    match enforcer_agent::policy::check(yaml) {
        Ok((p, warnings)) => {
            assert!(warnings.is_empty(), "README policy warns: {warnings:?}");
            assert_eq!(p.identities.len(), 2);
            assert_eq!(
                p.identities[0].spiffe_id,
                "spiffe://prod.example.org/payments-api"
            );
        }
        Err(d) => panic!("README policy does not check: {d:?}"),
    }
}

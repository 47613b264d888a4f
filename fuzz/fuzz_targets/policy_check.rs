//! The policy YAML parser and checker (`enforcer-agent policy check`, `run --policy`, the
//! policy file watch, `policy apply`), then what the agent does with a policy it accepted:
//! the bundle, the kernel rule entries, the identity classes.
//!
//! Beyond "no panic": a policy that `check` accepts must compile to a bundle that the agent
//! decodes back to the same policy (else `policy compile` would write bundles the agent
//! refuses, or reads differently).
#![no_main]

use enforcer_agent::policy::{
    CgroupFacts, Classes, Clock, check, decode_bundle, encode_bundle, policy_hash, rule_entries_of,
};
use libfuzzer_sys::fuzz_target;

/// Rule entries one input may compile to (the agent's own limit is far larger; this keeps
/// an input that expands port ranges fast to run).
const LIMIT: usize = 1 << 14;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((policy, _warnings)) = check(source) else {
        return;
    };
    let bundle = encode_bundle(&policy);
    match decode_bundle(&bundle) {
        Ok(back) => assert_eq!(
            back, policy,
            "the bundle of a checked policy decodes differently"
        ),
        Err(e) => panic!("the bundle of a checked policy is refused: {e}"),
    }
    let _ = policy_hash(&policy);
    let _ = rule_entries_of(&policy.rules, &[], 1, LIMIT, Clock::now());
    let mut classes = Classes::new(&policy);
    for scope in &policy.scope {
        classes.cg_class(&CgroupFacts::without_pod(scope));
    }
    for m in policy.identities.iter().flat_map(|i| &i.matches) {
        for sha in &m.binary_sha256 {
            classes.bin_class(sha, m.binary_path.first().map(String::as_str));
        }
        for cg in &m.cgroup {
            classes.cg_class(&CgroupFacts::without_pod(cg));
        }
    }
    let _ = classes.idmatch_entries(1);
});

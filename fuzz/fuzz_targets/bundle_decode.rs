//! The compiled policy bundle decoder (`run --policy FILE`, `policy apply` of a bundle): the
//! bytes may come from anywhere the operator got a file. Inputs without the bundle's magic are
//! also tried with it prepended, so the fuzzer reaches the protobuf decoder and the checks.
//!
//! Beyond "no panic": a bundle the agent accepts re-encodes to one that decodes the same.
#![no_main]

use enforcer_agent::policy::{
    Classes, Clock, decode_bundle, encode_bundle, is_bundle, load, rule_entries_of,
};
use libfuzzer_sys::fuzz_target;

/// Field 1 (bytes) holding `ENFORCER-POLICY`: how every bundle starts.
const MAGIC_PREFIX: &[u8] = b"\x0a\x0fENFORCER-POLICY";

/// Rule entries one input may compile to (kept small so inputs run fast).
const LIMIT: usize = 1 << 14;

fn one(bytes: &[u8]) {
    let Ok(policy) = decode_bundle(bytes) else {
        return;
    };
    let again = decode_bundle(&encode_bundle(&policy));
    assert_eq!(again.as_ref().ok(), Some(&policy), "{again:?}");
    let _ = rule_entries_of(&policy.rules, &[], 0, LIMIT, Clock::now());
    let _ = Classes::new(&policy).idmatch_entries(0);
}

fuzz_target!(|data: &[u8]| {
    let _ = load("fuzz.bundle", data);
    if is_bundle(data) {
        one(data);
    } else {
        let mut with = MAGIC_PREFIX.to_vec();
        with.extend_from_slice(data);
        one(&with);
    }
});

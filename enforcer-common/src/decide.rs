//! The decision, written once: process -> identity (`ENF_PROCS` facts, `ENF_BINCLASS`,
//! `ENF_CGROUPS`, `ENF_IDMATCH`) and (identity, destination) -> verdict (`ENF_HOSTS`, the
//! `ENF_RULES` trie, the mode and the `unattested` action).
//!
//! The kernel programs run it over their maps, `explain` (`Kernel::judge` in the agent) over
//! the same maps read through bpf(), and the policy compiler's unit tests over a pure model.
//! Everything is `#[inline(always)]` and generic over the two lookup traits below, so the
//! kernel build is the same straight-line code the verifier accepted before.

use crate::{
    ANY, Action, BIN_NONE, CG_NONE, CgroupValue, Config, Counter, FAMILY_V4, FAMILY_V6, GenConfig,
    IDENT_NONE, IdMatchKey, MAX_EXES, Mode, PROC_PENDING, PROC_WITHHELD, ProcState,
    RULE_DEFAULT_DENY, RULE_NO_CONFIG, RULE_PENDING, RULE_UNATTESTED, RULE_UNTRACKED,
    RULE_WITHHELD, RuleKeyData, RuleValue, Verdict, host_prefix_len,
};

/// Index of `ENF_BINCLASS` holding the binary class of executable `exe_id` in `generation`.
#[inline(always)]
pub const fn binclass_index(generation: u32, exe_id: u32) -> u32 {
    generation * MAX_EXES + (exe_id & (MAX_EXES - 1))
}

/// The maps the identity lookup reads, one method each.
pub trait IdentityMaps {
    /// `ENF_BINCLASS[index]` (see [`binclass_index`]).
    fn binclass(&self, index: u32) -> Option<u32>;
    /// `ENF_CGROUPS[cgroup_id]`.
    fn cgroup(&self, cgroup_id: u64) -> Option<CgroupValue>;
    /// `ENF_IDMATCH[key]`.
    fn idmatch(&self, key: &IdMatchKey) -> Option<u32>;
}

/// The maps the rule lookup reads, one method each.
pub trait RuleMaps {
    /// `ENF_HOSTS[key]` (exact match).
    fn host(&self, key: &RuleKeyData) -> Option<RuleValue>;
    /// Longest match of `key` (`prefix_len` bits) in the `ENF_RULES` trie.
    fn prefix(&self, prefix_len: u32, key: &RuleKeyData) -> Option<RuleValue>;
}

impl Config {
    /// The slot of `generation` (0 or 1; anything else reads slot 1).
    #[inline(always)]
    pub fn generation(&self, generation: u32) -> &GenConfig {
        // Two branches rather than an index: a constant offset the verifier checks at once.
        if generation == 0 {
            &self.generations[0]
        } else {
            &self.generations[1]
        }
    }
}

impl CgroupValue {
    /// The cgroup class in `generation`.
    #[inline(always)]
    pub fn class_in(&self, generation: u32) -> u32 {
        if generation == 0 {
            self.class[0]
        } else {
            self.class[1]
        }
    }
}

/// Identity of a process in one generation, from the facts recorded at its exec: binary
/// class and cgroup class of that generation, then (class, class, uid) when the generation
/// uses uids, then (class, class, any).
#[inline(always)]
pub fn identity<M: IdentityMaps>(maps: &M, g: &GenConfig, generation: u32, p: &ProcState) -> u32 {
    let bin = match maps.binclass(binclass_index(generation, p.exe_id)) {
        Some(b) => b,
        None => BIN_NONE,
    };
    let cg = if g.uses_cgroups == 0 {
        CG_NONE
    } else {
        match maps.cgroup(p.cgroup_id) {
            Some(c) => c.class_in(generation),
            None => CG_NONE,
        }
    };
    let mut k = IdMatchKey {
        generation,
        bin,
        cg,
        uid: p.uid,
    };
    if g.uses_uids != 0
        && let Some(id) = maps.idmatch(&k)
    {
        return id;
    }
    k.uid = ANY;
    match maps.idmatch(&k) {
        Some(id) => id,
        None => IDENT_NONE,
    }
}

/// Longest match for (generation, identity, proto, port, address) in `data`: the host entry,
/// else the trie (when the generation has prefixes); then the same for the all-ports
/// entries (port 0); else the default deny.
#[inline(always)]
pub fn lookup_rule<M: RuleMaps>(maps: &M, g: &GenConfig, mut data: RuleKeyData) -> RuleValue {
    let bits = host_prefix_len(data.family);
    if let Some(v) = maps.host(&data) {
        return v;
    }
    if g.prefix_rules != 0
        && let Some(v) = maps.prefix(bits, &data)
    {
        return v;
    }
    data.port = 0;
    if let Some(v) = maps.host(&data) {
        return v;
    }
    if g.prefix_rules != 0
        && let Some(v) = maps.prefix(bits, &data)
    {
        return v;
    }
    RuleValue {
        verdict: Verdict::Deny as u32,
        rule: RULE_DEFAULT_DENY,
    }
}

/// What a decision rested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The generation in force holds no policy.
    NoConfig,
    /// The process has no `ENF_PROCS` entry.
    Untracked,
    /// The process waits for the agent to attest it.
    Pending,
    /// The process has no identity: the `unattested` action decided.
    Unattested,
    /// The process's identity is withheld (loader environment, [`crate::PROC_WITHHELD`]):
    /// judged as unattested, reported with [`crate::RULE_WITHHELD`].
    Withheld,
    /// A rule entry (or the default deny) decided.
    Rule,
}

impl Basis {
    /// The counter the kernel bumps for this basis, besides the verdict's.
    #[inline(always)]
    pub const fn counter(self) -> Option<Counter> {
        match self {
            Self::NoConfig => Some(Counter::NoConfig),
            Self::Untracked => Some(Counter::Untracked),
            Self::Pending => Some(Counter::Pending),
            Self::Unattested => Some(Counter::Unattested),
            Self::Withheld => Some(Counter::Withheld),
            Self::Rule => None,
        }
    }
}

impl Verdict {
    /// The counter of decisions with this verdict.
    #[inline(always)]
    pub const fn counter(self) -> Counter {
        match self {
            Self::Allow => Counter::Allow,
            Self::Deny => Counter::Deny,
            Self::Audit => Counter::Audit,
        }
    }
}

/// The verdict of the `unattested` action (anything unknown denies).
#[inline(always)]
fn unattested_verdict(g: &GenConfig) -> Verdict {
    match Action::from_u32(g.unattested) {
        Some(Action::Allow) => Verdict::Allow,
        Some(Action::Audit) => Verdict::Audit,
        _ => Verdict::Deny,
    }
}

/// The decision for one connect or send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Final verdict (a deny in audit mode is already [`Verdict::Audit`]).
    pub verdict: Verdict,
    /// Identity number ([`IDENT_NONE`] when there is none).
    pub ident: u32,
    /// Rule id, or one of the `RULE_*` reasons.
    pub rule: u32,
    pub basis: Basis,
}

/// Decides a connect of process `proc_` (its `ENF_PROCS` entry, if any) to `dst` (from
/// [`destination_v4`] / [`destination_v6`]) under `cfg`.
#[inline(always)]
pub fn decide<M: IdentityMaps + RuleMaps>(
    maps: &M,
    cfg: &Config,
    proc_: Option<&ProcState>,
    dst: &RuleKeyData,
) -> Decision {
    let generation = cfg.active & 1;
    let g = cfg.generation(generation);
    if g.loaded == 0 {
        return Decision {
            verdict: if g.mode == Mode::Audit as u32 {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            ident: IDENT_NONE,
            rule: RULE_NO_CONFIG,
            basis: Basis::NoConfig,
        };
    }
    let (ident, verdict, rule, basis) = match proc_ {
        None => (IDENT_NONE, Verdict::Deny, RULE_UNTRACKED, Basis::Untracked),
        Some(p) if p.flags & PROC_PENDING != 0 => {
            (IDENT_NONE, Verdict::Deny, RULE_PENDING, Basis::Pending)
        }
        Some(p) if p.flags & PROC_WITHHELD != 0 => (
            IDENT_NONE,
            unattested_verdict(g),
            RULE_WITHHELD,
            Basis::Withheld,
        ),
        Some(p) => {
            let ident = identity(maps, g, generation, p);
            if ident == IDENT_NONE {
                (
                    ident,
                    unattested_verdict(g),
                    RULE_UNATTESTED,
                    Basis::Unattested,
                )
            } else {
                let mut key = *dst;
                key.generation = generation;
                key.ident = ident;
                let v = lookup_rule(maps, g, key);
                (ident, Verdict::from_raw(v.verdict), v.rule, Basis::Rule)
            }
        }
    };
    let verdict = if matches!(verdict, Verdict::Deny) && g.mode != Mode::Enforce as u32 {
        Verdict::Audit
    } else {
        verdict
    };
    Decision {
        verdict,
        ident,
        rule,
        basis,
    }
}

/// Destination key (generation and identity left 0) of an IPv4 connect.
#[inline(always)]
pub fn destination_v4(proto: u8, port: u16, addr: [u8; 4]) -> RuleKeyData {
    let mut a = [0u8; 16];
    a[0] = addr[0];
    a[1] = addr[1];
    a[2] = addr[2];
    a[3] = addr[3];
    RuleKeyData {
        generation: 0,
        ident: 0,
        proto,
        family: FAMILY_V4,
        port,
        addr: a,
    }
}

/// Destination key of an IPv6 connect; an IPv4-mapped address (`::ffff:a.b.c.d`) is judged
/// as the IPv4 address it carries.
#[inline(always)]
pub fn destination_v6(proto: u8, port: u16, addr: [u8; 16]) -> RuleKeyData {
    let mapped = addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff;
    if mapped {
        return destination_v4(proto, port, [addr[12], addr[13], addr[14], addr[15]]);
    }
    RuleKeyData {
        generation: 0,
        ident: 0,
        proto,
        family: FAMILY_V6,
        port,
        addr,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;
    use crate::{PROTO_TCP, RULE_FIXED_BITS};

    /// A pure model of the maps: the LPM trie as a list, longest match by brute force.
    #[derive(Default)]
    struct Model {
        binclass: BTreeMap<u32, u32>,
        cgroups: BTreeMap<u64, CgroupValue>,
        idmatch: BTreeMap<IdMatchKey, u32>,
        hosts: BTreeMap<RuleKeyData, RuleValue>,
        trie: Vec<(u32, RuleKeyData, RuleValue)>,
    }

    impl IdentityMaps for Model {
        fn binclass(&self, index: u32) -> Option<u32> {
            self.binclass.get(&index).copied()
        }
        fn cgroup(&self, cgroup_id: u64) -> Option<CgroupValue> {
            self.cgroups.get(&cgroup_id).copied()
        }
        fn idmatch(&self, key: &IdMatchKey) -> Option<u32> {
            self.idmatch.get(key).copied()
        }
    }

    impl RuleMaps for Model {
        fn host(&self, key: &RuleKeyData) -> Option<RuleValue> {
            self.hosts.get(key).copied()
        }
        fn prefix(&self, _prefix_len: u32, key: &RuleKeyData) -> Option<RuleValue> {
            // Only /24 IPv4 prefixes in these tests.
            self.trie
                .iter()
                .filter(|(_, k, _)| {
                    let mut a = *k;
                    let mut b = *key;
                    a.addr[3] = 0;
                    b.addr[3] = 0;
                    a == b
                })
                .map(|(_, _, v)| *v)
                .next()
        }
    }

    fn cfg(mode: Mode, unattested: Action) -> Config {
        let mut c = Config {
            active: 1,
            ..Config::default()
        };
        c.generations[1] = GenConfig {
            loaded: 1,
            mode: mode as u32,
            unattested: unattested as u32,
            uses_cgroups: 1,
            report_allow: 0,
            uses_uids: 1,
            prefix_rules: 1,
        };
        c
    }

    fn proc_(exe_id: u32, uid: u32, cgroup_id: u64) -> ProcState {
        ProcState {
            exe_id,
            uid,
            cgroup_id,
            ..ProcState::default()
        }
    }

    fn world() -> Model {
        let mut m = Model::default();
        m.binclass.insert(binclass_index(1, 7), 2);
        m.cgroups.insert(100, CgroupValue { class: [0, 5] });
        let key = |bin, cg, uid| IdMatchKey {
            generation: 1,
            bin,
            cg,
            uid,
        };
        m.idmatch.insert(key(2, 5, 1000), 11);
        m.idmatch.insert(key(2, 5, ANY), 12);
        let mut host = destination_v4(PROTO_TCP, 443, [10, 0, 0, 1]);
        host.generation = 1;
        host.ident = 12;
        m.hosts.insert(
            host,
            RuleValue {
                verdict: Verdict::Allow as u32,
                rule: 0,
            },
        );
        let mut net = destination_v4(PROTO_TCP, 0, [10, 0, 1, 0]);
        net.generation = 1;
        net.ident = 11;
        m.trie.push((
            RULE_FIXED_BITS + 24,
            net,
            RuleValue {
                verdict: Verdict::Allow as u32,
                rule: 1,
            },
        ));
        m
    }

    #[test]
    fn identity_tries_the_exact_uid_then_any() {
        let m = world();
        let c = cfg(Mode::Enforce, Action::Deny);
        let g = c.generation(1);
        assert_eq!(identity(&m, g, 1, &proc_(7, 1000, 100)), 11);
        assert_eq!(identity(&m, g, 1, &proc_(7, 0, 100)), 12);
        assert_eq!(identity(&m, g, 1, &proc_(8, 0, 100)), IDENT_NONE);
        assert_eq!(identity(&m, g, 1, &proc_(7, 0, 101)), IDENT_NONE);
        // The same facts in the other generation have no identity.
        assert_eq!(identity(&m, g, 0, &proc_(7, 0, 100)), IDENT_NONE);
    }

    #[test]
    fn decide_covers_every_basis() {
        let m = world();
        let enforce = cfg(Mode::Enforce, Action::Deny);
        let dst = destination_v4(PROTO_TCP, 443, [10, 0, 0, 1]);
        let d = decide(&m, &enforce, Some(&proc_(7, 0, 100)), &dst);
        assert_eq!(
            (d.verdict, d.ident, d.rule, d.basis),
            (Verdict::Allow, 12, 0, Basis::Rule)
        );
        // Port 0 entries of the trie hold for every port.
        let d = decide(
            &m,
            &enforce,
            Some(&proc_(7, 1000, 100)),
            &destination_v4(PROTO_TCP, 22, [10, 0, 1, 9]),
        );
        assert_eq!((d.verdict, d.ident, d.rule), (Verdict::Allow, 11, 1));
        let d = decide(
            &m,
            &enforce,
            Some(&proc_(7, 0, 100)),
            &destination_v4(PROTO_TCP, 444, [10, 0, 0, 1]),
        );
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_DEFAULT_DENY));
        let d = decide(&m, &enforce, None, &dst);
        assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::Untracked));
        let mut pending = proc_(7, 0, 100);
        pending.flags = PROC_PENDING;
        let d = decide(&m, &enforce, Some(&pending), &dst);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_PENDING));
        let d = decide(&m, &enforce, Some(&proc_(9, 0, 100)), &dst);
        assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::Unattested));
        // A withheld process has no identity even though its facts name one.
        let mut withheld = proc_(7, 0, 100);
        withheld.flags = PROC_WITHHELD;
        let d = decide(&m, &enforce, Some(&withheld), &dst);
        assert_eq!(
            (d.verdict, d.ident, d.rule, d.basis),
            (Verdict::Deny, IDENT_NONE, RULE_WITHHELD, Basis::Withheld)
        );
        let allow_unattested = cfg(Mode::Enforce, Action::Allow);
        let d = decide(&m, &allow_unattested, Some(&withheld), &dst);
        assert_eq!((d.verdict, d.rule), (Verdict::Allow, RULE_WITHHELD));
        let audit_unattested = cfg(Mode::Enforce, Action::Audit);
        let d = decide(&m, &audit_unattested, Some(&proc_(9, 0, 100)), &dst);
        assert_eq!(d.verdict, Verdict::Audit);
        // Audit mode turns every deny into an audit.
        let audit = cfg(Mode::Audit, Action::Deny);
        let d = decide(&m, &audit, None, &dst);
        assert_eq!(d.verdict, Verdict::Audit);
        // No policy: deny, unless the empty slot says audit.
        let mut none = Config::default();
        let d = decide(&m, &none, Some(&proc_(7, 0, 100)), &dst);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_NO_CONFIG));
        none.generations[0].mode = Mode::Audit as u32;
        assert_eq!(decide(&m, &none, None, &dst).verdict, Verdict::Allow);
    }

    #[test]
    fn a_stored_verdict_that_is_no_verdict_denies() {
        let mut m = world();
        for v in m.hosts.values_mut() {
            v.verdict = 0;
        }
        let c = cfg(Mode::Enforce, Action::Deny);
        let dst = destination_v4(PROTO_TCP, 443, [10, 0, 0, 1]);
        assert_eq!(
            decide(&m, &c, Some(&proc_(7, 0, 100)), &dst).verdict,
            Verdict::Deny
        );
    }

    #[test]
    fn v4_mapped_v6_is_v4() {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            destination_v6(PROTO_TCP, 1, a),
            destination_v4(PROTO_TCP, 1, [10, 0, 0, 1])
        );
        a[11] = 0xfe;
        assert_eq!(destination_v6(PROTO_TCP, 1, a).family, FAMILY_V6);
    }
}

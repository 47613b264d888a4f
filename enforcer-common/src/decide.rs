//! The decision, written once: process -> identity (`ENF_PROCS` facts, `ENF_BINCLASS`,
//! `ENF_CGROUPS`, `ENF_IDMATCH`) and (identity, destination) -> verdict (`ENF_HOSTS`, the
//! `ENF_RULES` trie, the mode and the `unattested` action).
//!
//! The kernel programs run it over their maps, `explain` (`Kernel::judge` in the agent) over
//! the same maps read through bpf(), and the policy compiler's unit tests over a pure model.
//! Everything is `#[inline(always)]` and generic over the two lookup traits below, so the
//! kernel build is the same straight-line code the verifier accepted before.

use crate::{
    AF_INET, AF_INET6, ANY, Action, BIN_NONE, CG_NONE, CgroupValue, Config, Counter, FAMILY_V4,
    FAMILY_V6, GenConfig, IDENT_NONE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MPTCP, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IdMatchKey, MAX_EXES, Mode, PROC_PENDING,
    PROC_TAMPERED, PROC_WITHHELD, ProcState, RULE_DEFAULT_DENY, RULE_NO_CONFIG, RULE_PENDING,
    RULE_SOCKET_KIND, RULE_TAMPERED, RULE_UNATTESTED, RULE_UNTRACKED, RULE_WITHHELD, RuleKeyData,
    RuleValue, SOCK_RAW, SocketKey, SocketKind, Verdict, host_prefix_len,
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
/// uses uids, then (class, class, any). A tampered process ([`PROC_TAMPERED`]) has none.
#[inline(always)]
pub fn identity<M: IdentityMaps>(maps: &M, g: &GenConfig, generation: u32, p: &ProcState) -> u32 {
    if p.flags & PROC_TAMPERED != 0 {
        return IDENT_NONE;
    }
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

/// What the identity decision (shared by connects and socket creation) found.
enum Judged {
    /// Decided without a rule: no configuration, untracked, pending or unattested.
    Done(Decision),
    /// The process has identity `ident` in the active `generation`: the rules decide.
    Ident { generation: u32, ident: u32 },
}

/// The part of every decision that is about the process: the configuration in force, its
/// `ENF_PROCS` entry, pending, its identity or the `unattested` action. Audit mode is applied
/// by the callers.
#[inline(always)]
fn judge_process<M: IdentityMaps>(maps: &M, cfg: &Config, proc_: Option<&ProcState>) -> Judged {
    let generation = cfg.active & 1;
    let g = cfg.generation(generation);
    if g.loaded == 0 {
        return Judged::Done(Decision {
            verdict: if g.mode == Mode::Audit as u32 {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            ident: IDENT_NONE,
            rule: RULE_NO_CONFIG,
            basis: Basis::NoConfig,
        });
    }
    let done = |verdict, rule, basis| {
        Judged::Done(Decision {
            verdict,
            ident: IDENT_NONE,
            rule,
            basis,
        })
    };
    match proc_ {
        None => done(Verdict::Deny, RULE_UNTRACKED, Basis::Untracked),
        Some(p) if p.flags & PROC_PENDING != 0 => done(Verdict::Deny, RULE_PENDING, Basis::Pending),
        Some(p) if p.flags & PROC_WITHHELD != 0 => {
            done(unattested_verdict(g), RULE_WITHHELD, Basis::Withheld)
        }
        Some(p) => {
            let ident = identity(maps, g, generation, p);
            if ident == IDENT_NONE {
                let verdict = unattested_verdict(g);
                let rule = if p.flags & PROC_TAMPERED != 0 {
                    RULE_TAMPERED
                } else {
                    RULE_UNATTESTED
                };
                done(verdict, rule, Basis::Unattested)
            } else {
                Judged::Ident { generation, ident }
            }
        }
    }
}

/// A deny in a generation that is not in enforce mode is an audit.
#[inline(always)]
fn in_mode(cfg: &Config, mut d: Decision) -> Decision {
    if matches!(d.verdict, Verdict::Deny)
        && !matches!(d.basis, Basis::NoConfig)
        && cfg.generation(cfg.active & 1).mode != Mode::Enforce as u32
    {
        d.verdict = Verdict::Audit;
    }
    d
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
    let d = match judge_process(maps, cfg, proc_) {
        Judged::Done(d) => d,
        Judged::Ident { generation, ident } => {
            let mut key = *dst;
            key.generation = generation;
            key.ident = ident;
            let v = lookup_rule(maps, cfg.generation(generation), key);
            Decision {
                verdict: Verdict::from_raw(v.verdict),
                ident,
                rule: v.rule,
                basis: Basis::Rule,
            }
        }
    };
    in_mode(cfg, d)
}

/// The map the socket-kind decision reads.
pub trait SocketMaps {
    /// `ENF_SOCKETS[key]`: the socket kinds (bits `1 << SocketKind`) the identity may create.
    fn sockets(&self, key: &SocketKey) -> Option<u32>;
}

/// The kind of an `AF_INET`/`AF_INET6` socket (`family`, `type`, `protocol` as the kernel
/// holds them after creation, protocol 0 already resolved), or `None` for the sockets the
/// connect and sendmsg hooks judge: TCP, UDP and MPTCP (and every other family).
#[inline(always)]
pub const fn socket_kind(family: u32, sock_type: u32, protocol: u32) -> Option<SocketKind> {
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    if sock_type == SOCK_RAW {
        return Some(SocketKind::Raw);
    }
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_MPTCP => None,
        IPPROTO_ICMP if family == AF_INET => Some(SocketKind::Icmp),
        IPPROTO_ICMPV6 if family == AF_INET6 => Some(SocketKind::Icmp),
        IPPROTO_SCTP => Some(SocketKind::Sctp),
        IPPROTO_UDPLITE => Some(SocketKind::UdpLite),
        _ => Some(SocketKind::Other),
    }
}

/// Decides the creation of a socket of `kind` by process `proc_` under `cfg`: the same
/// identity decision as a connect (no configuration, untracked and pending deny; no identity
/// takes the `unattested` action), then the identity's `sockets:` list instead of its rules.
/// A refusal by the list reports [`RULE_SOCKET_KIND`].
#[inline(always)]
pub fn decide_socket<M: IdentityMaps + SocketMaps>(
    maps: &M,
    cfg: &Config,
    proc_: Option<&ProcState>,
    kind: SocketKind,
) -> Decision {
    let d = match judge_process(maps, cfg, proc_) {
        Judged::Done(d) => d,
        Judged::Ident { generation, ident } => {
            let allowed = match maps.sockets(&SocketKey { generation, ident }) {
                Some(mask) => mask & kind.bit() != 0,
                None => false,
            };
            Decision {
                verdict: if allowed {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                },
                ident,
                rule: RULE_SOCKET_KIND,
                basis: Basis::Rule,
            }
        }
    };
    in_mode(cfg, d)
}

/// The loopback address the kernel sends a connect or send to `0.0.0.0` to.
pub const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];

/// True for `0.0.0.0` (INADDR_ANY), which no packet is ever sent to: the kernel routes a
/// connect or send to it to the socket's source address, or to loopback.
#[inline(always)]
pub const fn unspecified_v4(addr: [u8; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 0
}

/// True for `::` and `::ffff:0.0.0.0`, which the kernel sends to loopback (or, for the
/// latter, the IPv4 source address).
#[inline(always)]
pub const fn unspecified_v6(addr: [u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    let any = addr[10] == 0 && addr[11] == 0;
    let mapped = addr[10] == 0xff && addr[11] == 0xff;
    (any || mapped) && addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0
}

/// Destination key (generation and identity left 0) of an IPv4 connect from a socket with no
/// source address; see [`destination_v4_from`].
#[inline(always)]
pub fn destination_v4(proto: u8, port: u16, addr: [u8; 4]) -> RuleKeyData {
    destination_v4_from(proto, port, addr, [0; 4])
}

/// Destination key of an IPv4 connect or send, judged as the address it reaches: `0.0.0.0`
/// is `src` (the source address the socket is bound to, or the send asked for) when there is
/// one, else `127.0.0.1`, as the kernel's route lookup does (`__ip_route_output_key`).
/// Every other address is judged as written (the rest of `0.0.0.0/8` is routed as unicast).
#[inline(always)]
pub fn destination_v4_from(proto: u8, port: u16, addr: [u8; 4], src: [u8; 4]) -> RuleKeyData {
    let addr = if !unspecified_v4(addr) {
        addr
    } else if unspecified_v4(src) {
        LOOPBACK_V4
    } else {
        src
    };
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

/// Destination key of an IPv6 connect from a socket with no source address; see
/// [`destination_v6_from`].
#[inline(always)]
pub fn destination_v6(proto: u8, port: u16, addr: [u8; 16]) -> RuleKeyData {
    destination_v6_from(proto, port, addr, [0; 4])
}

/// Destination key of an IPv6 connect or send: an IPv4-mapped address (`::ffff:a.b.c.d`) is
/// judged as the IPv4 address it carries (`::ffff:0.0.0.0` as [`destination_v4_from`] with
/// `src4`, the socket's IPv4 source), and `::` as `::1`, where the kernel sends it.
#[inline(always)]
pub fn destination_v6_from(proto: u8, port: u16, addr: [u8; 16], src4: [u8; 4]) -> RuleKeyData {
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
        return destination_v4_from(proto, port, [addr[12], addr[13], addr[14], addr[15]], src4);
    }
    let mut addr = addr;
    if unspecified_v6(addr) {
        addr[15] = 1;
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
        sockets: BTreeMap<SocketKey, u32>,
    }

    impl SocketMaps for Model {
        fn sockets(&self, key: &SocketKey) -> Option<u32> {
            self.sockets.get(key).copied()
        }
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
            preload_hold: 0,
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
        // Tampered: the same facts, no identity, judged as unattested under its own rule.
        let mut tampered = proc_(7, 0, 100);
        tampered.flags = PROC_TAMPERED;
        assert_eq!(
            identity(&m, enforce.generation(1), 1, &tampered),
            IDENT_NONE
        );
        let d = decide(&m, &enforce, Some(&tampered), &dst);
        assert_eq!(
            (d.verdict, d.ident, d.rule, d.basis),
            (Verdict::Deny, IDENT_NONE, RULE_TAMPERED, Basis::Unattested)
        );
        let allow_unattested = cfg(Mode::Enforce, Action::Allow);
        let d = decide(&m, &allow_unattested, Some(&tampered), &dst);
        assert_eq!((d.verdict, d.rule), (Verdict::Allow, RULE_TAMPERED));
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

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>()
            .map(|a| a.octets())
            .unwrap_or([0xee; 16])
    }

    #[test]
    fn unspecified_addresses_are_judged_as_where_they_go() {
        let lo4 = destination_v4(PROTO_TCP, 9, [127, 0, 0, 1]);
        // 0.0.0.0: loopback, or the socket's source address when it has one.
        assert_eq!(destination_v4(PROTO_TCP, 9, [0, 0, 0, 0]), lo4);
        assert_eq!(
            destination_v4_from(PROTO_TCP, 9, [0, 0, 0, 0], [192, 0, 2, 2]),
            destination_v4(PROTO_TCP, 9, [192, 0, 2, 2])
        );
        // A source never changes a real destination.
        assert_eq!(
            destination_v4_from(PROTO_TCP, 9, [10, 0, 0, 1], [192, 0, 2, 2]),
            destination_v4(PROTO_TCP, 9, [10, 0, 0, 1])
        );
        // The rest of 0.0.0.0/8 is routed as unicast (checked on 6.18: out of the default
        // route), and 127.0.0.0/8 is loopback already: both as written.
        assert_eq!(
            destination_v4(PROTO_TCP, 9, [0, 0, 0, 5]).addr[..4],
            [0, 0, 0, 5]
        );
        assert_eq!(
            destination_v4(PROTO_TCP, 9, [127, 0, 0, 2]).addr[..4],
            [127, 0, 0, 2]
        );
        // ::ffff:0.0.0.0 -> 127.0.0.1 (or the IPv4 source); :: -> ::1.
        assert_eq!(destination_v6(PROTO_TCP, 9, v6("::ffff:0.0.0.0")), lo4);
        assert_eq!(
            destination_v6_from(PROTO_TCP, 9, v6("::ffff:0.0.0.0"), [192, 0, 2, 2]),
            destination_v4(PROTO_TCP, 9, [192, 0, 2, 2])
        );
        assert_eq!(
            destination_v6(PROTO_TCP, 9, v6("::")),
            destination_v6(PROTO_TCP, 9, v6("::1"))
        );
        assert_eq!(destination_v6(PROTO_TCP, 9, v6("::1")).addr, v6("::1"));
        // IPv4-compatible ::a.b.c.d is a plain IPv6 address for Linux (no route here).
        assert_eq!(
            destination_v6(PROTO_TCP, 9, v6("::127.0.0.1")).addr,
            v6("::127.0.0.1")
        );
        assert!(unspecified_v4([0; 4]) && !unspecified_v4([0, 0, 0, 1]));
        assert!(unspecified_v6(v6("::")) && unspecified_v6(v6("::ffff:0.0.0.0")));
        assert!(!unspecified_v6(v6("::1")) && !unspecified_v6(v6("::ffff:127.0.0.1")));
        assert!(!unspecified_v6(v6("fe80::")));
    }

    #[test]
    fn a_deny_on_loopback_holds_for_its_aliases() {
        // Identity 12 may reach everything (0.0.0.0/0 as a /24 stand-in is not possible in
        // this model, so: allow all ports of 127.0.0.0/24 is the trie, deny host 127.0.0.1:9).
        let mut m = world();
        let mut deny = destination_v4(PROTO_TCP, 9, [127, 0, 0, 1]);
        deny.generation = 1;
        deny.ident = 12;
        m.hosts.insert(
            deny,
            RuleValue {
                verdict: Verdict::Deny as u32,
                rule: 7,
            },
        );
        let mut net = destination_v4(PROTO_TCP, 0, [127, 0, 0, 0]);
        net.generation = 1;
        net.ident = 12;
        m.trie.push((
            RULE_FIXED_BITS + 24,
            net,
            RuleValue {
                verdict: Verdict::Allow as u32,
                rule: 8,
            },
        ));
        let c = cfg(Mode::Enforce, Action::Deny);
        let p = proc_(7, 0, 100);
        for dst in [
            destination_v4(PROTO_TCP, 9, [127, 0, 0, 1]),
            destination_v4(PROTO_TCP, 9, [0, 0, 0, 0]),
            destination_v6(PROTO_TCP, 9, v6("::ffff:0.0.0.0")),
            destination_v6(PROTO_TCP, 9, v6("::ffff:127.0.0.1")),
        ] {
            let d = decide(&m, &c, Some(&p), &dst);
            assert_eq!((d.verdict, d.rule), (Verdict::Deny, 7), "{dst:?}");
        }
        let d = decide(
            &m,
            &c,
            Some(&p),
            &destination_v4(PROTO_TCP, 10, [0, 0, 0, 0]),
        );
        assert_eq!((d.verdict, d.rule), (Verdict::Allow, 8));
    }

    #[test]
    fn socket_kinds() {
        use SocketKind::*;
        let (inet, inet6) = (AF_INET, AF_INET6);
        // (family, type, protocol) -> kind; TCP, UDP and MPTCP are the connect hooks'.
        let cases = [
            (inet, 1, IPPROTO_TCP, None),
            (inet6, 2, IPPROTO_UDP, None),
            (inet, 1, IPPROTO_MPTCP, None),
            (inet, SOCK_RAW, IPPROTO_ICMP, Some(Raw)),
            (inet, SOCK_RAW, IPPROTO_TCP, Some(Raw)),
            (inet6, SOCK_RAW, 255, Some(Raw)),
            (inet, 2, IPPROTO_ICMP, Some(Icmp)),
            (inet6, 2, IPPROTO_ICMPV6, Some(Icmp)),
            (inet6, 2, IPPROTO_ICMP, Some(Other)),
            (inet, 1, IPPROTO_SCTP, Some(Sctp)),
            (inet6, 5, IPPROTO_SCTP, Some(Sctp)),
            (inet, 2, IPPROTO_UDPLITE, Some(UdpLite)),
            (inet, 6, 33, Some(Other)),
            (inet, 1, 256, Some(Other)),
            (1, 1, 0, None),
            (16, 3, 0, None),
            (17, 3, 0, None),
        ];
        for (f, t, p, want) in cases {
            assert_eq!(socket_kind(f, t, p), want, "{f} {t} {p}");
        }
    }

    #[test]
    fn socket_creation_uses_the_identity_decision_and_the_list() {
        let mut m = world();
        m.sockets.insert(
            SocketKey {
                generation: 1,
                ident: 12,
            },
            SocketKind::Icmp.bit(),
        );
        let enforce = cfg(Mode::Enforce, Action::Deny);
        let attested = proc_(7, 0, 100);
        let d = decide_socket(&m, &enforce, Some(&attested), SocketKind::Icmp);
        assert_eq!(
            (d.verdict, d.ident, d.rule, d.basis),
            (Verdict::Allow, 12, RULE_SOCKET_KIND, Basis::Rule)
        );
        let d = decide_socket(&m, &enforce, Some(&attested), SocketKind::Raw);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_SOCKET_KIND));
        // Identity 11 has no list: nothing allowed.
        let d = decide_socket(&m, &enforce, Some(&proc_(7, 1000, 100)), SocketKind::Icmp);
        assert_eq!((d.verdict, d.ident), (Verdict::Deny, 11));
        // The other generation's list does not count.
        let mut other = enforce;
        other.active = 0;
        other.generations[0] = other.generations[1];
        let d = decide_socket(&m, &other, Some(&attested), SocketKind::Icmp);
        assert_eq!(d.verdict, Verdict::Deny);
        // Unattested: the `unattested` action.
        let stranger = proc_(9, 0, 100);
        let d = decide_socket(&m, &enforce, Some(&stranger), SocketKind::UdpLite);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_UNATTESTED));
        for (a, v) in [
            (Action::Allow, Verdict::Allow),
            (Action::Audit, Verdict::Audit),
        ] {
            let d = decide_socket(&m, &cfg(Mode::Enforce, a), Some(&stranger), SocketKind::Raw);
            assert_eq!(d.verdict, v);
        }
        // Pending and untracked: refused whatever `unattested` says (fail closed).
        let mut pending = attested;
        pending.flags = PROC_PENDING;
        let allow = cfg(Mode::Enforce, Action::Allow);
        assert_eq!(
            decide_socket(&m, &allow, Some(&pending), SocketKind::Raw).rule,
            RULE_PENDING
        );
        assert_eq!(
            decide_socket(&m, &allow, None, SocketKind::Raw).verdict,
            Verdict::Deny
        );
        // Audit mode: reported, never refused.
        let audit = cfg(Mode::Audit, Action::Deny);
        let d = decide_socket(&m, &audit, Some(&attested), SocketKind::Raw);
        assert_eq!(d.verdict, Verdict::Audit);
        // No policy: refused.
        let d = decide_socket(&m, &Config::default(), Some(&attested), SocketKind::Raw);
        assert_eq!((d.verdict, d.rule), (Verdict::Deny, RULE_NO_CONFIG));
    }
}

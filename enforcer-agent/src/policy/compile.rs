//! Rules -> rule entries (single hosts for `ENF_HOSTS`, shorter prefixes for the `ENF_RULES`
//! LPM trie; the kernel module splits them), and a pure model of those maps for the kernel's
//! own rule lookup (`enforcer_common::lookup_rule`), used by the unit tests.
//!
//! Layout: per (generation, identity, protocol, family, port) a group of CIDR prefixes. Port 0
//! holds the entries that apply to every port; every port named by some entry gets its own
//! group holding its entries plus copies of the port-0 ones. Deny precedence is compiled in:
//! an allow whose prefix lies inside a deny prefix of its group is stored as a deny. The
//! kernel looks up the real port, then port 0, and denies when nothing matches. A host entry is
//! always the longest match of its group, so trying the hash before the trie changes nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use enforcer_common::{
    FAMILY_V4, FAMILY_V6, GenConfig, MAX_RULES_LIMIT, PROTO_TCP, PROTO_UDP, RULE_DEFAULT_DENY,
    RULE_FIXED_BITS, RuleKey, RuleKeyData, RuleMaps, RuleValue, Verdict, destination_v4,
    destination_v6, host_prefix_len, lookup_rule,
};
use ipnet::IpNet;

use super::{Policy, PolicyError, Protocol, Rule};

/// Entries a policy may compile to when no agent capacity is known (`policy compile`).
const LIMIT: usize = MAX_RULES_LIMIT as usize;

struct Item<'a> {
    id: u32,
    rule: &'a Rule,
    /// Inclusive ranges; empty = all ports.
    ports: &'a [(u16, u16)],
}

fn family_of(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => FAMILY_V4,
        IpNet::V6(_) => FAMILY_V6,
    }
}

fn proto_applies(p: Protocol, proto: u8) -> bool {
    match p {
        Protocol::Any => true,
        Protocol::Tcp => proto == PROTO_TCP,
        Protocol::Udp => proto == PROTO_UDP,
    }
}

/// Ranges as given, or empty when they cover every port.
fn normalized_ports(ports: &[(u16, u16)]) -> &[(u16, u16)] {
    let covers_all = match ports {
        [] | [(1, u16::MAX)] => true,
        [_] => false,
        _ => {
            let mut sorted = ports.to_vec();
            sorted.sort_unstable();
            let mut merged: Vec<(u16, u16)> = Vec::new();
            for (a, b) in sorted {
                match merged.last_mut() {
                    Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            merged == [(1, u16::MAX)]
        }
    };
    if covers_all { &[] } else { ports }
}

fn key_of(generation: u32, ident: u32, proto: u8, port: u16, net: &IpNet) -> RuleKey {
    let mut addr = [0u8; 16];
    let (family, bits) = match net {
        IpNet::V4(n) => {
            addr[..4].copy_from_slice(&n.network().octets());
            (FAMILY_V4, n.prefix_len())
        }
        IpNet::V6(n) => {
            addr = n.network().octets();
            (FAMILY_V6, n.prefix_len())
        }
    };
    RuleKey {
        prefix_len: RULE_FIXED_BITS + u32::from(bits),
        data: RuleKeyData {
            generation,
            ident,
            proto,
            family,
            port,
            addr,
        },
    }
}

/// The rule entries (`ENF_RULES` + `ENF_HOSTS`) of `policy` for one generation, sorted by key.
pub fn rule_entries(
    policy: &Policy,
    generation: u32,
) -> Result<Vec<(RuleKey, RuleValue)>, PolicyError> {
    rule_entries_of(&policy.rules, &[], generation, LIMIT, Clock::now())
}

/// [`rule_entries`] of `rules` followed by `extra` (rule ids count across both), refused
/// beyond `limit` entries (the agent's `--max-rules`). Time-bound entries get their window on
/// the boot clock from `clock`; those already over at `clock` are left out.
pub fn rule_entries_of(
    rules: &[Rule],
    extra: &[Rule],
    generation: u32,
    limit: usize,
    clock: Clock,
) -> Result<Vec<(RuleKey, RuleValue)>, PolicyError> {
    let groups = group_rules(rules, extra, limit, clock)?;
    // Groups are independent: large policies compile on every CPU.
    let total: usize = groups.iter().map(|(_, v)| v.len()).sum();
    let workers = if total < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
    };
    let mut chunks: Vec<&[Group<'_>]> = Vec::new();
    let (mut from, mut acc) = (0, 0);
    for (i, (_, items)) in groups.iter().enumerate() {
        acc += items.len();
        if acc * workers >= total * (chunks.len() + 1) || i + 1 == groups.len() {
            chunks.push(&groups[from..=i]);
            from = i + 1;
        }
    }
    let parts: Vec<Result<Vec<(RuleKey, RuleValue)>, PolicyError>> = if chunks.len() <= 1 {
        chunks
            .iter()
            .map(|c| compile_groups(c, generation, limit, clock))
            .collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|c| s.spawn(move || compile_groups(c, generation, limit, clock)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    let mut out: Vec<(RuleKey, RuleValue)> = Vec::new();
    for part in parts {
        out.extend(part?);
        if out.len() > limit {
            return Err(PolicyError::TooManyRules { limit });
        }
    }
    out.sort_unstable_by_key(|(k, _)| (k.data, k.prefix_len));
    Ok(out)
}

/// The rules grouped by (identity, family), in key order; protocol is checked per proto
/// when compiling.
fn group_rules<'a>(
    rules: &'a [Rule],
    extra: &'a [Rule],
    limit: usize,
    clock: Clock,
) -> Result<Vec<Group<'a>>, PolicyError> {
    let mut groups: BTreeMap<(u32, u8), Vec<Item<'a>>> = BTreeMap::new();
    for (i, rule) in rules.iter().chain(extra).enumerate() {
        if rule.to_ident != 0 {
            // Identity destinations are expanded by the agent into cidr rules for the
            // current listeners of that identity (see `daemon`).
            continue;
        }
        if rule.timing.is_over(clock.wall_ns) {
            // Expired: it can never hold again.
            continue;
        }
        let id = u32::try_from(i).map_err(|_| PolicyError::TooManyRules { limit })?;
        groups
            .entry((rule.ident, family_of(&rule.cidr)))
            .or_default()
            .push(Item {
                id,
                rule,
                ports: normalized_ports(&rule.ports),
            });
    }
    Ok(groups.into_iter().collect())
}

/// The rules of one (identity, address family).
type Group<'a> = ((u32, u8), Vec<Item<'a>>);

/// Below this many rules one thread compiles faster than several.
const PARALLEL_FROM: usize = 50_000;

/// The entries of some (identity, family) groups.
fn compile_groups(
    groups: &[Group<'_>],
    generation: u32,
    limit: usize,
    clock: Clock,
) -> Result<Vec<(RuleKey, RuleValue)>, PolicyError> {
    let mut out: Vec<(RuleKey, RuleValue)> = Vec::new();
    for ((ident, _family), items) in groups {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let items: Vec<&Item<'_>> = items
                .iter()
                .filter(|it| proto_applies(it.rule.protocol, proto))
                .collect();
            if items.is_empty() {
                continue;
            }
            let all: Vec<&Item<'_>> = items
                .iter()
                .copied()
                .filter(|it| it.ports.is_empty())
                .collect();
            // Bound the work before expanding ranges.
            let mut refs = all.len();
            for it in &items {
                for &(a, b) in it.ports {
                    refs += usize::from(b - a) + 1 + all.len();
                }
            }
            if out.len() + refs > limit.saturating_mul(4) {
                return Err(PolicyError::TooManyRules { limit });
            }
            let mut by_port: BTreeMap<u16, Vec<&Item<'_>>> = BTreeMap::new();
            for it in &items {
                for &(a, b) in it.ports {
                    for p in a..=b {
                        let g = by_port.entry(p).or_default();
                        // An item's pushes are consecutive: overlapping ranges of one rule
                        // show up as the same id at the end.
                        if g.last().is_none_or(|x| x.id != it.id) {
                            g.push(it);
                        }
                    }
                }
            }
            emit_group(&mut out, generation, *ident, proto, 0, &all, clock);
            for (port, mut group) in by_port {
                group.extend(all.iter().copied());
                emit_group(&mut out, generation, *ident, proto, port, &group, clock);
            }
            if out.len() > limit {
                return Err(PolicyError::TooManyRules { limit });
            }
        }
    }
    Ok(out)
}

/// The value of `it`'s own prefix given the deny entries in force: a deny is itself, an
/// allow inside a deny prefix is that deny, else the allow.
fn value_of(it: &Item<'_>, denies: &[&Item<'_>]) -> RuleValue {
    if it.rule.deny {
        RuleValue::permanent(Verdict::Deny as u32, it.id)
    } else if let Some(d) = denies.iter().find(|d| d.rule.cidr.contains(&it.rule.cidr)) {
        RuleValue::permanent(Verdict::Deny as u32, d.id)
    } else {
        RuleValue::permanent(Verdict::Allow as u32, it.id)
    }
}

/// One entry per prefix: a deny wins, then the lowest rule id.
fn rank(v: &RuleValue) -> (bool, u32) {
    (v.verdict != Verdict::Deny as u32, v.rule)
}

fn emit_group(
    out: &mut Vec<(RuleKey, RuleValue)>,
    generation: u32,
    ident: u32,
    proto: u8,
    port: u16,
    items: &[&Item<'_>],
    clock: Clock,
) {
    if items.is_empty() {
        return;
    }
    let denies: Vec<&Item<'_>> = items.iter().copied().filter(|it| it.rule.deny).collect();
    let mut group = Vec::with_capacity(items.len());
    for it in items {
        group.push((
            key_of(generation, ident, proto, port, &it.rule.cidr),
            value_of(it, &denies),
        ));
    }
    group.sort_unstable_by(|a, b| {
        (a.0.prefix_len, a.0.data.addr)
            .cmp(&(b.0.prefix_len, b.0.data.addr))
            .then_with(|| rank(&a.1).cmp(&rank(&b.1)))
    });
    group.dedup_by_key(|e| e.0);
    if items.iter().any(|it| it.rule.timing.is_timed()) {
        for (key, value) in &mut group {
            *value = timed_value(key, *value, items, clock);
        }
    }
    out.append(&mut group);
}

/// The value of `key` when time-bound entries take part in its group: `active` (every entry
/// counted) inside a window, outside it what the permanent entries alone decide (the
/// longest permanent prefix that covers the key, or the default deny).
///
/// The window is conservative, never wider than the entries': an allow that only a
/// time-bound entry gives holds inside that entry's window; a deny that only time-bound
/// entries give holds from the earliest `notBefore` to the latest `expires` of those covering
/// the key. Where time-bound allows and denies overlap, the kernel may deny earlier or longer
/// than the policy says until the agent recompiles at the next boundary (it does at each).
fn timed_value(key: &RuleKey, active: RuleValue, items: &[&Item<'_>], clock: Clock) -> RuleValue {
    let cidr = cidr_of(key);
    let covers = |it: &&&Item<'_>| it.rule.cidr.contains(&cidr);
    let permanent: Vec<&Item<'_>> = items
        .iter()
        .copied()
        .filter(|it| !it.rule.timing.is_timed())
        .collect();
    let perm_denies: Vec<&Item<'_>> = permanent
        .iter()
        .copied()
        .filter(|it| it.rule.deny)
        .collect();
    let longest = permanent
        .iter()
        .filter(covers)
        .map(|it| it.rule.cidr.prefix_len())
        .max();
    let fallback = match longest {
        None => RuleValue::permanent(Verdict::Deny as u32, RULE_DEFAULT_DENY),
        Some(len) => permanent
            .iter()
            .filter(covers)
            .filter(|it| it.rule.cidr.prefix_len() == len)
            .map(|it| value_of(it, &perm_denies))
            .min_by_key(rank)
            .unwrap_or(RuleValue::permanent(
                Verdict::Deny as u32,
                RULE_DEFAULT_DENY,
            )),
    };
    if fallback.verdict == active.verdict {
        return active;
    }
    let window = if active.verdict == Verdict::Allow as u32 {
        // The allow comes from the winning (time-bound) entry itself.
        items
            .iter()
            .find(|it| it.id == active.rule)
            .map(|it| it.rule.timing.boot_window(clock.wall_ns, clock.boot_ns))
    } else {
        // The deny comes from time-bound denies covering the key: their hull.
        let denies: Vec<(u64, u64)> = items
            .iter()
            .filter(covers)
            .filter(|it| it.rule.deny && it.rule.timing.is_timed())
            .map(|it| it.rule.timing.boot_window(clock.wall_ns, clock.boot_ns))
            .collect();
        (!denies.is_empty()).then(|| {
            let nb = if denies.iter().any(|d| d.0 == 0) {
                0
            } else {
                denies.iter().map(|d| d.0).min().unwrap_or(0)
            };
            let exp = if denies.iter().any(|d| d.1 == 0) {
                0
            } else {
                denies.iter().map(|d| d.1).max().unwrap_or(0)
            };
            (nb, exp)
        })
    };
    match window {
        // Unbounded both ways: the entry holds always.
        Some((0, 0)) | None => active,
        Some((not_before_ns, expires_ns)) => RuleValue {
            not_before_ns,
            expires_ns,
            fallback_verdict: fallback.verdict,
            fallback_rule: fallback.rule,
            ..active
        },
    }
}

/// The CIDR a rule key stands for.
fn cidr_of(key: &RuleKey) -> IpNet {
    let bits = u8::try_from(key.prefix_len.saturating_sub(RULE_FIXED_BITS)).unwrap_or(0);
    let net = if key.data.family == FAMILY_V4 {
        let a = [
            key.data.addr[0],
            key.data.addr[1],
            key.data.addr[2],
            key.data.addr[3],
        ];
        ipnet::Ipv4Net::new(a.into(), bits).map(IpNet::V4)
    } else {
        ipnet::Ipv6Net::new(key.data.addr.into(), bits).map(IpNet::V6)
    };
    net.unwrap_or_default()
}

/// One reading of the wall clock (Unix ns) and the kernel boot clock (ns), taken together:
/// maps the wall-clock instants of time-bound entries to the boot clock the kernel compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub wall_ns: i64,
    pub boot_ns: u64,
}

impl Clock {
    /// Both clocks now.
    pub fn now() -> Self {
        let boot_ns = crate::sys::boottime_ns();
        let wall_ns = super::wall_now_ns();
        Self { wall_ns, boot_ns }
    }

    /// The offset `wall - boot` (ns): constant while no one steps the wall clock
    /// (`CLOCK_BOOTTIME` counts suspend, so a suspend moves both together).
    pub fn offset(&self) -> i128 {
        i128::from(self.wall_ns) - i128::from(self.boot_ns)
    }
}

/// Bytes of the key data as the kernel's LPM trie compares them.
fn key_bytes(d: &RuleKeyData) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&d.generation.to_ne_bytes());
    b[4..8].copy_from_slice(&d.ident.to_ne_bytes());
    b[8] = d.proto;
    b[9] = d.family;
    b[10..12].copy_from_slice(&d.port.to_ne_bytes());
    b[12..28].copy_from_slice(&d.addr);
    b
}

fn prefix_eq(a: &[u8; 28], b: &[u8; 28], bits: u32) -> bool {
    let bits = usize::try_from(bits).unwrap_or(usize::MAX).min(28 * 8);
    let full = bits / 8;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// The `ENF_SOCKETS` entries of `policy` in `generation`: one per identity with a `sockets:`
/// list (identity `i + 1` for `identities[i]`).
pub fn socket_entries(
    policy: &super::Policy,
    generation: u32,
) -> Vec<(enforcer_common::SocketKey, u32)> {
    policy
        .identities
        .iter()
        .enumerate()
        .filter(|(_, id)| id.sockets != 0)
        .map(|(i, id)| {
            (
                enforcer_common::SocketKey {
                    generation,
                    ident: i as u32 + 1,
                },
                id.sockets,
            )
        })
        .collect()
}

/// A pure model of `ENF_HOSTS` and the `ENF_RULES` trie holding `entries` (as
/// [`rule_entries`] gives them): exact match on the hosts, longest match by brute force on the
/// prefixes.
struct EntryMaps<'a>(&'a [(RuleKey, RuleValue)], u64);

impl RuleMaps for EntryMaps<'_> {
    fn host(&self, key: &RuleKeyData) -> Option<RuleValue> {
        let bits = host_prefix_len(key.family);
        self.0
            .iter()
            .find(|(k, _)| k.prefix_len == bits && k.data == *key)
            .map(|(_, v)| *v)
    }

    fn now_ns(&self) -> u64 {
        self.1
    }

    fn prefix(&self, prefix_len: u32, key: &RuleKeyData) -> Option<RuleValue> {
        let kb = key_bytes(key);
        self.0
            .iter()
            .filter(|(k, _)| {
                k.prefix_len < host_prefix_len(k.data.family)
                    && k.prefix_len <= prefix_len
                    && prefix_eq(&key_bytes(&k.data), &kb, k.prefix_len)
            })
            .max_by_key(|(k, _)| k.prefix_len)
            .map(|(_, v)| *v)
    }
}

/// The kernel's rule lookup ([`lookup_rule`], the very function the kernel programs run) over
/// a model of the maps holding `entries`, time-bound entries judged now; `None` means no
/// entry matched (default deny).
pub fn kernel_verdict(
    entries: &[(RuleKey, RuleValue)],
    generation: u32,
    ident: u32,
    proto: u8,
    addr: IpAddr,
    port: u16,
) -> Option<RuleValue> {
    kernel_verdict_at(
        entries,
        generation,
        ident,
        proto,
        addr,
        port,
        crate::sys::boottime_ns(),
    )
}

/// [`kernel_verdict`] at boot-clock instant `now_ns`.
pub fn kernel_verdict_at(
    entries: &[(RuleKey, RuleValue)],
    generation: u32,
    ident: u32,
    proto: u8,
    addr: IpAddr,
    port: u16,
    now_ns: u64,
) -> Option<RuleValue> {
    let mut dst = match addr {
        IpAddr::V4(v4) => destination_v4(proto, port, v4.octets()),
        IpAddr::V6(v6) => destination_v6(proto, port, v6.octets()),
    };
    dst.generation = generation;
    dst.ident = ident;
    let g = GenConfig {
        prefix_rules: 1,
        ..GenConfig::default()
    };
    let maps = EntryMaps(entries, now_ns);
    let v = lookup_rule(&maps, &g, dst).at(now_ns);
    (v.rule != RULE_DEFAULT_DENY).then_some(v)
}

#[cfg(test)]
mod tests;

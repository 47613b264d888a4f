//! cgroup sock_addr programs: judge each connect and unconnected send.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{
    Basis, Counter, EVENT_ALIAS, Event, EventKind, ExeKey, Hook, ProcState, RuleKeyData,
    UncoveredKey, UncoveredValue, Verdict, decide, destination_v4_from, destination_v6_from,
    unspecified_v4, unspecified_v6,
};

use crate::maps::{CONFIG, EVENTS, KernelMaps, PROCS, UNCOVERED, count, now_ns, tgid};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn enf_connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, Hook::Connect4)
}

#[cgroup_sock_addr(connect6)]
pub fn enf_connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enf_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enf_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, Hook::Sendmsg6)
}

/// The IPv4 source a send to `0.0.0.0` goes to: the one the send asks for (sendmsg4, e.g.
/// `IP_PKTINFO`), else the address the socket is bound to; zero when it has none (the kernel
/// then picks loopback). Read only for an unspecified destination.
#[inline(always)]
fn source_v4(sa: *const bpf_sock_addr, hook: Hook) -> [u8; 4] {
    // SAFETY: context loads the verifier allows for this hook: `msg_src_ip4` in sendmsg4
    // only, and `sk` (a socket pointer the kernel guarantees) then its `src_ip4`.
    unsafe {
        if matches!(hook, Hook::Sendmsg4) {
            let m = core::ptr::read_volatile(&raw const (*sa).msg_src_ip4);
            if m != 0 {
                return m.to_ne_bytes();
            }
        }
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return [0; 4];
        }
        core::ptr::read_volatile(&raw const (*sk).src_ip4).to_ne_bytes()
    }
}

/// Destination of a sock_addr call as the address it reaches (IPv4-mapped IPv6 folded to
/// IPv4, unspecified addresses to where the kernel sends them), and whether it was rewritten.
#[inline(always)]
fn destination(sa: *const bpf_sock_addr, hook: Hook) -> (RuleKeyData, bool) {
    // SAFETY: `sa` is the context the kernel gave us; these are 4-byte context loads of
    // fields the hook's address family may read.
    unsafe {
        let proto = (*sa).protocol as u8;
        let port = u16::from_be((*sa).user_port as u16);
        if hook.is_v4() {
            let a = (*sa).user_ip4.to_ne_bytes();
            if unspecified_v4(a) {
                let src = source_v4(sa, hook);
                return (destination_v4_from(proto, port, a, src), true);
            }
            (destination_v4_from(proto, port, a, [0; 4]), false)
        } else {
            let mut a = [0u8; 16];
            a[0..4].copy_from_slice(&(*sa).user_ip6[0].to_ne_bytes());
            a[4..8].copy_from_slice(&(*sa).user_ip6[1].to_ne_bytes());
            a[8..12].copy_from_slice(&(*sa).user_ip6[2].to_ne_bytes());
            a[12..16].copy_from_slice(&(*sa).user_ip6[3].to_ne_bytes());
            if unspecified_v6(a) {
                // `::ffff:0.0.0.0` goes to the socket's IPv4 source when it has a real one
                // (a dual-stack socket bound to `::ffff:a.b.c.d`).
                let sk = (*sa).__bindgen_anon_1.sk;
                let src = if sk.is_null() || a[10] != 0xff {
                    [0; 4]
                } else {
                    let s6 = &raw const (*sk).src_ip6;
                    let w = |i: usize| core::ptr::read_volatile(&raw const (*s6)[i]);
                    if w(0) == 0 && w(1) == 0 && w(2) == u32::from_be(0xffff) {
                        w(3).to_ne_bytes()
                    } else {
                        [0; 4]
                    }
                };
                return (destination_v6_from(proto, port, a, src), true);
            }
            (destination_v6_from(proto, port, a, [0; 4]), false)
        }
    }
}

fn try_sock_addr(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let (dst, alias) = destination(ctx.sock_addr, hook);
    let pid = tgid();
    let Some(cfg) = CONFIG.get(0) else {
        count(Counter::NoConfig);
        return DENY;
    };
    // SAFETY: the entry is read at once (copied by the decision), inside the RCU read section.
    let proc_ = unsafe { PROCS.get(&pid) };
    let d = decide(&KernelMaps, cfg, proc_, &dst);
    if let Some(c) = d.basis.counter() {
        count(c);
    }
    if matches!(d.basis, Basis::NoConfig) {
        return if matches!(d.verdict, Verdict::Deny) {
            DENY
        } else {
            ALLOW
        };
    }
    if matches!(d.basis, Basis::Unattested)
        && let Some(p) = proc_
    {
        tally_uncovered(p, &dst);
    }
    count(d.verdict.counter());
    let report_allow = cfg.generation(cfg.active & 1).report_allow != 0;
    if !matches!(d.verdict, Verdict::Allow) || report_allow {
        let flags = match proc_ {
            Some(p) => p.flags,
            None => 0,
        } | if alias { EVENT_ALIAS } else { 0 };
        report_connect(pid, hook, d.ident, d.verdict, d.rule, flags, &dst);
    }
    if matches!(d.verdict, Verdict::Deny) {
        DENY
    } else {
        ALLOW
    }
}

/// Coverage: count connects with no identity per (executable, cgroup), in the kernel, so the
/// report costs no event per connect.
#[inline(always)]
fn tally_uncovered(p: &ProcState, dst: &RuleKeyData) {
    let key = UncoveredKey {
        exe_id: p.exe_id,
        _pad0: 0,
        cgroup_id: p.cgroup_id,
    };
    let now = now_ns();
    match UNCOVERED.get_ptr_mut(&key) {
        Some(v) => {
            // SAFETY: a map value; concurrent updates from other CPUs only race on statistics.
            unsafe {
                (*v).connects += 1;
                (*v).last_ns = now;
                (*v).last_dst = dst.addr;
                (*v).last_port = dst.port;
                (*v).last_proto = dst.proto;
                (*v).last_family = dst.family;
            }
        }
        None => {
            let v = UncoveredValue {
                connects: 1,
                last_ns: now,
                last_dst: dst.addr,
                last_port: dst.port,
                last_proto: dst.proto,
                last_family: dst.family,
                _pad0: 0,
            };
            let _ = UNCOVERED.insert(&key, &v, 0);
        }
    }
}

#[inline(always)]
fn report_connect(
    pid: u32,
    hook: Hook,
    ident: u32,
    verdict: Verdict,
    rule: u32,
    flags: u32,
    dst: &RuleKeyData,
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let ug = bpf_get_current_uid_gid();
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind: EventKind::Connect as u32,
        tgid: pid,
        aux: hook as u32,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        ident,
        verdict: verdict as u32,
        rule,
        // SAFETY: a helper without arguments or side effects.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ktime_ns: now_ns(),
        start_ns: 0,
        flags,
        port: dst.port,
        proto: dst.proto,
        family: dst.family,
        dst: dst.addr,
        exe: ExeKey::default(),
    };
    entry.submit(0);
}

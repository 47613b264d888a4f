//! cgroup sock_addr programs: judge each connect and unconnected send.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{
    Basis, Counter, Event, EventKind, ExeKey, Hook, ProcState, RuleKeyData, UncoveredKey,
    UncoveredValue, Verdict, decide, destination_v4, destination_v6,
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

/// Destination of a sock_addr call, IPv4-mapped IPv6 folded to IPv4.
#[inline(always)]
fn destination(sa: *const bpf_sock_addr, hook: Hook) -> RuleKeyData {
    // SAFETY: `sa` is the context the kernel gave us; these are 4-byte context loads of
    // fields the hook's address family may read.
    unsafe {
        let proto = (*sa).protocol as u8;
        let port = u16::from_be((*sa).user_port as u16);
        if hook.is_v4() {
            destination_v4(proto, port, (*sa).user_ip4.to_ne_bytes())
        } else {
            let mut a = [0u8; 16];
            a[0..4].copy_from_slice(&(*sa).user_ip6[0].to_ne_bytes());
            a[4..8].copy_from_slice(&(*sa).user_ip6[1].to_ne_bytes());
            a[8..12].copy_from_slice(&(*sa).user_ip6[2].to_ne_bytes());
            a[12..16].copy_from_slice(&(*sa).user_ip6[3].to_ne_bytes());
            destination_v6(proto, port, a)
        }
    }
}

fn try_sock_addr(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let dst = destination(ctx.sock_addr, hook);
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
        };
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

//! cgroup sock program: refuses, at creation, the sockets the connect hooks never judge (raw,
//! ICMP ping, SCTP, UDP-Lite, any IP protocol other than TCP, UDP and MPTCP), with the same
//! identity decision as a connect and the identity's `sockets:` list instead of its rules.
//! The kernel runs it for `AF_INET`/`AF_INET6` sockets only (`inet_create`, `inet6_create`).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    macros::cgroup_sock,
    programs::SockContext,
};
use enforcer_common::{
    AF_INET6, Counter, Event, EventKind, ExeKey, FAMILY_V4, FAMILY_V6, Hook, SocketKind, Verdict,
    decide_socket, socket_kind,
};

use crate::maps::{CONFIG, EVENTS, KernelMaps, PROCS, count, now_ns, tgid};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock(sock_create)]
pub fn enf_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context the kernel gave us; 4-byte loads of fields sock_create may read.
    let (family, sock_type, protocol) = unsafe {
        let sk = ctx.sock;
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).type_),
            core::ptr::read_volatile(&raw const (*sk).protocol),
        )
    };
    // TCP, UDP, MPTCP (judged at connect) and other families: nothing to do, no lookup.
    let Some(kind) = socket_kind(family, sock_type, protocol) else {
        return ALLOW;
    };
    let Some(cfg) = CONFIG.get(0) else {
        count(Counter::NoConfig);
        return DENY;
    };
    let pid = tgid();
    // SAFETY: the entry is read at once (copied by the decision), inside the RCU read section.
    let proc_ = unsafe { PROCS.get(&pid) };
    let d = decide_socket(&KernelMaps, cfg, proc_, kind);
    if let Some(c) = d.basis.counter() {
        count(c);
    }
    let refused = matches!(d.verdict, Verdict::Deny);
    if refused {
        count(Counter::SocketRefused);
    }
    let report_allow = cfg.generation(cfg.active & 1).report_allow != 0;
    if !matches!(d.verdict, Verdict::Allow) || report_allow {
        let flags = match proc_ {
            Some(p) => p.flags,
            None => 0,
        };
        report(
            pid, d.ident, d.verdict, d.rule, flags, family, sock_type, protocol, kind,
        );
    }
    if refused { DENY } else { ALLOW }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one event's fields, written once"
)]
fn report(
    pid: u32,
    ident: u32,
    verdict: Verdict,
    rule: u32,
    flags: u32,
    family: u32,
    sock_type: u32,
    protocol: u32,
    kind: SocketKind,
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let ug = bpf_get_current_uid_gid();
    let mut dst = [0u8; 16];
    let p = protocol.to_ne_bytes();
    dst[0] = p[0];
    dst[1] = p[1];
    dst[2] = p[2];
    dst[3] = p[3];
    dst[4] = kind as u8;
    // SAFETY: reserved space of the right size; every field is written below.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event {
        kind: EventKind::Socket as u32,
        tgid: pid,
        aux: Hook::SockCreate as u32,
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
        port: sock_type as u16,
        proto: protocol as u8,
        family: if family == AF_INET6 {
            FAMILY_V6
        } else {
            FAMILY_V4
        },
        dst,
        exe: ExeKey::default(),
    };
    entry.submit(0);
}

//! Kernel programs for the tests and `cargo xtask bench` only; the agent never embeds them.
//!
//! * `bench_allow4/6`, `bench_sm_allow4/6`: programs that only allow, the cost any cgroup
//!   hook pays (names in `enforcer_common::BENCH_PROGS`).
//! * `enf_reject`: a program the verifier must refuse, to check what an operator sees when
//!   the kernel rejects a program (`enforcer_common::PROG_REJECT`).
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn bench_allow4(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn bench_allow6(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bench_sm_allow4(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bench_sm_allow6(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

// It reads far past the end of its context.
#[cgroup_sock_addr(connect4)]
pub fn enf_reject(ctx: SockAddrContext) -> i32 {
    // SAFETY: none, on purpose: the verifier rejects this load ("invalid bpf_context access"),
    // so the read never runs.
    let v =
        unsafe { core::ptr::read_volatile((ctx.sock_addr as *const u8).add(4000).cast::<u32>()) };
    (v & 1) as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

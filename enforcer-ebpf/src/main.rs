//! Kernel programs of the enforcer.
//!
//! * [`probes::sock_addr`]: `enf_connect4/6`, `enf_sendmsg4/6` (cgroup sock_addr) judge each
//!   connect / unconnected send from the calling process's identity and the compiled rules,
//!   with the decision function of `enforcer-common`.
//! * [`probes::sock_create`]: `enf_sock_create` (cgroup sock) refuses at creation the
//!   sockets the connect hooks never judge (raw, ICMP ping, SCTP, UDP-Lite, other protocols),
//!   unless the identity's `sockets:` list allows them.
//! * [`probes::process`]: `enf_fork`, `enf_exec`, `enf_exit` (raw tracepoints) keep process ->
//!   identity current in the kernel itself, so the identity changes at exec, not when user
//!   space catches up.
//! * [`probes::tamper`]: `enf_tamper_in`, `enf_tamper_out` (raw tracepoints `sys_enter`,
//!   `sys_exit`) strip the identity of a process another one traces, writes into or takes
//!   descriptors from.
//! * [`maps`]: every map, pinned by name under the agent's versioned bpffs folder, so
//!   enforcement outlives the agent.
//!
//! The benchmark's allow-only programs and the program the verifier must reject live in
//! `enforcer-ebpf-test`, never here.
#![no_std]
#![no_main]

mod maps;
mod probes;

use enforcer_common::ABI_VERSION;

/// The ABI version this object was built with; the agent checks it before use.
#[unsafe(no_mangle)]
static ENF_ABI: u32 = ABI_VERSION;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

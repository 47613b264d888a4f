//! The one table of the production object's programs: the loader, the feature probe,
//! `status` and the `load-program` diagnostics command all read [`PROGRAMS`].

use crate::Hook;

/// BPF program types the object uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, attached to a cgroup at a [`Hook`].
    CgroupSockAddr(Hook),
    /// `BPF_PROG_TYPE_RAW_TRACEPOINT`, attached to a tracepoint by name.
    RawTracepoint(&'static str),
    /// `BPF_PROG_TYPE_CGROUP_SOCK`, attached to a cgroup at a [`Hook`] (`sock_create`).
    CgroupSock(Hook),
}

impl ProgramKind {
    /// The cgroup hook of a cgroup program (sock_addr or sock), None for a tracepoint.
    pub const fn cgroup_hook(self) -> Option<Hook> {
        match self {
            Self::CgroupSockAddr(h) | Self::CgroupSock(h) => Some(h),
            Self::RawTracepoint(_) => None,
        }
    }
}

impl ProgramKind {
    /// The program type's name, as errors and the probe print it.
    pub const fn type_name(self) -> &'static str {
        match self {
            Self::CgroupSockAddr(_) => "cgroup_sock_addr",
            Self::RawTracepoint(_) => "raw_tracepoint",
            Self::CgroupSock(_) => "cgroup_sock",
        }
    }

    /// The ELF section prefix (and `status` label) of the type: `cgroup`, `raw_tracepoint`.
    pub const fn section(self) -> &'static str {
        match self {
            Self::CgroupSockAddr(_) | Self::CgroupSock(_) => "cgroup",
            Self::RawTracepoint(_) => "raw_tracepoint",
        }
    }

    /// Where it attaches: the cgroup hook (`connect4`) or the tracepoint (`sched_process_exec`).
    pub const fn attach_point(self) -> &'static str {
        match self {
            Self::CgroupSockAddr(h) | Self::CgroupSock(h) => h.name(),
            Self::RawTracepoint(tp) => tp,
        }
    }
}

/// One program of the production object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramSpec {
    /// Function (and program) name in the object, at most 15 characters.
    pub name: &'static str,
    pub kind: ProgramKind,
    /// True when the agent cannot run without it (every program today).
    pub required: bool,
    /// Oldest kernel (major, minor) the program was checked on.
    pub min_kernel: (u32, u32),
}

pub const PROG_CONNECT4: &str = "enf_connect4";
pub const PROG_CONNECT6: &str = "enf_connect6";
pub const PROG_SENDMSG4: &str = "enf_sendmsg4";
pub const PROG_SENDMSG6: &str = "enf_sendmsg6";
pub const PROG_FORK: &str = "enf_fork";
pub const PROG_EXEC: &str = "enf_exec";
pub const PROG_EXIT: &str = "enf_exit";
pub const PROG_TAMPER_IN: &str = "enf_tamper_in";
pub const PROG_TAMPER_OUT: &str = "enf_tamper_out";
pub const PROG_SOCK_CREATE: &str = "enf_sock_create";

/// Raw tracepoints the process programs attach to.
pub const TP_FORK: &str = "sched_process_fork";
pub const TP_EXEC: &str = "sched_process_exec";
pub const TP_EXIT: &str = "sched_process_exit";
/// Raw tracepoints of every syscall's entry and exit (the tamper programs).
pub const TP_SYS_ENTER: &str = "sys_enter";
pub const TP_SYS_EXIT: &str = "sys_exit";

/// Oldest kernel the agent supports (cgroup `bpf_link`, ring buffer, boot-clock helper).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

const fn prog(name: &'static str, kind: ProgramKind) -> ProgramSpec {
    ProgramSpec {
        name,
        kind,
        required: true,
        min_kernel: MIN_KERNEL,
    }
}

/// Every program of the production object, socket hooks first.
pub const PROGRAMS: [ProgramSpec; 10] = [
    prog(PROG_CONNECT4, ProgramKind::CgroupSockAddr(Hook::Connect4)),
    prog(PROG_CONNECT6, ProgramKind::CgroupSockAddr(Hook::Connect6)),
    prog(PROG_SENDMSG4, ProgramKind::CgroupSockAddr(Hook::Sendmsg4)),
    prog(PROG_SENDMSG6, ProgramKind::CgroupSockAddr(Hook::Sendmsg6)),
    prog(PROG_SOCK_CREATE, ProgramKind::CgroupSock(Hook::SockCreate)),
    prog(PROG_FORK, ProgramKind::RawTracepoint(TP_FORK)),
    prog(PROG_EXEC, ProgramKind::RawTracepoint(TP_EXEC)),
    prog(PROG_EXIT, ProgramKind::RawTracepoint(TP_EXIT)),
    prog(PROG_TAMPER_IN, ProgramKind::RawTracepoint(TP_SYS_ENTER)),
    prog(PROG_TAMPER_OUT, ProgramKind::RawTracepoint(TP_SYS_EXIT)),
];

/// The oldest kernel every required program of the table runs on: the agent refuses older
/// ones (the probe's `MIN_KERNEL`).
pub const fn required_min_kernel() -> (u32, u32) {
    let mut min = (0, 0);
    let mut i = 0;
    while i < PROGRAMS.len() {
        let p = &PROGRAMS[i];
        let (a, b) = p.min_kernel;
        if p.required && (a > min.0 || (a == min.0 && b > min.1)) {
            min = (a, b);
        }
        i += 1;
    }
    min
}

/// The program of the table named `name`.
pub fn program_named(name: &str) -> Option<&'static ProgramSpec> {
    PROGRAMS
        .iter()
        .find(|p| p.name.as_bytes() == name.as_bytes())
}

/// The cgroup program attached at `hook`.
pub fn program_for_hook(hook: Hook) -> Option<&'static ProgramSpec> {
    PROGRAMS
        .iter()
        .find(|p| matches!(p.kind.cgroup_hook(), Some(h) if h as u32 == hook as u32))
}

// ---- the test object (`enforcer-ebpf-test`): never in the production object ----

/// A program the verifier must reject; loaded only by tests, to check the rejection message.
pub const PROG_REJECT: &str = "enf_reject";

/// Programs that only allow (the floor of any cgroup hook), loaded by the benchmark only.
pub const BENCH_PROGS: [(Hook, &str); 4] = [
    (Hook::Connect4, "bench_allow4"),
    (Hook::Connect6, "bench_allow6"),
    (Hook::Sendmsg4, "bench_sm_allow4"),
    (Hook::Sendmsg6, "bench_sm_allow6"),
];

const _: () = {
    let mut i = 0;
    while i < PROGRAMS.len() {
        assert!(PROGRAMS[i].name.len() <= 15);
        i += 1;
    }
    assert!(PROG_REJECT.len() <= 15);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_one_program() {
        for h in Hook::ALL {
            let p = program_for_hook(*h).map(|p| p.name);
            assert!(p.is_some(), "{h:?}");
            assert_eq!(
                PROGRAMS
                    .iter()
                    .filter(|q| q.kind.cgroup_hook() == Some(*h))
                    .count(),
                1
            );
        }
        assert_eq!(
            program_named("enf_exec").map(|p| p.kind.attach_point()),
            Some(TP_EXEC)
        );
        assert!(program_named(PROG_REJECT).is_none());
    }
}

//! What the running kernel offers the enforcer, probed at start before anything is loaded.
//!
//! Each feature is *required* (missing: the agent refuses to start with one message naming
//! what is missing, the kernel release and the oldest supported kernel) or *optional*
//! (missing: the agent starts, logs what is lost, and `status` shows it). Nothing optional
//! ever widens access: without kernel BTF, for instance, every exec is treated as a never-seen
//! binary (held in an enforced scope until hashed), never as a known one.
//!
//! `ENFORCER_PROBE_DENY=btf,enable_stats` (a test knob) makes the probe report the named
//! features as missing. It can only take features away, so it can only make the agent refuse
//! to start or trust the kernel less, never more.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use enforcer_common::{Hook, KernelOffsets, PROGRAMS, ProgramKind};
use serde::Serialize;

use crate::{attest, btf, sys};

/// The oldest kernel the agent runs on: BTF, cgroup `bpf_link` (5.7), the BPF ring buffer
/// (5.8), `bpf_ktime_get_boot_ns` (5.8) and pinnable raw tracepoint links; checked in VMs.
/// The newest `min_kernel` of the required programs of the program table.
pub const MIN_KERNEL: (u32, u32) = enforcer_common::required_min_kernel();
/// Test knob: comma-separated feature names the probe reports as missing.
pub const DENY_ENV: &str = "ENFORCER_PROBE_DENY";

/// One probed feature.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    /// Stable name (the knob and the README table use it), e.g. `btf`, `map_ringbuf`.
    pub name: &'static str,
    pub required: bool,
    pub found: bool,
    /// What was found, or why it is missing.
    pub detail: String,
    /// What the agent does without it.
    pub without: &'static str,
}

/// Why the agent refuses this kernel.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "kernel {release} is older than {}.{}, the oldest kernel the enforcer supports (it needs BTF, cgroup bpf_link, the BPF ring buffer and pinnable raw tracepoints); run the agent on {}.{} or later; nothing was loaded",
        MIN_KERNEL.0, MIN_KERNEL.1, MIN_KERNEL.0, MIN_KERNEL.1
    )]
    TooOld { release: String },
    #[error(
        "kernel {release} lacks what the enforcer requires: {missing}; the minimum supported kernel is {}.{} built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and cgroup v2 (run `enforcer-agent probe` to see every feature); nothing was loaded",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    Missing { release: String, missing: String },
}

/// What the probe found.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// `uname -r`.
    pub release: String,
    pub features: Vec<Feature>,
    /// Kernel struct offsets for the exec program; `None` when BTF is not usable.
    #[serde(skip)]
    pub offsets: Option<KernelOffsets>,
    /// The cgroup2 mount point.
    #[serde(skip)]
    pub cgroup2: Option<PathBuf>,
}

/// `major.minor.patch` of a release string such as `5.10.0-32-amd64` or `6.12.117+deb13-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut nums = release.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = nums.next()??;
    let minor = nums.next()??;
    let patch = nums.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// True when `release` is at least [`MIN_KERNEL`]; an unparsable release is not (fail closed).
pub fn release_supported(release: &str) -> bool {
    parse_release(release).is_some_and(|(a, b, _)| (a, b) >= MIN_KERNEL)
}

/// Feature names listed in the knob's value.
pub fn denied(value: Option<&str>) -> BTreeSet<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub use crate::sys::kernel_release;

const HOLD_WITHOUT_BTF: &str = "exec-time identity is off: every exec is treated as a never-seen binary (held by SIGSTOP in an enforced scope until the agent hashes it, then let go), and a forked child that does not exec has no kernel entry, so its connects in an enforced scope are denied";
const REFUSE: &str = "refuses to start";
const TAMPER_BLIND: &str = "tampering by ptrace, /proc/PID/mem and pidfd_getfd is not seen (process_vm_writev by pid still is): a tampered process keeps its identity";
const OPTIONAL_PROGRAM: &str = "the optional program that needs it is not loaded";
/// Feature names of the socket hooks (stable: the knob and the README table use them),
/// indexed by `Hook as usize - 1`.
const ATTACH_FEATURES: [&str; 4] = [
    "attach_connect4",
    "attach_connect6",
    "attach_sendmsg4",
    "attach_sendmsg6",
];
const _: () = {
    assert!(Hook::Connect4 as usize == 1 && Hook::Connect6 as usize == 2);
    assert!(Hook::Sendmsg4 as usize == 3 && Hook::Sendmsg6 as usize == 4);
};

impl Probe {
    /// Probes the running kernel (root: the bpf() probes load tiny programs and maps).
    pub fn run() -> Self {
        let deny = denied(std::env::var(DENY_ENV).ok().as_deref());
        let mut p = Self::probe_kernel();
        for f in &mut p.features {
            if deny.contains(f.name) && f.found {
                f.found = false;
                f.detail = format!("reported missing by {DENY_ENV} (test knob): {}", f.detail);
            }
        }
        let known: BTreeSet<&str> = p.features.iter().map(|f| f.name).collect();
        for d in deny.iter().filter(|d| !known.contains(d.as_str())) {
            tracing::warn!(
                "{DENY_ENV} names `{d}`, which is no probed feature (known: {})",
                known.iter().copied().collect::<Vec<_>>().join(", ")
            );
        }
        if !p.found("btf") {
            p.offsets = None;
        }
        if !p.found("cgroup2") {
            p.cgroup2 = None;
        }
        p
    }

    fn probe_kernel() -> Self {
        let release = kernel_release();
        let mut features = Vec::new();
        let mut add = |name, required, res: Result<String, String>, without| {
            let (found, detail) = match res {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            features.push(Feature {
                name,
                required,
                found,
                detail,
                without,
            });
        };

        let cgroup2 = attest::cgroup2_mount().ok();
        add(
            "cgroup2",
            true,
            cgroup2
                .as_ref()
                .map(|m| format!("mounted at {}", m.display()))
                .ok_or_else(|| "no cgroup2 mount in /proc/self/mountinfo".to_string()),
            REFUSE,
        );
        add("bpffs", true, bpffs(), REFUSE);
        let offsets = btf::kernel_offsets();
        add(
            "btf",
            false,
            match &offsets {
                Ok(_) => Ok(format!(
                    "{} with the linux_binprm/file/inode/task_struct fields the exec program reads",
                    btf::VMLINUX_BTF
                )),
                Err(e) => Err(e.to_string()),
            },
            HOLD_WITHOUT_BTF,
        );
        add(
            "tamper_hook",
            false,
            match btf::tamper_offsets() {
                Ok(_) => Ok(
                    "raw tracepoints sys_enter/sys_exit (ptrace, process_vm_writev, pidfd_getfd, open of /proc/PID/mem for writing; 64- and 32-bit syscalls), with the task/file/pid offsets from BTF"
                        .to_string(),
                ),
                Err(e) => Err(e.to_string()),
            },
            TAMPER_BLIND,
        );
        add(
            crate::revoke::FEATURE_NETLINK,
            false,
            crate::revoke::probe_netlink(),
            crate::revoke::WITHOUT_NETLINK,
        );
        add(
            crate::revoke::FEATURE_KFUNC,
            false,
            crate::revoke::probe_kfunc(),
            crate::revoke::WITHOUT_KFUNC,
        );
        // One feature per program type and per socket hook of the program table.
        for (name, t) in [
            ("prog_cgroup_sock_addr", ProgramType::CgroupSockAddr),
            ("prog_raw_tracepoint", ProgramType::RawTracePoint),
            ("prog_cgroup_sock", ProgramType::CgroupSock),
        ] {
            let required = PROGRAMS
                .iter()
                .any(|p| p.required && format!("prog_{}", p.kind.type_name()) == name);
            add(
                name,
                required,
                yes_no(is_program_supported(t)),
                if required { REFUSE } else { OPTIONAL_PROGRAM },
            );
        }
        for p in &PROGRAMS {
            let ProgramKind::CgroupSockAddr(hook) = p.kind else {
                continue;
            };
            add(
                ATTACH_FEATURES[hook as usize - 1],
                p.required,
                sock_addr_prog(attach_type(hook))
                    .map(|_| "cgroup_sock_addr program loads".to_string()),
                if p.required { REFUSE } else { OPTIONAL_PROGRAM },
            );
        }
        add("cgroup_bpf_link", true, cgroup_link(), REFUSE);
        for (name, t) in [
            ("map_hash", MapType::Hash),
            ("map_lru_hash", MapType::LruHash),
            ("map_array", MapType::Array),
            ("map_percpu_array", MapType::PerCpuArray),
            ("map_lpm_trie", MapType::LpmTrie),
            ("map_cgroup_array", MapType::CgroupArray),
            ("map_ringbuf", MapType::RingBuf),
        ] {
            add(name, true, yes_no(is_map_supported(t)), REFUSE);
        }
        let raw = ProgramType::RawTracePoint;
        let sock = ProgramType::CgroupSockAddr;
        for (name, prog, helper) in [
            ("helper_send_signal", raw, BpfHelper::BPF_FUNC_send_signal),
            (
                "helper_probe_read_kernel",
                raw,
                BpfHelper::BPF_FUNC_probe_read_kernel,
            ),
            (
                "helper_current_task_under_cgroup",
                raw,
                BpfHelper::BPF_FUNC_current_task_under_cgroup,
            ),
            (
                "helper_ktime_get_boot_ns",
                raw,
                BpfHelper::BPF_FUNC_ktime_get_boot_ns,
            ),
            (
                "helper_get_current_cgroup_id",
                sock,
                BpfHelper::BPF_FUNC_get_current_cgroup_id,
            ),
            (
                "helper_ringbuf_reserve",
                sock,
                BpfHelper::BPF_FUNC_ringbuf_reserve,
            ),
            (
                "helper_ringbuf_submit",
                sock,
                BpfHelper::BPF_FUNC_ringbuf_submit,
            ),
        ] {
            add(
                name,
                true,
                yes_no(is_helper_supported(prog, helper)),
                REFUSE,
            );
        }
        add("pidfd", true, pidfd(), REFUSE);
        add(
            "enable_stats",
            false,
            enable_stats(),
            "no kernel-measured program run time (BPF_ENABLE_STATS, used by `cargo xtask bench` and bpftool); enforcement is unchanged",
        );
        Self {
            release,
            features,
            offsets: offsets.ok(),
            cgroup2,
        }
    }

    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }

    pub fn found(&self, name: &str) -> bool {
        self.feature(name).is_some_and(|f| f.found)
    }

    /// Refuses a kernel older than [`MIN_KERNEL`] or one that lacks a required feature.
    pub fn check(&self) -> Result<(), ProbeError> {
        check(&self.release, &self.features)
    }

    /// One log line per missing optional feature, saying what is lost.
    pub fn log_degradations(&self) {
        for f in self.features.iter().filter(|f| !f.required && !f.found) {
            tracing::warn!(
                feature = f.name,
                "kernel {} lacks {}: {}; without it the agent goes on: {}",
                self.release,
                f.name,
                f.detail,
                f.without
            );
        }
    }
}

/// [`Probe::check`] on plain data (unit-tested).
pub fn check(release: &str, features: &[Feature]) -> Result<(), ProbeError> {
    if !release_supported(release) {
        return Err(ProbeError::TooOld {
            release: release.to_string(),
        });
    }
    let missing: Vec<String> = features
        .iter()
        .filter(|f| f.required && !f.found)
        .map(|f| format!("{} ({})", f.name, f.detail))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::Missing {
            release: release.to_string(),
            missing: missing.join("; "),
        })
    }
}

fn yes_no<E: std::fmt::Display>(r: Result<bool, E>) -> Result<String, String> {
    match r {
        Ok(true) => Ok("supported".into()),
        Ok(false) => Err("not supported by this kernel".into()),
        Err(e) => Err(format!("probe failed: {e} (run as root)")),
    }
}

fn bpffs() -> Result<String, String> {
    let fss = fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("cannot read /proc/filesystems: {e}"))?;
    if !fss
        .lines()
        .any(|l| l.split_whitespace().last() == Some("bpf"))
    {
        return Err("the kernel has no bpf file system (CONFIG_BPF_SYSCALL)".into());
    }
    Ok(if crate::sys::is_bpffs(Path::new("/sys/fs/bpf")) {
        "mounted at /sys/fs/bpf".into()
    } else {
        "supported, not mounted: the agent mounts it at /sys/fs/bpf".into()
    })
}

// cgroup_sock_addr attach types (include/uapi/linux/bpf.h).
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_UDP6_SENDMSG: u32 = 15;
/// cgroup_sock attach type of `sock_create` (the `prog_cgroup_sock` feature covers it).
const ATTACH_INET_SOCK_CREATE: u32 = 2;

/// The kernel's attach type of a socket hook.
fn attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::Connect4 => ATTACH_INET4_CONNECT,
        Hook::Connect6 => ATTACH_INET6_CONNECT,
        Hook::Sendmsg4 => ATTACH_UDP4_SENDMSG,
        Hook::Sendmsg6 => ATTACH_UDP6_SENDMSG,
        Hook::SockCreate => ATTACH_INET_SOCK_CREATE,
    }
}

/// Loads `r0 = 1; exit` as a cgroup_sock_addr program for one attach type.
fn sock_addr_prog(attach: u32) -> Result<OwnedFd, String> {
    // mov64 r0, 1 ; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    match sys::load_sock_addr(&insns, c"GPL", attach) {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err("the kernel does not know this attach type (EINVAL)".into())
        }
        Err(e) => Err(format!("probe failed: BPF_PROG_LOAD: {e} (run as root)")),
    }
}

/// cgroup `bpf_link`: BPF_LINK_CREATE on an invalid cgroup fd answers EBADF where the kernel
/// knows cgroup links (5.7+) and EINVAL where it does not.
fn cgroup_link() -> Result<String, String> {
    use std::os::fd::AsFd as _;
    let prog = sock_addr_prog(ATTACH_INET4_CONNECT)?;
    match sys::link_create(prog.as_fd(), u32::MAX, ATTACH_INET4_CONNECT) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            Ok("BPF_LINK_CREATE for cgroups (pinned links, takeover without a gap)".into())
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err("BPF_LINK_CREATE does not take cgroup programs (kernel before 5.7)".into())
        }
        Err(e) => Err(format!("probe failed: BPF_LINK_CREATE: {e}")),
        // Cannot happen with an invalid target; the link is closed at once.
        Ok(_link) => Ok("BPF_LINK_CREATE for cgroups".into()),
    }
}

/// pidfd_open + pidfd_send_signal (5.3): held processes are resumed through a pidfd.
fn pidfd() -> Result<String, String> {
    match sys::pidfd_open(std::process::id()) {
        Ok(_fd) => Ok("pidfd_open (held processes are resumed through a pidfd)".into()),
        Err(e) => Err(format!(
            "pidfd_open: {e} (held processes could not be resumed safely)"
        )),
    }
}

fn enable_stats() -> Result<String, String> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        // Dropping the fd turns the statistics off again.
        Ok(_fd) => Ok("BPF_ENABLE_STATS (run time per program)".into()),
        Err(e) => Err(format!("BPF_ENABLE_STATS: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &'static str, required: bool, found: bool) -> Feature {
        Feature {
            name,
            required,
            found,
            detail: "d".into(),
            without: "w",
        }
    }

    #[test]
    fn releases_parse_and_compare() {
        assert_eq!(parse_release("5.10.0-32-amd64"), Some((5, 10, 0)));
        assert_eq!(parse_release("6.12.117+deb13-amd64"), Some((6, 12, 117)));
        assert_eq!(parse_release("7.2"), Some((7, 2, 0)));
        assert_eq!(parse_release("6.18.0-rc3"), Some((6, 18, 0)));
        assert_eq!(parse_release("garbage"), None);
        assert!(release_supported("5.10.0-32-amd64"));
        assert!(release_supported("5.11.1"));
        assert!(release_supported("6.1.0-47-amd64"));
        assert!(release_supported("10.0.0"));
        assert!(!release_supported("5.9.16"));
        assert!(!release_supported("5.4.0-200-generic"));
        assert!(!release_supported("4.19.0-27-amd64"));
        assert!(!release_supported(""), "unknown release: refused");
    }

    #[test]
    fn knob_lists_features() {
        assert!(denied(None).is_empty());
        assert!(denied(Some(" , ")).is_empty());
        let d = denied(Some("btf, enable_stats,,"));
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec!["btf".to_string(), "enable_stats".to_string()]
        );
    }

    #[test]
    fn check_refuses_old_kernels_and_missing_required_features() {
        let all = [f("map_ringbuf", true, true), f("btf", false, false)];
        assert!(check("5.10.0-32-amd64", &all).is_ok(), "optional may miss");
        let e = check("5.4.0-1", &all).unwrap_err().to_string();
        assert!(e.contains("5.4.0-1") && e.contains("5.10"), "{e}");
        let missing = [f("map_ringbuf", true, false), f("pidfd", true, false)];
        let e = check("6.1.0-47-amd64", &missing).unwrap_err().to_string();
        assert!(
            e.contains("map_ringbuf") && e.contains("pidfd") && e.contains("6.1.0-47-amd64"),
            "{e}"
        );
        assert!(e.contains("5.10"), "names the minimum kernel: {e}");
    }
}

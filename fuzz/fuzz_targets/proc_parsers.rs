//! The agent's parsers of `/proc` texts and of the cgroup paths they carry: `/proc/PID/stat`,
//! `/proc/PID/status`, `/proc/PID/cgroup`, `/proc/self/mountinfo`, the cgroup path -> cgroup2
//! folder, container and systemd unit, and the kernel release. A process controls its own
//! command name (stat), and an unprivileged user names its cgroups and mount points, so every
//! one of these sees attacker-chosen text. Each parser gets the whole input.
#![no_main]

use std::path::Path;

use enforcer_agent::{attest, k8s, policy, probe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads these files with `read_to_string`: non-UTF-8 is an I/O error there.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = attest::parse_stat(text);
    let _ = attest::parse_status_ids(text);
    if let Some(cg) = attest::parse_cgroup(text) {
        if let Ok(dir) = attest::cgroup_dir(Path::new("/sys/fs/cgroup"), &cg) {
            assert!(
                dir.starts_with("/sys/fs/cgroup"),
                "{cg:?} left the mount: {dir:?}"
            );
        }
        let _ = k8s::cgroup_path::parse(&cg);
        let _ = policy::systemd_unit(&cg);
    }
    let _ = attest::cgroup2_mount_from(text);
    if let Ok(dir) = attest::cgroup_dir(Path::new("/sys/fs/cgroup"), text) {
        assert!(
            dir.starts_with("/sys/fs/cgroup"),
            "{text:?} left the mount: {dir:?}"
        );
    }
    let _ = k8s::cgroup_path::parse(text);
    let _ = policy::systemd_unit(text);
    let _ = probe::parse_release(text);
    let _ = probe::release_supported(text);
});

//! Helpers shared by the adversarial modules.

use std::{ffi::OsStr, os::unix::process::CommandExt as _, path::Path, process::Command};

use enforcer_tests::TestCgroup;

/// The unprivileged uid the attacker runs as (the same uid as the attested service where a
/// test says so).
pub const ATTACKER_UID: u32 = 65534;

/// `bin args` to run in `cg` as `uid` (gid the same): the child moves itself into the cgroup
/// and drops root between fork and exec, so the exec is the attacker's, in the scope.
pub fn command_as<I, S>(cg: &TestCgroup, bin: &Path, args: I, uid: u32) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let procs = std::ffi::CString::new(cg.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .expect("path");
    let mut c = Command::new(bin);
    c.args(args);
    // SAFETY: only async-signal-safe calls (open/write/close/setgid/setuid) between fork and
    // exec.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

//! A real containerd node for the node suite (tests/tests/node.rs): Debian's containerd and
//! runc, started here with a config of our own (own root, state and socket, the CRI plugin
//! with a locally imported sandbox image), in a cgroup of its own, and stopped by pid after the
//! tests. Images are imported with `ctr`; nothing is pulled (there is no registry).
//!
//! The traps of this machine kind (../shared/TOOLCHAIN.md): `restrict_oom_score_adj = true`
//! (no CAP_SYS_RESOURCE in the bounding set), `disable_apparmor = true`, cgroupfs (no systemd).

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{output, status, step},
    setup::ensure_debian,
};

/// Installs containerd, runc and podman from Debian when missing (podman: the node suite
/// checks that `podman load` reads the agent's image; protoc comes with the set-up).
pub fn install() -> Result<()> {
    ensure_debian(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("podman", "podman"),
    ])
}

/// A running containerd; stopped (by pid), its cgroup and root removed on drop.
pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    cgroup: PathBuf,
}

/// The cgroup2 mount point (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    text.lines()
        .filter_map(|l| l.split_once(" - "))
        .find(|(_, r)| r.split_whitespace().next() == Some("cgroup2"))
        .and_then(|(l, _)| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .context("no cgroup2 mount in /proc/self/mountinfo: the node suite needs cgroup v2")
}

/// The containerd configuration (version 2) for a node living in `dir`.
pub fn config(dir: &Path, sandbox_image: &str) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
    )
}

impl Node {
    /// Starts containerd in `dir` (emptied first) and waits for its socket.
    pub fn start(dir: &Path, sandbox_image: &str) -> Result<Self> {
        let t0 = Instant::now();
        remove_tree(dir)?;
        fs::create_dir_all(dir.join("cni/conf"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let cfg = dir.join("config.toml");
        fs::write(&cfg, config(dir, sandbox_image))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let cgroup = cgroup2_mount()?.join(format!("enftest-containerd-{}", std::process::id()));
        if !cgroup.exists() {
            fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        }
        let log = fs::File::create(dir.join("containerd.log")).context("containerd.log")?;
        let mut c = Command::new("containerd");
        c.arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let procs =
            std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
                .context("cgroup path")?;
        // SAFETY: only open/write/close between fork and exec (async-signal-safe); the child
        // moves itself into the node's cgroup before containerd starts.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c
            .spawn()
            .context("starting containerd (installed by `cargo xtask test` from Debian)")?;
        let mut node = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
            cgroup,
        };
        loop {
            let mut v = Command::new("ctr");
            v.arg("-a").arg(&node.socket).arg("version");
            if node.socket.exists() && output(v).is_some() {
                break;
            }
            if let Some(Ok(Some(s))) = node.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "containerd exited ({s}) before it answered; its log:\n{}",
                    node.log()
                );
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd did not answer on {} within 30 s; its log:\n{}",
                    node.socket.display(),
                    node.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        step(&format!(
            "containerd ready on {} in {:.2}s",
            node.socket.display(),
            t0.elapsed().as_secs_f64()
        ));
        Ok(node)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -n k8s.io images import TAR` (unpacked for the CRI's overlayfs snapshotter).
    pub fn import(&self, tar: &Path) -> Result<()> {
        let t0 = Instant::now();
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(tar)
            .stdout(Stdio::null());
        status(c, &format!("ctr images import {}", tar.display()))?;
        step(&format!(
            "imported {} in {:.2}s",
            tar.display(),
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// SIGTERM (then SIGKILL after 10 s) to containerd; then ends the shims it left in its
    /// cgroup (they are ours), removes the cgroup, unmounts what is left under its root and
    /// removes the root.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..50 {
            let procs = fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for p in procs.lines() {
                let _ = Command::new("kill").args(["-KILL", p.trim()]).status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Err(e) = fs::remove_dir(&self.cgroup) {
            eprintln!(
                "xtask: warning: could not remove {}: {e}",
                self.cgroup.display()
            );
        }
        if let Err(e) = remove_tree(&self.dir) {
            eprintln!("xtask: warning: {e:#}");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Unmounts everything mounted below `dir` (deepest first), then removes it.
fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", m]).status();
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_settings_this_machine_kind_needs() {
        let c = config(Path::new("/x/node"), "localhost/enf-pause:test");
        for needle in [
            "version = 2",
            r#"root = "/x/node/root""#,
            r#"address = "/x/node/containerd.sock""#,
            r#"sandbox_image = "localhost/enf-pause:test""#,
            "restrict_oom_score_adj = true",
            "disable_apparmor = true",
            r#"snapshotter = "overlayfs""#,
            "SystemdCgroup = false",
        ] {
            assert!(c.contains(needle), "{needle} missing in\n{c}");
        }
    }
}

//! The host tools a guest needs: QEMU (installed from Debian when missing) and a static
//! busybox (extracted from Debian's `busybox-static`, nothing installed).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::debian::{MIRROR, extract_deb, find_deb};
use crate::cmd::{have, is_root, output, status, step};

pub fn ensure_qemu(vm: &Path) -> Result<()> {
    if have("qemu-system-x86_64") {
        return Ok(());
    }
    if !is_root() {
        bail!("qemu-system-x86_64 is missing; install Debian's qemu-system-x86 (as root)");
    }
    // Never remove anything: a backported qemu-utils (as machines of this kind carry) breaks
    // the stable qemu-system-common, so then take qemu-system-x86 from the same backports.
    let mut q = Command::new("dpkg-query");
    q.args(["-W", "-f=${Version}", "qemu-utils"]);
    let utils = output(q).unwrap_or_default();
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_default();
    if utils.contains("~bpo") && !codename.is_empty() {
        let bpo = format!("{codename}-backports");
        step(&format!(
            "installing qemu-system-x86 from {bpo} (qemu-utils {utils} is installed from there)"
        ));
        let aptdir = vm.join("apt").join("host-backports");
        for d in [
            aptdir.join("lists").join("partial"),
            aptdir.join("cache").join("archives").join("partial"),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let sl = aptdir.join("sources.list");
        fs::write(
            &sl,
            format!(
                "deb {MIRROR} {bpo} main
"
            ),
        )
        .with_context(|| format!("writing {}", sl.display()))?;
        // The machine's own sources (sources.list.d) plus backports, private lists.
        let opts = |c: &mut Command| {
            c.arg("-o")
                .arg(format!("Dir::Etc::SourceList={}", sl.display()))
                .arg("-o")
                .arg(format!(
                    "Dir::State::Lists={}",
                    aptdir.join("lists").display()
                ))
                .arg("-o")
                .arg(format!("Dir::Cache={}", aptdir.join("cache").display()))
                .args(["-o", "Acquire::Languages=none"]);
        };
        let mut c = Command::new("apt-get");
        opts(&mut c);
        c.args(["update", "-q"]);
        status(c, &format!("apt-get update ({bpo})"))?;
        let mut c = Command::new("apt-get");
        opts(&mut c);
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-remove",
            "-t",
            &bpo,
            "qemu-system-x86",
        ]);
        return status(c, &format!("apt-get install -t {bpo} qemu-system-x86"));
    }
    step("installing qemu-system-x86 from Debian");
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-remove qemu-system-x86",
    ]);
    status(c, "apt-get install qemu-system-x86")
}

/// The static busybox of Debian's `busybox-static`, extracted under target/vm (the machine's
/// own apt sources; nothing is installed).
pub fn ensure_busybox(vm: &Path) -> Result<PathBuf> {
    let dir = vm.join("busybox");
    let bin = dir.join("bin").join("busybox");
    if bin.exists() {
        return Ok(bin);
    }
    let cache = vm.join("cache");
    let deb = match find_deb(&cache, "busybox-static_")? {
        Some(d) => d,
        None => {
            step("downloading busybox-static (apt-get download)");
            let mut c = Command::new("apt-get");
            c.current_dir(&cache)
                .args(["download", "-q", "busybox-static"]);
            if c.status().map(|s| !s.success()).unwrap_or(true) {
                let mut c = Command::new("apt-get");
                c.args(["update", "-q"]);
                status(c, "apt-get update")?;
                let mut c = Command::new("apt-get");
                c.current_dir(&cache)
                    .args(["download", "-q", "busybox-static"]);
                status(c, "apt-get download busybox-static")?;
            }
            find_deb(&cache, "busybox-static_")?
                .context("apt-get download left no busybox-static .deb")?
        }
    };
    extract_deb(&deb, &dir)?;
    if !bin.exists() {
        bail!("{} has no bin/busybox", deb.display());
    }
    Ok(bin)
}

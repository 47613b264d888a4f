//! `cargo xtask build`: the kernel object (pinned nightly, bpf-linker) and the agent (release).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{clean_command, stable_cargo, status, step},
    setup::{Tools, setup},
    toolchain::{BPF_TARGET, NIGHTLY},
};

/// Sets up, builds the kernel object and the agent; returns the object's path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let tools = setup()?;
    let obj = build_ebpf(root, &tools)?;
    step("building the agent (release)");
    let mut c = stable_cargo(root, &obj);
    c.args(["build", "--release", "-p", "enforcer-agent"]);
    status(c, "building enforcer-agent")?;
    Ok(obj)
}

fn path_with(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).unwrap_or_default()
}

/// Builds the kernel object; returns its path.
fn build_ebpf(root: &Path, tools: &Tools) -> Result<PathBuf> {
    step("building kernel programs (enforcer-ebpf)");
    let target_dir = root.join("target").join("ebpf");
    let linker_dir = tools
        .bpf_linker_bin
        .parent()
        .context("bpf-linker has no folder")?;
    let mut c = clean_command("cargo");
    c.current_dir(root.join("enforcer-ebpf"))
        .arg(format!("+{NIGHTLY}"))
        .args([
            "build",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            BPF_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path_with(linker_dir));
    status(c, "building enforcer-ebpf")?;
    let obj = target_dir.join(BPF_TARGET).join("release").join("enforcer");
    if !obj.exists() {
        bail!("the kernel object {} was not produced", obj.display());
    }
    Ok(obj)
}

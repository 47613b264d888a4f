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
    build_ebpf_test(root, &tools)?;
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
    ebpf_cargo(root, tools, "enforcer-ebpf", "build", "enforcer")
}

/// Builds the test-only kernel object (the bench's allow-only programs and the program the
/// verifier must reject), beside the production one; returns its path.
fn build_ebpf_test(root: &Path, tools: &Tools) -> Result<PathBuf> {
    step("building test kernel programs (enforcer-ebpf-test)");
    ebpf_cargo(root, tools, "enforcer-ebpf-test", "build", "enforcer-test")
}

/// Clippy with `-D warnings` on the kernel crates, for the bpf target as the build does.
pub fn clippy_ebpf(root: &Path, tools: &Tools) -> Result<()> {
    for krate in EBPF_CRATES {
        step(&format!("clippy -D warnings ({krate}, {BPF_TARGET})"));
        ebpf_cargo(root, tools, krate, "clippy", "")?;
    }
    Ok(())
}

/// The kernel crates (each its own workspace, built with the pinned nightly).
pub const EBPF_CRATES: [&str; 2] = ["enforcer-ebpf", "enforcer-ebpf-test"];

/// Path of the test-only kernel object `build_ebpf_test` writes.
pub fn ebpf_test_obj(root: &Path) -> PathBuf {
    root.join("target")
        .join("ebpf")
        .join(BPF_TARGET)
        .join("release")
        .join("enforcer-test")
}

/// `cargo +NIGHTLY <cmd> --release -Z build-std=core --target bpf` in a kernel crate; for a
/// build, checks that `bin` was produced and returns its path.
fn ebpf_cargo(root: &Path, tools: &Tools, krate: &str, cmd: &str, bin: &str) -> Result<PathBuf> {
    let target_dir = root.join("target").join("ebpf");
    let linker_dir = tools
        .bpf_linker_bin
        .parent()
        .context("bpf-linker has no folder")?;
    let mut c = clean_command("cargo");
    c.current_dir(root.join(krate))
        .arg(format!("+{NIGHTLY}"))
        .args([
            cmd,
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            BPF_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path_with(linker_dir));
    if cmd == "clippy" {
        c.args(["--", "-D", "warnings"]);
    }
    status(c, &format!("cargo {cmd} in {krate}"))?;
    let obj = target_dir.join(BPF_TARGET).join("release").join(bin);
    if cmd == "build" && !obj.exists() {
        bail!("the kernel object {} was not produced", obj.display());
    }
    Ok(obj)
}

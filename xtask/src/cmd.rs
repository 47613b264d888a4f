//! Running other programs: the workspace root, progress lines, child commands with a clean
//! environment, and the checks every command shares (root, a tool on PATH).

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::toolchain::STABLE;

pub fn workspace_root() -> Result<PathBuf> {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .context("CARGO_MANIFEST_DIR is not set: run this as `cargo xtask ...`")?;
    Ok(Path::new(&manifest)
        .parent()
        .context("xtask has no parent folder")?
        .to_path_buf())
}

pub fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// A `Command` with the environment that cargo set for this xtask removed, so nested cargo
/// and rustc invocations pick the toolchain we name and nothing else.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
    ] {
        c.env_remove(var);
    }
    c
}

/// `cargo +STABLE` in the workspace, with the kernel object the agent embeds.
pub fn stable_cargo(root: &Path, obj: &Path) -> Command {
    let mut c = clean_command("cargo");
    c.current_dir(root)
        .arg(format!("+{STABLE}"))
        .env("ENFORCER_EBPF_OBJ", obj)
        .env("ENFORCER_EBPF_TEST_OBJ", crate::build::ebpf_test_obj(root));
    c
}

/// Runs `c`; an error names `what` when it cannot start or does not succeed.
pub fn status(mut c: Command, what: &str) -> Result<()> {
    let s = c
        .status()
        .with_context(|| format!("could not start {what} ({c:?})"))?;
    if !s.success() {
        bail!("{what} failed ({s}); see the output above");
    }
    Ok(())
}

/// The standard output of `c` when it succeeds.
pub fn output(mut c: Command) -> Option<String> {
    let o = c.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (it loads BPF programs and creates cgroups); run it with sudo");
    }
    Ok(())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether this runs under CI (`CI=true` or `CI=1`): then a test that cannot run fails.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

//! `cargo xtask setup`: the pinned toolchains and bpf-linker, installed when missing.

use std::{env, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result};

use crate::{
    cmd::{clean_command, have, is_root, output, status, step},
    toolchain::{BPF_LINKER, BPF_LINKER_FEATURES, CARGO_FUZZ, MUSL_TARGET, NIGHTLY, STABLE},
};

/// Paths of the installed tools.
pub struct Tools {
    pub bpf_linker_bin: PathBuf,
}

/// Installs what is missing; returns where the tools are.
pub fn setup() -> Result<Tools> {
    let t0 = Instant::now();
    // protoc: the agent's and the tests' CRI clients (k8s-cri) are generated from .proto at
    // build time.
    ensure_debian(&[("protoc", "protobuf-compiler")])?;
    ensure_toolchain(NIGHTLY, &["rust-src", "clippy"])?;
    ensure_toolchain(STABLE, &["clippy", "rustfmt"])?;
    ensure_target(STABLE, MUSL_TARGET)?;
    let bpf_linker_bin = ensure_bpf_linker()?;
    step(&format!(
        "toolchains ready: {NIGHTLY} (kernel), {STABLE} (agent), bpf-linker {BPF_LINKER} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    ));
    Ok(Tools { bpf_linker_bin })
}

/// Installs the Debian packages of the (command, package) pairs whose command is missing
/// (root: apt-get; otherwise an error naming the packages).
pub fn ensure_debian(needs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        anyhow::bail!(
            "missing Debian packages: {list}; install them (`sudo apt-get install {list}`) or run xtask as root"
        );
    }
    step(&format!("installing {list} (Debian)"));
    let mut c = Command::new("sh");
    c.args([
        "-c",
        &format!(
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {list}"
        ),
    ]);
    status(c, &format!("apt-get install {list}"))
}

fn tools_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("enforcer-tools"))
}

fn toolchain_installed(name: &str) -> bool {
    let mut c = clean_command("rustup");
    c.args(["run", name, "rustc", "--version"]);
    output(c).is_some()
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result<()> {
    if toolchain_installed(name) {
        let mut c = clean_command("rustup");
        c.args(["component", "list", "--installed", "--toolchain", name]);
        let have = output(c).unwrap_or_default();
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|comp| !have.lines().any(|l| l.starts_with(comp)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        step(&format!("adding {} to {name}", missing.join(", ")));
        let mut c = clean_command("rustup");
        c.args(["component", "add", "--toolchain", name])
            .args(&missing);
        return status(c, &format!("rustup component add {}", missing.join(" ")));
    }
    step(&format!(
        "installing toolchain {name} (with {})",
        components.join(", ")
    ));
    let mut c = clean_command("rustup");
    c.args(["toolchain", "install", name, "--profile", "minimal"]);
    for comp in components {
        c.args(["--component", comp]);
    }
    status(c, &format!("rustup toolchain install {name}"))
}

/// Adds the standard library of `target` to `toolchain` when missing (the static builds).
fn ensure_target(toolchain: &str, target: &str) -> Result<()> {
    let mut c = clean_command("rustup");
    c.args(["target", "list", "--installed", "--toolchain", toolchain]);
    if output(c).is_some_and(|o| o.lines().any(|l| l.trim() == target)) {
        return Ok(());
    }
    step(&format!("adding target {target} to {toolchain}"));
    let mut c = clean_command("rustup");
    c.args(["target", "add", "--toolchain", toolchain, target]);
    status(c, &format!("rustup target add {target}"))
}

fn sysroot(toolchain: &str) -> Result<PathBuf> {
    let mut c = clean_command("rustc");
    c.args([&format!("+{toolchain}"), "--print", "sysroot"]);
    let out = output(c).with_context(|| format!("rustc +{toolchain} --print sysroot failed"))?;
    Ok(PathBuf::from(out.trim()))
}

/// bpf-linker built against the nightly's own libLLVM (no system LLVM is new enough).
fn ensure_bpf_linker() -> Result<PathBuf> {
    let prefix = tools_dir()?.join(format!("bpf-linker-{BPF_LINKER}-{NIGHTLY}"));
    let bin = prefix.join("bin").join("bpf-linker");
    if bin.exists() {
        let mut c = Command::new(&bin);
        c.arg("--version");
        if let Some(v) = output(c)
            && v.contains(BPF_LINKER)
        {
            return Ok(bin);
        }
        step("the cached bpf-linker does not run; rebuilding it");
    }
    let sys = sysroot(NIGHTLY)?;
    let libdir = sys.join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly {NIGHTLY} looks incomplete; reinstall it with `rustup toolchain uninstall {NIGHTLY}`",
                libdir.display()
            )
        })?;
    let llvm_prefix = prefix.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    std::fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("creating {}", llvm_lib.display()))?;
    for link in ["libLLVM.so".to_string(), llvm.clone()] {
        let dst = llvm_lib.join(&link);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(libdir.join(&llvm), &dst)
            .with_context(|| format!("linking {}", dst.display()))?;
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER} against {llvm} of {NIGHTLY} (about a minute on 2 cores)"
    ));
    let mut c = clean_command("cargo");
    c.arg(format!("+{NIGHTLY}"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER,
        ])
        .arg("--root")
        .arg(&prefix)
        .env("LLVM_PREFIX", &llvm_prefix);
    if !BPF_LINKER_FEATURES.is_empty() {
        c.arg("--no-default-features")
            .arg("--features")
            .arg(BPF_LINKER_FEATURES.join(","));
    }
    status(c, "cargo install bpf-linker")?;
    Ok(bin)
}

/// cargo-fuzz, built from crates.io (locked) into the tool cache when missing; returns the
/// folder holding the `cargo-fuzz` binary (put it on PATH for `cargo +NIGHTLY fuzz`).
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let prefix = tools_dir()?.join(format!("cargo-fuzz-{CARGO_FUZZ}"));
    let bin_dir = prefix.join("bin");
    let bin = bin_dir.join("cargo-fuzz");
    if bin.exists() {
        let mut c = Command::new(&bin);
        c.args(["fuzz", "--version"]);
        if let Some(v) = output(c)
            && v.contains(CARGO_FUZZ)
        {
            return Ok(bin_dir);
        }
        step("the cached cargo-fuzz does not run; rebuilding it");
    }
    step(&format!(
        "building cargo-fuzz {CARGO_FUZZ} with {STABLE} (about a minute on 2 cores)"
    ));
    let mut c = clean_command("cargo");
    c.arg(format!("+{STABLE}"))
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--force",
            "--version",
            CARGO_FUZZ,
        ])
        .arg("--root")
        .arg(&prefix);
    status(c, "cargo install cargo-fuzz")?;
    Ok(bin_dir)
}

//! `cargo xtask test [ARGS...]`: rustfmt, clippy, unit and real-kernel tests, then the
//! real-kernel suites on the oldest supported kernel in a VM (not with ARGS).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::Result;

use crate::{
    build::{EBPF_CRATES, build, clippy_ebpf},
    cmd::{clean_command, have, in_ci, is_root, require_root, stable_cargo, status, step},
    deploy, fuzz,
    image::{self, PAUSE_REFERENCE, PROBE_REFERENCE},
    node::{self, Node},
    setup::setup,
    toolchain::STABLE,
    vm,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments of `cargo test` (e.g. a test name filter, `-p CRATE`); with any, the VM suite
    /// is not run.
    #[arg(allow_hyphen_values = true, value_name = "ARGS")]
    pub cargo_args: Vec<String>,
    /// Arguments of the test binaries (default `--test-threads=1`).
    #[arg(last = true, value_name = "TEST-ARGS")]
    pub test_args: Vec<String>,
}

impl Args {
    /// The arguments of `cargo test` as given, `-- TEST-ARGS` included when there are any.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.cargo_args.clone();
        if !self.test_args.is_empty() {
            args.push("--".to_string());
            args.extend(self.test_args.iter().cloned());
        }
        args
    }
}

pub fn test(root: &Path, args: &Args) -> Result<()> {
    let args = &args.args();
    let obj = build(root)?;
    step("rustfmt --check");
    let mut c = stable_cargo(root, &obj);
    c.args(["fmt", "--all", "--check"]);
    status(
        c,
        &format!("cargo fmt --check (run `cargo +{STABLE} fmt --all` to fix)"),
    )?;
    for krate in EBPF_CRATES.into_iter().chain(["fuzz"]) {
        let mut c = clean_command("cargo");
        c.current_dir(root.join(krate))
            .arg(format!("+{STABLE}"))
            .args(["fmt", "--check"]);
        status(c, &format!("cargo fmt --check in {krate}"))?;
    }
    step("clippy -D warnings");
    let mut c = stable_cargo(root, &obj);
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(c, "cargo clippy")?;
    clippy_ebpf(root, &setup()?)?;
    if in_ci() {
        require_root("`cargo xtask test` in CI")?;
    } else if !is_root() {
        eprintln!("xtask: not root: the real-kernel tests will skip (they fail under CI=true)");
    }
    if in_ci() && !have("vagrant") {
        step(
            "installing vagrant (Debian package; tests/tests/vagrant.rs validates vagrant/Vagrantfile)",
        );
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends vagrant shellcheck",
        ]);
        status(c, "apt-get install vagrant shellcheck")?;
    }
    // The Kubernetes manifests, rendered and validated offline; the .deb that
    // tests/tests/deploy.rs installs and removes.
    deploy::validate(root)?;
    let deb = deploy::deb(root)?;
    let agent = root.join("target").join("release").join("enforcer-agent");
    let mut c = stable_cargo(root, &obj);
    c.args(["test", "--workspace", "--release"])
        .env("ENFORCER_AGENT_BIN", &agent)
        .env("ENFORCER_DEB", &deb)
        .args(args);
    if !args.iter().any(|a| a == "--") {
        c.args(["--", "--test-threads=1"]);
    }
    // The containerd node of tests/tests/node.rs (host only, root): started before the
    // suites, stopped (by pid) after them, whatever their outcome.
    let node = if is_root() && needs_node(args) {
        Some(start_node(root, &obj, &mut c)?)
    } else {
        None
    };
    step("unit and real-kernel tests");
    let tests = status(c, "cargo test");
    drop(node);
    tests?;
    // A short run of every fuzz target in the full run (a crash fails it); a focused run
    // leaves it to `cargo xtask fuzz`.
    if args.is_empty() {
        step("fuzzing: a short run of each target");
        fuzz::short_run(root)?;
    }
    // The same real-kernel suites on the oldest supported kernel, in a VM, so a verifier
    // regression on old kernels fails the build. Skipped only when not root outside CI, or
    // when a test-name filter was given (a focused local run).
    if !args.is_empty() {
        eprintln!(
            "xtask: a test filter was given: not running the VM suite (`cargo xtask vm-test`)"
        );
        return Ok(());
    }
    if !is_root() {
        eprintln!("xtask: not root: skipping the VM suite on the oldest kernel");
        return Ok(());
    }
    step("the real-kernel suites on the oldest supported kernel (5.10, QEMU/TCG)");
    vm::vm_test(root, &vm::Args::kernel("5.10"))
}

/// True when the `cargo test` arguments may select a test of the node suites
/// (`tests/tests/node.rs`, `daemonset.rs`), which need the containerd node: every full run,
/// and a focused one unless it names other `--test` targets only, or other packages only, or
/// `--lib` only. A focused run of another suite then skips the image builds.
pub(crate) fn needs_node(args: &[String]) -> bool {
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .take_while(|a| *a != "--")
        .collect();
    if args.is_empty() {
        return true;
    }
    let values = |flag: &str, short: Option<&str>| -> Vec<&str> {
        let mut out = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if *a == flag || Some(*a) == short {
                if let Some(v) = args.get(i + 1) {
                    out.push(*v);
                }
            } else if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                out.push(v);
            }
        }
        out
    };
    let tests = values("--test", None);
    if !tests.is_empty() {
        return tests.iter().any(|t| matches!(*t, "node" | "daemonset"));
    }
    let packages = values("--package", Some("-p"));
    if !packages.is_empty() && !packages.contains(&"enforcer-tests") {
        return false;
    }
    !args.contains(&"--lib")
}

/// Builds the node suite's images (the agent's, a pause image and an enf-probe image, all
/// static), starts containerd, imports them, and tells the tests where (environment of `c`).
/// `cargo xtask bench` starts the same node for its container-start part.
pub(crate) fn start_node(root: &Path, obj: &Path, c: &mut Command) -> Result<Node> {
    let t0 = Instant::now();
    node::install()?;
    let images = image::images_dir(root);
    let agent_tar = images.join(format!("enforcer-agent-{}.tar", image::VERSION));
    let agent_digest = image::agent_image(root, obj, &agent_tar)?;
    let test_dir = images.join("test");
    let test = image::test_images(root, obj, &test_dir)?;
    let t_images = t0.elapsed();
    let node_dir: PathBuf = root.join("target").join("containerd");
    let node = Node::start(&node_dir, PAUSE_REFERENCE)?;
    for tar in [
        PathBuf::from(&test.pause),
        PathBuf::from(&test.probe),
        agent_tar.clone(),
    ] {
        node.import(&tar)?;
    }
    step(&format!(
        "node ready: images built in {:.1}s, containerd started and images imported in {:.1}s",
        t_images.as_secs_f64(),
        (t0.elapsed() - t_images).as_secs_f64()
    ));
    c.env("ENFORCER_CRI_SOCKET", &node.socket)
        .env(
            "ENFORCER_TEST_IMAGES",
            format!(
                "pause={PAUSE_REFERENCE},probe={PROBE_REFERENCE},agent={}",
                image::agent_reference()
            ),
        )
        .env("ENFORCER_TEST_PROBE_SHA256", &test.probe_sha256)
        .env("ENFORCER_TEST_AGENT_IMAGE", &agent_tar)
        .env("ENFORCER_TEST_AGENT_IMAGE_DIGEST", &agent_digest);
    Ok(node)
}

//! `cargo xtask bench [ROUNDS] [--only container-start|syscall-cost]`: the peers and matplotlib, the
//! containerd node of the node suite (xtask/src/node.rs, for container start), `enf-bench run`
//! (or only its container-start part), then BENCHMARKS.md and benchmarks.png through
//! `xtask/bench/report.py`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    build::build,
    cmd::{have, require_root, stable_cargo, status, step},
    test::start_node,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Interleaved rounds (at least 5 for a meaningful median).
    #[arg(default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Measure only this part (the other parts of the last full run, kept in
    /// target/bench/results.json, stay in BENCHMARKS.md).
    #[arg(long, value_enum)]
    pub only: Option<Part>,
}

/// A part of the benchmark that runs alone.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The delay the agent adds to a container's start on the containerd node.
    ContainerStart,
    /// What the tamper programs (raw tracepoints sys_enter/sys_exit) cost unrelated syscalls.
    SyscallCost,
}

pub fn bench(root: &Path, args: &Args) -> Result<()> {
    let obj = build(root)?;
    require_root("`cargo xtask bench`")?;
    let only_syscall = args.only == Some(Part::SyscallCost);
    if args.only.is_none() && (!have("nft") || !have("iptables")) {
        step("installing the peers from Debian: nftables, iptables");
        let mut c = Command::new("sh");
        c.args(["-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables iptables"]);
        status(c, "apt-get install nftables iptables")?;
    }
    let out = root.join("target").join("bench");
    let venv = out.join("venv");
    let py = venv.join("bin").join("python3");
    if !py.exists() {
        step("creating a Python venv with matplotlib for the plot (target/bench/venv)");
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        status(c, "python3 -m venv")?;
        let mut c = Command::new(venv.join("bin").join("pip"));
        c.args(["install", "-q", "-r"])
            .arg(root.join("xtask").join("bench").join("requirements.txt"));
        status(c, "pip install matplotlib")?;
    }
    step("building the benchmark (release)");
    let mut c = stable_cargo(root, &obj);
    c.args([
        "build",
        "--release",
        "-p",
        "enforcer-tests",
        "--bin",
        "enf-bench",
    ]);
    status(c, "building enf-bench")?;
    let rounds = args.rounds;
    let mut c = Command::new(root.join("target").join("release").join("enf-bench"));
    // The node suite's containerd node, with its images, for the container-start part;
    // stopped (by pid) when the measurement ends, whatever its outcome.
    let node = if only_syscall {
        None
    } else {
        Some(start_node(root, &obj, &mut c)?)
    };
    step(&format!("measuring ({rounds} interleaved rounds)"));
    c.arg(match args.only {
        Some(Part::ContainerStart) => "container-start",
        Some(Part::SyscallCost) => "syscall-cost",
        None => "run",
    })
    .arg(&out)
    .arg(rounds.to_string())
    .env("ENFORCER_EBPF_OBJ", &obj)
    .env(
        "ENFORCER_AGENT_BIN",
        root.join("target").join("release").join("enforcer-agent"),
    );
    let measured = status(c, "enf-bench");
    drop(node);
    measured?;
    step("writing BENCHMARKS.md and benchmarks.png");
    let fragment = out.join("report.md");
    let mut c = Command::new(&py);
    c.arg(root.join("xtask").join("bench").join("report.py"))
        .arg(out.join("results.json"))
        .arg(root.join("benchmarks.png"))
        .arg(&fragment);
    status(c, "report.py")?;
    let body = std::fs::read_to_string(&fragment).context("reading the report")?;
    let partial = match args.only {
        Some(Part::ContainerStart) => {
            " This file was last written by `cargo xtask bench --only container-start`: the container-start section and its target line are from that run, every other section from the last full run (kept in results.json)."
        }
        Some(Part::SyscallCost) => {
            " This file was last written by `cargo xtask bench --only syscall-cost`: the tamper-programs section and its target line are from that run, every other section from the last full run (kept in results.json)."
        }
        None => "",
    };
    let md = format!(
        "# Benchmarks\n\nReproduce on a machine of this kind, as root: `cargo xtask bench` (optionally the number of rounds, default 7; at least 5 for a meaningful median; `--only container-start` or `--only syscall-cost` for that part alone). Raw numbers: `target/bench/results.json`.{partial}\n\n{body}"
    );
    std::fs::write(root.join("BENCHMARKS.md"), md).context("writing BENCHMARKS.md")?;
    print!("{body}");
    Ok(())
}

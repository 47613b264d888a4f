//! `cargo xtask bench [ROUNDS] [--only container-start|syscall-cost|time-bound]`: the peers and matplotlib, the
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
    /// What time-bound entries (`expires:`) cost a UDP connect: two agents, with and without.
    TimeBound,
}

pub fn bench(root: &Path, args: &Args) -> Result<()> {
    let obj = build(root)?;
    require_root("`cargo xtask bench`")?;
    // The parts that need no containerd node.
    let no_node = matches!(args.only, Some(Part::SyscallCost | Part::TimeBound));
    if args.only.is_none() && (!have("nft") || !have("iptables")) {
        step("installing the peers from Debian: nftables, iptables");
        let mut c = Command::new("sh");
        c.args(["-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables iptables"]);
        status(c, "apt-get install nftables iptables")?;
    }
    let out = root.join("target").join("bench");
    let venv = out.join("venv");
    let py = venv.join("bin").join("python3");
    // The time-bound section alone needs no plot: the standard library's python3 renders it.
    let py = if args.only == Some(Part::TimeBound) {
        std::path::PathBuf::from("python3")
    } else {
        py
    };
    if !py.exists() && args.only != Some(Part::TimeBound) {
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
    let node = if no_node {
        None
    } else {
        Some(start_node(root, &obj, &mut c)?)
    };
    step(&format!("measuring ({rounds} interleaved rounds)"));
    c.arg(match args.only {
        Some(Part::ContainerStart) => "container-start",
        Some(Part::SyscallCost) => "syscall-cost",
        Some(Part::TimeBound) => "time-bound",
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
    if args.only == Some(Part::TimeBound) {
        return time_bound_section(root, &out, &py);
    }
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
        Some(Part::TimeBound) => {
            " This file was last written by `cargo xtask bench --only time-bound`: the time-bound entries section and its target lines are from that run, every other section from the last full run (kept in results.json)."
        }
        None => "",
    };
    let md = format!(
        "# Benchmarks\n\nReproduce on a machine of this kind, as root: `cargo xtask bench` (optionally the number of rounds, default 7; at least 5 for a meaningful median; `--only container-start`, `--only syscall-cost` or `--only time-bound` for that part alone). Raw numbers: `target/bench/results.json`.{partial}\n\n{body}"
    );
    std::fs::write(root.join("BENCHMARKS.md"), md).context("writing BENCHMARKS.md")?;
    print!("{body}");
    Ok(())
}

/// `--only time-bound`: replaces (or adds) the "Time-bound entries" section of BENCHMARKS.md,
/// every other section as it was (results.json need not hold a full run).
fn time_bound_section(root: &Path, out: &Path, py: &Path) -> Result<()> {
    step("writing the time-bound entries section of BENCHMARKS.md");
    let fragment = out.join("time-bound.md");
    let mut c = Command::new(py);
    c.arg(root.join("xtask").join("bench").join("report.py"))
        .arg("--time-bound-section")
        .arg(out.join("results.json"))
        .arg(&fragment);
    status(c, "report.py --time-bound-section")?;
    let section = std::fs::read_to_string(&fragment).context("reading the section")?;
    let md_path = root.join("BENCHMARKS.md");
    let md = std::fs::read_to_string(&md_path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    // The header says which command wrote which section.
    let md = md
        .lines()
        .map(|l| {
            if l.starts_with("Reproduce on a machine") {
                "Reproduce on a machine of this kind, as root: `cargo xtask bench` (optionally the number of rounds, default 7; at least 5 for a meaningful median; `--only container-start`, `--only syscall-cost` or `--only time-bound` for that part alone). Raw numbers: `target/bench/results.json`. This file was last written by `cargo xtask bench --only time-bound`: the time-bound entries section (with its own target lines) is from that run, every other section as the file had it before."
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    std::fs::write(
        &md_path,
        splice_section(&md, "#### Time-bound entries", &section),
    )
    .context("writing BENCHMARKS.md")?;
    print!("{section}");
    Ok(())
}

/// `md` with the section that starts at the line `heading` (up to the next `####` heading,
/// `#### Notes` or the plot) replaced by `section`; added before `#### Notes` (or the plot,
/// or at the end) when there is none.
fn splice_section(md: &str, heading: &str, section: &str) -> String {
    let section = format!("{}\n\n", section.trim_end());
    let ends = |rest: &str| {
        ["\n#### ", "\n![", "\n### "]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| i + 1))
            .min()
            .unwrap_or(rest.len())
    };
    if let Some(start) = md.find(&format!("{heading}\n")) {
        let after = start + heading.len();
        let end = after + ends(&md[after..]);
        return format!("{}{section}{}", &md[..start], &md[end..]);
    }
    let at = md
        .find("\n#### Notes\n")
        .or_else(|| md.find("\n!["))
        .map(|i| i + 1)
        .unwrap_or(md.len());
    format!("{}{section}{}", &md[..at], &md[at..])
}

#[cfg(test)]
mod tests {
    use super::splice_section;

    #[test]
    fn splices_the_section_in_place_or_before_the_notes() {
        let md = "# B\n\n#### A\n\na\n\n#### Notes\n\n- n\n\n![p](p.png)\n";
        let added = splice_section(md, "#### T", "#### T\n\nt1\n");
        assert_eq!(
            added,
            "# B\n\n#### A\n\na\n\n#### T\n\nt1\n\n#### Notes\n\n- n\n\n![p](p.png)\n"
        );
        let replaced = splice_section(&added, "#### T", "#### T\n\nt2\n");
        assert_eq!(replaced, added.replace("t1", "t2"));
    }
}

//! `cargo xtask fuzz [TARGET] [--time SECS] [--jobs N]`: the libFuzzer targets of `fuzz/`
//! (cargo-fuzz, pinned nightly), each for a bounded time, seeded from `fuzz/corpus/TARGET`.
//! A crash (panic, timeout, out of memory) fails the command and leaves its input in
//! `fuzz/artifacts/TARGET/`. `cargo xtask test` runs each target for [`SHORT_RUN_SECS`].

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{clean_command, status, step},
    setup::{ensure_cargo_fuzz, setup},
    toolchain::NIGHTLY,
};

/// The fuzz targets (binaries of `fuzz/Cargo.toml`).
pub const TARGETS: [&str; 4] = ["policy_check", "bundle_decode", "api_frame", "proc_parsers"];

/// Seconds per target in `cargo xtask test` (run one after the other: 4 x 25 s).
pub const SHORT_RUN_SECS: u64 = 25;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One target (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub time: u64,
    /// Targets run at the same time (each uses one core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub jobs: u64,
}

/// `cargo xtask fuzz`.
pub fn fuzz(root: &Path, args: &Args) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    run(
        root,
        &targets,
        args.time,
        usize::try_from(args.jobs).unwrap_or(1),
    )
}

/// The short run of every target that `cargo xtask test` does.
pub fn short_run(root: &Path) -> Result<()> {
    run(root, &TARGETS, SHORT_RUN_SECS, 1)
}

fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("fuzz")
}

fn work_dir(root: &Path) -> PathBuf {
    root.join("target").join("fuzz")
}

/// `cargo +NIGHTLY fuzz SUB` with the flags every build and run shares (same flags, so `run`
/// reuses what `build` compiled).
fn cargo_fuzz(root: &Path, tool_dir: &Path, sub: &str) -> Command {
    let mut path = vec![tool_dir.to_path_buf()];
    if let Some(p) = env::var_os("PATH") {
        path.extend(env::split_paths(&p));
    }
    let mut c = clean_command("cargo");
    c.current_dir(root)
        .arg(format!("+{NIGHTLY}"))
        .args(["fuzz", sub])
        .arg("--fuzz-dir")
        .arg(fuzz_dir(root))
        .arg("--target-dir")
        .arg(work_dir(root).join("build"))
        // Safe Rust: no sanitizer needed to see memory errors, and twice the executions;
        // overflow checks and debug assertions on, so arithmetic bugs are crashes too.
        .args(["--sanitizer", "none", "--debug-assertions"])
        .env("PATH", env::join_paths(path).unwrap_or_default())
        .env("RUSTUP_TOOLCHAIN", NIGHTLY);
    c
}

struct Running {
    target: String,
    child: Child,
    log: PathBuf,
    corpus: PathBuf,
    started: Instant,
}

fn run(root: &Path, targets: &[&str], secs: u64, jobs: usize) -> Result<()> {
    setup()?;
    let tool_dir = ensure_cargo_fuzz()?;
    step("building the fuzz targets (cargo fuzz build, nightly)");
    status(
        cargo_fuzz(root, &tool_dir, "build"),
        "cargo fuzz build (the fuzz/ crate)",
    )?;
    let logs = work_dir(root).join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut failed = Vec::new();
    for batch in targets.chunks(jobs.max(1)) {
        step(&format!(
            "fuzzing {} for {secs} s each (logs in {})",
            batch.join(", "),
            logs.display()
        ));
        let mut running = Vec::new();
        for target in batch {
            running.push(start(root, &tool_dir, target, secs, &logs)?);
        }
        for r in running {
            if let Err(e) = finish(r) {
                eprintln!("xtask: {e:#}");
                failed.push(e.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found {} failing target(s): {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

fn start(root: &Path, tool_dir: &Path, target: &str, secs: u64, logs: &Path) -> Result<Running> {
    // New inputs go to a corpus under target/ (the first folder); the committed seeds are read.
    let corpus = work_dir(root).join("corpus").join(target);
    let seeds = fuzz_dir(root).join("corpus").join(target);
    for d in [&corpus, &seeds] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    let mut c = cargo_fuzz(root, tool_dir, "run");
    c.arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = c
        .spawn()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    Ok(Running {
        target: target.to_string(),
        child,
        log,
        corpus,
        started: Instant::now(),
    })
}

/// Waits for one run; prints its numbers, or the end of its log and an error on a crash.
fn finish(mut r: Running) -> Result<()> {
    let st = r
        .child
        .wait()
        .with_context(|| format!("waiting for the fuzz run of {}", r.target))?;
    let text = fs::read_to_string(&r.log).unwrap_or_default();
    let stats = Stats::parse(&text);
    let inputs = fs::read_dir(&r.corpus).map(|d| d.count()).unwrap_or(0);
    if !st.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        bail!(
            "{}: {st} after {:.0} s; the crashing input is in fuzz/artifacts/{}/ (full log {}); reproduce with `cargo xtask fuzz {}` or `cargo +{NIGHTLY} fuzz run {} INPUT`, fix the library, add a unit test",
            r.target,
            r.started.elapsed().as_secs_f64(),
            r.target,
            r.log.display(),
            r.target,
            r.target
        );
    }
    let Some(runs) = stats.runs else {
        bail!(
            "{}: the fuzz run ended without libFuzzer's final statistics; see {}",
            r.target,
            r.log.display()
        );
    };
    step(&format!(
        "fuzz {}: {runs} executions in {:.0} s ({}/s), 0 crashes, corpus {inputs} inputs, {} coverage points",
        r.target,
        r.started.elapsed().as_secs_f64(),
        runs / r.started.elapsed().as_secs().max(1),
        stats.cov.map_or("?".to_string(), |c| c.to_string())
    ));
    Ok(())
}

/// What libFuzzer's output says at the end of a run.
#[derive(Debug, Default, PartialEq)]
struct Stats {
    runs: Option<u64>,
    cov: Option<u64>,
}

impl Stats {
    fn parse(text: &str) -> Self {
        let mut s = Stats::default();
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("stat::number_of_executed_units:") {
                s.runs = v.trim().parse().ok().or(s.runs);
            } else if let Some(rest) = l.strip_prefix("Done ")
                && s.runs.is_none()
            {
                s.runs = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            }
            if let Some(i) = l.find(" cov: ") {
                s.cov = l[i + 6..]
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .or(s.cov);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_a_seed_corpus() {
        let root = crate::cmd::workspace_root().expect("root");
        let manifest = fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has {bins} bins");
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} is not in fuzz/Cargo.toml"
            );
            assert!(
                root.join(format!("fuzz/fuzz_targets/{t}.rs")).exists(),
                "no fuzz/fuzz_targets/{t}.rs"
            );
            let seeds = fs::read_dir(root.join(format!("fuzz/corpus/{t}")))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "no seed corpus in fuzz/corpus/{t}");
        }
    }

    #[test]
    fn final_statistics_are_read() {
        let log = "#2\tINITED cov: 812 ft: 900 corp: 12/3Kb exec/s: 0 rss: 40Mb\n\
                   #4096\tpulse  cov: 1203 ft: 2000 corp: 80/9Kb exec/s: 2048 rss: 60Mb\n\
                   Done 51234 runs in 25 second(s)\n\
                   stat::number_of_executed_units: 51234\n\
                   stat::peak_rss_mb: 61\n";
        assert_eq!(
            Stats::parse(log),
            Stats {
                runs: Some(51234),
                cov: Some(1203)
            }
        );
        assert_eq!(Stats::parse("nothing"), Stats::default());
    }
}

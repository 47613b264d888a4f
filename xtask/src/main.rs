//! `cargo xtask`: set-up, build, run and test of the enforcer.
//!
//! Runs on the machine's default stable toolchain (whatever `cargo` is), installs the pinned
//! toolchains and bpf-linker when missing (see `toolchain.rs`), then drives `cargo +PINNED`.
//! Each command lives in its own module; this file only parses the command line and dispatches.

mod bench;
mod build;
mod cmd;
mod deploy;
mod fuzz;
mod image;
mod node;
mod oci;
mod run;
mod setup;
mod test;
mod toolchain;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory as _, Parser, Subcommand};

/// Set-up, build, run and test of the enforcer.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the pinned toolchains and bpf-linker when missing.
    Setup,
    /// Build the kernel programs and the agent (release).
    Build,
    /// Build, then run `enforcer-agent run ARGS...` in the foreground (root).
    Run(run::Args),
    /// Build, then rustfmt, clippy, unit and real-kernel tests (root), then the real-kernel
    /// suites in a 5.10 VM (not when ARGS are given).
    Test(test::Args),
    /// Build, install the peers (nftables, iptables) and matplotlib, measure connect()/sendto()
    /// latency side by side (root), write BENCHMARKS.md.
    Bench(bench::Args),
    /// Real-kernel tests in Debian kernels under QEMU (root).
    VmTest(vm::Args),
    /// Build, then the Debian package of the agent (binary, systemd unit, audit-mode policy):
    /// target/debian/enforcer-agent_VERSION_ARCH.deb.
    Deb,
    /// Build the agent statically (musl) and write its OCI image archive (for `ctr images
    /// import`, `docker load`, `podman load`); prints the image digest.
    Image(image::Args),
    /// Run the libFuzzer targets of fuzz/ (cargo-fuzz, pinned nightly) for --time seconds
    /// each; fails on a crash (input left in fuzz/artifacts/TARGET/).
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        Cli::command().print_help()?;
        return Ok(());
    };
    let root = cmd::workspace_root()?;
    match command {
        Command::Setup => setup::setup().map(|_| ()),
        Command::Build => build::build(&root).map(|_| ()),
        Command::Run(args) => run::run(&root, &args),
        Command::Test(args) => test::test(&root, &args),
        Command::Bench(args) => bench::bench(&root, &args),
        Command::VmTest(args) => vm::vm_test(&root, &args),
        Command::Deb => {
            build::build(&root)?;
            deploy::deb(&root).map(|_| ())
        }
        Command::Image(args) => image::image(&root, &args),
        Command::Fuzz(args) => fuzz::fuzz(&root, &args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        let cli = Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?} did not parse: {e}"));
        cli.command.expect("a command")
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_its_arguments_to_cargo_test_verbatim() {
        for args in [
            &[][..],
            &["explain"][..],
            &["explain", "--", "--nocapture"][..],
            &["--", "--nocapture"][..],
            &["-p", "enforcer-agent", "--lib"][..],
            &["--release", "explain", "--", "--exact", "explain"][..],
        ] {
            let Command::Test(t) = parse(&[&["test"][..], args].concat()) else {
                panic!("not test");
            };
            assert_eq!(t.args(), args, "cargo xtask test {args:?}");
        }
    }

    #[test]
    fn only_runs_that_may_select_node_tests_start_the_node() {
        let needs =
            |a: &[&str]| test::needs_node(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(needs(&[]));
        assert!(needs(&["explain"]));
        assert!(needs(&["-p", "enforcer-tests", "pods"]));
        assert!(needs(&["--test", "node"]));
        assert!(needs(&["--test=daemonset"]));
        assert!(!needs(&[
            "-p",
            "enforcer-tests",
            "--test",
            "kernel",
            "kill9"
        ]));
        assert!(!needs(&["--test", "grants", "--", "--nocapture", "node"]));
        assert!(!needs(&["-p", "enforcer-agent", "--lib"]));
        assert!(!needs(&["--lib"]));
    }

    #[test]
    fn run_passes_flags_through_to_the_agent() {
        let args = ["--policy", "/etc/enforcer/policy.yaml", "--mode", "audit"];
        let Command::Run(r) = parse(&[&["run"][..], &args[..]].concat()) else {
            panic!("not run");
        };
        assert_eq!(r.args, args);
    }

    #[test]
    fn bench_rounds_default_to_seven() {
        let Command::Bench(b) = parse(&["bench"]) else {
            panic!("not bench");
        };
        assert_eq!(b.rounds, 7);
        let Command::Bench(b) = parse(&["bench", "3"]) else {
            panic!("not bench");
        };
        assert_eq!(b.rounds, 3);
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "0"]).is_err());
    }

    #[test]
    fn vm_test_reads_its_flags() {
        let Command::VmTest(v) = parse(&[
            "vm-test",
            "--kernel",
            "5.10,6.1",
            "-k",
            "all",
            "--timeout=60",
            "--refresh",
            "--update-readme",
            "some_test",
        ]) else {
            panic!("not vm-test");
        };
        assert_eq!(v.kernel, ["5.10", "6.1", "all"]);
        assert_eq!(v.timeout, 60);
        assert!(v.refresh && v.update_readme);
        assert_eq!(v.filter, ["some_test"]);
        let names: Vec<&str> = vm::resolve_kernels(&v.kernel)
            .expect("known kernels")
            .iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["5.10", "6.1", "6.12", "7.2"]);
        let Command::VmTest(v) = parse(&["vm-test"]) else {
            panic!("not vm-test");
        };
        let names: Vec<&str> = vm::resolve_kernels(&v.kernel)
            .expect("default kernel")
            .iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["6.1"]);
        assert_eq!(v.timeout, 15 * 60);
        assert!(vm::resolve_kernels(&["4.19".to_string()]).is_err());
    }

    #[test]
    fn fuzz_reads_its_target_and_flags() {
        let Command::Fuzz(f) = parse(&["fuzz"]) else {
            panic!("not fuzz");
        };
        assert_eq!((f.target, f.time, f.jobs), (None, 60, 1));
        let Command::Fuzz(f) = parse(&["fuzz", "api_frame", "--time", "300", "--jobs", "2"]) else {
            panic!("not fuzz");
        };
        assert_eq!(
            (f.target.as_deref(), f.time, f.jobs),
            (Some("api_frame"), 300, 2)
        );
        assert!(Cli::try_parse_from(["cargo xtask", "fuzz", "no_such_target"]).is_err());
        assert!(Cli::try_parse_from(["cargo xtask", "fuzz", "--time", "0"]).is_err());
    }

    #[test]
    fn unknown_commands_and_flags_are_refused() {
        assert!(Cli::try_parse_from(["cargo xtask", "frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["cargo xtask", "vm-test", "--no-such-flag"]).is_err());
        assert!(Cli::try_parse_from(["cargo xtask", "build", "extra"]).is_err());
    }
}

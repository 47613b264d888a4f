//! `enforcer-agent`: the node agent and its command line (thin: the work is in the library).

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use enforcer_agent::{
    attest, daemon,
    policy::{self, Severity},
};

#[derive(Parser)]
#[command(
    name = "enforcer-agent",
    version,
    about = "eBPF workload identity enforcer: node agent and CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground (root). Without --policy: the embedded audit policy.
    Run {
        /// Policy file: YAML or a compiled bundle.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Unix socket of the agent's API (not served yet: the API comes next).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// bpffs folder for the pinned programs, links and maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs_dir: PathBuf,
        /// Folder for the agent's own state.
        #[arg(long, default_value = "/run/enforcer")]
        state_dir: PathBuf,
        /// On a clean exit (SIGTERM/SIGINT), remove the pins: enforcement stops. By default it
        /// stays in force after the agent exits.
        #[arg(long)]
        unpin_on_exit: bool,
    },
    /// Policy files: check and compile.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// The facts of one process, ready to paste into a policy `match` entry.
    Attest {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        json: bool,
    },
    /// Detach everything and remove the pinned state (enforcement stops).
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Exit 0 when valid; else exit 1 with FILE:LINE:COL: message lines on stderr.
    Check { file: PathBuf },
    /// Write the compiled bundle (protobuf) that `run --policy` also accepts.
    Compile {
        file: PathBuf,
        #[arg(short = 'o', long = "output")]
        out: PathBuf,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer/v1";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enforcer-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| {
        format!(
            "cannot read {}: check the path and its permissions",
            path.display()
        )
    })
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Policy {
            cmd: PolicyCmd::Check { file },
        } => {
            let name = file.display().to_string();
            let bytes = read(&file)?;
            let Ok(text) = std::str::from_utf8(&bytes) else {
                bail!("{name} is not UTF-8 text; a policy is a YAML file");
            };
            match policy::check(text) {
                Ok((_, warnings)) => {
                    for w in warnings {
                        eprintln!("{}", w.render(&name));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(diags) => {
                    for d in &diags {
                        eprintln!("{}", d.render(&name));
                    }
                    let n = diags
                        .iter()
                        .filter(|d| d.severity == Severity::Error)
                        .count();
                    eprintln!("{name}: {n} error(s); the policy was not accepted");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Policy {
            cmd: PolicyCmd::Compile { file, out },
        } => {
            let name = file.display().to_string();
            let (p, warnings) = policy::load(&name, &read(&file)?).map_err(anyhow::Error::new)?;
            for w in warnings {
                eprintln!("{}", w.render(&name));
            }
            // Compile the kernel entries too, so a policy too big for the kernel fails here.
            policy::rule_entries(&p, 0).map_err(anyhow::Error::new)?;
            let bytes = policy::encode_bundle(&p);
            fs::write(&out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "{} -> {} ({} bytes, sha256 {})",
                name,
                out.display(),
                bytes.len(),
                policy::policy_hash(&p)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Attest { pid, json } => {
            let mut cache = attest::HashCache::new(16);
            let f = attest::attest_pid(&mut cache, pid)
                .with_context(|| format!("attesting pid {pid}"))?;
            let sha = hex::encode(f.sha256);
            if json {
                let v = serde_json::json!({
                    "pid": f.pid, "exe": f.exe_path, "sha256": sha, "cgroup": f.cgroup,
                    "uid": f.uid, "gid": f.gid,
                });
                println!("{v}");
            } else {
                println!("# pid {} exe {} gid {}", f.pid, f.exe_path, f.gid);
                println!("- binarySha256: [{sha}]");
                println!("  cgroup: [\"{}\"]", f.cgroup);
                println!("  uid: [{}]", f.uid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Uninstall { bpffs_dir } => {
            enforcer_agent::kernel::uninstall(&bpffs_dir)?;
            eprintln!(
                "removed {}: programs detached, enforcement stopped",
                bpffs_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            policy: file,
            api_socket,
            bpffs_dir,
            state_dir,
            unpin_on_exit,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let (p, source) = match &file {
                Some(f) => {
                    let name = f.display().to_string();
                    let (p, warnings) =
                        policy::load(&name, &read(f)?).map_err(anyhow::Error::new)?;
                    for w in warnings {
                        eprintln!("{}", w.render(&name));
                    }
                    (p, name)
                }
                None => {
                    let (p, _) = policy::check(policy::DEFAULT_POLICY).map_err(|_| {
                        anyhow::anyhow!("the embedded default policy does not check; this is a bug")
                    })?;
                    (p, "the embedded default policy".to_string())
                }
            };
            if let Some(sock) = &api_socket {
                tracing::warn!(
                    socket = %sock.display(),
                    "the API socket is not served yet by this version; decisions are printed on stdout"
                );
            }
            if !nix::unistd::geteuid().is_root() {
                bail!(
                    "`run` needs root: it loads BPF programs and attaches them to cgroups; run it with sudo"
                );
            }
            let opts = daemon::Options {
                policy: p,
                policy_source: source,
                policy_path: file.clone(),
                pin_dir: bpffs_dir,
                state_dir,
                unpin_on_exit,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let agent = daemon::Agent::start(&opts)?;
                agent.run(&opts).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

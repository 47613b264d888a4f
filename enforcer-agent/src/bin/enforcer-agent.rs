//! `enforcer-agent`: the node agent and its command line (thin: the work is in the library).

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use enforcer_agent::{
    api::{self, reply, request},
    attest, client, daemon, import,
    policy::{self, Severity},
};

#[derive(Parser)]
#[command(
    name = "enforcer-agent",
    version,
    about = "eBPF workload identity enforcer: node agent and CLI"
)]
struct Cli {
    /// Unix socket of the agent's API (root-only): served by `run`, used by the other commands.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
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
        /// Append decisions (JSON lines) to this file instead of stdout.
        #[arg(long)]
        events_file: Option<PathBuf>,
        /// Serve Prometheus metrics on ADDR:PORT (e.g. 127.0.0.1:9090); off by default.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Rule entries a policy may compile to. The kernel keeps two policies side by side:
        /// about 2 x N x 100 B when full, plus 32 B x N for the host table's buckets.
        #[arg(long, default_value_t = enforcer_common::DEFAULT_MAX_RULES,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(enforcer_common::MAX_RULES_LIMIT)))]
        max_rules: u32,
        /// Where the host's cgroup v2 hierarchy is mounted (a container that sees it elsewhere,
        /// e.g. /host/sys/fs/cgroup); default: found in /proc/self/mountinfo.
        #[arg(long, value_name = "DIR")]
        cgroup2: Option<PathBuf>,
        /// The container runtime's CRI socket, for pod metadata; default: the first of
        /// containerd's, CRI-O's and cri-dockerd's usual sockets that answers.
        #[arg(long, value_name = "PATH")]
        cri_socket: Option<PathBuf>,
        /// This node's name (in a DaemonSet: the downward API's spec.nodeName). Turns on the
        /// API-server watch of this node's pods (service accounts, current labels).
        #[arg(long, value_name = "NAME", env = "NODE_NAME")]
        kube_node: Option<String>,
        /// The API server's URL; default: the in-cluster configuration.
        #[arg(long, value_name = "URL")]
        kube_api: Option<String>,
    },
    /// Print shell completions generated from this command line.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from this command line.
    Man,
    /// Kernel features, attachments, map fill, policy in force (and drift), counters, coverage.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Every process the agent tracks: pid, exe, sha256, cgroup, uid, identity or none.
    Identities {
        #[arg(long)]
        json: bool,
    },
    /// The verdict the kernel would give a connect of PID to ADDR:PORT, and the rule behind it.
    Explain {
        #[arg(long)]
        pid: u32,
        /// ADDR:PORT, e.g. 10.0.0.5:5432 or [::1]:53
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, value_parser = ["tcp", "udp"], default_value = "tcp")]
        protocol: String,
        #[arg(long)]
        json: bool,
    },
    /// Decisions as they happen (deny and audit; --all for allows too).
    Events {
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        all: bool,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// A least-privilege policy from the connects the agent recorded: one identity per
    /// (binary, cgroup or pod) that connected, egress entries for exactly what it reached.
    Learn {
        /// Observe this long first (allowed connects are reported meanwhile), e.g. 10m.
        #[arg(long = "for", value_name = "DURATION", value_parser = duration)]
        for_: Option<std::time::Duration>,
        /// Learn the processes of this cgroup subtree (repeatable); also the policy's scope.
        #[arg(long, value_name = "CGROUP")]
        scope: Vec<String>,
        /// Learn the pods of this namespace (repeatable).
        #[arg(long, value_name = "NS")]
        namespace: Vec<String>,
        /// Group IPv4 hosts into prefixes of this length, e.g. /24 (default: exact hosts).
        #[arg(long, value_name = "/N", value_parser = prefix_len)]
        aggregate: Option<u32>,
        /// Group IPv6 hosts into prefixes of this length, e.g. /64.
        #[arg(long, value_name = "/N", value_parser = prefix_len)]
        aggregate6: Option<u32>,
        /// Only connects seen within this time, e.g. 24h (default: the whole record).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        since: Option<std::time::Duration>,
        /// Write the policy here (default: stdout).
        #[arg(short = 'o', long = "output")]
        out: Option<PathBuf>,
    },
    /// Policy files: check, compile, apply, diff.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Policy identities from another system's registrations.
    Import {
        #[command(subcommand)]
        cmd: ImportCmd,
    },
    /// The facts of one process, ready to paste into a policy `match` entry.
    Attest {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        json: bool,
    },
    /// What this kernel offers the enforcer (root): each feature found or missing, and what
    /// the agent does without it. Exit 1 when `run` would refuse this kernel.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Diagnostics: load one cgroup_sock_addr program of the embedded object (or of the
    /// object file `--object`, such as the test object whose `enf_reject` shows what a kernel
    /// refusal prints) through the agent's loader and unload it (root).
    #[command(hide = true)]
    LoadProgram {
        name: String,
        #[arg(long)]
        object: Option<PathBuf>,
    },
    /// A time-bound exception (break-glass): IDENTITY may reach --to for --for, added to the
    /// policy in force at once; the kernel stops honouring it at its instant by itself.
    Grant {
        /// The identity's `name` in the policy.
        #[arg(long)]
        identity: String,
        /// ADDR[/LEN][:PORTS], e.g. 10.0.0.7:22, 10.20.0.0/16:5432,8000-8100 or [::1]:53
        #[arg(long)]
        to: String,
        #[arg(long, value_parser = ["tcp", "udp"])]
        protocol: Option<String>,
        /// How long: 30m, 4h, 1h30m (at most the policy's `maxGrant`, default 1h).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        /// Why (an incident or ticket): shown in `grants`, `status` and events.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// The grants in force: id, identity, destination, reason, who, granted at, expires, time left.
    Grants {
        #[arg(long)]
        json: bool,
    },
    /// End a grant now (connections it allowed are closed when `revokeConnections` is on).
    Revoke {
        /// The grant's id (see `grants`).
        id: u64,
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
    /// Hand a policy (YAML or bundle) to the running agent: all or nothing.
    Apply {
        file: PathBuf,
        /// Apply nothing: print what `policy diff` prints (exit 1 when something would
        /// newly be denied).
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: the report as JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// What the policy would newly deny or allow, replayed over the connects the agent
    /// recorded. Exit 0: nothing newly denied; 1: something would be; 2: error.
    Diff {
        file: PathBuf,
        /// Only connects seen within this time, e.g. 24h (default: the whole record).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
}

/// `10m`, `24h`, `30s`, `7d`.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    enforcer_agent::record::parse_duration(s).ok_or_else(|| {
        format!("{s:?} is not a duration: write a number and s, m, h or d (10m, 24h)")
    })
}

/// `/24` or `24`.
fn prefix_len(s: &str) -> Result<u32, String> {
    s.trim_start_matches('/')
        .parse::<u32>()
        .ok()
        .filter(|n| *n <= 128)
        .ok_or_else(|| format!("{s:?} is not a prefix length: write /N (e.g. /24)"))
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Identities from SPIRE registration entries: the output of
    /// `spire-server entry show -output json` (FILE, or - for stdin). Exit 0: every entry
    /// imported; 2: some skipped (each reported); 1: bad input, or the written policy does
    /// not pass `policy check`.
    Spire {
        file: PathBuf,
        /// Write the policy here instead of stdout.
        #[arg(short = 'o', long = "output")]
        out: Option<PathBuf>,
        /// The trust domain to import, when the entries name several (the others' entries
        /// are skipped).
        #[arg(long, value_name = "TD")]
        trust_domain: Option<String>,
    },
}

/// `/sys/fs/bpf/` + the ABI's versioned pin folder.
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer/v4";
const _: () = {
    let (a, b) = (
        DEFAULT_PIN_DIR.as_bytes(),
        enforcer_common::PIN_SUBDIR.as_bytes(),
    );
    assert!(
        a.len() == 12 + b.len(),
        "DEFAULT_PIN_DIR must be /sys/fs/bpf/ + PIN_SUBDIR"
    );
    let mut i = 0;
    while i < b.len() {
        assert!(
            a[12 + i] == b[i],
            "DEFAULT_PIN_DIR must be /sys/fs/bpf/ + PIN_SUBDIR"
        );
        i += 1;
    }
};

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

/// `policy diff` and `policy apply --dry-run`: exit 0 (nothing newly denied), 1 (something
/// would be), 2 (the diff could not be made).
fn diff_cmd(
    socket: &Path,
    file: &Path,
    since: Option<std::time::Duration>,
    json: bool,
) -> ExitCode {
    match diff_report(socket, file, since) {
        Ok(r) => {
            if json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("enforcer-agent: error: printing the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print_diff(&file.display().to_string(), &r);
            }
            if r.newly_denied.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("enforcer-agent: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn diff_report(
    socket: &Path,
    file: &Path,
    since: Option<std::time::Duration>,
) -> Result<api::DiffReport> {
    let name = file.display().to_string();
    let bytes = read(file)?;
    if !policy::is_bundle(&bytes) {
        // YAML errors come with their FILE:LINE:COL, checked here before anything is sent.
        policy::load(&name, &bytes).map_err(anyhow::Error::new)?;
    }
    let req = api::DiffRequest {
        policy: bytes,
        name,
        since_secs: since.map_or(0, |d| d.as_secs().max(1)),
    };
    let reply::Kind::Diff(r) = client::call(socket, request::Kind::Diff(req))? else {
        bail!(
            "the agent answered `policy diff` with something else; is it the same version as this CLI?"
        );
    };
    Ok(r)
}

fn print_diff(name: &str, r: &api::DiffReport) {
    for w in &r.warnings {
        eprintln!("{w}");
    }
    println!(
        "{name}: replayed {} recorded connects ({} record entries) against the policy in force",
        r.connects, r.entries
    );
    for (title, groups) in [
        ("newly denied", &r.newly_denied),
        ("newly allowed", &r.newly_allowed),
    ] {
        let n: u64 = groups.iter().map(|g| g.connects).sum();
        if groups.is_empty() {
            println!("{title}: nothing");
            continue;
        }
        println!("{title}: {n} connects to {} destinations", groups.len());
        for g in groups {
            let dst = if g.dst.contains(':') {
                format!("[{}]:{}", g.dst, g.port)
            } else {
                format!("{}:{}", g.dst, g.port)
            };
            println!(
                "  {} -> {} {dst}: {} connects, last {} ({})",
                g.identity.as_deref().unwrap_or("unattested"),
                g.protocol,
                g.connects,
                enforcer_agent::record::rfc3339(g.last_seen),
                g.processes.join(", ")
            );
            println!(
                "      in force: {}; candidate: {}",
                g.rule_in_force, g.rule_candidate
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
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
    let socket = cli.api_socket;
    match cli.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "enforcer-agent", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("rendering the man page")?;
            for sub in <Cli as clap::CommandFactory>::command().get_subcommands() {
                let name = format!("enforcer-agent-{}", sub.get_name());
                let sub = sub.clone().name(name);
                clap_mangen::Man::new(sub)
                    .render(&mut out)
                    .context("rendering the man page")?;
            }
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&out)
                .context("writing the man page")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => {
            let reply::Kind::Status(s) =
                client::call(&socket, request::Kind::Status(api::StatusRequest {}))?
            else {
                bail!(
                    "the agent answered `status` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Identities { json } => {
            let reply::Kind::Identities(ids) = client::call(
                &socket,
                request::Kind::Identities(api::IdentitiesRequest {}),
            )?
            else {
                bail!(
                    "the agent answered `identities` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&ids.processes)?);
            } else {
                println!(
                    "{:>7}  {:<40}  {:<12}  {:>5}  {:<30}  exe",
                    "PID", "IDENTITY", "SHA256", "UID", "CGROUP"
                );
                for p in &ids.processes {
                    println!(
                        "{:>7}  {:<40}  {:<12}  {:>5}  {:<30}  {}{}",
                        p.pid,
                        p.identity.as_deref().unwrap_or("-"),
                        p.sha256
                            .as_deref()
                            .map(|s| &s[..12.min(s.len())])
                            .unwrap_or("-"),
                        p.uid,
                        p.cgroup.as_deref().unwrap_or("-"),
                        p.exe.as_deref().unwrap_or("-"),
                        p.pod
                            .as_deref()
                            .map(|pod| format!("  (pod {pod})"))
                            .unwrap_or_default()
                            + if p.pending { "  (pending)" } else { "" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain {
            pid,
            to,
            protocol,
            json,
        } => {
            let req = api::ExplainRequest {
                pid,
                dst: to.ip().to_string(),
                port: to.port().into(),
                protocol,
            };
            let reply::Kind::Explain(d) = client::call(&socket, request::Kind::Explain(req))?
            else {
                bail!(
                    "the agent answered `explain` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("{}", describe(&d));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Events { follow, all, json } => {
            let req = api::Request {
                kind: Some(request::Kind::Events(api::EventsRequest { follow, all })),
            };
            let mut c = client::Call::send(&socket, &req)?;
            c.read_timeout(if follow {
                None
            } else {
                Some(std::time::Duration::from_secs(60))
            });
            while let Some(kind) = c.next_reply()? {
                if let reply::Kind::Event(d) = kind {
                    if json {
                        println!("{}", serde_json::to_string(&d)?);
                    } else {
                        println!("{}", describe(&d));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Learn {
            for_,
            scope,
            namespace,
            aggregate,
            aggregate6,
            since,
            out,
        } => {
            if let Some(s) = scope.iter().find(|s| !s.starts_with('/')) {
                bail!(
                    "--scope {s:?}: a cgroup path starts with / (e.g. /system.slice/app.service)"
                );
            }
            let wait = for_.unwrap_or_default();
            let req = api::LearnRequest {
                for_secs: wait.as_secs().max(u64::from(!wait.is_zero())),
                scope,
                namespace,
                aggregate_v4: aggregate,
                aggregate_v6: aggregate6,
                since_secs: since.map_or(0, |d| d.as_secs().max(1)),
            };
            if !wait.is_zero() {
                eprintln!(
                    "learn: observing for {} s (allowed connects are reported meanwhile)",
                    wait.as_secs()
                );
            }
            let timeout = wait + std::time::Duration::from_secs(60);
            let reply::Kind::Learned(l) =
                client::call_within(&socket, request::Kind::Learn(req), timeout)?
            else {
                bail!(
                    "the agent answered `learn` with something else; is it the same version as this CLI?"
                );
            };
            let summary = format!(
                "{} identities from {} connects ({} record entries{})",
                l.identities,
                l.connects,
                l.entries,
                if l.skipped > 0 {
                    format!("; {} from processes never attested left out", l.skipped)
                } else {
                    String::new()
                } + &if l.denied > 0 {
                    format!("; {} denied by the kernel left out", l.denied)
                } else {
                    String::new()
                }
            );
            match out {
                Some(path) => {
                    fs::write(&path, &l.yaml)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("learn: {summary} -> {}", path.display());
                }
                None => {
                    print!("{}", l.yaml);
                    eprintln!("learn: {summary}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy {
            cmd: PolicyCmd::Diff { file, since, json },
        } => Ok(diff_cmd(&socket, &file, since, json)),
        Cmd::Policy {
            cmd:
                PolicyCmd::Apply {
                    file,
                    dry_run: true,
                    json,
                },
        } => Ok(diff_cmd(&socket, &file, None, json)),
        Cmd::Policy {
            cmd: PolicyCmd::Apply { file, .. },
        } => {
            let name = file.display().to_string();
            let bytes = read(&file)?;
            // Check YAML locally first: errors come with their FILE:LINE:COL, and nothing is
            // sent. A bundle was checked when it was compiled; the agent decodes and
            // validates it again before anything is touched, so it is not decoded twice here.
            if !policy::is_bundle(&bytes) {
                let (_, warnings) = policy::load(&name, &bytes).map_err(anyhow::Error::new)?;
                for w in &warnings {
                    eprintln!("{}", w.render(&name));
                }
            }
            let req = api::ApplyRequest {
                policy: bytes,
                name: name.clone(),
            };
            let reply::Kind::Apply(a) = client::call(&socket, request::Kind::Apply(req))? else {
                bail!(
                    "the agent answered `policy apply` with something else; is it the same version as this CLI?"
                );
            };
            eprintln!(
                "{name}: applied (generation {}, sha256 {})",
                a.generation, a.policy_hash
            );
            Ok(ExitCode::SUCCESS)
        }
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
        Cmd::Import {
            cmd:
                ImportCmd::Spire {
                    file,
                    out,
                    trust_domain,
                },
        } => {
            let name = file.display().to_string();
            let bytes = if name == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .context("cannot read the SPIRE entries from stdin")?;
                b
            } else {
                read(&file)?
            };
            let opts = import::spire::Options { trust_domain };
            let r = import::spire::import(&bytes, &opts).with_context(|| name.clone())?;
            let out_name = match &out {
                Some(o) => {
                    fs::write(o, &r.yaml)
                        .with_context(|| format!("cannot write {}", o.display()))?;
                    o.display().to_string()
                }
                None => {
                    print!("{}", r.yaml);
                    "<stdout>".to_string()
                }
            };
            for s in &r.skipped {
                eprintln!(
                    "{name}: skipped SPIRE entry {:?} ({:?}): {}",
                    s.entry_id, s.spiffe_id, s.reason
                );
            }
            for d in &r.diagnostics {
                eprintln!("{}", d.render(&out_name));
            }
            let identities: std::collections::BTreeSet<&str> =
                r.imported.iter().map(|i| i.identity.as_str()).collect();
            eprintln!(
                "{name}: imported {} of {} entries as {} identities of trust domain {} into {out_name} ({} skipped)",
                r.imported.len(),
                r.imported.len() + r.skipped.len(),
                identities.len(),
                r.trust_domain,
                r.skipped.len()
            );
            if !r.passes_check() {
                eprintln!(
                    "{out_name}: the imported policy does not pass `policy check` (above): SPIRE can give one workload several SPIFFE IDs, a process here has one identity; make the identities disjoint or remove one"
                );
                return Ok(ExitCode::from(1));
            }
            Ok(if r.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Attest { pid, json } => {
            let mut cache = attest::HashCache::new(16);
            let f = attest::attest_pid(&mut cache, pid)
                .with_context(|| format!("attesting pid {pid}"))?;
            let sha = hex::encode(f.sha256);
            let unit = policy::systemd_unit(&f.cgroup);
            if json {
                let v = serde_json::json!({
                    "pid": f.pid, "exe": f.exe_path, "sha256": sha, "cgroup": f.cgroup,
                    "systemd_unit": unit, "uid": f.uid, "gid": f.gid,
                });
                println!("{v}");
            } else {
                println!("# pid {} exe {} gid {}", f.pid, f.exe_path, f.gid);
                println!("- binarySha256: [{sha}]");
                println!("  cgroup: [\"{}\"]", f.cgroup);
                match unit {
                    // An alternative to the cgroup line: the unit survives a slice rename.
                    Some(u) => println!("  # or, instead of cgroup: systemdUnit: [\"{u}\"]"),
                    None => println!("  # no systemd unit owns this cgroup"),
                }
                println!("  uid: [{}]", f.uid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Probe { json } => {
            init_logging();
            let p = enforcer_agent::probe::Probe::run();
            let verdict = p.check();
            if json {
                let mut v = serde_json::to_value(&p)?;
                v["supported"] = serde_json::Value::Bool(verdict.is_ok());
                v["min_kernel"] = serde_json::Value::String(format!(
                    "{}.{}",
                    enforcer_agent::probe::MIN_KERNEL.0,
                    enforcer_agent::probe::MIN_KERNEL.1
                ));
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("kernel {}", p.release);
                print_features(
                    p.features
                        .iter()
                        .map(|f| (f.name, f.required, f.found, f.detail.as_str(), f.without)),
                );
            }
            match verdict {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("enforcer-agent: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::LoadProgram { name, object } => {
            // The socket programs of the table, and those of the test object.
            let name: &'static str = enforcer_agent::kernel::socket_programs()
                .map(|(_, n)| n)
                .chain(enforcer_common::BENCH_PROGS.iter().map(|(_, n)| *n))
                .chain([enforcer_common::PROG_REJECT])
                .find(|n| *n == name)
                .with_context(|| format!("no cgroup_sock_addr program `{name}` is known"))?;
            match object {
                None => enforcer_agent::kernel::load_sock_addr_program(name)?,
                Some(path) => {
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("reading the kernel object {}", path.display()))?;
                    enforcer_agent::kernel::load_sock_addr_program_from(&bytes, name)?;
                }
            }
            eprintln!("{name}: loaded and unloaded");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Grant {
            identity,
            to,
            protocol,
            duration,
            reason,
            json,
        } => {
            let req = api::GrantRequest {
                identity,
                to,
                protocol: protocol.unwrap_or_default(),
                duration,
                reason,
                by: requester(),
            };
            let reply::Kind::Grant(g) = client::call(&socket, request::Kind::Grant(req))? else {
                bail!(
                    "the agent answered `grant` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!(
                    "grant {} in force: {} ({}) -> {} until {} ({} left), reason: {}",
                    g.id,
                    g.identity,
                    g.spiffe_id,
                    g.destination,
                    g.expires_at,
                    enforcer_agent::grants::format_secs(g.seconds_left),
                    g.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Grants { json } => {
            let reply::Kind::Grants(l) =
                client::call(&socket, request::Kind::Grants(api::GrantsRequest {}))?
            else {
                bail!(
                    "the agent answered `grants` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&l.grants)?);
            } else if l.grants.is_empty() {
                println!(
                    "no grants in force (maxGrant {})",
                    enforcer_agent::grants::format_secs(l.max_grant_secs)
                );
            } else {
                print_grants(&l.grants);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Revoke { id, json } => {
            let reply::Kind::Grant(g) =
                client::call(&socket, request::Kind::Revoke(api::RevokeRequest { id }))?
            else {
                bail!(
                    "the agent answered `revoke` with something else; is it the same version as this CLI?"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!(
                    "grant {} revoked: {} -> {} (was until {}, reason: {})",
                    g.id, g.identity, g.destination, g.expires_at, g.reason
                );
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

            bpffs_dir,
            state_dir,
            unpin_on_exit,
            metrics_addr,
            events_file,
            max_rules,
            cgroup2,
            cri_socket,
            kube_node,
            kube_api,
        } => {
            let started = std::time::Instant::now();
            init_logging();
            // Before any thread starts: a cgroup namespace is per thread.
            match enforcer_agent::sys::join_init_cgroup_namespace() {
                Ok(true) => {
                    tracing::info!("joined the cgroup namespace of PID 1 (host cgroup paths)")
                }
                Ok(false) => {}
                Err(e) => bail!(
                    "this agent is in a cgroup namespace of its own and cannot join PID 1's: {e}; run it with the host's PID namespace (hostPID) and CAP_SYS_ADMIN, or in the host's cgroup namespace"
                ),
            }
            if let Some(dir) = &cgroup2 {
                enforcer_agent::attest::use_cgroup2_mount(dir)
                    .with_context(|| format!("--cgroup2 {}", dir.display()))?;
            }
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
                api_socket: socket,
                unpin_on_exit,
                metrics_addr,
                events_file,
                max_rules,
                started,
                k8s: enforcer_agent::k8s::Options {
                    cri_socket,
                    kube_node,
                    kube_api,
                },
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let pods = enforcer_agent::k8s::feed::prefetch(&opts.k8s).await;
                let agent = daemon::Agent::start_with_pods(&opts, pods)?;
                agent.run(&opts).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs to stderr (`ENFORCER_LOG` filters, default info).
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn describe(d: &api::Decision) -> String {
    let mut until = String::new();
    if let Some(e) = &d.expires {
        until.push_str(&format!(" (until {e}"));
        if let Some(r) = &d.reason {
            until.push_str(&format!(", reason: {r}"));
        }
        until.push(')');
    }
    if d.pid == 0 && matches!(d.verdict.as_str(), "grant" | "expired" | "revoked") {
        // A grant made, over or revoked: not a process's decision.
        return format!("{}: {}", d.verdict, d.rule);
    }
    let line = format!(
        "{}: pid {} ({}, identity {}) -> {}:{}/{} by {}{until}",
        d.verdict,
        d.pid,
        d.exe.as_deref().unwrap_or("exe unknown"),
        d.identity.as_deref().unwrap_or("none"),
        if d.dst.contains(':') {
            format!("[{}]", d.dst)
        } else {
            d.dst.clone()
        },
        d.port,
        d.protocol,
        d.rule
    );
    match &d.action {
        // A closure (revocation): `closed (policy-apply): deny: pid ... from SRC`.
        Some(action) => format!(
            "{action} ({}): {line}, connection from {}",
            d.reason.as_deref().unwrap_or("?"),
            d.src.as_deref().unwrap_or("?")
        ),
        None => line,
    }
}

/// Who runs this command, for the grant's record: the user sudo ran it for, and the uid.
fn requester() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(
        || format!("uid {uid}"),
        |u| format!("{} (uid {uid})", u.name),
    );
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() => format!("{name} via sudo by {s}"),
        _ => name,
    }
}

fn print_grants(grants: &[api::GrantInfo]) {
    println!(
        "{:>4}  {:<20}  {:<28}  {:<20}  {:<20}  {:>9}  {:<16}  reason",
        "ID", "IDENTITY", "DESTINATION", "GRANTED", "EXPIRES", "LEFT", "BY"
    );
    for g in grants {
        println!(
            "{:>4}  {:<20}  {:<28}  {:<20}  {:<20}  {:>9}  {:<16}  {}",
            g.id,
            g.identity,
            g.destination,
            g.granted_at,
            g.expires_at,
            enforcer_agent::grants::format_secs(g.seconds_left),
            g.by,
            g.reason
        );
    }
}

fn print_status(s: &api::Status) {
    println!(
        "policy: {} (sha256 {}), mode {}, generation {}",
        s.policy_source, s.policy_hash, s.mode, s.generation
    );
    println!(
        "time-bound: {} grant(s), {} policy entr{} with an instant; next expiry {}",
        s.grants.len(),
        s.timed_entries,
        if s.timed_entries == 1 { "y" } else { "ies" },
        s.next_expiry.as_deref().unwrap_or("none")
    );
    if !s.grants.is_empty() {
        print_grants(&s.grants);
    }
    println!("revocation: {}", s.revocation);
    if s.drift.is_empty() {
        println!("kernel maps: in sync with the compiled policy");
    } else {
        println!("kernel maps: DRIFT from the compiled policy:");
        for d in &s.drift {
            println!("  {d}");
        }
    }
    println!("kernel {}: features", s.kernel_release);
    print_features(s.features.iter().map(|f| {
        (
            f.name.as_str(),
            f.required,
            f.found,
            f.detail.as_str(),
            f.without.as_str(),
        )
    }));
    println!("attached:");
    for a in &s.attached {
        println!("  {:<40} {}", a.program, a.target);
    }
    println!("maps:");
    for m in &s.maps {
        println!("  {:<14} {:>9} / {}", m.name, m.entries, m.capacity);
    }
    if let Some(k) = &s.kubernetes {
        println!("pods:");
        println!("  container runtime  {}", k.runtime);
        println!("  API server         {}", k.api_server);
        println!(
            "  containers         {} known, {} waiting for their pod",
            k.containers_known, k.containers_waiting
        );
        for n in &k.notes {
            println!("  NOTE: {n}");
        }
    }
    println!("counters:");
    for c in &s.counters {
        println!("  {:<20} {}", c.name, c.value);
    }
    println!(
        "connections with no identity (last {} s):",
        s.uncovered_window_secs
    );
    if s.uncovered.is_empty() {
        println!("  none");
    }
    for u in &s.uncovered {
        println!(
            "  {:>6}  {}  {}  {}",
            u.connects,
            u.exe,
            u.cgroup,
            u.destinations.join(", ")
        );
    }
}

/// One line per feature: name, found/missing, and for a missing one what the agent does.
fn print_features<'a>(features: impl Iterator<Item = (&'a str, bool, bool, &'a str, &'a str)>) {
    for (name, required, found, detail, without) in features {
        let need = if required { "required" } else { "optional" };
        if found {
            println!("  {name:<34} found    ({need}) {detail}");
        } else {
            println!("  {name:<34} MISSING  ({need}) {detail}");
            println!("  {:<34}          without it: {without}", "");
        }
    }
}

//! OpenSnitch (Debian's `opensnitch` 1.5.8), the per-binary application firewall a user would
//! otherwise pick, as a measured peer.
//!
//! opensnitchd decides each new outbound flow in user space: its rule (iptables mangle OUTPUT
//! `-m conntrack --ctstate NEW,RELATED -j NFQUEUE --queue-bypass`) hands the flow's first packet
//! to the daemon, which finds the socket's process by netlink + /proc, matches its rules and
//! returns a verdict. Its own rule takes the whole machine, so here the daemon runs with
//! `"Firewall": "none"` (no rules of its own, nor its 30 s re-check and re-insert of them) and we
//! add its rule ourselves, limited to one cgroup: `iptables -t mangle -I OUTPUT -m cgroup --path
//! <cgroup> -m conntrack --ctstate NEW,RELATED -j NFQUEUE --queue-num Q --queue-bypass` (and
//! ip6tables). iptables, not nft: opensnitchd's nftables backend needs the kernel's nft `queue`
//! expression (CONFIG_NFT_QUEUE), which kernels may lack; the xt NFQUEUE target is what its
//! default (iptables) backend uses.
//! The daemon reads its config from the fixed /etc/opensnitchd/default-config.json, so it runs
//! in a mount namespace of its own in which our config directory is bind-mounted there: the
//! machine's /etc is never written, and the mount vanishes with the daemon.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

const DAEMON: &str = "/usr/bin/opensnitchd";
/// The daemon's fixed config directory (default-config.json, system-fw.json).
const CONF_DIR: &str = "/etc/opensnitchd";
/// The daemon also takes QUEUE + 1 (the queue it re-queues to while asking a UI).
const QUEUE: u16 = 4242;
/// opensnitchd's default number of workers deciding packets.
const WORKERS: u32 = 16;

/// A running opensnitchd enforcing "allow process.path == <allowed binary>, deny everything
/// else", intercepting only traffic from one cgroup (so the other configurations measured in the
/// same run are not affected). Dropping it stops the daemon (only the pid we started) and removes
/// every firewall rule, queue, config and rules file it or we created.
pub struct OpenSnitch {
    child: Option<Child>,
    dir: PathBuf,
    /// (iptables or ip6tables, rule spec) of the rules we added to mangle OUTPUT.
    rules: Vec<(&'static str, Vec<String>)>,
    /// nft families ("ip", "ip6") whose mangle table iptables-nft created for our rule.
    new_tables: Vec<&'static str>,
    allowed: PathBuf,
    cgroup_rel: String,
    version: String,
    method: String,
}

/// Installs Debian's `opensnitch` if `opensnitchd` is missing, without letting the package start
/// a machine-wide daemon (no service start while installing; on systemd, the unit is disabled).
pub fn ensure_installed() -> Result<(), String> {
    if Path::new(DAEMON).exists() {
        return Ok(());
    }
    // Keep the maintainer scripts from starting the service (invoke-rc.d and deb-systemd-invoke
    // ask policy-rc.d; 101 = "not allowed").
    let rc = Path::new("/usr/sbin/policy-rc.d");
    let ours = !rc.exists();
    if ours {
        fs::write(rc, "#!/bin/sh\nexit 101\n")
            .and_then(|()| fs::set_permissions(rc, fs::Permissions::from_mode(0o755)))
            .map_err(|e| {
                format!(
                    "writing {} (keeps apt from starting opensnitchd): {e}; run as root",
                    rc.display()
                )
            })?;
    }
    let mut r = apt_install();
    if r.is_err() {
        // An old or missing package list: update once and retry.
        r = run("apt-get", &["update"]).and_then(|_| apt_install());
    }
    if ours {
        let _ = fs::remove_file(rc);
    }
    r.map_err(|e| format!("installing Debian's opensnitch: {e}; install it by hand (`apt-get install -y --no-install-recommends opensnitch`)"))?;
    if Path::new("/run/systemd/system").is_dir() {
        // systemd runs here: the package enabled opensnitch.service; never let it run.
        run("systemctl", &["disable", "--now", "opensnitch.service"]).map_err(|e| {
            format!("disabling the opensnitch.service the package enabled: {e}; run `systemctl disable --now opensnitch` before benchmarking")
        })?;
    }
    if !Path::new(DAEMON).exists() {
        return Err(format!(
            "the opensnitch package is installed but {DAEMON} is missing; reinstall it (`apt-get install --reinstall opensnitch`)"
        ));
    }
    Ok(())
}

fn apt_install() -> Result<String, String> {
    let out = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "opensnitch"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running apt-get: {e}"))?;
    if out.status.success() {
        Ok(String::new())
    } else {
        Err(format!(
            "`apt-get install -y --no-install-recommends opensnitch` failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 5)
        ))
    }
}

/// Runs a program; its stdout, or an error with its stderr.
fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The last `n` lines of `text`, joined with " | ".
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Pids of every running opensnitchd, whoever started it.
fn running_daemons() -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let exe = fs::read_link(e.path().join("exe")).ok()?;
            (exe.file_name()? == "opensnitchd").then_some(name)
        })
        .collect()
}

impl OpenSnitch {
    /// `allowed`: absolute path of the worker binary allowed to connect; `cgroup_rel`: the cgroup
    /// v2 path relative to the cgroup2 mount (e.g. "/enftest-b-osn-1234") whose traffic is
    /// intercepted; `cgroup_abs`: its absolute directory. Errors are Strings that say what failed
    /// and how to fix.
    ///
    /// Call it from the thread that outlives the value (the main thread): the daemon gets
    /// SIGTERM when the thread that started it ends, so a killed benchmark leaves no daemon.
    pub fn start(allowed: &Path, cgroup_rel: &str, cgroup_abs: &Path) -> Result<Self, String> {
        ensure_installed()?;
        // /proc/PID/exe, which opensnitchd matches, names the binary with symlinks resolved.
        let allowed = fs::canonicalize(allowed)
            .map_err(|e| format!("resolving the allowed binary {}: {e}", allowed.display()))?;
        if !cgroup_abs.is_dir() {
            return Err(format!(
                "cgroup {} is not a directory; create it under the cgroup2 mount first",
                cgroup_abs.display()
            ));
        }
        let cg_path = cgroup_rel.trim_matches('/').to_string();
        if cg_path.is_empty() {
            return Err(format!(
                "cgroup path {cgroup_rel:?} names the cgroup2 root; give a cgroup below it"
            ));
        }
        let others = running_daemons();
        if !others.is_empty() {
            return Err(format!(
                "opensnitchd is already running (pid {}); it intercepts on its own and would decide for the whole benchmark: stop it (`systemctl disable --now opensnitch`, or kill it) and rerun",
                others.join(", ")
            ));
        }
        // Rules left by a benchmark that was killed (its daemon died with it): ours are the
        // only ones queueing to QUEUE.
        for ipt in ["iptables", "ip6tables"] {
            let listed = run(ipt, &["-t", "mangle", "-S", "OUTPUT"]).unwrap_or_default();
            for line in listed.lines() {
                if let Some(spec) = line.strip_prefix("-A OUTPUT ")
                    && spec.contains(&format!("--queue-num {QUEUE} "))
                {
                    let mut args = vec!["-t", "mangle", "-D", "OUTPUT"];
                    args.extend(spec.split_whitespace());
                    run(ipt, &args).map_err(|e| {
                        format!("removing a stale rule of an earlier run ({ipt} -t mangle {line}): {e}; delete it by hand")
                    })?;
                }
            }
        }
        if !Path::new(CONF_DIR).is_dir() {
            return Err(format!(
                "{CONF_DIR} is missing (opensnitchd's fixed config directory); reinstall opensnitch (`apt-get install --reinstall opensnitch`)"
            ));
        }
        let version = run(DAEMON, &["-version"])
            .map(|v| v.trim().to_string())
            .map_err(|e| format!("asking {DAEMON} its version: {e}; reinstall opensnitch"))?;
        let pkg = run("dpkg-query", &["-W", "-f=${Version}", "opensnitch"])
            .map(|v| format!(" (Debian package {})", v.trim()))
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("enfbench-osn-{}-{nanos:x}", std::process::id()));
        // From here on, dropping `me` undoes whatever was done.
        let mut me = OpenSnitch {
            child: None,
            dir,
            rules: Vec::new(),
            new_tables: Vec::new(),
            allowed,
            cgroup_rel: cg_path.clone(),
            version: format!("{version}{pkg}"),
            method: String::new(),
        };
        let etc = me.dir.join("etc");
        let rules = me.dir.join("rules");
        let log = me.dir.join("opensnitchd.log");
        let sock = format!("unix://{}", me.dir.join("ui.sock").display());
        for d in [&etc, &rules] {
            fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let write = |p: PathBuf, v: serde_json::Value| -> Result<(), String> {
            let text = serde_json::to_string_pretty(&v)
                .map_err(|e| format!("encoding {}: {e}", p.display()))?;
            fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))
        };
        // No UI ever connects (the socket does not exist), so an unmatched flow gets
        // DefaultAction at once. Firewall "none" is neither "iptables" nor "nftables": the
        // daemon then installs no interception rule of its own ("firewall not initialized").
        write(
            etc.join("default-config.json"),
            serde_json::json!({
                "Server": {"Address": sock, "LogFile": log.display().to_string()},
                "DefaultAction": "deny",
                "DefaultDuration": "once",
                "InterceptUnknown": false,
                // The package's default; its eBPF monitor cannot start here (no opensnitch.o in
                // Debian's package, no kprobes in the kernel), so the daemon falls back to
                // /proc. Asking for "proc" outright would skip the start of its pid-cache
                // cleaner (MonitorActivePids), leaving pid -> binary entries cached forever.
                "ProcMonitorMethod": "ebpf",
                "LogLevel": 1,
                "Firewall": "none",
                "Stats": {"MaxEvents": 150, "MaxStats": 25}
            }),
        )?;
        write(
            etc.join("system-fw.json"),
            serde_json::json!({"SystemRules": []}),
        )?;
        write(
            rules.join("000-allow-enf-bench-worker.json"),
            serde_json::json!({
                "name": "000-allow-enf-bench-worker",
                "enabled": true,
                "precedence": false,
                "action": "allow",
                "duration": "always",
                "operator": {
                    "type": "simple",
                    "operand": "process.path",
                    "sensitive": false,
                    "data": me.allowed.display().to_string(),
                    "list": []
                }
            }),
        )?;
        let stderr_path = me.dir.join("stderr");
        let stderr = fs::File::create(&stderr_path)
            .map_err(|e| format!("creating {}: {e}", stderr_path.display()))?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--"])
            .args([
                "/bin/sh",
                "-c",
                "mount --bind \"$0\" /etc/opensnitchd && exec \"$@\"",
            ])
            .arg(&etc)
            .arg(DAEMON)
            .arg("-rules-path")
            .arg(&rules)
            .args(["-ui-socket", &sock])
            .arg("-log-file")
            .arg(&log)
            .args(["-process-monitor-method", "proc"])
            .args(["-queue-num", &QUEUE.to_string()])
            .args(["-workers", &WORKERS.to_string()])
            .arg("-no-live-reload")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        // unshare and sh exec in place: the pid we get is opensnitchd's.
        me.child = Some(cmd.spawn().map_err(|e| {
            format!("starting opensnitchd under unshare: {e}; unshare (util-linux) is needed")
        })?);
        let ready = format!("Running on netfilter queue #{QUEUE}");
        let t0 = Instant::now();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&ready) {
                if let Some(l) = text.lines().find(|l| {
                    l.contains("Error parsing rule")
                        || l.contains("Error compiling rule")
                        || l.contains("Error while reading")
                }) {
                    return Err(format!("opensnitchd did not load our rule: {l}"));
                }
                // Each start or fallback of a method is logged ("Process monitor method ...").
                me.method = text
                    .lines()
                    .filter_map(|l| l.split("Process monitor method ").nth(1))
                    .next_back()
                    .map(|m| m.trim().to_string())
                    .unwrap_or_else(|| "/proc".to_string());
                break;
            }
            let exited = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t0.elapsed() > Duration::from_secs(20) {
                let err = fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!(
                    "opensnitchd did not come up ({}): log: {} stderr: {}; if queue {QUEUE} or {} is taken, stop what holds it",
                    exited.map_or("still starting after 20 s".to_string(), |s| s.to_string()),
                    tail(&text, 6),
                    tail(&err, 6),
                    QUEUE + 1
                ));
            }
            sleep(Duration::from_millis(50));
        }
        // iptables-nft makes a mangle table for the rule; remove it again if it was not here.
        let nft_backend = run("iptables", &["-V"])
            .map(|v| v.contains("nf_tables"))
            .unwrap_or(false);
        for (ipt, family) in [("iptables", "ip"), ("ip6tables", "ip6")] {
            if nft_backend && run("nft", &["list", "table", family, "mangle"]).is_err() {
                me.new_tables.push(family);
            }
            let spec: Vec<String> = [
                "-m",
                "cgroup",
                "--path",
                &cg_path,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,RELATED",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &QUEUE.to_string(),
                "--queue-bypass",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            let mut args = vec!["-t", "mangle", "-I", "OUTPUT"];
            args.extend(spec.iter().map(String::as_str));
            run(ipt, &args).map_err(|e| {
                format!("adding the cgroup's interception rule: {e}; the kernel needs xt_cgroup, xt_conntrack and xt_NFQUEUE")
            })?;
            me.rules.push((ipt, spec));
        }
        Ok(me)
    }

    /// One line for BENCHMARKS.md describing the configuration exactly (version, rule,
    /// interception scope, proc monitor method in use).
    pub fn describe(&self) -> String {
        format!(
            "OpenSnitch {} (opensnitchd, no UI, {WORKERS} workers): one rule `allow if process.path == {}` (operator simple, duration always), DefaultAction deny; interception: opensnitchd's own rule (iptables/ip6tables mangle OUTPUT -m conntrack --ctstate NEW,RELATED -j NFQUEUE --queue-num {QUEUE} --queue-bypass) added by the benchmark with -m cgroup --path {} (its own machine-wide rules off: Firewall \"none\"); process lookup: netlink sock_diag, then {} (ProcMonitorMethod is the package default, ebpf, which needs kprobes and an opensnitch.o that this kernel and Debian's package lack); verdict per new flow (TCP SYN, every UDP datagram until a reply), process path cached per pid.",
            self.version,
            self.allowed.display(),
            self.cgroup_rel,
            self.method
        )
    }

    /// Ok while the daemon runs. Worth a call after each measurement: with `bypass`, a dead
    /// daemon lets every flow through, which would measure nothing at all.
    pub fn check(&mut self) -> Result<(), String> {
        let log = self.dir.join("opensnitchd.log");
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            other => Err(format!(
                "opensnitchd is no longer running ({other:?}); its log: {}",
                tail(&fs::read_to_string(&log).unwrap_or_default(), 6)
            )),
        }
    }
}

impl Drop for OpenSnitch {
    fn drop(&mut self) {
        // Rules first: no flow waits on a daemon that is going away.
        for (ipt, spec) in self.rules.drain(..) {
            let mut args = vec!["-t", "mangle", "-D", "OUTPUT"];
            args.extend(spec.iter().map(String::as_str));
            if let Err(e) = run(ipt, &args) {
                eprintln!(
                    "warning: removing the OpenSnitch interception rule: {e}; delete it by hand"
                );
            }
        }
        for family in self.new_tables.drain(..) {
            let ipt = if family == "ip" {
                "iptables"
            } else {
                "ip6tables"
            };
            let empty = run(ipt, &["-t", "mangle", "-S"])
                .map(|t| !t.lines().any(|l| l.starts_with("-A ")))
                .unwrap_or(false);
            if empty && let Err(e) = run("nft", &["delete", "table", family, "mangle"]) {
                eprintln!(
                    "warning: removing the {family} mangle table iptables made for OpenSnitch: {e}"
                );
            }
        }
        if let Some(mut child) = self.child.take() {
            // SIGKILL, to our own child's pid only: on SIGTERM opensnitchd 1.5.8 waits 5 s per
            // netfilter queue ("queue stuck, closing by timeout") and has nothing else to undo
            // (no rules of its own); the kernel unbinds its queues when it dies.
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.dir)
        {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}

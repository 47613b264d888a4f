//! Real-kernel tests of the adoption commands: `learn` from the decision record, and
//! `policy diff` / `policy apply --dry-run` replaying it, with a real agent, real binaries
//! in test cgroups, TCP and UDP over IPv4 and IPv6 loopback.

use std::{collections::BTreeMap, fs, net::SocketAddr, path::PathBuf};

use enforcer_tests::*;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const EPERM: i32 = 13;

/// Three binaries (copies of the probe with different content, so different sha256s) in two
/// cgroups, connecting over TCP and UDP (connected and `sendto`) to IPv4 and IPv6 listeners.
struct Mix {
    a: TestCgroup,
    b: TestCgroup,
    l: Listeners,
    _dir: TempDir,
    bins: [PathBuf; 3],
}

/// (binary index, cgroup a?, probe command, destination).
type Connect = (usize, bool, &'static str, SocketAddr);

impl Mix {
    fn new(tag: &str) -> Self {
        let a = TestCgroup::new(&format!("{tag}-a"));
        let b = TestCgroup::new(&format!("{tag}-b"));
        let dir = TempDir::new(tag);
        let probe = std::path::Path::new(PROBE_BIN);
        let bins = [dir.path("web"), dir.path("worker"), dir.path("cron")];
        copy_probe(probe, &bins[0], None);
        copy_probe(probe, &bins[1], Some(b'1'));
        copy_probe(probe, &bins[2], Some(b'2'));
        Mix {
            a,
            b,
            l: Listeners::new(),
            _dir: dir,
            bins,
        }
    }

    /// Lets the agent know the binaries before the mix runs: the files settle (so the kernel
    /// may know them by inode) and each runs once without connecting. A connect made while
    /// its process is still pending attestation is not recorded (its facts are not known).
    fn warm_up(&self) {
        let_settle();
        let mut running = Vec::new();
        for bin in &self.bins {
            for cg in [&self.a, &self.b] {
                running.push(spawn_in(cg, bin, &["sleep", "1"]));
            }
        }
        for child in running {
            assert_eq!(wait_traced(child).0, 0);
        }
    }

    fn connects(&self) -> Vec<Connect> {
        let l = &self.l;
        vec![
            (0, true, "tcp", l.tcp4),
            (0, true, "udp", l.udp4),
            (0, false, "tcp", l.tcp6),
            (0, false, "udp", l.udp6),
            (1, true, "udp", l.udp6),
            (1, true, "sendto", l.udp4),
            (1, false, "tcp", l.tcp4),
            (2, false, "tcp", l.tcp6),
            (2, false, "sendto", l.udp6),
        ]
    }

    fn scope_yaml(&self) -> String {
        format!("[\"{}\", \"{}\"]", self.a.rel, self.b.rel)
    }

    /// Audit everything, report allows too: the record sees every connect.
    fn observe_policy(&self) -> String {
        format!(
            "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: learn.test\nmode: audit\nunattested: audit\nreportAllow: true\nscope: {}\nidentities: []\nrules: []\n",
            self.scope_yaml()
        )
    }

    /// Runs each connect once; returns the exit codes.
    fn run(&self, connects: &[Connect]) -> Vec<i32> {
        connects
            .iter()
            .map(|(bin, in_a, cmd, dst)| {
                let cg = if *in_a { &self.a } else { &self.b };
                run_in(cg, &self.bins[*bin], &[cmd, &dst.to_string()])
            })
            .collect()
    }

    fn ours(&self, ev: &serde_json::Value) -> bool {
        ev["cgroup"] == self.a.rel.as_str() || ev["cgroup"] == self.b.rel.as_str()
    }

    /// Waits until the agent reported `n` connect decisions of the mix's cgroups after the
    /// first `from` event lines; returns them.
    fn wait_decisions(&self, agent: &Agent, from: usize, n: usize) -> Vec<serde_json::Value> {
        let evs = agent.wait_events(&format!("{n} decisions of the mix"), |evs| {
            evs.iter()
                .skip(from)
                .filter(|e| self.ours(e) && e["dst"].is_string())
                .count()
                >= n
        });
        evs.into_iter()
            .skip(from)
            .filter(|e| self.ours(e) && e["dst"].is_string())
            .collect()
    }
}

fn learn_args<'a>(mix: &'a Mix, out: &'a str) -> Vec<&'a str> {
    vec![
        "learn", "--scope", &mix.a.rel, "--scope", &mix.b.rel, "-o", out,
    ]
}

/// Observed in audit mode, learned, applied in enforce mode: the same mix runs with zero
/// denials, a new destination is denied, and the record outlives a restart.
#[test]
fn learned_policy_allows_exactly_the_observed_mix() {
    if !require_root("learned_policy_allows_exactly_the_observed_mix") {
        return;
    }
    let mix = Mix::new("learn");
    let mut agent = Agent::start(&mix.observe_policy());
    mix.warm_up();
    let connects = mix.connects();
    assert!(
        mix.run(&connects).iter().all(|c| *c == 0),
        "audit mode denies nothing"
    );
    mix.wait_decisions(&agent, 0, connects.len());

    let out = agent.state_dir.path("learned.yaml");
    let out_s = out.to_str().expect("path");
    let (code, _, err) = agent.cli(&learn_args(&mix, out_s));
    assert_eq!(code, 0, "learn failed: {err}");
    let learned = fs::read_to_string(&out).expect("learned policy");
    eprintln!("learned:\n{learned}");
    let (code, _, err) = run_cmd(&agent_bin(), &["policy", "check", out_s]);
    assert_eq!(
        code, 0,
        "the learned policy must pass `policy check`: {err}"
    );
    assert_eq!(
        learned.matches("  - name: ").count(),
        5,
        "one identity per (binary, cgroup) that connected:\n{learned}"
    );
    assert!(learned.contains("mode: enforce") && learned.contains("unattested: deny"));
    // Deterministic: the same record gives the same text.
    let again = agent.state_dir.path("again.yaml");
    let (code, _, err) = agent.cli(&learn_args(&mix, again.to_str().expect("path")));
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(&again).expect("again"), learned);

    let (code, _, err) = agent.cli(&["policy", "apply", out_s]);
    assert_eq!(code, 0, "applying the learned policy: {err}");
    let from = agent.events().len();
    let codes = mix.run(&connects);
    assert_eq!(
        codes,
        vec![0; connects.len()],
        "the observed mix runs unchanged under the learned policy (enforce)"
    );
    // Denials are reported at once; give the agent a moment to print any.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = mix.wait_decisions(&agent, from, 0);
    let denied: Vec<_> = after.iter().filter(|e| e["verdict"] != "allow").collect();
    assert!(
        denied.is_empty(),
        "denials under the learned policy: {denied:?}"
    );
    // A destination never observed: denied in the kernel.
    assert_eq!(
        run_in(&mix.a, &mix.bins[0], &["tcp", &mix.l.extra4.to_string()]),
        EPERM,
        "a new destination is denied"
    );
    assert_eq!(
        run_in(&mix.b, &mix.bins[0], &["udp", &mix.l.udp4.to_string()]),
        EPERM,
        "a destination seen from another cgroup only is denied here"
    );

    // The record outlives a restart (written at the clean exit, read at start).
    agent.stop();
    assert!(agent.state_dir.path("decisions.json").exists());
    agent.spawn();
    let after_restart = agent.state_dir.path("restart.yaml");
    let (code, _, err) = agent.cli(&learn_args(&mix, after_restart.to_str().expect("path")));
    assert_eq!(code, 0, "learn after a restart: {err}");
    let text = fs::read_to_string(&after_restart).expect("restart");
    let matches = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("binarySha256") || l.contains("cgroup:") || l.contains("- to:"))
            .map(|l| l.split('#').next().unwrap_or(l).trim_end().to_string())
            .collect()
    };
    // The same identities and destinations: the two connects denied since are recorded but
    // never learned (learning does not widen access to what a policy refused).
    assert_eq!(matches(&text), matches(&learned), "{text}");
    eprintln!(
        "learned_policy_allows_exactly_the_observed_mix: {} connects learned into 5 identities, 0 denials after apply, new destinations denied",
        connects.len()
    );
}

type Multiset = BTreeMap<(Option<String>, String, u64, String), u64>;

fn diff_multiset(report: &serde_json::Value) -> Multiset {
    let mut m = Multiset::new();
    for g in report["newly_denied"].as_array().expect("newly_denied") {
        *m.entry((
            g["identity"].as_str().map(str::to_string),
            g["dst"].as_str().expect("dst").to_string(),
            g["port"].as_u64().expect("port"),
            g["protocol"].as_str().expect("protocol").to_string(),
        ))
        .or_default() += g["connects"].as_u64().expect("connects");
    }
    m
}

/// `policy diff` of a candidate that drops some allows predicts the kernel's denials once it
/// is applied, connect by connect; `policy apply --dry-run` prints the same and applies
/// nothing.
#[test]
fn diff_predicts_the_denials_of_a_real_apply() {
    if !require_root("diff_predicts_the_denials_of_a_real_apply") {
        return;
    }
    let mix = Mix::new("diff");
    let agent = Agent::start(&mix.observe_policy());
    mix.warm_up();
    let connects = mix.connects();
    assert!(mix.run(&connects).iter().all(|c| *c == 0));
    mix.wait_decisions(&agent, 0, connects.len());
    let learned = agent.state_dir.path("learned.yaml");
    let learned_s = learned.to_str().expect("path");
    let (code, _, err) = agent.cli(&learn_args(&mix, learned_s));
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(&learned).expect("learned");

    // The learned policy breaks nothing: diff says so (exit 0).
    let (code, out, err) = agent.cli(&["policy", "diff", learned_s, "--json"]);
    assert_eq!(code, 0, "diff of the learned policy: {out} {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        report["newly_denied"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );

    // The candidate: without the tcp6 and udp4 allows.
    let drop = [
        format!("\"::1/128\", ports: [{}], protocol: tcp", mix.l.tcp6.port()),
        format!(
            "\"127.0.0.1/32\", ports: [{}], protocol: udp",
            mix.l.udp4.port()
        ),
    ];
    let candidate: String = text
        .lines()
        .filter(|l| !drop.iter().any(|d| l.contains(d.as_str())))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        candidate.len() < text.len(),
        "the candidate drops allows:\n{text}"
    );
    let cand = agent.state_dir.path("candidate.yaml");
    fs::write(&cand, &candidate).expect("candidate");
    let cand_s = cand.to_str().expect("path");

    let (code, out, err) = agent.cli(&["policy", "diff", cand_s, "--json"]);
    assert_eq!(code, 1, "exit 1: something would newly be denied ({err})");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    let predicted = diff_multiset(&report);
    assert!(!predicted.is_empty(), "{report}");
    let (code, text_out, _) = agent.cli(&["policy", "diff", cand_s]);
    assert_eq!(code, 1);
    assert!(text_out.contains("newly denied"), "{text_out}");
    // --dry-run: the same report, nothing applied.
    let hash_before = agent.cli_json(&["status"])["policy_hash"].clone();
    let (code, dry, _) = agent.cli(&["policy", "apply", cand_s, "--dry-run", "--json"]);
    assert_eq!(code, 1);
    let dry: serde_json::Value = serde_json::from_str(&dry).expect("json");
    assert_eq!(diff_multiset(&dry), predicted);
    assert_eq!(
        agent.cli_json(&["status"])["policy_hash"],
        hash_before,
        "dry run applied nothing"
    );

    // Apply for real, run the mix again: the kernel's denials are exactly those predicted.
    let (code, _, err) = agent.cli(&["policy", "apply", cand_s]);
    assert_eq!(code, 0, "{err}");
    let from = agent.events().len();
    let codes = mix.run(&connects);
    let denied_runs = codes.iter().filter(|c| **c == EPERM).count() as u64;
    mix.wait_decisions(&agent, from, denied_runs as usize);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let evs = mix.wait_decisions(&agent, from, denied_runs as usize);
    let mut actual = Multiset::new();
    for e in evs.iter().filter(|e| e["verdict"] == "deny") {
        *actual
            .entry((
                e["identity"].as_str().map(str::to_string),
                e["dst"].as_str().expect("dst").to_string(),
                e["port"].as_u64().expect("port"),
                e["protocol"].as_str().expect("protocol").to_string(),
            ))
            .or_default() += 1;
    }
    assert_eq!(
        actual, predicted,
        "kernel denials vs diff's prediction (identity, dst, port, protocol) -> connects"
    );
    assert_eq!(denied_runs, predicted.values().sum::<u64>());
    eprintln!(
        "diff_predicts_the_denials_of_a_real_apply: {} connects predicted denied, {} denied by the kernel, 0 mismatches",
        predicted.values().sum::<u64>(),
        denied_runs
    );
}

/// `learn --for`: allowed connects are not reported under a policy without `reportAllow`,
/// so there is nothing to learn; while `learn --for` observes, the agent reports them, and
/// the policy it answers with covers what ran meanwhile.
#[test]
fn learn_for_turns_allow_reports_on_while_it_observes() {
    if !require_root("learn_for_turns_allow_reports_on_while_it_observes") {
        return;
    }
    let mix = Mix::new("learnfor");
    let yaml = format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: learn.test\nmode: enforce\nunattested: allow\nscope: {}\nidentities: []\nrules: []\n",
        mix.scope_yaml()
    );
    let agent = Agent::start(&yaml);
    mix.warm_up();
    let tcp = [(0, true, "tcp", mix.l.tcp4)];
    assert_eq!(mix.run(&tcp), vec![0]);
    let out = agent.state_dir.path("learned.yaml");
    let out_s = out.to_str().expect("path").to_string();
    let (code, _, err) = agent.cli(&learn_args(&mix, &out_s));
    assert_eq!(
        code, 1,
        "allowed connects were not reported: nothing to learn ({err})"
    );
    assert!(err.contains("nothing to learn"), "{err}");

    let sock = agent.api_socket();
    let (a, b) = (mix.a.rel.clone(), mix.b.rel.clone());
    let learner = std::thread::spawn(move || {
        run_cmd(
            &agent_bin(),
            &[
                "learn",
                "--for",
                "4s",
                "--scope",
                &a,
                "--scope",
                &b,
                "-o",
                &out_s,
                "--api-socket",
                sock.to_str().expect("socket"),
            ],
        )
    });
    agent.wait_log("learn: observing", 1);
    let udp = [(1, false, "udp", mix.l.udp6)];
    assert_eq!(mix.run(&udp), vec![0]);
    let (code, _, err) = learner.join().expect("learn thread");
    assert_eq!(code, 0, "learn --for: {err}");
    let learned = fs::read_to_string(&out).expect("learned");
    assert!(
        learned.contains(&format!(
            "cidr: \"::1/128\", ports: [{}], protocol: udp",
            mix.l.udp6.port()
        )),
        "{learned}"
    );
    assert!(
        !learned.contains(&format!("ports: [{}], protocol: tcp", mix.l.tcp4.port())),
        "the connect made before `learn --for` was not reported:\n{learned}"
    );
}

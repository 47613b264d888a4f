//! What time-bound entries (`expires:`) cost a connect: the decision reads the boot clock
//! only when the matched entry is time-bound. Two agents, each with its own cgroup and pins:
//! A runs the 10-rule bench policy as is, B the same policy with the worker's allowing rules
//! expiring a day ahead. In the same rounds as the no-program baseline (the order rotating
//! every round), UDP connect4/connect6 p50 and mean; then, with BPF_ENABLE_STATS, the
//! connect4/connect6 programs' run time per run for A and B (interleaved, per round).

use std::{fs, path::Path, rc::Rc, time::SystemTime};

use enforcer_agent::policy;
use enforcer_tests::*;

use super::{Config, bench_policy, measure, sha256, write_exe};

const WORKLOADS: [(&str, usize); 2] = [("udp-connect4", 50_000), ("udp-connect6", 50_000)];

/// Connects per (round, agent, workload) in the run-time phase.
const STATS_N: usize = 20_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The kernel's accumulated (run time ns, run count) of a program, by id.
fn prog_stats(id: u32) -> Option<(f64, f64)> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .map(|p| (p.run_time().as_nanos() as f64, p.run_count() as f64))
}

/// The id of the program an agent attached at `hook` of a cgroup (from its pinned link).
fn prog_id(agent: &Agent, cg: &TestCgroup, hook: &str) -> Result<u32, String> {
    let cg_id = std::os::unix::fs::MetadataExt::ino(
        &fs::metadata(&cg.dir).map_err(|e| format!("{}: {e}", cg.dir.display()))?,
    );
    let pin = agent
        .pin_dir
        .join("links")
        .join(format!("cg_{cg_id}_{hook}"));
    let link: aya::programs::links::FdLink = aya::programs::links::PinnedLink::from_pin(&pin)
        .map_err(|e| format!("{}: {e}", pin.display()))?
        .into();
    Ok(link
        .info()
        .map_err(|e| format!("link info of {}: {e}", pin.display()))?
        .program_id())
}

/// The part alone: its own listeners and worker binary.
pub fn run_alone(rounds: usize) -> Result<serde_json::Value, String> {
    let l = Listeners::on_cpu(Some(0));
    let dir = TempDir::new("bench-tb");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bytes = fs::read(&me).map_err(|e| e.to_string())?;
    let worker = dir.path("worker");
    write_exe(&worker, &bytes)?;
    run(&l, &worker, sha256(&bytes), rounds)
}

/// `rounds` interleaved rounds; the JSON of `results.json`'s `time_bound`.
pub fn run(
    l: &Listeners,
    worker: &Path,
    worker_sha: [u8; 32],
    rounds: usize,
) -> Result<serde_json::Value, String> {
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| format!("the clock is before 1970: {e}"))?
        .as_nanos() as i64;
    let day_ahead = now_ns + 86_400 * 1_000_000_000;
    let cfg = |name: &str, config: &'static str, cg: &Rc<TestCgroup>| Config {
        name: name.into(),
        config,
        rules: Some(10),
        caller: "attested",
        cg: cg.clone(),
        worker: worker.to_path_buf(),
        denied: false,
    };
    let base_cg = Rc::new(TestCgroup::new("b-tb-none"));
    let a_cg = Rc::new(TestCgroup::new("b-tb-plain"));
    let b_cg = Rc::new(TestCgroup::new("b-tb-timed"));
    let pa = bench_policy(&a_cg.rel, worker_sha, l, 10);
    let mut pb = bench_policy(&b_cg.rel, worker_sha, l, 10);
    let mut timed = 0;
    for r in pb.rules.iter_mut().filter(|r| r.ident == 1 && !r.deny) {
        r.timing.expires = Some(day_ahead);
        timed += 1;
    }
    if timed == 0 {
        return Err(
            "the bench policy has no allowing rule of the worker to make time-bound".into(),
        );
    }
    eprintln!(
        "enf-bench: time-bound: starting two agents (10 rules; B with {timed} entries expiring in a day)"
    );
    let agent_a = Agent::start_bytes(&policy::encode_bundle(&pa), &[]);
    let agent_b = Agent::start_bytes(&policy::encode_bundle(&pb), &[]);
    let configs = [
        cfg("none", "none", &base_cg),
        cfg("plain", "enforcer-10", &a_cg),
        cfg("timed", "enforcer-10-time-bound", &b_cg),
    ];
    // Let the worker's binary be attested by both agents before measuring.
    let_settle();
    for c in &configs {
        measure(c, "getpid", &l.udp4, 10)?;
    }
    let target = |w: &str| if w == "udp-connect6" { l.udp6 } else { l.udp4 };
    // samples[workload][config] = per round (p50, mean)
    let mut samples = vec![vec![Vec::<(f64, f64)>::new(); configs.len()]; WORKLOADS.len()];
    let k = configs.len();
    for round in 0..rounds {
        for (wi, (w, n)) in WORKLOADS.iter().enumerate() {
            // The order rotates by one place per round, so none of the three is always first.
            let shift = round % k;
            for i in 0..k {
                let ci = (i + shift) % k;
                let (p50, mean) = measure(&configs[ci], w, &target(w), *n)?;
                samples[wi][ci].push((p50, mean));
            }
        }
        let last = |wi: usize, ci: usize| samples[wi][ci][round].0;
        eprintln!(
            "enf-bench: time-bound round {}/{rounds}: udp-connect4 p50 none {:.0} / plain {:.0} / time-bound {:.0} ns; udp-connect6 {:.0} / {:.0} / {:.0} ns",
            round + 1,
            last(0, 0),
            last(0, 1),
            last(0, 2),
            last(1, 0),
            last(1, 1),
            last(1, 2)
        );
    }
    // Program run time, in a phase of its own (BPF_ENABLE_STATS adds two clock reads to every
    // program run, so the latency rounds above ran without it); A and B alternate per round,
    // each run's time taken as the difference of the kernel's counters around it.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| format!("BPF_ENABLE_STATS: {e}"))?;
    let hooks = [("connect4", "udp-connect4"), ("connect6", "udp-connect6")];
    // run[hook][agent] = ns per run, per round
    let mut run_ns = vec![vec![Vec::<f64>::new(); 2]; hooks.len()];
    for (hi, (hook, w)) in hooks.iter().enumerate() {
        let ids = [
            prog_id(&agent_a, &a_cg, hook)?,
            prog_id(&agent_b, &b_cg, hook)?,
        ];
        for round in 0..rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for ai in order {
                let id = ids[ai];
                let before = prog_stats(id).ok_or(format!("program {id} ({hook}) is gone"))?;
                measure(&configs[ai + 1], w, &target(w), STATS_N)?;
                let after = prog_stats(id).ok_or(format!("program {id} ({hook}) is gone"))?;
                let runs = after.1 - before.1;
                if runs < STATS_N as f64 {
                    return Err(format!(
                        "the {hook} program of {} ran {runs} times for {STATS_N} connects: is it attached to {}?",
                        configs[ai + 1].name,
                        configs[ai + 1].cg.rel
                    ));
                }
                run_ns[hi][ai].push((after.0 - before.0) / runs);
            }
        }
    }
    drop(stats);
    drop(agent_a);
    drop(agent_b);

    let mut rows = Vec::new();
    for (wi, (w, _)) in WORKLOADS.iter().enumerate() {
        let s = &samples[wi];
        let per_round = |f: &dyn Fn(usize) -> f64| median((0..rounds).map(f).collect());
        rows.push(serde_json::json!({
            "workload": w,
            "base_p50_ns": per_round(&|r| s[0][r].0),
            "plain_p50_ns": per_round(&|r| s[1][r].0),
            "timed_p50_ns": per_round(&|r| s[2][r].0),
            "base_mean_ns": per_round(&|r| s[0][r].1),
            "plain_mean_ns": per_round(&|r| s[1][r].1),
            "timed_mean_ns": per_round(&|r| s[2][r].1),
            "plain_added_p50_ns": per_round(&|r| s[1][r].0 - s[0][r].0),
            "timed_added_p50_ns": per_round(&|r| s[2][r].0 - s[0][r].0),
            "timed_minus_plain_p50_ns": per_round(&|r| s[2][r].0 - s[1][r].0),
            "timed_minus_plain_mean_ns": per_round(&|r| s[2][r].1 - s[1][r].1),
        }));
    }
    let mut run_rows = Vec::new();
    for (hi, (hook, _)) in hooks.iter().enumerate() {
        let (a, b) = (&run_ns[hi][0], &run_ns[hi][1]);
        run_rows.push(serde_json::json!({
            "hook": hook,
            "plain_ns": median(a.clone()),
            "timed_ns": median(b.clone()),
            "timed_minus_plain_ns": median(a.iter().zip(b).map(|(a, b)| b - a).collect()),
        }));
    }
    let clocksource =
        fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
    Ok(serde_json::json!({
        "rounds": rounds,
        "clocksource": clocksource,
        "rows": rows,
        "run": run_rows,
        "notes": [
            format!("Two agents at once, each scoped to its own cgroup with its own pins: without = the 10-rule bench policy; with = the same policy with the worker's {timed} allowing entries time-bound (`expires` a day ahead), so every connect of the worker matches a time-bound entry and its decision reads the boot clock (bpf_ktime_get_boot_ns) and compares it with the entry's window. The programs are the same; only the entries differ. Clock source of this machine: {clocksource} (the boot clock's cost depends on it)."),
            "Added p50 = median over rounds of (p50 of the configuration - p50 of the same round's no-program baseline); with - without = median over rounds of the difference within the round. Each round measures the baseline, without and with once per workload (50,000 connects each, fresh worker process on CPU 1), in an order that rotates every round.",
            format!("Program run time: BPF_ENABLE_STATS, in a phase after the latency rounds; per round {STATS_N} connects for each agent (the order alternating), the run time per run from the kernel's counters around each; median over rounds. The stats themselves add ~2 clock reads per run to both."),
        ],
    }))
}

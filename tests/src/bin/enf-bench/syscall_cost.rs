//! What the tamper programs (raw tracepoints `sys_enter`/`sys_exit`, attached for the whole
//! node) cost every unrelated syscall: a `getppid` loop and an `open`+`close` loop of
//! `/dev/null`, with an agent running (so its programs attached) against the same round's
//! baseline with none, the order alternating every round.

use std::time::Instant;

use enforcer_tests::*;

/// Syscalls per sample, and samples per (round, side): the median sample is kept.
const GETPPID_N: u32 = 200_000;
const OPEN_N: u32 = 20_000;
const SAMPLES: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per getppid, ns per open+close of /dev/null: medians of [`SAMPLES`] samples, on CPU 1.
fn measure() -> (f64, f64) {
    pin_thread(Some(1));
    let mut g = Vec::new();
    let mut o = Vec::new();
    let path = c"/dev/null";
    for _ in 0..SAMPLES {
        let t0 = Instant::now();
        for _ in 0..GETPPID_N {
            // SAFETY: getppid takes no arguments.
            std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        }
        g.push(t0.elapsed().as_nanos() as f64 / f64::from(GETPPID_N));
        let t0 = Instant::now();
        for _ in 0..OPEN_N {
            // SAFETY: open of a constant path, closed at once.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }
        o.push(t0.elapsed().as_nanos() as f64 / f64::from(OPEN_N));
    }
    (median(g), median(o))
}

/// `rounds` interleaved rounds; the JSON of `results.json`'s `syscall_cost`.
pub fn run(rounds: usize) -> Result<serde_json::Value, String> {
    let cg = TestCgroup::new("b-syscall");
    // Audit, scoped to an empty cgroup of its own: the programs are attached node-wide all
    // the same (that is what is measured), nothing is held or denied.
    let policy = format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: bench.example.org\nmode: audit\nscope: [\"{}\"]\n",
        cg.rel
    );
    let (mut base_g, mut base_o, mut hook_g, mut hook_o) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let sides: [bool; 2] = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for hooked in sides {
            let agent = hooked.then(|| Agent::start(&policy));
            if let Some(a) = &agent {
                let links = a.cli_json(&["status"]).to_string();
                if !links.contains("sys_enter") {
                    return Err(format!(
                        "the agent did not report its sys_enter program in status: {links}"
                    ));
                }
            }
            let (g, o) = measure();
            if hooked {
                hook_g.push(g);
                hook_o.push(o);
            } else {
                base_g.push(g);
                base_o.push(o);
            }
            drop(agent);
        }
        eprintln!(
            "enf-bench: syscall cost round {}: getppid {:.0} -> {:.0} ns, open+close {:.0} -> {:.0} ns",
            r + 1,
            base_g[r],
            hook_g[r],
            base_o[r],
            hook_o[r]
        );
    }
    let row = |op: &str, base: Vec<f64>, hook: Vec<f64>| {
        // Per-round ratios against the same round's baseline, then their median.
        let ratios: Vec<f64> = base.iter().zip(&hook).map(|(b, h)| h / b).collect();
        let added: Vec<f64> = base.iter().zip(&hook).map(|(b, h)| h - b).collect();
        serde_json::json!({
            "op": op,
            "base_ns": median(base),
            "hook_ns": median(hook),
            "added_ns": median(added),
            "ratio": median(ratios),
        })
    };
    Ok(serde_json::json!({
        "rounds": rounds,
        "rows": [
            row("getppid", base_g, hook_g),
            row("open+close /dev/null", base_o, hook_o),
        ],
        "notes": [
            "with: an agent running (audit, scoped to an empty cgroup): its raw tracepoints sys_enter/sys_exit run on every syscall of the node and return after comparing the syscall number; without: no agent. getppid is a syscall the programs ignore; open is one whose exit they inspect (the descriptor's file: a procfs `mem` opened for writing?).",
            "median over rounds of (with / without in the same round); each side is the median of 5 samples of 200,000 getppid or 20,000 open+close on CPU 1",
        ],
    }))
}

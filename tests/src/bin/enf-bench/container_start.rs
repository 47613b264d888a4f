//! Container start on the containerd node `cargo xtask bench` starts (xtask/src/node.rs): the
//! delay the agent adds to a pod's container start, against the same round's start with no
//! agent. Three pods, one per configuration, under this process's pods parent:
//! (a) `none`: no agent for its cgroup;
//! (b) `agent`: an agent scoped to its pod cgroup, enforcing a policy with no `k8s` selector
//!     (the identity is the binary's hash in a kubepods cgroup);
//! (c) `agent-k8s`: an agent scoped to its pod cgroup, enforcing a policy with `k8s`
//!     selectors (namespace, pod label, container) and the node's CRI socket: the container's
//!     first exec is held until the runtime told the agent the pod.
//! A start is CreateContainer + StartContainer until the container's process runs enf-probe
//! (the kubelet's view: both calls are on its path to a running container; the agent's part,
//! the hold at the first exec and the CRI question, falls inside StartContainer's share,
//! which is also recorded). Interleaved: every round starts one container in each pod, in an
//! order that rotates every round.

use std::time::Duration;

use enforcer_tests::{cri::*, *};

/// Container starts per configuration in one `cargo xtask bench` round.
pub const PER_ROUND: usize = 10;

const CONFIGS: [&str; 3] = ["none", "agent", "agent-k8s"];

fn policy(scope: &str, sha: &str, k8s: bool) -> String {
    let k8s = if k8s {
        "\n        k8s: {namespace: [bench-start], podLabels: {app: start}, container: [app]}"
    } else {
        ""
    };
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: bench.local
mode: enforce
unattested: allow
scope: ["{scope}"]
identities:
  - name: app
    spiffeId: spiffe://bench.local/app
    match:
      - binarySha256: [{sha}]
        cgroup: ["/enftest-k8s-*/kubepods/**"]{k8s}
rules:
  - identity: app
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [9], protocol: tcp}}
"#
    )
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[(((v.len() - 1) as f64) * q).round() as usize]
}

/// The numbers after ` us=` in the agent's "attested at exec" lines.
fn exec_us(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("attested at exec"))
        .filter_map(|l| super::log_number(l, "us"))
        .collect()
}

/// Measures `rounds * PER_ROUND` starts per configuration: the JSON object of results
/// (`rows`, `starts`, `notes`) for results.json's `container_start`.
pub fn run(rounds: usize) -> Result<serde_json::Value, String> {
    let node = node_env("enf-bench container-start").ok_or(
        "no containerd node: run through `cargo xtask bench`, which starts one (ENFORCER_CRI_SOCKET)",
    )?;
    let mut cri = Cri::connect(&node.socket)?;
    let runtime = cri.version()?;
    let parent = PodsParent::new();
    let spec = ContainerSpec {
        name: "app".to_string(),
        image: node.probe_image.clone(),
        command: vec!["/enf-probe".to_string()],
        args: vec!["sleep".to_string(), "600".to_string()],
        ..Default::default()
    };
    let pod = |name: &str| {
        Pod::run(
            &node.socket,
            &PodSpec {
                name: name.to_string(),
                namespace: "bench-start".to_string(),
                labels: [("app".to_string(), "start".to_string())].into(),
                log_dir: None,
            },
            false,
        )
    };
    let mut pods = vec![pod("start-none")?, pod("start-agent")?, pod("start-k8s")?];
    let socket = node.socket.display().to_string();
    let plain = Agent::start(&policy(&pods[1].cgroup, &node.probe_sha256, false));
    let k8s = Agent::start_with(
        &policy(&pods[2].cgroup, &node.probe_sha256, true),
        &["--cri-socket", &socket],
    );
    let timeout = Duration::from_secs(30);
    // Warm-up: the image's snapshot, the runtime's caches, the agents' first look.
    for p in pods.iter_mut() {
        p.time_start(&spec, "enf-probe", timeout)?;
    }
    let exec_before = exec_us(&k8s.log()).len();
    let waited_before = k8s.count_log("pod metadata came for held processes");
    let n = rounds * PER_ROUND;
    // samples[config] = per round (total, start-only, baseline total, baseline start-only)
    let mut samples: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); CONFIGS.len()];
    for r in 0..n {
        if r % PER_ROUND == 0 {
            eprintln!(
                "enf-bench: container start, round {}/{rounds}",
                r / PER_ROUND + 1
            );
        }
        let mut got = [(0.0, 0.0); 3];
        for i in 0..CONFIGS.len() {
            let c = (i + r) % CONFIGS.len();
            let t = pods[c].time_start(&spec, "enf-probe", timeout)?;
            got[c] = (t.total_ms, t.start_ms);
        }
        for c in 0..CONFIGS.len() {
            samples[c].push((got[c].0, got[c].1, got[0].0, got[0].1));
        }
    }
    let k8s_exec: Vec<f64> = exec_us(&k8s.log()).split_off(exec_before);
    let waited: Vec<f64> = k8s
        .log()
        .lines()
        .filter(|l| l.contains("pod metadata came for held processes"))
        .filter_map(|l| super::log_number(l, "waited_us"))
        .collect::<Vec<f64>>()
        .split_off(waited_before);
    let held = waited.len();
    let mut rows = Vec::new();
    for (c, name) in CONFIGS.iter().enumerate() {
        let s = &samples[c];
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| s.iter().map(f).collect::<Vec<f64>>();
        let total = col(|x| x.0);
        let start = col(|x| x.1);
        let added = col(|x| x.0 - x.2);
        let added_start = col(|x| x.1 - x.3);
        rows.push(serde_json::json!({
            "config": name,
            "starts": s.len(),
            "p50_ms": quantile(&total, 0.5),
            "p90_ms": quantile(&total, 0.9),
            "start_p50_ms": quantile(&start, 0.5),
            "start_p90_ms": quantile(&start, 0.9),
            "added_p50_ms": quantile(&added, 0.5),
            "added_p90_ms": quantile(&added, 0.9),
            "added_start_p50_ms": quantile(&added_start, 0.5),
        }));
    }
    let mut notes = vec![format!(
        "Container start: {runtime} (Debian's containerd and runc, started by xtask, cgroupfs driver, no CNI: the node's network), image {} (static enf-probe). A start is CreateContainer + StartContainer until the container's process runs /enf-probe (its exec done, not held; /proc polled every 100 us), the container then stopped and removed; {n} starts per configuration, one of each per round in a rotating order; added = the same round's difference with `none`, p50/p90 over rounds. Configurations: `none` (no agent for that pod), `agent` (an agent enforcing a policy with no k8s selector: binary hash in a kubepods cgroup), `agent-k8s` (an agent enforcing a policy with k8s selectors, namespace + pod label + container, and the node's CRI socket: the first exec in each new container is held until the runtime named its pod). Both agents run throughout, each scoped to its own pod's cgroup; their exec programs run for every exec on the machine, the baseline's included.",
        node.probe_image
    )];
    notes.push(format!(
        "Container start, the agent's side (agent-k8s): the first exec of {held} of {n} containers was held for the pod's metadata; from the agent's first look at the held exec to the runtime's answer (the CRI question: ContainerStatus, then PodSandboxStatus): p50 {:.0} us, p90 {:.0} us; then attesting and resuming the process (\"attested at exec\", every exec of a pending process in that pod): p50 {:.0} us, p90 {:.0} us over {} execs.",
        quantile(&waited, 0.5),
        quantile(&waited, 0.9),
        quantile(&k8s_exec, 0.5),
        quantile(&k8s_exec, 0.9),
        k8s_exec.len()
    ));
    drop(k8s);
    drop(plain);
    pods.clear();
    drop(parent);
    Ok(serde_json::json!({
        "runtime": runtime,
        "rounds": rounds,
        "per_round": PER_ROUND,
        "held": held,
        "agent_wait_us": {"p50": quantile(&waited, 0.5), "p90": quantile(&waited, 0.9), "n": waited.len()},
        "agent_exec_us": {"p50": quantile(&k8s_exec, 0.5), "p90": quantile(&k8s_exec, 0.9), "n": k8s_exec.len()},
        "rows": rows,
        "notes": notes,
    }))
}

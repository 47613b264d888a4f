//! Node tests: real pods on a real containerd node (Debian's containerd and runc), driven
//! through CRI as the kubelet drives them (tests/src/cri.rs). `cargo xtask test` starts the
//! node and imports the images it built (a pause image, an enf-probe image and the agent's);
//! under CI=true a test that cannot reach the node fails, never skips. Host only: the VM
//! matrix's guests have no containerd.
//!
//! Pods share the node's network (no CNI here), so a pod's enf-probe reaches the test's
//! listeners on 127.0.0.1. Exit codes of the probe: 0 = connected, 13 = EPERM from the kernel.

use std::path::Path;

use enforcer_tests::{cri::*, *};

const OK: i32 = 0;
const EPERM: i32 = 13;
/// CRI container state (CONTAINER_RUNNING comes with the CRI client).
const CONTAINER_EXITED: i32 = 2;

fn node(test: &str) -> Option<NodeEnv> {
    if !require_root(test) {
        return None;
    }
    let env = node_env(test)?;
    let mut cri = Cri::connect(&env.socket).unwrap_or_else(|e| panic!("{test}: {e}"));
    let v = cri.version().unwrap_or_else(|e| panic!("{test}: {e}"));
    for image in [&env.pause_image, &env.probe_image, &env.agent_image] {
        assert!(
            cri.has_image(image)
                .unwrap_or_else(|e| panic!("{test}: {e}")),
            "{test}: the node ({v}) has no image {image}: `cargo xtask test` imports it"
        );
    }
    Some(env)
}

fn probe_container(env: &NodeEnv, name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_string(),
        image: env.probe_image.clone(),
        command: vec!["/enf-probe".to_string()],
        args: vec!["sleep".to_string(), "600".to_string()],
        ..Default::default()
    }
}

fn pod_spec(name: &str, namespace: &str) -> PodSpec {
    PodSpec {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: [("app".to_string(), "api".to_string())].into(),
        log_dir: None,
    }
}

/// The identity `api`: the enf-probe binary (by sha256) in a pod cgroup of this test. The
/// k8s selectors (namespace, labels, container) come with the policy's `k8s` key.
fn policy(parent: &str, mode: &str, sha: &str, allowed: u16) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: {mode}
unattested: allow
scope: ["{parent}"]
identities:
  - name: api
    match:
      - binarySha256: [{sha}]
        cgroup: ["/enftest-k8s-*/kubepods/**"]
rules:
  - identity: api
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{allowed}], protocol: tcp}}
"#
    )
}

/// A pod's enf-probe is allowed to the allowed port and denied elsewhere, by the host's agent
/// in enforce mode; with no agent the same connect succeeds (the attack works unprotected).
#[test]
fn pod_probe_is_allowed_and_denied_as_the_policy_says() {
    let Some(env) = node("pod_probe_is_allowed_and_denied_as_the_policy_says") else {
        return;
    };
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let denied = l.extra4.to_string();
    let mut pod = Pod::run(&env.socket, &pod_spec("api-0", "payments"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    let app = pod
        .run_container(&probe_container(&env, "app"))
        .unwrap_or_else(|e| panic!("{e}"));
    let exec = |pod: &mut Pod, addr: &str| -> i32 {
        let (code, out, err) = pod
            .exec(&app, &["/enf-probe", "tcp", addr])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            code == OK || code == EPERM,
            "enf-probe tcp {addr} in the pod: exit {code}: {out}{err}"
        );
        code
    };

    // No agent: the connect the policy denies goes through.
    assert_eq!(exec(&mut pod, &denied), OK, "no agent: nothing denies");
    assert_eq!(exec(&mut pod, &allowed), OK);

    let agent = Agent::start(&policy(
        &parent.rel,
        "enforce",
        &env.probe_sha256,
        l.tcp4.port(),
    ));
    assert_eq!(exec(&mut pod, &allowed), OK, "allowed port, enforce mode");
    assert_eq!(
        exec(&mut pod, &denied),
        EPERM,
        "a port the policy does not allow, enforce mode:\n{}",
        agent.log()
    );
    // The agent saw the pod's process as the identity, in the container's cgroup.
    let evs = agent.wait_events("a deny of the pod's probe", |evs| {
        evs.iter()
            .any(|e| e["verdict"] == "deny" && e["identity"] == "spiffe://test.example.org/api")
    });
    let ev = evs
        .iter()
        .find(|e| e["verdict"] == "deny" && e["identity"] == "spiffe://test.example.org/api")
        .expect("the deny event");
    let cg = pod.container_cgroup(&app);
    assert_eq!(
        ev["cgroup"],
        cg.as_str(),
        "the deny names the container's cgroup: {ev}"
    );
    assert_eq!(ev["sha256"], env.probe_sha256.as_str());
    drop(agent);
    let pod_cgroup = pod.cgroup.clone();
    drop(pod);
    for m in cgroup_mounts() {
        let dir = m.join(pod_cgroup.trim_start_matches('/'));
        assert!(!dir.exists(), "{} is removed with the pod", dir.display());
    }
}

/// CreateContainer + StartContainer until the container's process runs enf-probe (its exec
/// done, not held), in ms (`cargo xtask bench` measures the same, see enf-bench).
fn start_once(pod: &mut Pod, spec: &ContainerSpec) -> f64 {
    pod.time_start(spec, "enf-probe", AGENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
        .total_ms
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Container start (CreateContainer + StartContainer until the process runs its binary) with
/// no agent and with the host's agent enforcing the pods' parent: printed as the seed of the
/// bench's container-start item. Asserts that every container starts (none is held forever).
#[test]
fn container_start_time_with_and_without_the_agent() {
    let Some(env) = node("container_start_time_with_and_without_the_agent") else {
        return;
    };
    const N: usize = 9;
    let parent = PodsParent::new();
    let l = Listeners::new();
    let mut pod = Pod::run(&env.socket, &pod_spec("start-0", "payments"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    let spec = probe_container(&env, "app");
    let _warm = start_once(&mut pod, &spec);
    let without: Vec<f64> = (0..N).map(|_| start_once(&mut pod, &spec)).collect();
    let agent = Agent::start(&policy(
        &parent.rel,
        "enforce",
        &env.probe_sha256,
        l.tcp4.port(),
    ));
    let with: Vec<f64> = (0..N).map(|_| start_once(&mut pod, &spec)).collect();
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "node: container start p50 {:.1} ms without the agent, {:.1} ms with it (enforce, {N} starts each; without {without:.1?}, with {with:.1?})",
        p50(without.clone()),
        p50(with.clone()),
    );
    drop(agent);
}

/// The agent's image (`cargo xtask image`) is in the node under the digest xtask printed, and
/// its static binary runs in the otherwise empty image.
#[test]
fn agent_image_runs_in_the_node() {
    let Some(env) = node("agent_image_runs_in_the_node") else {
        return;
    };
    let digest = std::env::var("ENFORCER_TEST_AGENT_IMAGE_DIGEST")
        .expect("ENFORCER_TEST_AGENT_IMAGE_DIGEST (set by `cargo xtask test`)");
    let (code, out, err) = run_cmd(
        Path::new("ctr"),
        &[
            "-a",
            env.socket.to_str().expect("socket path"),
            "-n",
            "k8s.io",
            "images",
            "ls",
        ],
    );
    assert_eq!(code, 0, "ctr images ls: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{} ", env.agent_image)))
        .unwrap_or_else(|| panic!("no {} in ctr images ls:\n{out}", env.agent_image));
    assert!(
        line.contains(&digest),
        "containerd lists the agent image with the digest xtask printed ({digest}): {line}"
    );

    let _parent = PodsParent::new();
    let mut pod = Pod::run(
        &env.socket,
        &pod_spec("agent-version", "kube-system"),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let id = pod
        .run_container(&ContainerSpec {
            name: "enforcer".to_string(),
            image: env.agent_image.clone(),
            args: vec!["--version".to_string()],
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, exit, info) = wait_for("the agent container to exit", AGENT_TIMEOUT, || {
        let s = pod.status(&id).ok()?;
        (s.0 == CONTAINER_EXITED).then_some(s)
    });
    assert_eq!(
        (state, exit),
        (CONTAINER_EXITED, 0),
        "`/enforcer-agent --version` in the image: {info}"
    );
}

/// The agent's image runs as the DaemonSet's pod would (privileged, the node's PID and network
/// namespaces, the host's bpffs mounted): `enforcer-agent probe` finds this kernel supported.
#[test]
fn agent_image_probes_the_kernel_as_a_privileged_host_pid_pod() {
    let Some(env) = node("agent_image_probes_the_kernel_as_a_privileged_host_pid_pod") else {
        return;
    };
    let _parent = PodsParent::new();
    let logs = TempDir::new("pod-logs");
    let mut spec = pod_spec("enforcer-probe", "kube-system");
    spec.log_dir = Some(logs.0.clone());
    let mut pod = Pod::run(&env.socket, &spec, true).unwrap_or_else(|e| panic!("{e}"));
    let id = pod
        .run_container(&ContainerSpec {
            name: "enforcer".to_string(),
            image: env.agent_image.clone(),
            args: vec!["probe".to_string(), "--json".to_string()],
            // The host's bpffs and cgroup2 tree, as the DaemonSet mounts them.
            mounts: vec![
                (
                    "/sys/fs/bpf".into(),
                    "/sys/fs/bpf".to_string(),
                    false,
                    false,
                ),
                (
                    cgroup2_mount(),
                    cgroup2_mount().display().to_string(),
                    false,
                    false,
                ),
            ],
            privileged: true,
            host_pid: true,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, exit, _) = wait_for("the agent container to exit", AGENT_TIMEOUT, || {
        let s = pod.status(&id).ok()?;
        (s.0 == CONTAINER_EXITED).then_some(s)
    });
    let log = std::fs::read_to_string(logs.path("enforcer.log")).unwrap_or_default();
    assert_eq!(
        (state, exit),
        (CONTAINER_EXITED, 0),
        "`enforcer-agent probe` in a privileged host-PID pod:\n{log}"
    );
    assert!(
        log.contains("\"supported\":true") || log.contains("\"supported\": true"),
        "probe --json says supported:\n{log}"
    );
}

/// `podman load` accepts the agent's image archive (the OCI layout beside the docker-archive
/// manifest.json). `docker load` needs a Docker daemon, which cannot run here.
#[test]
fn podman_loads_the_agent_image() {
    let test = "podman_loads_the_agent_image";
    if !require_root(test) {
        return;
    }
    let Some(tar) = std::env::var_os("ENFORCER_TEST_AGENT_IMAGE") else {
        assert!(
            !in_ci(),
            "{test}: ENFORCER_TEST_AGENT_IMAGE is not set (run through `cargo xtask test`)"
        );
        eprintln!("SKIP {test}: ENFORCER_TEST_AGENT_IMAGE is not set");
        return;
    };
    if run_cmd_status("podman", &["--version"]).is_none() {
        assert!(
            !in_ci(),
            "{test}: podman is not installed (`cargo xtask test` installs it from Debian)"
        );
        eprintln!("SKIP {test}: podman is not installed");
        return;
    }
    let reference = format!("localhost/enforcer-agent:{}", env!("CARGO_PKG_VERSION"));
    let tar = tar.to_str().expect("path").to_string();
    let (code, out, err) = run_cmd(Path::new("podman"), &["load", "-i", &tar]);
    assert_eq!(code, 0, "podman load -i {tar}: {out}{err}");
    assert!(
        out.contains(&reference) || err.contains(&reference),
        "podman load names {reference}: {out}{err}"
    );
    let (code, out, err) = run_cmd(
        Path::new("podman"),
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.Entrypoint}} {{.Config.Cmd}}",
            &reference,
        ],
    );
    let _ = run_cmd(Path::new("podman"), &["rmi", "-f", &reference]);
    assert_eq!(code, 0, "podman image inspect {reference}: {err}");
    assert_eq!(out.trim(), "[/enforcer-agent] [run]");
}

/// The exit code of `cmd args`, or None when it cannot start (not installed).
fn run_cmd_status(cmd: &str, args: &[&str]) -> Option<i32> {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()
        .map(|s| s.code().unwrap_or(-1))
}

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

/// A namespace of this test run alone (DNS-1123), so a selector never matches another run's pod.
fn test_namespace(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), unique_n())
}

/// An enforce-mode policy whose identity `api` is the enf-probe binary (by sha256) in pods
/// that the `k8s` selector `k8s` (YAML flow mapping) selects; `api` may reach `allowed`.
fn k8s_policy(parent: &str, unattested: &str, sha: &str, allowed: u16, k8s: &str) -> String {
    format!(
        r#"apiVersion: enforcer/v1
kind: Policy
trustDomain: test.example.org
mode: enforce
unattested: {unattested}
scope: ["{parent}"]
identities:
  - name: api
    match:
      - binarySha256: [{sha}]
        k8s: {k8s}
rules:
  - identity: api
    egress:
      - to: {{cidr: 127.0.0.1/32, ports: [{allowed}], protocol: tcp}}
"#
    )
}

/// The agent on the host, enforcing `policy`, asking the node's runtime for pod metadata.
fn host_agent(env: &NodeEnv, policy: &str, extra: &[&str]) -> Agent {
    let socket = env.socket.to_str().expect("socket path");
    let mut args = vec!["--cri-socket", socket];
    args.extend_from_slice(extra);
    Agent::start_with(policy, &args)
}

/// ExecSync `enf-probe tcp ADDR` in a running container: OK or EPERM.
fn probe_tcp(pod: &mut Pod, id: &str, addr: &str) -> i32 {
    let (code, out, err) = pod
        .exec(id, &["/enf-probe", "tcp", addr])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        code == OK || code == EPERM,
        "enf-probe tcp {addr} in container {id}: exit {code}: {out}{err}"
    );
    code
}

/// A pod of `namespace` labelled `app=APP` running a sleeping enf-probe container `app`.
fn probe_pod(env: &NodeEnv, name: &str, namespace: &str, app: &str) -> (Pod, String) {
    let mut spec = pod_spec(name, namespace);
    spec.labels = [("app".to_string(), app.to_string())].into();
    let mut pod = Pod::run(&env.socket, &spec, false).unwrap_or_else(|e| panic!("{e}"));
    let id = pod
        .run_container(&probe_container(env, "app"))
        .unwrap_or_else(|e| panic!("{e}"));
    (pod, id)
}

/// The deny event of a connect from cgroup `cg`, once the agent printed it.
fn deny_in(agent: &Agent, cg: &str) -> serde_json::Value {
    let found = |evs: &[serde_json::Value]| {
        evs.iter()
            .find(|e| e["verdict"] == "deny" && e["cgroup"] == cg)
            .cloned()
    };
    let evs = agent.wait_events(&format!("a deny in {cg}"), |evs| found(evs).is_some());
    found(&evs).expect("the deny event")
}

/// `identities --json`'s entry for process `pid`.
fn identity_of(agent: &Agent, pid: u32) -> serde_json::Value {
    let ids = agent.cli_json(&["identities"]);
    ids.as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .cloned()
        .unwrap_or_else(|| panic!("identities has no process {pid}: {ids}"))
}

/// Pods selected by namespace + labels + binary hash are the identity: pod A (namespace NS,
/// `app=api`) reaches the allowed port and is denied the other; pod B (the same binary and
/// labels in another namespace) and pod C (NS, other labels) are not the identity and are
/// denied under `unattested: deny`. With no agent every one of those connects goes through.
/// A `serviceAccount` selector cannot match without the API server, and status says so.
#[test]
fn pod_probe_is_allowed_and_denied_as_the_policy_says() {
    let Some(env) = node("pod_probe_is_allowed_and_denied_as_the_policy_says") else {
        return;
    };
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let denied = l.extra4.to_string();
    let ns = test_namespace("payments");
    let other_ns = test_namespace("shop");
    let (mut a, a_app) = probe_pod(&env, "api-a", &ns, "api");
    let (mut b, b_app) = probe_pod(&env, "api-b", &other_ns, "api");
    let (mut c, c_app) = probe_pod(&env, "web-c", &ns, "web");

    // No agent: the connects the policy denies go through.
    assert_eq!(probe_tcp(&mut a, &a_app, &denied), OK, "no agent: pod A");
    assert_eq!(probe_tcp(&mut b, &b_app, &allowed), OK, "no agent: pod B");
    assert_eq!(probe_tcp(&mut c, &c_app, &allowed), OK, "no agent: pod C");

    let selector = format!("{{namespace: [{ns}], podLabels: {{app: api}}}}");
    let agent = host_agent(
        &env,
        &k8s_policy(
            &parent.rel,
            "deny",
            &env.probe_sha256,
            l.tcp4.port(),
            &selector,
        ),
        &[],
    );
    let log = || agent.log();
    assert_eq!(
        probe_tcp(&mut a, &a_app, &allowed),
        OK,
        "pod A, allowed port:\n{}",
        log()
    );
    assert_eq!(
        probe_tcp(&mut a, &a_app, &denied),
        EPERM,
        "pod A, another port:\n{}",
        log()
    );
    assert_eq!(
        probe_tcp(&mut b, &b_app, &allowed),
        EPERM,
        "pod B: the same binary and labels in another namespace is not `api`:\n{}",
        log()
    );
    assert_eq!(
        probe_tcp(&mut c, &c_app, &allowed),
        EPERM,
        "pod C: namespace NS with other labels is not `api`:\n{}",
        log()
    );

    // The deny of A names the identity and the container's cgroup; B's and C's name none.
    let ev = deny_in(&agent, &a.container_cgroup(&a_app));
    assert_eq!(ev["identity"], "spiffe://test.example.org/api", "{ev}");
    assert_eq!(ev["sha256"], env.probe_sha256.as_str());
    for (pod, id) in [(&b, &b_app), (&c, &c_app)] {
        let ev = deny_in(&agent, &pod.container_cgroup(id));
        assert!(ev["identity"].is_null(), "not the identity: {ev}");
        assert_eq!(ev["rule"], "unattested", "{ev}");
    }
    // `identities` shows each container's first process with its pod, and A's identity.
    let pa = identity_of(&agent, a.pid(&a_app).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(pa["pod"], format!("{ns}/api-a/app"), "{pa}");
    assert_eq!(pa["identity"], "spiffe://test.example.org/api", "{pa}");
    let pb = identity_of(&agent, b.pid(&b_app).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(pb["pod"], format!("{other_ns}/api-b/app"), "{pb}");
    assert!(pb["identity"].is_null(), "{pb}");
    let pc = identity_of(&agent, c.pid(&c_app).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(pc["pod"], format!("{ns}/web-c/app"), "{pc}");
    assert!(pc["identity"].is_null(), "{pc}");
    let k = &agent.cli_json(&["status"])["kubernetes"];
    assert_eq!(k["runtime_connected"], true, "{k}");
    assert!(k["containers_known"].as_u64().unwrap_or(0) >= 3, "{k}");

    // A serviceAccount selector: with no API server (no --kube-node) the account of no pod is
    // known, so it cannot match: pod A is no longer `api` (fail closed), and status says why.
    let selector = format!("{{namespace: [{ns}], serviceAccount: [api], podLabels: {{app: api}}}}");
    agent.reload(&k8s_policy(
        &parent.rel,
        "deny",
        &env.probe_sha256,
        l.tcp4.port(),
        &selector,
    ));
    agent.wait_log("policy reloaded", 1);
    assert_eq!(
        probe_tcp(&mut a, &a_app, &allowed),
        EPERM,
        "pod A under a serviceAccount selector with no API server:\n{}",
        log()
    );
    let k = &agent.cli_json(&["status"])["kubernetes"];
    assert_eq!(k["api_server_connected"], false, "{k}");
    assert!(
        k["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("serviceAccount")))),
        "status notes that serviceAccount selectors cannot match: {k}"
    );
    drop(agent);
    let pod_cgroup = a.cgroup.clone();
    drop((a, b, c));
    for m in cgroup_mounts() {
        let dir = m.join(pod_cgroup.trim_start_matches('/'));
        assert!(!dir.exists(), "{} is removed with the pod", dir.display());
    }
}

/// Runs a pod in `namespace` (labels `app=api`) whose only container's entrypoint is
/// `enf-probe tcp ADDR` (it connects at once and exits: no ExecSync), waits for it to exit and
/// returns its exit code (ContainerStatus); the pod is removed.
fn connect_at_start(env: &NodeEnv, name: &str, namespace: &str, addr: &str) -> i32 {
    let mut pod =
        Pod::run(&env.socket, &pod_spec(name, namespace), false).unwrap_or_else(|e| panic!("{e}"));
    let id = pod
        .run_container(&ContainerSpec {
            name: "connect".to_string(),
            image: env.probe_image.clone(),
            command: vec!["/enf-probe".to_string()],
            args: vec!["tcp".to_string(), addr.to_string()],
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, exit, info) = wait_for("the container to exit", AGENT_TIMEOUT, || {
        let s = pod.status(&id).ok()?;
        (s.0 == CONTAINER_EXITED).then_some(s)
    });
    assert_eq!(state, CONTAINER_EXITED, "{info}");
    assert!(
        exit == OK || exit == EPERM,
        "`enf-probe tcp {addr}` as a container's entrypoint: exit {exit}: {info}"
    );
    exit
}

/// No pod process is judged on missing metadata: a container whose entrypoint connects at
/// once (its first exec, before the agent can know its pod) is held at exec until the runtime
/// named its pod, then allowed as the identity under `unattested: deny` (judged without its
/// pod, it would have been denied). The same container in another namespace is denied; with
/// no agent it connects.
#[test]
fn a_containers_first_process_is_held_until_its_pod_is_known() {
    let Some(env) = node("a_containers_first_process_is_held_until_its_pod_is_known") else {
        return;
    };
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let ns = test_namespace("payments");
    let other_ns = test_namespace("shop");
    assert_eq!(
        connect_at_start(&env, "early-0", &other_ns, &allowed),
        OK,
        "no agent: the other namespace's container connects"
    );
    let selector = format!("{{namespace: [{ns}], podLabels: {{app: api}}}}");
    let agent = host_agent(
        &env,
        &k8s_policy(
            &parent.rel,
            "deny",
            &env.probe_sha256,
            l.tcp4.port(),
            &selector,
        ),
        &[],
    );
    for i in 0..3 {
        assert_eq!(
            connect_at_start(&env, &format!("early-a{i}"), &ns, &allowed),
            OK,
            "a container of namespace {ns} connecting as its first process (start {i}):\n{}",
            agent.log()
        );
    }
    assert_eq!(
        connect_at_start(&env, "early-b", &other_ns, &allowed),
        EPERM,
        "the same container in another namespace:\n{}",
        agent.log()
    );
}

/// When the runtime's socket is gone and the policy selects by pod, a new pod's processes stay
/// pending and are denied in enforce mode (even under `unattested: allow`), status says the
/// runtime is unreachable and why pods are denied, and the log says it once, not per connect.
#[test]
fn runtime_socket_gone_keeps_new_pods_denied_and_is_logged_once() {
    let Some(env) = node("runtime_socket_gone_keeps_new_pods_denied_and_is_logged_once") else {
        return;
    };
    const UNREACHABLE: &str = "container runtime unreachable";
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let ns = test_namespace("payments");
    {
        let (mut pod, app) = probe_pod(&env, "api-0", &ns, "api");
        assert_eq!(
            probe_tcp(&mut pod, &app, &allowed),
            OK,
            "no agent: the pod connects"
        );
    }
    let gone = TempDir::new("no-cri");
    let socket = gone.path("containerd.sock");
    let selector = format!("{{namespace: [{ns}], podLabels: {{app: api}}}}");
    let agent = Agent::start_with(
        &k8s_policy(
            &parent.rel,
            "allow",
            &env.probe_sha256,
            l.tcp4.port(),
            &selector,
        ),
        &["--cri-socket", socket.to_str().expect("path")],
    );
    agent.wait_log(UNREACHABLE, 1);
    let (mut pod, app) = probe_pod(&env, "api-1", &ns, "api");
    for i in 0..3 {
        assert_eq!(
            probe_tcp(&mut pod, &app, &allowed),
            EPERM,
            "connect {i} of a new pod while the runtime is unreachable:\n{}",
            agent.log()
        );
    }
    let second = pod
        .run_container(&probe_container(&env, "second"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        probe_tcp(&mut pod, &second, &allowed),
        EPERM,
        "{}",
        agent.log()
    );
    // The denies are those of pending processes (no identity), not of `unattested: allow`.
    // (A process still held names the exe and cgroup the agent last knew for its pid, the
    // runtime's: so the event is found by its rule, not its cgroup.)
    let evs = agent.wait_events("a deny of a pending process", |evs| {
        evs.iter()
            .any(|e| e["verdict"] == "deny" && e["rule"] == "pending attestation")
    });
    assert!(
        evs.iter()
            .filter(|e| e["verdict"] == "deny")
            .all(|e| e["identity"].is_null() && e["rule"] == "pending attestation"),
        "{evs:?}"
    );
    let k = &agent.cli_json(&["status"])["kubernetes"];
    assert_eq!(k["runtime_connected"], false, "{k}");
    assert!(
        k["runtime"]
            .as_str()
            .is_some_and(|r| r.contains("unreachable")),
        "{k}"
    );
    assert!(
        k["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("pending")))),
        "status notes that new containers stay pending: {k}"
    );
    // Several seconds and reconnection attempts later, still said once.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(agent.count_log(UNREACHABLE), 1, "{}", agent.log());
}

/// A removed pod's containers leave the kernel's cgroup map (within the 5-s sweep) and the
/// agent's pod directory.
#[test]
fn deleted_pods_leave_the_maps() {
    let Some(env) = node("deleted_pods_leave_the_maps") else {
        return;
    };
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let ns = test_namespace("payments");
    let selector = format!("{{namespace: [{ns}], podLabels: {{app: api}}}}");
    let agent = host_agent(
        &env,
        &k8s_policy(
            &parent.rel,
            "deny",
            &env.probe_sha256,
            l.tcp4.port(),
            &selector,
        ),
        &[],
    );
    let known = || {
        agent.cli_json(&["status"])["kubernetes"]["containers_known"]
            .as_u64()
            .expect("status kubernetes.containers_known")
    };
    let before = known();
    let (mut pod, app) = probe_pod(&env, "api-a", &ns, "api");
    assert_eq!(probe_tcp(&mut pod, &app, &allowed), OK, "{}", agent.log());
    let cg = pod.container_cgroup(&app);
    let id = cgroup_id_of(&cg).unwrap_or_else(|| panic!("no cgroup {cg}"));
    assert!(
        kernel_knows_cgroup(&agent.pin_dir, id),
        "ENF_CGROUPS has the container's cgroup {cg} ({id})"
    );
    let with = known();
    assert!(
        with > before,
        "the pod's containers are known: {before} -> {with}"
    );
    drop(pod);
    let t0 = std::time::Instant::now();
    let mut left = (true, with);
    while t0.elapsed() < std::time::Duration::from_secs(10) {
        left = (kernel_knows_cgroup(&agent.pin_dir, id), known());
        if !left.0 && left.1 < with {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !left.0,
        "the removed container's cgroup {id} is still in ENF_CGROUPS after 10 s:\n{}",
        agent.log()
    );
    assert!(
        left.1 < with,
        "containers_known is still {} (was {with} with the pod) after 10 s",
        left.1
    );
}

/// An API server for one node, from recorded objects: answers kube's LIST of the node's pods
/// with `pods` (JSON Pod objects) and holds each WATCH open with no event, on 127.0.0.1 (plain
/// HTTP, as `--kube-api http://...` takes it). Records each request's path and query.
struct RecordedApiServer {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RecordedApiServer {
    fn start(pods: Vec<serde_json::Value>) -> Self {
        use std::io::{BufRead as _, Write as _};
        use std::sync::{Arc, Mutex, atomic::AtomicBool, atomic::Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let list = serde_json::json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "100"},
            "items": pods,
        })
        .to_string();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                let (seen, stop, list) = (seen2.clone(), stop2.clone(), list.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let mut r = std::io::BufReader::new(&stream);
                    let mut first = String::new();
                    if r.read_line(&mut first).is_err() {
                        return;
                    }
                    // The headers (no request of kube's LIST or WATCH has a body).
                    loop {
                        let mut h = String::new();
                        match r.read_line(&mut h) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if h == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let pq = first.split_whitespace().nth(1).unwrap_or("").to_string();
                    seen.lock().expect("lock").push(pq.clone());
                    let mut w = &stream;
                    if !pq.starts_with("/api/v1/pods") {
                        let _ = w.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    } else if !pq.contains("watch=true") {
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{list}",
                            list.len()
                        );
                    } else {
                        // A watch with nothing new: open until the server stops.
                        let _ = w.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                        );
                        let _ = w.flush();
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                        let _ = w.write_all(b"0\r\n\r\n");
                    }
                });
            }
        });
        Self { url, seen, stop }
    }
}

impl Drop for RecordedApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A Pod object as the API server returns it (trimmed to what the agent reads and a little
/// more), for the CRI pod `pod`, on node `node`, with service account `sa`.
fn api_pod(pod: &Pod, node: &str, sa: &str) -> serde_json::Value {
    let meta = pod.config.metadata.clone().expect("pod metadata");
    serde_json::json!({
        "metadata": {
            "name": meta.name, "namespace": meta.namespace, "uid": meta.uid,
            "resourceVersion": "100", "labels": pod.config.labels,
            "creationTimestamp": "2026-12-01T06:00:00Z"
        },
        "spec": {
            "nodeName": node, "serviceAccountName": sa, "serviceAccount": sa,
            "containers": [{"name": "app", "image": "localhost/enf-probe:test"}]
        },
        "status": {"phase": "Running"}
    })
}

/// The API server as a source (`--kube-node`, `--kube-api`), end to end: a recorded API
/// server names the service accounts of two real pods of the node; the policy selects by
/// namespace + serviceAccount. Pod A (account `api`) reaches the allowed port once the API
/// server told its account; pod B (account `worker`, same namespace, binary and labels) is
/// denied. With no agent, B connects.
#[test]
fn service_account_from_the_api_server_selects_pods() {
    let Some(env) = node("service_account_from_the_api_server_selects_pods") else {
        return;
    };
    let parent = PodsParent::new();
    let l = Listeners::new();
    let allowed = l.tcp4.to_string();
    let denied = l.extra4.to_string();
    let ns = test_namespace("payments");
    let node_name = format!("node-{}", std::process::id());
    let (mut a, a_app) = probe_pod(&env, "api-a", &ns, "api");
    let (mut b, b_app) = probe_pod(&env, "worker-b", &ns, "api");
    assert_eq!(probe_tcp(&mut b, &b_app, &allowed), OK, "no agent: pod B");
    assert_eq!(probe_tcp(&mut a, &a_app, &denied), OK, "no agent: pod A");
    let server = RecordedApiServer::start(vec![
        api_pod(&a, &node_name, "api"),
        api_pod(&b, &node_name, "worker"),
    ]);
    let selector = format!("{{namespace: [{ns}], serviceAccount: [api]}}");
    let agent = host_agent(
        &env,
        &k8s_policy(
            &parent.rel,
            "deny",
            &env.probe_sha256,
            l.tcp4.port(),
            &selector,
        ),
        &["--kube-node", &node_name, "--kube-api", &server.url],
    );
    let k = wait_for("status: api_server connected", AGENT_TIMEOUT, || {
        let k = agent.cli_json(&["status"])["kubernetes"].clone();
        (k["api_server_connected"] == true).then_some(k)
    });
    assert_eq!(k["api_server"], "connected", "{k}");
    assert!(
        !k["notes"].to_string().contains("serviceAccount"),
        "no note about serviceAccount selectors once the API server answers: {k}"
    );
    // The account comes with the watch's list; the class follows at once.
    let spiffe = format!("spiffe://test.example.org/ns/{ns}/sa/api");
    let pa = wait_for("pod A to be the identity", AGENT_TIMEOUT, || {
        let p = identity_of(&agent, a.pid(&a_app).ok()?);
        (p["identity"] == spiffe.as_str()).then_some(p)
    });
    assert_eq!(pa["pod"], format!("{ns}/api-a/app"), "{pa}");
    assert_eq!(
        probe_tcp(&mut a, &a_app, &allowed),
        OK,
        "pod A (sa api):\n{}",
        agent.log()
    );
    assert_eq!(
        probe_tcp(&mut a, &a_app, &denied),
        EPERM,
        "pod A, another port"
    );
    assert_eq!(
        probe_tcp(&mut b, &b_app, &allowed),
        EPERM,
        "pod B (sa worker) is not the identity:\n{}",
        agent.log()
    );
    let ev = deny_in(&agent, &a.container_cgroup(&a_app));
    assert_eq!(
        ev["identity"],
        spiffe.as_str(),
        "the default SPIFFE ID of ns + sa: {ev}"
    );
    let seen = server.seen.lock().expect("lock").clone();
    assert!(
        seen.iter()
            .any(|q| q.contains(&format!("spec.nodeName%3D{node_name}"))
                || q.contains(&format!("spec.nodeName={node_name}"))),
        "the agent watches only this node's pods: {seen:?}"
    );
    drop(agent);
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

//! The deployment files as users get them (host only, not in the VM suites):
//! - the Kubernetes manifests rendered by `kubectl kustomize` (base and enforce overlay):
//!   what the DaemonSet promises (capabilities, no privileged container, host PID, the bpffs
//!   and policy mounts, tolerations, priority, probes on the metrics port the agent serves,
//!   the image tag), and that the ConfigMap's policy passes `enforcer-agent policy check`
//!   (`cargo xtask test` also validates them against the Kubernetes schemas);
//! - the systemd unit, checked by `systemd-analyze verify`;
//! - the .deb from `cargo xtask deb`: installed, removed and purged in a scratch dpkg root
//!   (`dpkg --root`), never on the machine itself.
//!
//! A missing tool (kubectl, systemd-analyze, dpkg, the .deb) fails the test under CI=true and
//! is a SKIP line otherwise.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use enforcer_tests::{TempDir, agent_bin, require_root};
use yaml_rust2::{Yaml, YamlLoader};

/// The capabilities the DaemonSet adds, as the README and its comments document them.
const DAEMONSET_CAPS: [&str; 8] = [
    "BPF",
    "PERFMON",
    "SYS_ADMIN",
    "NET_ADMIN",
    "SYS_RESOURCE",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "KILL",
];
/// The systemd unit's: the same, less CAP_SYS_ADMIN (only for the namespace joins a
/// container needs).
const UNIT_CAPS: [&str; 7] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_RESOURCE",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "KILL",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when `tool` runs; missing: panics under CI=true, else prints SKIP.
fn have(tool: &str, test: &str) -> bool {
    if Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
    {
        return true;
    }
    assert!(
        !ci(),
        "{test}: {tool} is missing and CI=true forbids skipping; install it"
    );
    eprintln!("SKIP {test}: {tool} is not installed");
    false
}

fn run(c: &mut Command) -> (bool, String) {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `kubectl kustomize DIR`, parsed.
fn render(dir: &str) -> Vec<Yaml> {
    let (ok, out) = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir)));
    assert!(ok, "kubectl kustomize {dir}:\n{out}");
    YamlLoader::load_from_str(&out).unwrap_or_else(|e| panic!("{dir} renders bad YAML: {e}"))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--NAME=VALUE` (or `--NAME VALUE`) in an argument list.
fn flag(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{long}="))
            .map(str::to_string)
            .or_else(|| (a == &long).then(|| args.get(i + 1).cloned()).flatten())
    })
}

/// `enforcer-agent policy check` of a policy text; the YAML's `mode`.
fn check_policy(text: &str, what: &str) -> String {
    let dir = TempDir::new("deploy-policy");
    let file = dir.path("policy.yaml");
    fs::write(&file, text).expect("writing the policy");
    let (ok, out) = run(Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(&file));
    assert!(
        ok,
        "{what}: `enforcer-agent policy check` refuses it:\n{out}"
    );
    let doc = YamlLoader::load_from_str(text).expect("policy YAML");
    doc[0]["mode"].as_str().unwrap_or("enforce").to_string()
}

/// What users of the DaemonSet rely on, in the base (audit) and the enforce overlay.
#[test]
fn kubernetes_manifests_keep_their_promises() {
    let test = "kubernetes_manifests_keep_their_promises";
    if !have("kubectl", test) {
        return;
    }
    for (dir, mode) in [
        ("deploy/kubernetes", "audit"),
        ("deploy/kubernetes/enforce", "enforce"),
    ] {
        let docs = render(dir);
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
        ] {
            assert_eq!(of_kind(&docs, kind).len(), 1, "{dir}: one {kind}");
        }

        // RBAC: read pods, nothing else.
        let role = of_kind(&docs, "ClusterRole")[0];
        let rules = role["rules"].as_vec().expect("rules");
        assert_eq!(rules.len(), 1, "{dir}: {rules:?}");
        assert_eq!(strs(&rules[0]["apiGroups"]), [""]);
        assert_eq!(strs(&rules[0]["resources"]), ["pods"]);
        let mut verbs = strs(&rules[0]["verbs"]);
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{dir}");
        let binding = of_kind(&docs, "ClusterRoleBinding")[0];
        let sa = of_kind(&docs, "ServiceAccount")[0];
        assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
        assert_eq!(
            binding["subjects"][0]["namespace"],
            sa["metadata"]["namespace"]
        );

        let ds = of_kind(&docs, "DaemonSet")[0];
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
        assert_eq!(spec["hostPID"].as_bool(), Some(true), "{dir}: hostPID");
        assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "{dir}");
        assert_eq!(
            spec["priorityClassName"].as_str(),
            Some("system-node-critical")
        );
        let tolerations = spec["tolerations"].as_vec().expect("tolerations");
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"].as_str() == Some("Exists")
                    && t["key"].is_badvalue()
                    && t["effect"].is_badvalue()),
            "{dir}: a toleration of every taint: {tolerations:?}"
        );
        let update = &ds["spec"]["updateStrategy"];
        assert_eq!(update["type"].as_str(), Some("RollingUpdate"));
        assert_eq!(update["rollingUpdate"]["maxUnavailable"].as_i64(), Some(1));

        let containers = spec["containers"].as_vec().expect("containers");
        assert_eq!(containers.len(), 1, "{dir}: one container");
        assert!(
            spec["initContainers"].is_badvalue(),
            "{dir}: no init container"
        );
        let c = &containers[0];
        assert_eq!(
            c["image"].as_str(),
            Some(format!("localhost/enforcer-agent:{}", env!("CARGO_PKG_VERSION")).as_str()),
            "{dir}: the image tag is the workspace version"
        );
        assert_eq!(c["imagePullPolicy"].as_str(), Some("IfNotPresent"));
        let sc = &c["securityContext"];
        // No privileged container anywhere (none is documented as needing it).
        assert_ne!(sc["privileged"].as_bool(), Some(true), "{dir}: privileged");
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(
            strs(&sc["capabilities"]["add"]),
            DAEMONSET_CAPS,
            "{dir}: the capability list is the documented one"
        );

        let args = strs(&c["args"]);
        assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
        assert_eq!(flag(&args, "kube-node").as_deref(), Some("$(NODE_NAME)"));
        // Every flag the DaemonSet passes is one `run` has (a renamed flag would crash-loop
        // every agent of the cluster).
        let (ok, help) = run(Command::new(agent_bin()).args(["run", "--help"]));
        assert!(ok, "enforcer-agent run --help: {help}");
        for a in args.iter().skip(1) {
            let name = a.split('=').next().unwrap_or(a);
            assert!(
                name.starts_with("--") && help.contains(&format!("{name} ")),
                "{dir}: the DaemonSet passes {a:?}, which `enforcer-agent run` does not take:\n{help}"
            );
        }
        let env = c["env"].as_vec().expect("env");
        assert!(
            env.iter().any(|e| e["name"].as_str() == Some("NODE_NAME")
                && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName")),
            "{dir}: NODE_NAME from spec.nodeName: {env:?}"
        );

        // Volumes: the mount of each host path / ConfigMap, by mount path.
        let volumes = spec["volumes"].as_vec().expect("volumes");
        let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
        let mount_of = |path: &str| -> &Yaml {
            let m = mounts
                .iter()
                .filter(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
                .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
                .unwrap_or_else(|| panic!("{dir}: nothing mounted over {path}"));
            assert!(
                m["subPath"].is_badvalue(),
                "{dir}: {path} comes from a subPath mount (never updated)"
            );
            volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("{dir}: no volume {:?}", m["name"]))
        };
        for m in mounts {
            let propagation = m["mountPropagation"].as_str().unwrap_or("None");
            assert!(
                propagation != "Bidirectional" || sc["privileged"].as_bool() == Some(true),
                "{dir}: Bidirectional propagation is allowed only in a privileged container"
            );
        }
        let bpffs = flag(&args, "bpffs-dir").expect("--bpffs-dir");
        assert_eq!(
            mount_of(&bpffs)["hostPath"]["path"].as_str(),
            Some("/sys/fs/bpf"),
            "{dir}: the pins ({bpffs}) are on the host's bpffs"
        );
        let cgroup2 = flag(&args, "cgroup2").expect("--cgroup2");
        assert_eq!(
            mount_of(&cgroup2)["hostPath"]["path"].as_str(),
            Some("/sys/fs/cgroup")
        );
        let state = flag(&args, "state-dir").expect("--state-dir");
        assert_eq!(
            mount_of(&state)["hostPath"]["path"].as_str(),
            Some(state.as_str()),
            "{dir}: the state survives the pod (takeover)"
        );
        let policy_path = flag(&args, "policy").expect("--policy");
        let policy_volume = mount_of(&policy_path);
        let cm_name = policy_volume["configMap"]["name"]
            .as_str()
            .expect("the policy comes from a ConfigMap");
        let cm = of_kind(&docs, "ConfigMap")[0];
        assert_eq!(cm["metadata"]["name"].as_str(), Some(cm_name));
        let file = Path::new(&policy_path)
            .file_name()
            .and_then(|f| f.to_str())
            .expect("policy file name");
        let text = cm["data"][file]
            .as_str()
            .unwrap_or_else(|| panic!("{dir}: the ConfigMap has no {file}"));
        assert_eq!(check_policy(text, dir), mode, "{dir}: the policy's mode");

        // Probes: /healthz and /readyz on the port the agent serves metrics on.
        let metrics = flag(&args, "metrics-addr").expect("--metrics-addr");
        let port: i64 = metrics
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("--metrics-addr ADDR:PORT");
        let ports = c["ports"].as_vec().expect("ports");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{dir}: {probe}");
            let probe_port = match &get["port"] {
                Yaml::Integer(p) => *p,
                Yaml::String(name) => ports
                    .iter()
                    .find(|p| p["name"].as_str() == Some(name))
                    .and_then(|p| p["containerPort"].as_i64())
                    .unwrap_or_else(|| panic!("{dir}: no port named {name}")),
                other => panic!("{dir}: {probe} port {other:?}"),
            };
            assert_eq!(probe_port, port, "{dir}: {probe} probes {metrics}");
        }
    }
}

/// The systemd unit verifies (`systemd-analyze verify`, offline), with the command line,
/// capabilities and hardening it documents.
#[test]
fn systemd_unit_verifies() {
    let test = "systemd_unit_verifies";
    if !have("systemd-analyze", test) {
        return;
    }
    let unit = fs::read_to_string(root().join("deploy/systemd/enforcer-agent.service"))
        .expect("reading the unit");
    let value = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
            .to_string()
    };
    assert_eq!(
        value("ExecStart"),
        "/usr/bin/enforcer-agent run --policy /etc/enforcer/policy.yaml"
    );
    let caps: Vec<String> = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    assert_eq!(caps, UNIT_CAPS);
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("Restart", "on-failure"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
    ] {
        assert_eq!(value(key), want, "{key}");
    }
    assert!(value("ReadWritePaths").contains("/sys/fs/bpf"));
    assert!(value("ProtectHome").starts_with("read-only"));

    // verify checks that ExecStart's binary exists: a copy of the unit runs the built one.
    let dir = TempDir::new("unit");
    let copy = dir.path("enforcer-agent.service");
    fs::write(
        &copy,
        unit.replace(
            "/usr/bin/enforcer-agent",
            agent_bin().to_str().expect("path"),
        ),
    )
    .expect("writing the unit copy");
    // Documentation=man:enforcer-agent(1): the man page generated from the CLI.
    let man1 = dir.path("man/man1");
    fs::create_dir_all(&man1).expect("mkdir");
    let (ok, page) = run(Command::new(agent_bin()).arg("man"));
    assert!(ok, "enforcer-agent man: {page}");
    fs::write(man1.join("enforcer-agent.1"), page).expect("writing the man page");
    let mut c = Command::new("systemd-analyze");
    c.arg("verify").arg(&copy).env("MANPATH", dir.path("man"));
    if !have("man", test) {
        c.arg("--man=no");
    }
    let (ok, out) = run(&mut c);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );

    // A unit that is not valid is refused: the check can fail.
    fs::write(&copy, unit.replace("Type=exec", "Type=bogus")).expect("writing");
    let (ok, out) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .arg("--man=no"));
    assert!(
        !ok || out.contains("bogus"),
        "a bad unit must be reported:\n{out}"
    );
}

/// The .deb of `cargo xtask deb` installs the binary, the unit and the audit policy (a
/// conffile), enables the unit through deb-systemd-helper, and leaves nothing behind once
/// purged; removal keeps the edited policy. All in a scratch dpkg root: the machine's own
/// dpkg database and systemd folders are not touched.
#[test]
fn deb_installs_and_purges() {
    let test = "deb_installs_and_purges";
    if !require_root(test) || !have("dpkg", test) {
        return;
    }
    let Some(deb) = std::env::var_os("ENFORCER_DEB").map(PathBuf::from) else {
        assert!(
            !ci(),
            "{test}: ENFORCER_DEB is not set; run the tests with `cargo xtask test`"
        );
        eprintln!("SKIP {test}: ENFORCER_DEB is not set (`cargo xtask test` builds the .deb)");
        return;
    };
    assert!(deb.exists(), "{}", deb.display());
    let host_wants =
        Path::new("/etc/systemd/system/multi-user.target.wants/enforcer-agent.service");
    let host_had = host_wants.exists();

    let scratch = TempDir::new("dpkg-root");
    let r = &scratch.0;
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(r.join(f), "").expect("dpkg database");
    }
    let dpkg = |args: &[&str]| {
        let (ok, out) = run(Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            // Maintainer scripts run here with DPKG_ROOT set, not chrooted into the root.
            .arg("--force-script-chrootless")
            // The scratch database has no libc6.
            .arg("--force-depends")
            .args(args));
        assert!(ok, "dpkg {args:?}:\n{out}");
        out
    };
    dpkg(&["-i", deb.to_str().expect("path")]);

    let bin = r.join("usr/bin/enforcer-agent");
    let (ok, version) = run(Command::new(&bin).arg("--version"));
    assert!(
        ok && version.contains(env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let unit = r.join("lib/systemd/system/enforcer-agent.service");
    assert_eq!(
        fs::read_to_string(&unit).expect("the unit"),
        fs::read_to_string(root().join("deploy/systemd/enforcer-agent.service")).expect("unit")
    );
    let policy = r.join("etc/enforcer/policy.yaml");
    let text = fs::read_to_string(&policy).expect("the policy");
    assert_eq!(check_policy(&text, "/etc/enforcer/policy.yaml"), "audit");
    assert!(r.join("usr/share/man/man1/enforcer-agent.1.gz").exists());
    let (ok, conffiles) = run(Command::new("dpkg-query")
        .arg(format!("--admindir={}", r.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Conffiles}", "enforcer-agent"]));
    assert!(
        ok && conffiles.contains("/etc/enforcer/policy.yaml"),
        "{conffiles}"
    );
    let wants = r.join("etc/systemd/system/multi-user.target.wants/enforcer-agent.service");
    assert_eq!(
        fs::read_link(&wants).ok().as_deref(),
        Some(Path::new("/lib/systemd/system/enforcer-agent.service")),
        "the unit is enabled in the package's root"
    );

    // Remove: the binary and unit go, the (edited) policy stays.
    fs::write(&policy, format!("{text}# edited\n")).expect("editing the policy");
    dpkg(&["-r", "enforcer-agent"]);
    assert!(!bin.exists() && !unit.exists());
    assert!(policy.exists(), "removal keeps the conffile");
    // Purge: nothing of the package is left.
    dpkg(&["-P", "enforcer-agent"]);
    let mut left = Vec::new();
    let mut stack = vec![r.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("readdir").flatten() {
            let p = e.path();
            if p.starts_with(r.join("var/lib/dpkg")) {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                left.push(p);
            }
        }
    }
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert_eq!(
        host_wants.exists(),
        host_had,
        "the machine's own systemd folders must not change"
    );
}

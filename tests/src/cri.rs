//! A kubelet-like CRI client for the node suite: it talks to the containerd that
//! `cargo xtask test` started (ENFORCER_CRI_SOCKET) the way the kubelet does, and removes what
//! it created (containers, pod sandboxes, and the cgroup directories the runtime leaves behind).
//!
//! Pods live under a test-unique cgroup parent, `/enftest-k8s-<pid>/kubepods/besteffort/pod<uid>`
//! (a policy's `scope` names `/enftest-k8s-<pid>`), with the node's network (no CNI here) and an
//! empty hostname (runc refuses one without a private UTS namespace).

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, SecurityProfile, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient, security_profile,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cgroup2_mount;

/// Where the node is, from the environment `cargo xtask test` sets. Not set: under CI=true
/// this panics (a node test never skips in CI); locally it prints why and returns None.
pub fn node_env(test: &str) -> Option<NodeEnv> {
    let socket = std::env::var_os("ENFORCER_CRI_SOCKET").map(PathBuf::from);
    let images = std::env::var("ENFORCER_TEST_IMAGES").ok();
    let (Some(socket), Some(images)) = (socket, images) else {
        let why = "ENFORCER_CRI_SOCKET/ENFORCER_TEST_IMAGES are not set: run the node suite through `cargo xtask test` (as root), which starts containerd and imports the test images";
        if crate::in_ci() {
            panic!("{test}: {why}; CI=true forbids skipping");
        }
        eprintln!("SKIP {test}: {why}");
        return None;
    };
    let images: HashMap<String, String> = images
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let image = |k: &str| {
        images
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("ENFORCER_TEST_IMAGES names no {k} image: {images:?}"))
    };
    Some(NodeEnv {
        socket,
        pause_image: image("pause"),
        probe_image: image("probe"),
        agent_image: image("agent"),
        probe_sha256: std::env::var("ENFORCER_TEST_PROBE_SHA256")
            .expect("ENFORCER_TEST_PROBE_SHA256 (set by `cargo xtask test`)"),
    })
}

/// The node `cargo xtask test` started.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    pub socket: PathBuf,
    pub pause_image: String,
    /// Holds `/enf-probe` (static; its sha256 is `probe_sha256`).
    pub probe_image: String,
    /// The agent's image (`cargo xtask image`), entrypoint `/enforcer-agent`.
    pub agent_image: String,
    pub probe_sha256: String,
}

/// A CRI connection (runtime and image services) over the node's unix socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// The CRI error of a call, named.
fn fail(what: &str, e: tonic::Status) -> String {
    format!("CRI {what}: {} ({:?})", e.message(), e.code())
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:0")
                    .expect("a static URI")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connecting to the CRI socket {}: {e}", socket.display()))?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (a liveness check).
    pub fn version(&mut self) -> Result<String, String> {
        let r = self
            .rt
            .block_on(self.runtime.version(k8s_cri::v1::VersionRequest::default()))
            .map_err(|e| fail("Version", e))?
            .into_inner();
        Ok(format!("{} {}", r.runtime_name, r.runtime_version))
    }

    /// Whether the runtime has `image` (imported locally; nothing is ever pulled).
    pub fn has_image(&mut self, image: &str) -> Result<bool, String> {
        let r = self
            .rt
            .block_on(self.images.image_status(k8s_cri::v1::ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .map_err(|e| fail("ImageStatus", e))?
            .into_inner();
        Ok(r.image.is_some())
    }
}

/// The cgroup parent of this test process's pods, relative to the cgroup2 root:
/// `/enftest-k8s-<pid>`. A policy's `scope` names it.
pub fn pods_parent() -> String {
    format!("/enftest-k8s-{}", std::process::id())
}

/// What a pod is, as the kubelet would describe it.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub labels: HashMap<String, String>,
    /// Where the runtime writes the containers' output (`<dir>/<container name>.log`).
    pub log_dir: Option<PathBuf>,
}

/// What a container is.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// (host path, container path, read-only, bidirectional propagation)
    pub mounts: Vec<(PathBuf, String, bool, bool)>,
    pub privileged: bool,
    pub add_capabilities: Vec<String>,
    /// Share the node's PID namespace (the agent's DaemonSet pod).
    pub host_pid: bool,
    /// Capabilities dropped (`ALL` as in a manifest's `drop: [ALL]`).
    pub drop_capabilities: Vec<String>,
    /// `readOnlyRootFilesystem`.
    pub readonly_rootfs: bool,
    /// `seccompProfile: {type: RuntimeDefault}` (else the runtime's unconfined default).
    pub seccomp_runtime_default: bool,
}

/// A running pod sandbox and its containers: stopped and removed on drop, then the cgroup
/// directories the runtime left behind are removed (depth first, every hierarchy), as the
/// kubelet does.
pub struct Pod {
    pub cri: Cri,
    pub id: String,
    pub uid: String,
    pub config: PodSandboxConfig,
    pub containers: Vec<String>,
    /// The pod's cgroup, relative to the cgroup roots (`/enftest-k8s-<pid>/kubepods/besteffort/pod<uid>`).
    pub cgroup: String,
}

impl Pod {
    /// RunPodSandbox with the node's network (and, with `host_pid`, its PID namespace, in a
    /// privileged sandbox).
    pub fn run(socket: &Path, spec: &PodSpec, host_pid: bool) -> Result<Self, String> {
        Self::run_with(socket, spec, host_pid, host_pid, &pods_parent())
    }

    /// RunPodSandbox with the node's network, its PID namespace with `host_pid`, and a
    /// privileged sandbox only with `privileged` (the kubelet's rule: only when a container
    /// of the pod is privileged), under the cgroup `parent` (relative to the cgroup roots).
    pub fn run_with(
        socket: &Path,
        spec: &PodSpec,
        host_pid: bool,
        privileged: bool,
        parent: &str,
    ) -> Result<Self, String> {
        let mut cri = Cri::connect(socket)?;
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            crate::unique_n()
        );
        let cgroup = format!("{parent}/kubepods/besteffort/pod{uid}");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: spec
                .log_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            labels: spec.labels.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(host_pid)),
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = cri
            .rt
            .block_on(cri.runtime.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .map_err(|e| {
                fail(
                    &format!("RunPodSandbox {}/{}", spec.namespace, spec.name),
                    e,
                )
            })?
            .into_inner()
            .pod_sandbox_id;
        Ok(Self {
            cri,
            id,
            uid,
            config,
            containers: Vec::new(),
            cgroup,
        })
    }

    /// CreateContainer; returns its id (not started).
    pub fn create(&mut self, c: &ContainerSpec) -> Result<String, String> {
        let mut labels = HashMap::new();
        labels.insert("io.kubernetes.container.name".to_string(), c.name.clone());
        let meta = self.config.metadata.clone().unwrap_or_default();
        labels.insert("io.kubernetes.pod.name".to_string(), meta.name);
        labels.insert("io.kubernetes.pod.namespace".to_string(), meta.namespace);
        labels.insert("io.kubernetes.pod.uid".to_string(), meta.uid);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            args: c.args.clone(),
            envs: c
                .envs
                .iter()
                .map(|(k, v)| k8s_cri::v1::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: c
                .mounts
                .iter()
                .map(|(host, ctr, ro, bidi)| Mount {
                    container_path: ctr.clone(),
                    host_path: host.display().to_string(),
                    readonly: *ro,
                    propagation: if *bidi {
                        MountPropagation::PropagationBidirectional as i32
                    } else {
                        MountPropagation::PropagationPrivate as i32
                    },
                    ..Default::default()
                })
                .collect(),
            labels,
            log_path: if self.config.log_directory.is_empty() {
                String::new()
            } else {
                format!("{}.log", c.name)
            },
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    capabilities: Some(Capability {
                        add_capabilities: c.add_capabilities.clone(),
                        drop_capabilities: c.drop_capabilities.clone(),
                        ..Default::default()
                    }),
                    privileged: c.privileged,
                    namespace_options: Some(namespaces(c.host_pid)),
                    readonly_rootfs: c.readonly_rootfs,
                    seccomp: c.seccomp_runtime_default.then(|| SecurityProfile {
                        profile_type: security_profile::ProfileType::RuntimeDefault as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .cri
            .rt
            .block_on(self.cri.runtime.create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            }))
            .map_err(|e| fail(&format!("CreateContainer {}", c.name), e))?
            .into_inner()
            .container_id;
        self.containers.push(id.clone());
        Ok(id)
    }

    /// StartContainer.
    pub fn start(&mut self, id: &str) -> Result<(), String> {
        self.cri
            .rt
            .block_on(self.cri.runtime.start_container(StartContainerRequest {
                container_id: id.to_string(),
            }))
            .map_err(|e| fail(&format!("StartContainer {id}"), e))?;
        Ok(())
    }

    /// CreateContainer + StartContainer; returns the container id.
    pub fn run_container(&mut self, c: &ContainerSpec) -> Result<String, String> {
        let id = self.create(c)?;
        self.start(&id)?;
        Ok(id)
    }

    /// ExecSync `cmd` in the container: (exit code, stdout, stderr).
    pub fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<(i32, String, String), String> {
        let r = self
            .cri
            .rt
            .block_on(self.cri.runtime.exec_sync(ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            }))
            .map_err(|e| fail(&format!("ExecSync {cmd:?} in {id}"), e))?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// ContainerStatus (verbose): (state, exit code, the runtime's `info` JSON: pid, ...).
    pub fn status(&mut self, id: &str) -> Result<(i32, i32, serde_json::Value), String> {
        let r = self
            .cri
            .rt
            .block_on(self.cri.runtime.container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            }))
            .map_err(|e| fail(&format!("ContainerStatus {id}"), e))?
            .into_inner();
        let status = r
            .status
            .ok_or_else(|| format!("CRI ContainerStatus {id}: no status"))?;
        let info = r
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok((status.state, status.exit_code, info))
    }

    /// The host pid of a running container's first process.
    pub fn pid(&mut self, id: &str) -> Result<u32, String> {
        let (_, _, info) = self.status(id)?;
        info["pid"]
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .ok_or_else(|| format!("container {id} has no pid in its status: {info}"))
    }

    /// The container's cgroup, relative to the cgroup2 root.
    pub fn container_cgroup(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup)
    }

    /// StopContainer (grace `timeout` s) then RemoveContainer.
    pub fn remove_container(&mut self, id: &str, timeout: i64) -> Result<(), String> {
        self.cri
            .rt
            .block_on(self.cri.runtime.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout,
            }))
            .map_err(|e| fail(&format!("StopContainer {id}"), e))?;
        self.cri
            .rt
            .block_on(self.cri.runtime.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            }))
            .map_err(|e| fail(&format!("RemoveContainer {id}"), e))?;
        self.containers.retain(|c| c != id);
        Ok(())
    }
}

/// One container start, as [`Pod::time_start`] measures it (ms).
#[derive(Debug, Clone, Copy)]
pub struct StartTiming {
    /// CreateContainer's round trip.
    pub create_ms: f64,
    /// From StartContainer's call until the container's process runs its binary.
    pub start_ms: f64,
    /// CreateContainer + StartContainer until the process runs its binary (the kubelet's
    /// view of a container start): `create_ms + start_ms`.
    pub total_ms: f64,
}

impl Pod {
    /// CreateContainer + StartContainer of `spec`, timed until the container's first process
    /// runs the binary whose file name is `binary` (its exec done and not held: not stopped
    /// by the agent), polled every 100 us through /proc; then the container is stopped and
    /// removed. Fails when it does not run within `timeout` or the runtime does not say it
    /// runs.
    pub fn time_start(
        &mut self,
        spec: &ContainerSpec,
        binary: &str,
        timeout: Duration,
    ) -> Result<StartTiming, String> {
        let t0 = Instant::now();
        let id = self.create(spec)?;
        let t1 = Instant::now();
        self.start(&id)?;
        let pid = self.pid(&id)?;
        let runs = || -> Option<()> {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            (exe.ends_with(binary) && state != 'T' && state != 't').then_some(())
        };
        while runs().is_none() {
            if t1.elapsed() > timeout {
                let _ = self.remove_container(&id, 0);
                return Err(format!(
                    "container {id} (pid {pid}) did not run {binary} within {} s of StartContainer",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let t2 = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timing = StartTiming {
            create_ms: ms(t1 - t0),
            start_ms: ms(t2 - t1),
            total_ms: ms(t2 - t0),
        };
        let (state, _, _) = self.status(&id)?;
        self.remove_container(&id, 0)?;
        if state != CONTAINER_RUNNING {
            return Err(format!(
                "container {id} ran {binary} but the runtime says its state is {state}, not running"
            ));
        }
        Ok(timing)
    }
}

/// CRI's container state `CONTAINER_RUNNING`.
pub const CONTAINER_RUNNING: i32 = 1;

fn namespaces(host_pid: bool) -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: if host_pid {
            NamespaceMode::Node as i32
        } else {
            NamespaceMode::Container as i32
        },
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for id in self.containers.clone() {
            if let Err(e) = self.remove_container(&id, 0) {
                eprintln!("warning: {e}");
            }
        }
        let id = self.id.clone();
        if let Err(e) =
            self.cri
                .rt
                .block_on(self.cri.runtime.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }))
        {
            eprintln!("warning: {}", fail(&format!("StopPodSandbox {id}"), e));
        }
        if let Err(e) = self.cri.rt.block_on(self.cri.runtime.remove_pod_sandbox(
            RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            },
        )) {
            eprintln!("warning: {}", fail(&format!("RemovePodSandbox {id}"), e));
        }
        remove_cgroup_tree(&self.cgroup);
    }
}

/// Every cgroup hierarchy's mount point (v1 controllers and v2), from mountinfo.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(" - "))
        .filter(|(_, r)| matches!(r.split_whitespace().next(), Some("cgroup" | "cgroup2")))
        .filter_map(|(l, _)| l.split_whitespace().nth(4).map(PathBuf::from))
        .collect()
}

/// Removes `rel` (relative to the cgroup roots) and everything below it, depth first, in
/// every hierarchy (the runtime leaves them behind). Retries while processes still leave.
pub fn remove_cgroup_tree(rel: &str) {
    fn rm(dir: &Path) -> bool {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path());
                }
            }
        }
        let t0 = Instant::now();
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
                Err(_) if t0.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
                    return false;
                }
            }
        }
    }
    let rel = rel.trim_start_matches('/');
    for m in cgroup_mounts() {
        rm(&m.join(rel));
    }
}

/// The test's pod cgroup parent (`/enftest-k8s-<pid>`), created in the cgroup2 tree so an agent
/// can attach to it before any pod exists; removed with everything below it (every hierarchy)
/// on drop.
pub struct PodsParent {
    pub rel: String,
    pub dir: PathBuf,
}

impl PodsParent {
    pub fn new() -> Self {
        let rel = pods_parent();
        let dir = cgroup2_mount().join(rel.trim_start_matches('/'));
        if !dir.exists() {
            fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        }
        Self { rel, dir }
    }
}

impl Default for PodsParent {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PodsParent {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.rel);
    }
}

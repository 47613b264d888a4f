//! The node's container runtime over CRI v1 (containerd, CRI-O, cri-dockerd): container id ->
//! [`PodMeta`], the way the kubelet itself asks.
//!
//! CRI never reports a service account: that comes from the API server ([`super::api`]).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    Container, ContainerFilter, ListContainersRequest, ListPodSandboxRequest, PodSandboxMetadata,
    PodSandboxStatusRequest, VersionRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::PodMeta;

/// The sockets tried, in order, when none is given (the kubelet's and crictl's defaults).
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
];

/// Labels the kubelet adds to a sandbox's labels for its own bookkeeping; they are not the
/// pod's labels (the API server does not show them), so `podLabels` never sees them.
const KUBELET_SANDBOX_LABELS: [&str; 3] = [
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
];
const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// How long one call may take before the runtime counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(
        "no container runtime answered on a CRI socket (tried: {}); give the runtime's socket \
         explicitly, and in a DaemonSet mount the host's /run (or its socket) into the agent",
        .tried.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect::<Vec<_>>().join("; ")
    )]
    NoSocket { tried: Vec<(PathBuf, String)> },
    #[error(
        "could not connect to the CRI socket {}: {reason}; check that the runtime runs and that \
         the path is the runtime's CRI socket",
        .socket.display()
    )]
    Connect { socket: PathBuf, reason: String },
    #[error(
        "CRI call {call} on {} failed: {} ({:?}); check the runtime's health (crictl --runtime-endpoint unix://{} info)",
        .socket.display(), .status.message(), .status.code(), .socket.display()
    )]
    Call {
        socket: PathBuf,
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

/// Where to find the runtime's socket.
#[derive(Debug, Clone, Default)]
pub struct SocketConfig {
    /// A socket path that wins over discovery (taken as is, not under `host_root`).
    pub explicit: Option<PathBuf>,
    /// Where the host's root is mounted (a DaemonSet's `/host`); the default sockets are looked
    /// up under it.
    pub host_root: Option<PathBuf>,
}

impl SocketConfig {
    /// The sockets to try, in order.
    pub fn candidates(&self) -> Vec<PathBuf> {
        if let Some(p) = &self.explicit {
            return vec![p.clone()];
        }
        DEFAULT_SOCKETS
            .iter()
            .map(|s| match &self.host_root {
                Some(root) => root.join(s.trim_start_matches('/')),
                None => PathBuf::from(s),
            })
            .collect()
    }
}

/// A connected CRI runtime service.
#[derive(Debug, Clone)]
pub struct CriClient {
    socket: PathBuf,
    runtime: String,
    rt: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the first socket of `config` that answers a `Version` call.
    pub async fn connect(config: &SocketConfig) -> Result<Self, CriError> {
        let mut tried = Vec::new();
        for socket in config.candidates() {
            match Self::connect_to(&socket).await {
                Ok(c) => return Ok(c),
                Err(e) if config.explicit.is_some() => return Err(e),
                Err(e) => tried.push((socket, short_reason(&e))),
            }
        }
        Err(CriError::NoSocket { tried })
    }

    /// Connects to `socket` and checks that it answers as a CRI v1 runtime.
    pub async fn connect_to(socket: &Path) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        let connect_err = |reason: String| CriError::Connect {
            socket: socket.to_path_buf(),
            reason,
        };
        if !socket.exists() {
            return Err(connect_err("no such file".into()));
        }
        // The URI is never used: the connector always dials the socket.
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|e| connect_err(error_chain(&e)))?;
        let mut rt = RuntimeServiceClient::new(channel);
        let v = rt
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|s| call_err(socket, "Version", s))?
            .into_inner();
        Ok(Self {
            socket: socket.to_path_buf(),
            runtime: format!("{} {}", v.runtime_name, v.runtime_version),
            rt,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime's name and version, as it reports them (`containerd v1.6.20`).
    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// The pod metadata of one container; `None` when the runtime does not know the container
    /// (or no longer knows its sandbox). A sandbox id (the `pause` container's cgroup) is not a
    /// container to CRI and gives `None` too; no pod process runs there.
    pub async fn container(&self, id: &str) -> Result<Option<PodMeta>, CriError> {
        let mut rt = self.rt.clone();
        let containers = rt
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    id: id.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| call_err(&self.socket, "ListContainers", s))?
            .into_inner()
            .containers;
        // The filter may match by prefix; only the exact id counts.
        let Some(c) = containers.into_iter().find(|c| c.id == id) else {
            return Ok(None);
        };
        let sandbox = match rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: c.pod_sandbox_id.clone(),
                verbose: false,
            })
            .await
        {
            Ok(r) => r.into_inner().status,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(call_err(&self.socket, "PodSandboxStatus", s)),
        };
        let Some(sandbox) = sandbox else {
            return Ok(None);
        };
        Ok(Some(pod_meta(
            &c,
            sandbox.metadata.as_ref(),
            &sandbox.labels,
        )))
    }

    /// The pod metadata of a pod sandbox id (the `pause` process's cgroup), with an empty
    /// container name; `None` when the runtime does not know the sandbox.
    pub async fn sandbox(&self, id: &str) -> Result<Option<PodMeta>, CriError> {
        let mut rt = self.rt.clone();
        let status = match rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await
        {
            Ok(r) => r.into_inner().status,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(call_err(&self.socket, "PodSandboxStatus", s)),
        };
        // The id filter matches by prefix in some runtimes: only the exact id counts.
        Ok(status
            .filter(|st| st.id == id)
            .map(|st| pod_meta(&Container::default(), st.metadata.as_ref(), &st.labels)))
    }

    /// Every container the runtime knows with its pod's metadata (the start-up sweep);
    /// containers whose sandbox is gone are left out.
    pub async fn list(&self) -> Result<Vec<(String, PodMeta)>, CriError> {
        let mut rt = self.rt.clone();
        let sandboxes = rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| call_err(&self.socket, "ListPodSandbox", s))?
            .into_inner()
            .items;
        let containers = rt
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(|s| call_err(&self.socket, "ListContainers", s))?
            .into_inner()
            .containers;
        Ok(join(&containers, &sandboxes))
    }
}

/// Joins containers to their sandboxes (pure; [`CriClient::list`]'s logic).
fn join(containers: &[Container], sandboxes: &[k8s_cri::v1::PodSandbox]) -> Vec<(String, PodMeta)> {
    let by_id: HashMap<&str, &k8s_cri::v1::PodSandbox> =
        sandboxes.iter().map(|s| (s.id.as_str(), s)).collect();
    containers
        .iter()
        .filter_map(|c| {
            let sb = by_id.get(c.pod_sandbox_id.as_str())?;
            Some((c.id.clone(), pod_meta(c, sb.metadata.as_ref(), &sb.labels)))
        })
        .collect()
}

/// [`PodMeta`] from a CRI container and its sandbox's metadata and labels (pure).
///
/// The sandbox's metadata names the pod; the container's `io.kubernetes.pod.*` labels stand in
/// where a runtime leaves it empty. The pod's labels are the sandbox's labels without the
/// kubelet's bookkeeping keys, i.e. the labels the API server shows for the pod.
pub fn pod_meta(
    c: &Container,
    sandbox: Option<&PodSandboxMetadata>,
    sandbox_labels: &HashMap<String, String>,
) -> PodMeta {
    let from_labels = |key: &str| c.labels.get(key).cloned().unwrap_or_default();
    let or_label = |v: Option<&String>, key: &str| match v {
        Some(v) if !v.is_empty() => v.clone(),
        _ => from_labels(key),
    };
    let labels: BTreeMap<String, String> = sandbox_labels
        .iter()
        .filter(|(k, _)| !KUBELET_SANDBOX_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    PodMeta {
        namespace: or_label(sandbox.map(|m| &m.namespace), "io.kubernetes.pod.namespace"),
        pod_name: or_label(sandbox.map(|m| &m.name), "io.kubernetes.pod.name"),
        pod_uid: or_label(sandbox.map(|m| &m.uid), "io.kubernetes.pod.uid"),
        labels,
        container: or_label(c.metadata.as_ref().map(|m| &m.name), CONTAINER_NAME_LABEL),
        service_account: None,
    }
}

fn call_err(socket: &Path, call: &'static str, status: tonic::Status) -> CriError {
    CriError::Call {
        socket: socket.to_path_buf(),
        call,
        status: Box::new(status),
    }
}

fn short_reason(e: &CriError) -> String {
    match e {
        CriError::Connect { reason, .. } => reason.clone(),
        CriError::Call { call, status, .. } => format!("{call}: {}", status.message()),
        CriError::NoSocket { .. } => e.to_string(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::{ContainerMetadata, PodSandbox};

    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A container and sandbox as the kubelet creates them (labels as kubelet's
    /// `newPodLabels` and `newContainerLabels` write them).
    fn kubelet_pair() -> (Container, PodSandbox) {
        let c = Container {
            id: "c1".into(),
            pod_sandbox_id: "s1".into(),
            metadata: Some(ContainerMetadata {
                name: "api".into(),
                attempt: 0,
            }),
            labels: map(&[
                ("io.kubernetes.container.name", "api"),
                ("io.kubernetes.pod.name", "api-7d9f"),
                ("io.kubernetes.pod.namespace", "payments"),
                (
                    "io.kubernetes.pod.uid",
                    "1234abcd-5678-90ab-cdef-1234567890ab",
                ),
            ]),
            ..Default::default()
        };
        let s = PodSandbox {
            id: "s1".into(),
            metadata: Some(PodSandboxMetadata {
                name: "api-7d9f".into(),
                uid: "1234abcd-5678-90ab-cdef-1234567890ab".into(),
                namespace: "payments".into(),
                attempt: 0,
            }),
            labels: map(&[
                ("app", "api"),
                ("tier", "backend"),
                ("io.kubernetes.pod.name", "api-7d9f"),
                ("io.kubernetes.pod.namespace", "payments"),
                (
                    "io.kubernetes.pod.uid",
                    "1234abcd-5678-90ab-cdef-1234567890ab",
                ),
            ]),
            ..Default::default()
        };
        (c, s)
    }

    fn want() -> PodMeta {
        PodMeta {
            namespace: "payments".into(),
            pod_name: "api-7d9f".into(),
            pod_uid: "1234abcd-5678-90ab-cdef-1234567890ab".into(),
            labels: [("app", "api"), ("tier", "backend")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            container: "api".into(),
            service_account: None,
        }
    }

    #[test]
    fn kubelet_shaped_container_gives_the_pod_and_its_own_labels() {
        let (c, s) = kubelet_pair();
        assert_eq!(pod_meta(&c, s.metadata.as_ref(), &s.labels), want());
    }

    #[test]
    fn container_labels_stand_in_for_missing_metadata() {
        let (mut c, s) = kubelet_pair();
        c.metadata = None;
        assert_eq!(pod_meta(&c, None, &s.labels), want());
        // Empty metadata fields count as missing too.
        let empty = PodSandboxMetadata::default();
        assert_eq!(pod_meta(&c, Some(&empty), &s.labels), want());
    }

    #[test]
    fn a_user_label_that_looks_like_bookkeeping_is_kept_unless_the_kubelet_owns_it() {
        let (c, mut s) = kubelet_pair();
        s.labels
            .insert("io.kubernetes.team".into(), "payments".into());
        let m = pod_meta(&c, s.metadata.as_ref(), &s.labels);
        assert_eq!(
            m.labels.get("io.kubernetes.team").map(String::as_str),
            Some("payments")
        );
        assert!(!m.labels.contains_key("io.kubernetes.pod.uid"));
    }

    #[test]
    fn list_joins_containers_to_sandboxes_and_drops_orphans() {
        let (c, s) = kubelet_pair();
        let orphan = Container {
            id: "c2".into(),
            pod_sandbox_id: "gone".into(),
            ..c.clone()
        };
        let got = join(&[c, orphan], &[s]);
        assert_eq!(got, vec![("c1".to_owned(), want())]);
    }

    #[test]
    fn socket_discovery_order() {
        let none = SocketConfig::default();
        assert_eq!(
            none.candidates(),
            DEFAULT_SOCKETS.map(PathBuf::from).to_vec()
        );
        let host = SocketConfig {
            explicit: None,
            host_root: Some("/host".into()),
        };
        assert_eq!(
            host.candidates(),
            vec![
                PathBuf::from("/host/run/containerd/containerd.sock"),
                PathBuf::from("/host/run/crio/crio.sock"),
                PathBuf::from("/host/var/run/cri-dockerd.sock"),
            ]
        );
        let explicit = SocketConfig {
            explicit: Some("/tmp/x.sock".into()),
            host_root: Some("/host".into()),
        };
        assert_eq!(explicit.candidates(), vec![PathBuf::from("/tmp/x.sock")]);
    }

    #[tokio::test]
    async fn no_socket_names_every_path_tried() {
        let dir = std::env::temp_dir().join(format!("enf-cri-none-{}", std::process::id()));
        let cfg = SocketConfig {
            explicit: None,
            host_root: Some(dir.clone()),
        };
        let err = CriClient::connect(&cfg).await.unwrap_err().to_string();
        for p in cfg.candidates() {
            assert!(err.contains(&p.display().to_string()), "{err}");
        }
        assert!(err.contains("no such file"), "{err}");
    }

    #[tokio::test]
    async fn a_socket_that_is_not_a_cri_runtime_is_a_clear_error() {
        // A unix socket that accepts and closes: not a gRPC server.
        let dir = std::env::temp_dir().join(format!("enf-cri-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("bad.sock");
        let _ = std::fs::remove_file(&sock);
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let cfg = SocketConfig {
            explicit: Some(sock.clone()),
            host_root: None,
        };
        let err = CriClient::connect(&cfg).await.unwrap_err().to_string();
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        // Whether the handshake or the first call fails, the message names the socket.
        assert!(err.contains(&sock.display().to_string()), "{err}");
    }
}

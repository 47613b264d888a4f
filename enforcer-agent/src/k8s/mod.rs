//! Kubernetes pod metadata as an attribute of a cgroup (the tetragon shape: the kernel only
//! ever sees the cgroup id and a small class number; the pod stays in user space).
//!
//! Data path: a process's cgroup path -> container id (the cgroup path shapes of the runtimes)
//! -> [`PodMeta`] from the node's container runtime (CRI) and the API server -> the `k8s:`
//! selectors of the policy fold into the cgroup's class.

use std::collections::BTreeMap;

/// What the agent knows of the pod and container a cgroup belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub pod_name: String,
    /// The pod's UID as the API server spells it (dashes, not the systemd driver's underscores).
    pub pod_uid: String,
    pub labels: BTreeMap<String, String>,
    /// The container's name in the pod spec (`io.kubernetes.container.name`).
    pub container: String,
    /// Only the API server knows it (CRI never reports it); `None` until it is known, and then
    /// no `serviceAccount` selector holds.
    pub service_account: Option<String>,
}

/// Where the agent looks for pod metadata (`run` flags).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The container runtime's CRI socket (`--cri-socket`); `None`: found automatically.
    pub cri_socket: Option<std::path::PathBuf>,
    /// This node's name (`--kube-node`, from the downward API): turns on the API-server pod
    /// watch for the pods of this node.
    pub kube_node: Option<String>,
    /// The API server's URL (`--kube-api`); `None`: the in-cluster configuration.
    pub kube_api: Option<String>,
}

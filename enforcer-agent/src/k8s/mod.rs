//! Kubernetes pod metadata as an attribute of a cgroup (the tetragon shape: the kernel only
//! ever sees the cgroup id and a small class number; the pod stays in user space).
//!
//! Data path: a process's cgroup path -> container id (the cgroup path shapes of the runtimes)
//! -> [`PodMeta`] from the node's container runtime (CRI) and the API server -> the `k8s:`
//! selectors of the policy fold into the cgroup's class.

pub mod api;
pub mod cgroup_path;
pub mod cri;
pub mod feed;

use std::collections::{BTreeMap, HashMap};

use api::{ApiPod, PodEvent};

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

/// What both sources know, merged by container id and pod UID (pure: the caller feeds it what
/// the CRI and the API watch report, and asks it per container).
///
/// - CRI ([`cri::CriClient`]) maps a container id to its pod (namespace, name, UID, labels at the
///   pod's start) and its container name; it is the first to know a new container.
/// - The API server ([`api::spawn`]) adds the service account and keeps labels current; its pod
///   statuses also map container ids to names, so a container the CRI could not be asked about
///   still resolves once the kubelet has reported it.
///
/// Where both know a pod, the API server's namespace, name and labels win (they are newer).
#[derive(Debug, Default)]
pub struct PodDirectory {
    /// Container id -> what the CRI said of it.
    cri: HashMap<String, PodMeta>,
    /// Pod UID -> what the API server says of it.
    api: HashMap<String, ApiPod>,
    /// Container id -> pod UID, from the API server's container statuses.
    api_containers: HashMap<String, String>,
}

impl PodDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records what the CRI said of a container.
    pub fn insert_container(&mut self, container_id: &str, meta: PodMeta) {
        self.cri.insert(container_id.to_owned(), meta);
    }

    /// Forgets one container (its cgroup is gone).
    pub fn remove_container(&mut self, container_id: &str) {
        self.cri.remove(container_id);
        self.api_containers.remove(container_id);
    }

    /// Applies one API watch event; returns the container ids whose metadata may have changed
    /// (on an update: the pod's known containers, to re-class; on a deletion: the containers
    /// that left the directory, whose cgroups leave the maps).
    pub fn apply_event(&mut self, event: PodEvent) -> Vec<String> {
        match event {
            PodEvent::Applied(pod) => self.apply_pod(pod),
            PodEvent::Deleted { uid } => self.delete_pod(&uid),
        }
    }

    /// Records the API server's view of a pod; returns the pod's known container ids.
    pub fn apply_pod(&mut self, pod: ApiPod) -> Vec<String> {
        let uid = pod.uid.clone();
        for (id, _) in &pod.containers {
            self.api_containers.insert(id.clone(), uid.clone());
        }
        self.api.insert(uid.clone(), pod);
        self.containers_of(&uid)
    }

    /// Forgets a deleted pod and every container of it; returns those container ids (sorted).
    pub fn delete_pod(&mut self, uid: &str) -> Vec<String> {
        let gone = self.containers_of(uid);
        self.api.remove(uid);
        for id in &gone {
            self.cri.remove(id);
            self.api_containers.remove(id);
        }
        gone
    }

    /// The container ids known for a pod (sorted, no duplicates).
    pub fn containers_of(&self, uid: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .cri
            .iter()
            .filter(|(_, m)| m.pod_uid == uid)
            .map(|(id, _)| id.clone())
            .chain(
                self.api_containers
                    .iter()
                    .filter(|(_, u)| *u == uid)
                    .map(|(id, _)| id.clone()),
            )
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The pod of a cgroup of a kubelet's pod tree, when known.
    pub fn for_cgroup(&self, cgroup_path: &str) -> Option<PodMeta> {
        let c = cgroup_path::parse(cgroup_path)?;
        c.pod_uid.as_ref()?;
        self.meta(&c.id)
    }

    /// Keeps only the containers for which `keep(id)` holds (the others' cgroups are gone).
    pub fn retain_containers(&mut self, keep: impl Fn(&str) -> bool) {
        self.cri.retain(|id, _| keep(id));
        self.api_containers.retain(|id, _| keep(id));
    }

    /// How many containers the directory knows.
    pub fn len(&self) -> usize {
        let mut n = self.cri.len();
        n += self
            .api_containers
            .keys()
            .filter(|id| !self.cri.contains_key(*id))
            .count();
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The merged metadata of a container; `None` when neither source knows it.
    pub fn meta(&self, container_id: &str) -> Option<PodMeta> {
        let cri = self.cri.get(container_id);
        let uid = cri
            .map(|m| m.pod_uid.as_str())
            .filter(|u| !u.is_empty())
            .or_else(|| self.api_containers.get(container_id).map(String::as_str));
        let api = uid.and_then(|u| self.api.get(u));
        match (cri, api) {
            (Some(c), None) => Some(c.clone()),
            (cri, Some(a)) => {
                let api_name = a
                    .containers
                    .iter()
                    .find(|(id, _)| id == container_id)
                    .map(|(_, n)| n.clone());
                let container = cri
                    .map(|c| c.container.clone())
                    .filter(|n| !n.is_empty())
                    .or(api_name)?;
                let or_cri = |v: &str, f: fn(&PodMeta) -> &String| {
                    if v.is_empty() {
                        cri.map(|c| f(c).clone()).unwrap_or_default()
                    } else {
                        v.to_owned()
                    }
                };
                Some(PodMeta {
                    namespace: or_cri(&a.namespace, |c| &c.namespace),
                    pod_name: or_cri(&a.name, |c| &c.pod_name),
                    pod_uid: a.uid.clone(),
                    labels: a.labels.clone(),
                    container,
                    service_account: a.service_account.clone(),
                })
            }
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "c1";
    const C2: &str = "c2";

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    fn cri_meta(container: &str) -> PodMeta {
        PodMeta {
            namespace: "payments".into(),
            pod_name: "api-1".into(),
            pod_uid: "uid-1".into(),
            labels: labels(&[("app", "api"), ("track", "stable")]),
            container: container.into(),
            service_account: None,
        }
    }

    fn api_pod(containers: &[(&str, &str)]) -> ApiPod {
        ApiPod {
            uid: "uid-1".into(),
            namespace: "payments".into(),
            name: "api-1".into(),
            service_account: Some("api".into()),
            labels: labels(&[("app", "api"), ("track", "canary")]),
            containers: containers
                .iter()
                .map(|(i, n)| ((*i).into(), (*n).into()))
                .collect(),
        }
    }

    #[test]
    fn cri_alone_gives_the_pod_without_a_service_account() {
        let mut d = PodDirectory::new();
        assert_eq!(d.meta(C1), None);
        d.insert_container(C1, cri_meta("api"));
        assert_eq!(d.meta(C1), Some(cri_meta("api")));
    }

    #[test]
    fn api_adds_the_service_account_and_its_newer_labels() {
        let mut d = PodDirectory::new();
        d.insert_container(C1, cri_meta("api"));
        d.insert_container(C2, cri_meta("sidecar"));
        assert_eq!(d.apply_event(PodEvent::Applied(api_pod(&[]))), vec![C1, C2]);
        let m = d.meta(C1).unwrap();
        assert_eq!(m.service_account.as_deref(), Some("api"));
        assert_eq!(m.labels, labels(&[("app", "api"), ("track", "canary")]));
        assert_eq!(m.container, "api");
        assert_eq!(d.meta(C2).unwrap().container, "sidecar");
    }

    #[test]
    fn api_alone_resolves_containers_it_has_statuses_for() {
        let mut d = PodDirectory::new();
        assert_eq!(d.apply_pod(api_pod(&[(C1, "api")])), vec![C1]);
        let m = d.meta(C1).unwrap();
        assert_eq!((m.pod_uid.as_str(), m.container.as_str()), ("uid-1", "api"));
        assert_eq!(m.service_account.as_deref(), Some("api"));
        // A container the kubelet has not reported yet is unknown: no guessed container name.
        assert_eq!(d.meta(C2), None);
    }

    #[test]
    fn pod_deletion_removes_every_container_of_it() {
        let mut d = PodDirectory::new();
        d.insert_container(C1, cri_meta("api"));
        d.apply_pod(api_pod(&[(C2, "sidecar")]));
        let other = PodMeta {
            pod_uid: "uid-2".into(),
            ..cri_meta("api")
        };
        d.insert_container("c3", other.clone());
        assert_eq!(
            d.apply_event(PodEvent::Deleted {
                uid: "uid-1".into()
            }),
            vec![C1, C2]
        );
        assert_eq!((d.meta(C1), d.meta(C2)), (None, None));
        assert_eq!(d.meta("c3"), Some(other));
        assert_eq!(d.delete_pod("uid-1"), Vec::<String>::new());
    }

    #[test]
    fn a_removed_container_is_forgotten_but_its_pod_stays() {
        let mut d = PodDirectory::new();
        d.insert_container(C1, cri_meta("api"));
        d.insert_container(C2, cri_meta("sidecar"));
        d.apply_pod(api_pod(&[]));
        d.remove_container(C1);
        assert_eq!(d.meta(C1), None);
        assert_eq!(d.containers_of("uid-1"), vec![C2]);
    }
}

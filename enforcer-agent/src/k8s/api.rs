//! The API server as a pod metadata source: a watch of the pods scheduled on this node
//! (`spec.nodeName=NODE`), which adds what CRI cannot say (the service account) and keeps labels
//! current (labels change on a running pod; the runtime keeps the ones of the pod's start).
//!
//! [`spawn`] starts the watch as a task and hands back a channel of [`PodEvent`]s and a
//! [`watch`] of the [`ApiStatus`], both easy to drive from a `tokio::select!` loop. An unreachable
//! API server never ends the task: kube's watcher retries with exponential backoff and the
//! status says `NotConnected` (with the last error) until a list succeeds again.

use std::collections::{BTreeMap, HashSet};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// What the API server says of one pod on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `spec.serviceAccountName` (`default` when the pod names none, as admission sets it).
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `(container id without the runtime scheme, container name)` from the pod's statuses
    /// (init, regular and ephemeral containers), for containers the kubelet already reported.
    pub containers: Vec<(String, String)>,
}

/// A change to the node's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// The pod was added or changed (or listed at (re)connection).
    Applied(ApiPod),
    /// The pod is gone (deleted, or absent from a relist after a reconnection).
    Deleted { uid: String },
}

/// Whether the pod watch is in sync with the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiStatus {
    /// Not listed yet.
    Connecting,
    /// Listed, and watching.
    Connected,
    /// The last attempt failed; retrying with backoff. `serviceAccount` selectors cannot match
    /// pods whose account is not known yet.
    NotConnected { error: String },
}

impl std::fmt::Display for ApiStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connecting => f.write_str("connecting"),
            Self::Connected => f.write_str("connected"),
            Self::NotConnected { error } => write!(f, "not connected (retrying): {error}"),
        }
    }
}

/// Where the API server is.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The node whose pods to watch (the DaemonSet passes `spec.nodeName` down).
    pub node_name: String,
    /// An explicit server URL (plain HTTP for tests, no credentials); `None` = in-cluster config
    /// (the pod's service account token and `KUBERNETES_SERVICE_HOST`).
    pub server: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no in-cluster Kubernetes API configuration ({0}); run the agent in a pod with a service \
         account, or give the API server's URL, or run without the API server (no serviceAccount \
         selectors)"
    )]
    InCluster(#[from] kube::config::InClusterError),
    #[error("bad Kubernetes API server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("could not build a Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
    #[error("the node name for the pod watch is empty; set it from the pod's spec.nodeName")]
    NoNode,
}

/// The running pod watch.
#[derive(Debug)]
pub struct ApiSource {
    pub events: mpsc::Receiver<PodEvent>,
    pub status: watch::Receiver<ApiStatus>,
    task: JoinHandle<()>,
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching the pods of `config.node_name`. Must run inside a tokio runtime.
pub fn spawn(config: &ApiConfig) -> Result<ApiSource, ApiError> {
    if config.node_name.is_empty() {
        return Err(ApiError::NoNode);
    }
    let kube_config =
        match &config.server {
            None => Config::incluster()?,
            Some(url) => Config::new(url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
                ApiError::Url {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?),
        };
    let client = Client::try_from(kube_config)?;
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));
    let (tx, events) = mpsc::channel(256);
    let (status_tx, status) = watch::channel(ApiStatus::Connecting);
    let task = tokio::spawn(run(api, wc, tx, status_tx));
    Ok(ApiSource {
        events,
        status,
        task,
    })
}

async fn run(
    api: Api<Pod>,
    wc: watcher::Config,
    tx: mpsc::Sender<PodEvent>,
    status: watch::Sender<ApiStatus>,
) {
    let mut stream = std::pin::pin!(watcher(api, wc).default_backoff());
    // Pods the consumer has been told of; a relist drops the ones it no longer shows.
    let mut known: HashSet<String> = HashSet::new();
    let mut relisted: HashSet<String> = HashSet::new();
    while let Some(item) = stream.next().await {
        let out = match item {
            Err(e) => {
                status.send_replace(ApiStatus::NotConnected {
                    error: error_chain(&e),
                });
                continue;
            }
            Ok(watcher::Event::Init) => {
                relisted.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let Some(p) = api_pod(&pod) else { continue };
                relisted.insert(p.uid.clone());
                known.insert(p.uid.clone());
                vec![PodEvent::Applied(p)]
            }
            Ok(watcher::Event::InitDone) => {
                status.send_replace(ApiStatus::Connected);
                let gone: Vec<String> = known.difference(&relisted).cloned().collect();
                known.retain(|u| relisted.contains(u));
                gone.into_iter()
                    .map(|uid| PodEvent::Deleted { uid })
                    .collect()
            }
            Ok(watcher::Event::Apply(pod)) => {
                let Some(p) = api_pod(&pod) else { continue };
                known.insert(p.uid.clone());
                vec![PodEvent::Applied(p)]
            }
            Ok(watcher::Event::Delete(pod)) => {
                let Some(uid) = pod.metadata.uid else {
                    continue;
                };
                known.remove(&uid);
                vec![PodEvent::Deleted { uid }]
            }
        };
        for ev in out {
            if tx.send(ev).await.is_err() {
                return; // The consumer is gone.
            }
        }
    }
}

/// The facts of a Pod object (pure); `None` for an object without a UID.
pub fn api_pod(pod: &Pod) -> Option<ApiPod> {
    let md = &pod.metadata;
    let uid = md.uid.clone().filter(|u| !u.is_empty())?;
    let mut containers = Vec::new();
    if let Some(st) = &pod.status {
        for list in [
            &st.init_container_statuses,
            &st.container_statuses,
            &st.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            for cs in list {
                if let Some(id) = cs.container_id.as_deref().and_then(strip_scheme) {
                    containers.push((id.to_owned(), cs.name.clone()));
                }
            }
        }
    }
    Some(ApiPod {
        uid,
        namespace: md.namespace.clone().unwrap_or_default(),
        name: md.name.clone().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty()),
        labels: md.labels.clone().unwrap_or_default(),
        containers,
    })
}

/// `containerd://ID`, `cri-o://ID`, `docker://ID` -> `ID`.
fn strip_scheme(s: &str) -> Option<&str> {
    let id = s.split_once("://").map_or(s, |(_, id)| id);
    (!id.is_empty()).then_some(id)
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
    //! The watch against recorded API objects, served by the test over HTTP on 127.0.0.1 the way
    //! an API server answers kube's LIST and WATCH requests.

    use std::{
        convert::Infallible,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
    use hyper::{
        Request, Response,
        body::{Bytes, Frame},
    };
    use hyper_util::rt::TokioIo;
    use serde_json::json;

    use super::*;

    const NODE: &str = "node-a";

    /// A Pod as the API server returns it (trimmed to the fields the agent reads and a few more).
    fn pod(
        uid: &str,
        name: &str,
        sa: &str,
        labels: serde_json::Value,
        cid: Option<&str>,
    ) -> serde_json::Value {
        let mut p = json!({
            "metadata": {
                "name": name, "namespace": "payments", "uid": uid,
                "resourceVersion": "100", "labels": labels,
                "creationTimestamp": "2026-12-01T06:00:00Z"
            },
            "spec": {
                "nodeName": NODE, "serviceAccountName": sa, "serviceAccount": sa,
                "containers": [{"name": "api", "image": "registry.invalid/api:1"}]
            },
            "status": {"phase": "Pending"}
        });
        if let Some(cid) = cid {
            p["status"] = json!({
                "phase": "Running",
                "containerStatuses": [{
                    "name": "api", "ready": true, "restartCount": 0, "image": "registry.invalid/api:1",
                    "imageID": "", "containerID": format!("containerd://{cid}"), "started": true,
                    "state": {"running": {"startedAt": "2026-12-01T06:00:01Z"}}
                }]
            });
        }
        p
    }

    fn typed(mut p: serde_json::Value) -> serde_json::Value {
        p["apiVersion"] = json!("v1");
        p["kind"] = json!("Pod");
        p
    }

    type Body = BoxBody<Bytes, Infallible>;

    /// Serves LIST with pods A and B, the first WATCH with MODIFIED A, ADDED C, DELETED B and
    /// then a watch that stays open; records every request's path and query.
    async fn serve(listener: tokio::net::TcpListener, seen: Arc<Mutex<Vec<String>>>) {
        let watches = Arc::new(Mutex::new(0u32));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let watches = watches.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let watches = watches.clone();
                    async move {
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(pq.clone());
                        Ok::<_, Infallible>(answer(&pq, &watches))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn answer(pq: &str, watches: &Mutex<u32>) -> Response<Body> {
        let json_response = |body: Body| {
            Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap()
        };
        if !pq.starts_with("/api/v1/pods") {
            return Response::builder()
                .status(404)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap();
        }
        if !pq.contains("watch=true") {
            let list = json!({
                "apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "100"},
                "items": [
                    pod("uid-a", "api-a", "api", json!({"app": "api", "track": "stable"}), Some(&"a".repeat(64))),
                    pod("uid-b", "api-b", "api", json!({"app": "api"}), None),
                ]
            });
            return json_response(Full::new(Bytes::from(list.to_string())).boxed());
        }
        let n = {
            let mut w = watches.lock().unwrap();
            *w += 1;
            *w
        };
        let events = if n == 1 {
            [
                (
                    "MODIFIED",
                    typed(pod(
                        "uid-a",
                        "api-a",
                        "api",
                        json!({"app": "api", "track": "canary"}),
                        Some(&"a".repeat(64)),
                    )),
                ),
                (
                    "ADDED",
                    typed(pod(
                        "uid-c",
                        "worker-c",
                        "worker",
                        json!({"app": "worker"}),
                        None,
                    )),
                ),
                (
                    "DELETED",
                    typed(pod("uid-b", "api-b", "api", json!({"app": "api"}), None)),
                ),
            ]
            .into_iter()
            .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
            .collect::<String>()
        } else {
            String::new()
        };
        // The events, then a stream that stays open (as a watch does until its timeout).
        let head =
            futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from(events)))]);
        let body = StreamBody::new(head.chain(futures_util::stream::pending()));
        json_response(http_body_util::BodyExt::boxed(body))
    }

    async fn next_event(src: &mut ApiSource) -> PodEvent {
        tokio::time::timeout(Duration::from_secs(20), src.events.recv())
            .await
            .expect("no pod event within 20 s")
            .expect("the watch task ended")
    }

    async fn wait_status(src: &mut ApiSource, pred: impl Fn(&ApiStatus) -> bool) -> ApiStatus {
        let r = tokio::time::timeout(Duration::from_secs(20), src.status.wait_for(|s| pred(s)))
            .await
            .expect("status did not change within 20 s");
        r.expect("the watch task ended").clone()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[tokio::test]
    async fn watch_yields_updates_and_deletions_and_retries_until_the_server_answers() {
        // A port with nothing on it yet: the watch must report it and keep retrying.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let mut src = spawn(&ApiConfig {
            node_name: NODE.into(),
            server: Some(format!("http://{addr}")),
        })
        .unwrap();
        let st = wait_status(&mut src, |s| matches!(s, ApiStatus::NotConnected { .. })).await;
        assert!(st.to_string().starts_with("not connected"), "{st}");

        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(serve(listener, seen.clone()));

        let a = ApiPod {
            uid: "uid-a".into(),
            namespace: "payments".into(),
            name: "api-a".into(),
            service_account: Some("api".into()),
            labels: labels(&[("app", "api"), ("track", "stable")]),
            containers: vec![("a".repeat(64), "api".into())],
        };
        let b = ApiPod {
            uid: "uid-b".into(),
            name: "api-b".into(),
            labels: labels(&[("app", "api")]),
            containers: vec![],
            ..a.clone()
        };
        assert_eq!(next_event(&mut src).await, PodEvent::Applied(a.clone()));
        assert_eq!(next_event(&mut src).await, PodEvent::Applied(b));
        wait_status(&mut src, |s| *s == ApiStatus::Connected).await;
        let a2 = ApiPod {
            labels: labels(&[("app", "api"), ("track", "canary")]),
            ..a
        };
        assert_eq!(next_event(&mut src).await, PodEvent::Applied(a2));
        let c = ApiPod {
            uid: "uid-c".into(),
            namespace: "payments".into(),
            name: "worker-c".into(),
            service_account: Some("worker".into()),
            labels: labels(&[("app", "worker")]),
            containers: vec![],
        };
        assert_eq!(next_event(&mut src).await, PodEvent::Applied(c));
        assert_eq!(
            next_event(&mut src).await,
            PodEvent::Deleted {
                uid: "uid-b".into()
            }
        );

        let seen = seen.lock().unwrap().clone();
        server.abort();
        let selector = |q: &String| {
            q.replace("%3D", "=")
                .contains(&format!("fieldSelector=spec.nodeName={NODE}"))
        };
        let lists: Vec<_> = seen.iter().filter(|q| !q.contains("watch=true")).collect();
        let watches: Vec<_> = seen.iter().filter(|q| q.contains("watch=true")).collect();
        assert!(!lists.is_empty() && !watches.is_empty(), "{seen:?}");
        assert!(
            lists.iter().chain(&watches).all(|q| selector(q)),
            "a request without the node's field selector: {seen:?}"
        );
        assert!(watches[0].contains("resourceVersion=100"), "{seen:?}");
    }

    #[test]
    fn pod_without_uid_is_ignored_and_schemes_are_stripped() {
        let p: Pod = serde_json::from_value(pod("", "x", "", json!({}), Some("abc"))).unwrap();
        assert_eq!(api_pod(&p), None);
        let p: Pod = serde_json::from_value(pod("u", "x", "", json!({}), Some("abc"))).unwrap();
        let got = api_pod(&p).unwrap();
        assert_eq!(got.containers, vec![("abc".into(), "api".into())]);
        assert_eq!(got.service_account, None);
        assert_eq!(strip_scheme("cri-o://abc"), Some("abc"));
        assert_eq!(strip_scheme("containerd://"), None);
    }

    #[test]
    fn empty_node_name_is_refused() {
        let err = spawn(&ApiConfig {
            node_name: String::new(),
            server: Some("http://127.0.0.1:1".into()),
        })
        .unwrap_err();
        assert!(err.to_string().contains("spec.nodeName"), "{err}");
    }
}

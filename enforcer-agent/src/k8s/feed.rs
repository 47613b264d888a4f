//! The pod metadata task: talks to the container runtime (CRI) and the API server off the
//! agent's event loop, and hands the loop [`PodUpdate`]s. The loop asks about one container id
//! at a time ([`PodFeed::ask`]) when a process execs in a container cgroup it has no pod for.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::api::{self, ApiConfig, ApiStatus, PodEvent};
use super::cri::{CriClient, SocketConfig};
use super::{Options, PodMeta};

/// What the task tells the event loop.
#[derive(Debug)]
pub enum PodUpdate {
    /// The runtime's answer about one container (or pod sandbox) id; `None`: it does not
    /// know the id (after retries), so no `k8s` selector holds for that cgroup.
    Container {
        id: String,
        meta: Option<PodMeta>,
    },
    /// Every container the runtime runs, listed when the task (re)connected.
    Listed(Vec<(String, PodMeta)>),
    /// The runtime socket answers (socket, runtime name and version)...
    CriUp {
        socket: String,
        runtime: String,
    },
    /// ...or does not (said once per change, not per lookup).
    CriDown {
        error: String,
    },
    /// A pod of this node changed or was deleted (API server).
    Api(PodEvent),
    ApiStatus(ApiStatus),
}

/// The running task (dropping it stops it).
pub struct PodFeed {
    ask: mpsc::UnboundedSender<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodFeed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PodFeed {
    /// Asks the runtime about a container id; the answer comes as [`PodUpdate::Container`].
    pub fn ask(&self, id: &str) {
        let _ = self.ask.send(id.to_string());
    }
}

/// How long to wait before the runtime is asked again about an id it does not know yet
/// (a container being created, a sandbox being started): about 2.5 s in all.
const NOT_YET: [u64; 8] = [5, 10, 20, 40, 80, 160, 640, 1500];
/// How long to wait before connecting to a runtime socket again.
const RECONNECT: Duration = Duration::from_secs(2);

/// Starts the task (inside a tokio runtime). With `kube_node`, also the API-server watch; an
/// API configuration that cannot be built is reported as [`PodUpdate::ApiStatus`], never fatal:
/// CRI metadata keeps working.
pub fn spawn(opts: &Options) -> (PodFeed, mpsc::Receiver<PodUpdate>) {
    let (ask, asks) = mpsc::unbounded_channel();
    let (tx, updates) = mpsc::channel(1024);
    let mut tasks = vec![tokio::spawn(cri_task(
        SocketConfig {
            explicit: opts.cri_socket.clone(),
            host_root: None,
        },
        asks,
        tx.clone(),
    ))];
    if let Some(node) = &opts.kube_node {
        let cfg = ApiConfig {
            node_name: node.clone(),
            server: opts.kube_api.clone(),
        };
        tasks.push(tokio::spawn(api_task(cfg, tx)));
    }
    (PodFeed { ask, tasks }, updates)
}

/// The containers the runtime runs, listed once before the agent's first apply (so that a
/// restart keeps every pod's identity); empty when no runtime answers within a few seconds
/// (then pods are classified as their metadata comes).
pub async fn prefetch(opts: &Options) -> Vec<(String, PodMeta)> {
    let cfg = SocketConfig {
        explicit: opts.cri_socket.clone(),
        host_root: None,
    };
    let listed = tokio::time::timeout(PREFETCH_LIMIT, async {
        let c = CriClient::connect(&cfg).await.map_err(|e| e.to_string())?;
        c.list().await.map_err(|e| e.to_string())
    })
    .await;
    match listed {
        Ok(Ok(all)) => all,
        Ok(Err(e)) => {
            tracing::info!("no pod metadata at start: {e}");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                "the container runtime did not list its containers within {} s; pods are classified as their metadata comes",
                PREFETCH_LIMIT.as_secs()
            );
            Vec::new()
        }
    }
}

const PREFETCH_LIMIT: Duration = Duration::from_secs(5);

async fn cri_task(
    cfg: SocketConfig,
    mut asks: mpsc::UnboundedReceiver<String>,
    tx: mpsc::Sender<PodUpdate>,
) {
    let mut down_said: Option<String> = None;
    loop {
        let client = match CriClient::connect(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                let error = e.to_string();
                if down_said.as_deref() != Some(error.as_str()) {
                    down_said = Some(error.clone());
                    if tx.send(PodUpdate::CriDown { error }).await.is_err() {
                        return;
                    }
                }
                // Questions asked while the runtime is down are asked again by the loop.
                while asks.try_recv().is_ok() {}
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        down_said = None;
        let up = PodUpdate::CriUp {
            socket: client.socket().display().to_string(),
            runtime: client.runtime().to_string(),
        };
        if tx.send(up).await.is_err() {
            return;
        }
        match client.list().await {
            Ok(all) => {
                if tx.send(PodUpdate::Listed(all)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(PodUpdate::CriDown {
                        error: e.to_string(),
                    })
                    .await;
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        }
        // Each question on its own task: a container still being created must not delay
        // the answer about another.
        let (failed_tx, mut failed) = mpsc::channel::<String>(1);
        loop {
            tokio::select! {
                id = asks.recv() => {
                    let Some(id) = id else { return };
                    let (c, tx, failed_tx) = (client.clone(), tx.clone(), failed_tx.clone());
                    tokio::spawn(async move {
                        match lookup(&c, &id).await {
                            Ok(meta) => {
                                let _ = tx.send(PodUpdate::Container { id, meta }).await;
                            }
                            Err(e) => {
                                let _ = failed_tx.try_send(e);
                            }
                        }
                    });
                }
                error = failed.recv() => {
                    let error = error.unwrap_or_else(|| "the runtime stopped answering".into());
                    down_said = Some(error.clone());
                    if tx.send(PodUpdate::CriDown { error }).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The pod of a container or pod sandbox id, asking again while the runtime does not know
/// it yet (its cgroup can exist, and its first process exec, before the runtime lists it).
async fn lookup(c: &CriClient, id: &str) -> Result<Option<PodMeta>, String> {
    for wait in NOT_YET {
        if let Some(m) = c.container(id).await.map_err(|e| e.to_string())? {
            return Ok(Some(m));
        }
        if let Some(m) = c.sandbox(id).await.map_err(|e| e.to_string())? {
            return Ok(Some(m));
        }
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    Ok(None)
}

async fn api_task(cfg: ApiConfig, tx: mpsc::Sender<PodUpdate>) {
    let mut src = match api::spawn(&cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx
                .send(PodUpdate::ApiStatus(ApiStatus::NotConnected {
                    error: e.to_string(),
                }))
                .await;
            return;
        }
    };
    let mut last = src.status.borrow().clone();
    let _ = tx.send(PodUpdate::ApiStatus(last.clone())).await;
    loop {
        tokio::select! {
            ev = src.events.recv() => {
                let Some(ev) = ev else { return };
                if tx.send(PodUpdate::Api(ev)).await.is_err() {
                    return;
                }
            }
            changed = src.status.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = src.status.borrow().clone();
                if now != last {
                    last = now.clone();
                    if tx.send(PodUpdate::ApiStatus(now)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

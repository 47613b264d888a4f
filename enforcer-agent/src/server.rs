//! The API server, a thin adapter: accepts connections on the unix socket, each on a task of
//! its own, reads the request (within [`REQUEST_TIMEOUT`]), hands it to the agent as a
//! [`Call`] and writes the answer back. A client that sends nothing, or reads slowly, holds
//! only its own task: the event loop sees a request once it is whole and answers it without
//! waiting on the client.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::api::{self, reply, request};

/// A client must send its request within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A reply not taken by the client within this time is abandoned.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are told to retry and closed.
const MAX_CLIENTS: usize = 64;
/// Requests waiting for the agent.
pub const QUEUE: usize = 64;

/// A whole request, for the agent to answer.
pub enum Call {
    /// `status`, `identities`, `explain`, `policy apply`: one reply.
    Ask(request::Kind, oneshot::Sender<reply::Kind>),
    /// `events`: the recent decisions (allowed ones too with `all`).
    History {
        all: bool,
        reply: oneshot::Sender<Vec<api::Decision>>,
    },
    /// `events --follow`: after the history, the connection receives each new decision.
    Follow {
        stream: std::os::unix::net::UnixStream,
        all: bool,
    },
}

/// Binds the API socket, root-only (0600). A live agent already serving it is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent already serves {}; stop it first or pass another --api-socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale API socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(l)
}

/// Accepts API connections until the task is aborted; each is served on a task of its own.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("API accept: {e}");
                // Out of descriptors, for instance: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut s = stream;
                let busy = error(format!(
                    "the agent is serving {MAX_CLIENTS} API clients already; retry"
                ));
                let _ = tokio::time::timeout(REPLY_TIMEOUT, send(&mut s, busy)).await;
            });
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            serve_one(stream, &calls).await;
            drop(permit);
        });
    }
}

/// Serves one API connection.
async fn serve_one(mut stream: UnixStream, calls: &mpsc::Sender<Call>) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            reply_with(&mut stream, error(format!("bad API request: {e:#}"))).await;
            return;
        }
        Err(_) => {
            let msg = format!(
                "no API request within {} s; closing",
                REQUEST_TIMEOUT.as_secs()
            );
            reply_with(&mut stream, error(msg)).await;
            return;
        }
    };
    let Some(kind) = req.kind else {
        reply_with(
            &mut stream,
            error("empty API request: name a command".into()),
        )
        .await;
        return;
    };
    if let request::Kind::Events(r) = kind {
        let (tx, rx) = oneshot::channel();
        if calls
            .send(Call::History {
                all: r.all,
                reply: tx,
            })
            .await
            .is_err()
        {
            return;
        }
        let Ok(history) = rx.await else {
            return;
        };
        for d in history {
            let sent =
                tokio::time::timeout(REPLY_TIMEOUT, send(&mut stream, reply::Kind::Event(d))).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
        if r.follow
            && let Ok(std) = stream.into_std()
        {
            let _ = calls
                .send(Call::Follow {
                    stream: std,
                    all: r.all,
                })
                .await;
        }
        return;
    }
    let (tx, rx) = oneshot::channel();
    if calls.send(Call::Ask(kind, tx)).await.is_err() {
        return;
    }
    if let Ok(reply) = rx.await {
        reply_with(&mut stream, reply).await;
    }
}

async fn reply_with(stream: &mut UnixStream, kind: reply::Kind) {
    let _ = tokio::time::timeout(REPLY_TIMEOUT, send(stream, kind)).await;
}

fn error(msg: String) -> reply::Kind {
    reply::Kind::Error(msg)
}

async fn read_request(s: &mut UnixStream) -> Result<api::Request> {
    let len = s.read_u32().await.context("reading the frame length")?;
    if len > api::MAX_FRAME {
        bail!(
            "frame of {len} bytes is larger than {} bytes",
            api::MAX_FRAME
        );
    }
    // Grown as bytes arrive: a length alone does not make the agent allocate it.
    let mut buf = Vec::new();
    s.take(u64::from(len))
        .read_to_end(&mut buf)
        .await
        .context("reading the frame")?;
    if buf.len() != len as usize {
        bail!("the frame ended after {} of its {len} bytes", buf.len());
    }
    <api::Request as prost::Message>::decode(buf.as_slice())
        .context("decoding the protobuf request")
}

async fn send(s: &mut UnixStream, kind: reply::Kind) -> std::io::Result<()> {
    let frame = api::frame(&api::Reply { kind: Some(kind) });
    s.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for the agent: answers every request at once.
    async fn responder(mut calls: mpsc::Receiver<Call>) {
        while let Some(call) = calls.recv().await {
            match call {
                Call::Ask(_, reply) => {
                    let _ = reply.send(reply::Kind::Status(api::Status {
                        policy_source: "answered".into(),
                        ..Default::default()
                    }));
                }
                Call::History { reply, .. } => {
                    let _ = reply.send(vec![api::Decision::default()]);
                }
                Call::Follow { .. } => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_or_slow_client_holds_up_no_one() {
        let dir = std::env::temp_dir().join(format!("enforcer-server-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let listener = bind(&path).expect("bind");
        let (tx, rx) = mpsc::channel(QUEUE);
        let server = tokio::spawn(serve(listener, tx));
        tokio::spawn(responder(rx));
        // Clients that connect and never send, and one that sends and never reads.
        let mut silent = Vec::new();
        for _ in 0..8 {
            silent.push(UnixStream::connect(&path).await.expect("connect"));
        }
        let mut unread = UnixStream::connect(&path).await.expect("connect");
        let events = api::Request {
            kind: Some(request::Kind::Events(api::EventsRequest {
                follow: false,
                all: true,
            })),
        };
        unread.write_all(&api::frame(&events)).await.expect("send");
        let p = path.clone();
        let t0 = std::time::Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            crate::client::call(&p, request::Kind::Status(api::StatusRequest {}))
        })
        .await
        .expect("client task")
        .expect("a request is answered while other clients hang");
        assert!(
            matches!(&answer, reply::Kind::Status(s) if s.policy_source == "answered"),
            "{answer:?}"
        );
        assert!(
            t0.elapsed() < REQUEST_TIMEOUT / 2,
            "answered after {:?}",
            t0.elapsed()
        );
        // A silent client is told why it is closed, after the request timeout.
        let mut s = silent.pop().expect("a silent client");
        let len = tokio::time::timeout(REQUEST_TIMEOUT * 3, s.read_u32())
            .await
            .expect("closed within the timeout")
            .expect("a reply frame");
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.expect("frame");
        let reply = <api::Reply as prost::Message>::decode(buf.as_slice()).expect("decode");
        assert!(
            matches!(&reply.kind, Some(reply::Kind::Error(m)) if m.contains("no API request")),
            "{reply:?}"
        );
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

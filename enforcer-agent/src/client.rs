//! The CLI's side of the API.

use std::{os::unix::net::UnixStream, path::Path, time::Duration};

use crate::api::{self, reply};

/// Errors of talking to the agent, one clear sentence each.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent is not running (nothing listens on {0}); start it with `enforcer-agent run`, or pass --api-socket"
    )]
    NotRunning(String),
    #[error("permission denied on {0}: the API is root-only; run this command with sudo")]
    Denied(String),
    #[error("talking to the agent on {path}: {err}")]
    Transport { path: String, err: api::ApiError },
    #[error("the agent closed the connection without an answer")]
    NoAnswer,
    #[error("{0}")]
    Agent(String),
}

/// An open connection with one request sent.
pub struct Call {
    stream: UnixStream,
    path: String,
}

impl Call {
    pub fn send(socket: &Path, req: &api::Request) -> Result<Self, ClientError> {
        let path = socket.display().to_string();
        let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::Denied(path.clone()),
            _ => ClientError::NotRunning(path.clone()),
        })?;
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        api::write_frame(&mut stream, req).map_err(|err| ClientError::Transport {
            path: path.clone(),
            err,
        })?;
        Ok(Self { stream, path })
    }

    /// The next reply; `Ok(None)` when the agent closed the stream.
    pub fn next_reply(&mut self) -> Result<Option<reply::Kind>, ClientError> {
        let r: Option<api::Reply> =
            api::read_frame(&mut self.stream).map_err(|err| ClientError::Transport {
                path: self.path.clone(),
                err,
            })?;
        match r.and_then(|r| r.kind) {
            Some(reply::Kind::Error(e)) => Err(ClientError::Agent(e)),
            other => Ok(other),
        }
    }

    /// Sets a read timeout (none: wait forever, for `events --follow`).
    pub fn read_timeout(&self, t: Option<Duration>) {
        let _ = self.stream.set_read_timeout(t);
    }
}

/// One request, one reply.
pub fn call(socket: &Path, req: api::request::Kind) -> Result<reply::Kind, ClientError> {
    call_within(socket, req, Duration::from_secs(60))
}

/// [`call`], waiting up to `timeout` for the reply (`learn --for` answers after its time).
pub fn call_within(
    socket: &Path,
    req: api::request::Kind,
    timeout: Duration,
) -> Result<reply::Kind, ClientError> {
    let mut c = Call::send(socket, &api::Request { kind: Some(req) })?;
    c.read_timeout(Some(timeout));
    c.next_reply()?.ok_or(ClientError::NoAnswer)
}

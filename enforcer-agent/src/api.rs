//! The agent's API: protobuf messages (prost) over a unix socket, each frame a 4-byte
//! big-endian length then the message. One request per connection; `events --follow` keeps
//! the connection and receives one `Reply` per decision.

use std::io::{Read, Write};

use serde::Serialize;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/enforcer/api.sock";
/// Largest frame accepted either way (a compiled 1M-rule bundle fits).
pub const MAX_FRAME: u32 = 256 << 20;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(oneof = "request::Kind", tags = "1, 2, 3, 4, 5, 10, 11, 12, 20, 21")]
    pub kind: Option<request::Kind>,
}

pub mod request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Status(super::StatusRequest),
        #[prost(message, tag = "2")]
        Identities(super::IdentitiesRequest),
        #[prost(message, tag = "3")]
        Explain(super::ExplainRequest),
        #[prost(message, tag = "4")]
        Events(super::EventsRequest),
        #[prost(message, tag = "5")]
        Apply(super::ApplyRequest),
        #[prost(message, tag = "10")]
        Grant(super::GrantRequest),
        #[prost(message, tag = "11")]
        Grants(super::GrantsRequest),
        #[prost(message, tag = "12")]
        Revoke(super::RevokeRequest),
        #[prost(message, tag = "20")]
        Learn(super::LearnRequest),
        #[prost(message, tag = "21")]
        Diff(super::DiffRequest),
    }
}

/// `grant`: a time-bound exception added to the policy in force.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrantRequest {
    /// The identity's `name` in the policy.
    #[prost(string, tag = "1")]
    pub identity: String,
    /// `ADDR[/LEN][:PORTS]`.
    #[prost(string, tag = "2")]
    pub to: String,
    /// `tcp`, `udp`, or empty for both.
    #[prost(string, tag = "3")]
    pub protocol: String,
    /// `30m`, `4h`...
    #[prost(string, tag = "4")]
    pub duration: String,
    #[prost(string, tag = "5")]
    pub reason: String,
    /// Who asks (user and uid, as the command line saw them).
    #[prost(string, tag = "6")]
    pub by: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GrantsRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// One grant in force (`grants`, and the answer of `grant` and `revoke`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct GrantInfo {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The identity's name and SPIFFE ID.
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, tag = "3")]
    pub spiffe_id: String,
    /// `tcp 10.0.0.7/32 ports 22`.
    #[prost(string, tag = "4")]
    pub destination: String,
    #[prost(string, tag = "5")]
    pub reason: String,
    #[prost(string, tag = "6")]
    pub by: String,
    /// RFC 3339.
    #[prost(string, tag = "7")]
    pub granted_at: String,
    #[prost(string, tag = "8")]
    pub expires_at: String,
    /// Seconds left (0 once over).
    #[prost(uint64, tag = "9")]
    pub seconds_left: u64,
    /// `expires_at` as Unix ns (exact).
    #[prost(int64, tag = "10")]
    pub expires_unix_ns: i64,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct GrantList {
    #[prost(message, repeated, tag = "1")]
    pub grants: Vec<GrantInfo>,
    /// `maxGrant` of the policy in force, seconds.
    #[prost(uint64, tag = "2")]
    pub max_grant_secs: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdentitiesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExplainRequest {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    /// Destination address (IPv4 or IPv6 text).
    #[prost(string, tag = "2")]
    pub dst: String,
    #[prost(uint32, tag = "3")]
    pub port: u32,
    /// "tcp" or "udp".
    #[prost(string, tag = "4")]
    pub protocol: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EventsRequest {
    #[prost(bool, tag = "1")]
    pub follow: bool,
    /// Include allowed decisions.
    #[prost(bool, tag = "2")]
    pub all: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplyRequest {
    /// A YAML policy or a compiled bundle.
    #[prost(bytes = "vec", tag = "1")]
    pub policy: Vec<u8>,
    /// File name for messages.
    #[prost(string, tag = "2")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(oneof = "reply::Kind", tags = "1, 2, 3, 4, 5, 6, 10, 11, 20, 21")]
    pub kind: Option<reply::Kind>,
}

pub mod reply {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(string, tag = "1")]
        Error(String),
        #[prost(message, tag = "2")]
        Status(super::Status),
        #[prost(message, tag = "3")]
        Identities(super::Identities),
        #[prost(message, tag = "4")]
        Explain(super::Decision),
        #[prost(message, tag = "5")]
        Event(super::Decision),
        #[prost(message, tag = "6")]
        Apply(super::Applied),
        #[prost(message, tag = "10")]
        Grant(super::GrantInfo),
        #[prost(message, tag = "11")]
        Grants(super::GrantList),
        #[prost(message, tag = "20")]
        Learned(super::Learned),
        #[prost(message, tag = "21")]
        Diff(super::DiffReport),
    }
}

/// One decision: an event, or what `explain` says the kernel would decide.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Decision {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(string, optional, tag = "2")]
    pub exe: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub sha256: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub cgroup: Option<String>,
    #[prost(uint32, tag = "5")]
    pub uid: u32,
    /// SPIFFE ID, or none.
    #[prost(string, optional, tag = "6")]
    pub identity: Option<String>,
    /// allow | deny | audit
    #[prost(string, tag = "7")]
    pub verdict: String,
    #[prost(string, tag = "8")]
    pub dst: String,
    #[prost(uint32, tag = "9")]
    pub port: u32,
    #[prost(string, tag = "10")]
    pub protocol: String,
    /// The policy entry that decided, or why none did.
    #[prost(string, tag = "11")]
    pub rule: String,
    /// Kernel time of the decision (boot clock, ns); 0 for explain.
    #[prost(uint64, tag = "12")]
    pub time_ns: u64,
    /// The address the process wrote when the kernel sends it elsewhere (`0.0.0.0`, `::`,
    /// `::ffff:0.0.0.0`); `dst` is then the address judged, where the connect goes.
    #[prost(string, optional, tag = "30")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<String>,
    /// Socket creation events only: the kind refused or allowed (`raw`, `icmp`, `sctp`,
    /// `udplite`, `other`), with the socket's family (`inet`, `inet6`), type and protocol.
    #[prost(string, optional, tag = "31")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[prost(string, optional, tag = "32")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[prost(string, optional, tag = "33")]
    #[serde(skip_serializing_if = "Option::is_none", rename = "type")]
    pub socket_type: Option<String>,
    #[prost(uint32, optional, tag = "34")]
    #[serde(skip_serializing_if = "Option::is_none", rename = "protocol_number")]
    pub protocol_number: Option<u32>,
    /// Why: the `reason:` of the time-bound entry or grant that decided, or of a grant,
    /// expiry or revocation event.
    #[prost(string, optional, tag = "40")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The grant the event or the deciding rule is about.
    #[prost(uint64, optional, tag = "41")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<u64>,
    /// When the rule that decided stops holding (RFC 3339), for a time-bound entry.
    #[prost(string, optional, tag = "42")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Closure events only (revocation): `closed` (the socket was destroyed) or `would
    /// close` (audit: nothing closed), with `closed`, why the sweep ran (`reason`:
    /// `policy-apply`, `startup`, `identity-lost`, `grant-expired`, `grant-revoked`,
    /// `entry-expired`) and the socket's own address (`src`).
    /// (`reason` above says why the sweep ran: `policy-apply`, `startup`, ...)
    #[prost(string, optional, tag = "43")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[prost(bool, optional, tag = "44")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed: Option<bool>,
    #[prost(string, optional, tag = "45")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Process {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(string, optional, tag = "2")]
    pub exe: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub sha256: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub cgroup: Option<String>,
    #[prost(uint32, tag = "5")]
    pub uid: u32,
    #[prost(uint32, tag = "6")]
    pub gid: u32,
    #[prost(string, optional, tag = "7")]
    pub identity: Option<String>,
    /// Why this identity (or none).
    #[prost(string, tag = "8")]
    pub reason: String,
    /// Not attested yet (exec of a never-seen file).
    #[prost(bool, tag = "9")]
    pub pending: bool,
    /// `NAMESPACE/POD/CONTAINER` when the process runs in a pod the agent knows.
    #[prost(string, optional, tag = "10")]
    pub pod: Option<String>,
    /// Tampered with (traced, memory written, descriptors taken): no identity until an
    /// untraced exec.
    #[prost(bool, tag = "12")]
    pub tampered: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Identities {
    #[prost(message, repeated, tag = "1")]
    pub processes: Vec<Process>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct NamedCount {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub value: u64,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct MapFill {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub entries: u64,
    #[prost(uint64, tag = "3")]
    pub capacity: u64,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Attachment {
    #[prost(string, tag = "1")]
    pub program: String,
    /// cgroup path or tracepoint name
    #[prost(string, tag = "2")]
    pub target: String,
}

/// Connections by processes with no identity, grouped by binary and cgroup.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Uncovered {
    #[prost(string, tag = "1")]
    pub exe: String,
    #[prost(string, tag = "2")]
    pub sha256: String,
    #[prost(string, tag = "3")]
    pub cgroup: String,
    #[prost(uint64, tag = "4")]
    pub connects: u64,
    #[prost(string, repeated, tag = "5")]
    pub destinations: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Status {
    #[prost(string, repeated, tag = "1")]
    pub kernel_features: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub attached: Vec<Attachment>,
    #[prost(message, repeated, tag = "3")]
    pub maps: Vec<MapFill>,
    #[prost(string, tag = "4")]
    pub policy_source: String,
    #[prost(string, tag = "5")]
    pub policy_hash: String,
    #[prost(string, tag = "6")]
    pub mode: String,
    #[prost(uint32, tag = "7")]
    pub generation: u32,
    #[prost(message, repeated, tag = "8")]
    pub counters: Vec<NamedCount>,
    /// Differences between the kernel maps and the compiled policy (empty: in sync).
    #[prost(string, repeated, tag = "9")]
    pub drift: Vec<String>,
    #[prost(message, repeated, tag = "10")]
    pub uncovered: Vec<Uncovered>,
    #[prost(uint64, tag = "11")]
    pub uncovered_window_secs: u64,
    #[prost(uint64, tag = "12")]
    pub events_lost: u64,
    /// `uname -r` of the node.
    #[prost(string, tag = "13")]
    pub kernel_release: String,
    /// What the agent probed of the kernel at start.
    #[prost(message, repeated, tag = "14")]
    pub features: Vec<KernelFeature>,
    /// Where pod metadata comes from, and whether it answers.
    #[prost(message, optional, tag = "15")]
    pub kubernetes: Option<Kubernetes>,
    /// Grants in force.
    #[prost(message, repeated, tag = "20")]
    pub grants: Vec<GrantInfo>,
    /// Time-bound policy entries (not grants) that still hold or will.
    #[prost(uint64, tag = "21")]
    pub timed_entries: u64,
    /// The next instant a time-bound entry or grant starts or stops holding (RFC 3339).
    #[prost(string, optional, tag = "22")]
    pub next_expiry: Option<String>,
    /// Whether and how live connections that lose their allow are closed (README
    /// "Revocation").
    #[prost(string, tag = "16")]
    pub revocation: String,
}

/// Pod metadata sources (`status`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Kubernetes {
    /// `containerd v1.6.20 at /run/containerd/containerd.sock (connected)` or why not.
    #[prost(string, tag = "1")]
    pub runtime: String,
    #[prost(bool, tag = "2")]
    pub runtime_connected: bool,
    /// `connected`, `not configured (no --kube-node)`, or why not.
    #[prost(string, tag = "3")]
    pub api_server: String,
    #[prost(bool, tag = "4")]
    pub api_server_connected: bool,
    /// Containers whose pod the agent knows.
    #[prost(uint64, tag = "5")]
    pub containers_known: u64,
    /// Containers whose processes wait for their pod's metadata (pending: denied in enforce).
    #[prost(uint64, tag = "6")]
    pub containers_waiting: u64,
    /// What the operator should know (e.g. serviceAccount selectors that cannot match).
    #[prost(string, repeated, tag = "7")]
    pub notes: Vec<String>,
}

/// One kernel feature the agent probed at start.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct KernelFeature {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Missing and required: the agent refuses to start.
    #[prost(bool, tag = "2")]
    pub required: bool,
    #[prost(bool, tag = "3")]
    pub found: bool,
    /// What was found, or why it is missing.
    #[prost(string, tag = "4")]
    pub detail: String,
    /// What the agent does without it.
    #[prost(string, tag = "5")]
    pub without: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Applied {
    #[prost(string, tag = "1")]
    pub policy_hash: String,
    #[prost(uint32, tag = "2")]
    pub generation: u32,
    #[prost(string, repeated, tag = "3")]
    pub warnings: Vec<String>,
}

/// `learn`: a policy from the decision record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LearnRequest {
    /// Observe this long first (allow reports on meanwhile); 0: answer from the record now.
    #[prost(uint64, tag = "1")]
    pub for_secs: u64,
    /// cgroup subtrees to learn (and the learned policy's `scope`).
    #[prost(string, repeated, tag = "2")]
    pub scope: Vec<String>,
    /// Pod namespaces to learn.
    #[prost(string, repeated, tag = "3")]
    pub namespace: Vec<String>,
    /// Group IPv4 hosts into prefixes of this length (0: exact hosts).
    #[prost(uint32, optional, tag = "4")]
    pub aggregate_v4: Option<u32>,
    /// Group IPv6 hosts into prefixes of this length.
    #[prost(uint32, optional, tag = "5")]
    pub aggregate_v6: Option<u32>,
    /// Only connects last seen within this many seconds (0: the whole record).
    #[prost(uint64, tag = "6")]
    pub since_secs: u64,
}

/// The learned policy.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Learned {
    #[prost(string, tag = "1")]
    pub yaml: String,
    #[prost(uint32, tag = "2")]
    pub identities: u32,
    /// Record entries (process facts x destination) used.
    #[prost(uint64, tag = "3")]
    pub entries: u64,
    #[prost(uint64, tag = "4")]
    pub connects: u64,
    /// Entries left out: the process was not attested.
    #[prost(uint64, tag = "5")]
    pub skipped: u64,
    /// Entries left out: denied by the kernel when last seen.
    #[prost(uint64, tag = "6")]
    pub denied: u64,
}

/// `policy diff` and `policy apply --dry-run`: a candidate replayed over the record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DiffRequest {
    /// A YAML policy or a compiled bundle.
    #[prost(bytes = "vec", tag = "1")]
    pub policy: Vec<u8>,
    /// File name for messages.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Only connects last seen within this many seconds (0: the whole record).
    #[prost(uint64, tag = "3")]
    pub since_secs: u64,
}

/// Connects whose verdict the candidate changes, for one identity and destination.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct DiffGroup {
    /// SPIFFE ID under the candidate, or none (unattested).
    #[prost(string, optional, tag = "1")]
    pub identity: Option<String>,
    #[prost(string, tag = "2")]
    pub dst: String,
    #[prost(uint32, tag = "3")]
    pub port: u32,
    #[prost(string, tag = "4")]
    pub protocol: String,
    /// Recorded connects.
    #[prost(uint64, tag = "5")]
    pub connects: u64,
    /// `EXE in CGROUP` of the processes that made them.
    #[prost(string, repeated, tag = "6")]
    pub processes: Vec<String>,
    /// What decides under the policy in force, and under the candidate.
    #[prost(string, tag = "7")]
    pub rule_in_force: String,
    #[prost(string, tag = "8")]
    pub rule_candidate: String,
    /// Unix seconds.
    #[prost(uint64, tag = "9")]
    pub last_seen: u64,
}

/// What a candidate policy would change.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct DiffReport {
    #[prost(message, repeated, tag = "1")]
    pub newly_denied: Vec<DiffGroup>,
    #[prost(message, repeated, tag = "2")]
    pub newly_allowed: Vec<DiffGroup>,
    /// Record entries replayed, and the connects they stand for.
    #[prost(uint64, tag = "3")]
    pub entries: u64,
    #[prost(uint64, tag = "4")]
    pub connects: u64,
    /// What the replay could not judge as the kernel will, and why.
    #[prost(string, repeated, tag = "5")]
    pub notes: Vec<String>,
    /// `policy check` warnings of the candidate.
    #[prost(string, repeated, tag = "6")]
    pub warnings: Vec<String>,
}

/// Errors of the API transport.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API frame is {0} bytes, more than the {MAX_FRAME} allowed")]
    TooLarge(u32),
    #[error("the API message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("API connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes one frame (blocking).
pub fn write_frame(w: &mut impl Write, msg: &impl prost::Message) -> Result<(), ApiError> {
    let bytes = msg.encode_to_vec();
    let len = u32::try_from(bytes.len()).map_err(|_| ApiError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(ApiError::TooLarge(len));
    }
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame (blocking); `Ok(None)` at a clean end of stream.
pub fn read_frame<M: prost::Message + Default>(r: &mut impl Read) -> Result<Option<M>, ApiError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(ApiError::TooLarge(len));
    }
    // Grown as bytes arrive: a length alone does not make the reader allocate it.
    let mut buf = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut buf)?;
    if buf.len() != len as usize {
        return Err(ApiError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the frame ended after {} of its {len} bytes", buf.len()),
        )));
    }
    Ok(Some(M::decode(buf.as_slice())?))
}

/// Encodes one frame into bytes (for non-blocking writers).
pub fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_reject_garbage() {
        let req = Request {
            kind: Some(request::Kind::Explain(ExplainRequest {
                pid: 7,
                dst: "::1".into(),
                port: 53,
                protocol: "udp".into(),
            })),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).expect("write");
        assert_eq!(buf, frame(&req));
        let back: Option<Request> = read_frame(&mut buf.as_slice()).expect("read");
        assert_eq!(back, Some(req));
        let empty: Option<Request> = read_frame(&mut [].as_slice()).expect("eof");
        assert_eq!(empty, None);
        let huge = (MAX_FRAME + 1).to_be_bytes();
        assert!(matches!(
            read_frame::<Request>(&mut huge.as_slice()),
            Err(ApiError::TooLarge(_))
        ));
        let mut short = MAX_FRAME.to_be_bytes().to_vec();
        short.extend_from_slice(&[0x0a, 0x00]);
        assert!(matches!(
            read_frame::<Request>(&mut short.as_slice()),
            Err(ApiError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        let mut bad = 3u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            read_frame::<Request>(&mut bad.as_slice()),
            Err(ApiError::Decode(_))
        ));
    }
}

//! Agent metrics in the OpenMetrics text format, served over HTTP on `GET /metrics`.
//!
//! Opt-in: nothing listens unless `--metrics-addr` is given. Recording is cheap and lock-free
//! apart from the label lookup of [`Metrics::decision`], so the daemon can record whether or
//! not anything is served.
//!
//! Exported series:
//!
//! | name | type | labels |
//! |------|------|--------|
//! | `enforcer_decisions_total` | counter | `identity`, `verdict` |
//! | `enforcer_events_lost_total` | counter (absolute value read back from the kernel) | |
//! | `enforcer_events_dropped_total` | counter (decision lines not written: the output was full) | |
//! | `enforcer_map_entries` | gauge | `map` |
//! | `enforcer_map_capacity` | gauge | `map` |
//! | `enforcer_attestation_seconds` | histogram, 16 exponential buckets 50µs..5s | |
//! | `enforcer_connections_closed_total` | counter (revocation) | `identity`, `reason` |
//!
//! A labelled family (`decisions`, `map_*`) appears in the exposition once it has its first
//! series; the unlabelled ones are always there.
//!
//! The same endpoint answers `GET /healthz` and `GET /readyz` from [`Metrics::health`]
//! (see [`crate::health`]): 200 `ok`, or 503 with one line saying why not.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets_range},
    },
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::health::Health;

/// Content type of the OpenMetrics text exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A client must send its request headers within this time, or the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones are closed right away (scrapers are few).
const MAX_CONNECTIONS: usize = 64;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source}; pick a free address and port with \
         --metrics-addr (for example 127.0.0.1:9090), or stop whatever already uses it"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    identity: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    identity: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

type U64Gauge = Gauge<u64, AtomicU64>;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    events_lost: Counter,
    events_dropped: Counter,
    map_entries: Family<MapLabels, U64Gauge>,
    map_capacity: Family<MapLabels, U64Gauge>,
    attestation: Histogram,
    connections_closed: Family<ClosedLabels, Counter>,
    health: Health,
    grants_active: U64Gauge,
    grant_events: Family<GrantLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    /// grant | expired | revoked
    event: String,
}

/// Agent metrics, opt-in (served only when `--metrics-addr` is given).
///
/// Cheap to clone: all clones record into and render the same registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Histogram buckets for exec -> attested identity: 16 exponential steps from 50µs to 5s
/// (three per decade), rounded to three significant digits so the exposition stays readable.
fn attestation_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets_range(50e-6, 5.0, 16).map(|b| {
        // Round-trip through scientific notation: exact to 3 significant digits.
        format!("{b:.2e}").parse().unwrap_or(b)
    })
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("enforcer");

        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions reported by the kernel, by workload identity (SPIFFE ID or \"none\") \
             and verdict (allow, deny, audit)",
            decisions.clone(),
        );

        let events_lost = Counter::default();
        registry.register(
            "events_lost",
            "Kernel events dropped before the agent could read them",
            events_lost.clone(),
        );

        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Decision lines the agent dropped because stdout (or --events-file) did not take \
             them fast enough",
            events_dropped.clone(),
        );

        let map_entries = Family::<MapLabels, U64Gauge>::default();
        registry.register(
            "map_entries",
            "Entries currently in each kernel map",
            map_entries.clone(),
        );

        let map_capacity = Family::<MapLabels, U64Gauge>::default();
        registry.register(
            "map_capacity",
            "Maximum entries of each kernel map",
            map_capacity.clone(),
        );

        let attestation = Histogram::new(attestation_buckets());
        registry.register_with_unit(
            "attestation",
            "Time from exec to the attested identity being in the kernel maps",
            Unit::Seconds,
            attestation.clone(),
        );

        let grants_active = U64Gauge::default();
        registry.register(
            "grants_active",
            "Grants (time-bound exceptions from `enforcer-agent grant`) in force",
            grants_active.clone(),
        );
        let grant_events = Family::<GrantLabels, Counter>::default();
        registry.register(
            "grant_events",
            "Grants made (grant), over at their instant (expired) and ended early or dropped \
             by an apply (revoked)",
            grant_events.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Live connections closed because they lost their allow (revocation), by workload \
             identity and reason (policy-apply, startup, identity-lost, grant-expired, \
             grant-revoked, entry-expired)",
            connections_closed.clone(),
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                grants_active,
                grant_events,
                decisions,
                events_lost,
                events_dropped,
                map_entries,
                map_capacity,
                attestation,
                connections_closed,
                health: Health::new(),
            }),
        }
    }

    /// One decision reported by the kernel. identity: SPIFFE ID or "none"; verdict: "allow" | "deny" | "audit".
    pub fn decision(&self, identity: &str, verdict: &str) {
        let labels = DecisionLabels {
            identity: identity.to_owned(),
            verdict: verdict.to_owned(),
        };
        self.inner.decisions.get_or_create(&labels).inc();
    }

    /// One connection closed by revocation.
    pub fn connection_closed(&self, identity: &str, reason: &str) {
        let labels = ClosedLabels {
            identity: identity.to_owned(),
            reason: reason.to_owned(),
        };
        self.inner.connections_closed.get_or_create(&labels).inc();
    }

    /// The kernel's count of lost events, exported as the counter `enforcer_events_lost_total`.
    /// The value is taken as is: the kernel owns monotonicity, and a drop (maps recreated) reads
    /// as a counter reset, which Prometheus handles.
    pub fn set_lost_events(&self, n: u64) {
        self.inner.events_lost.inner().store(n, Ordering::Relaxed);
    }

    /// Decision lines dropped so far (absolute), exported as `enforcer_events_dropped_total`.
    pub fn set_dropped_events(&self, n: u64) {
        self.inner
            .events_dropped
            .inner()
            .store(n, Ordering::Relaxed);
    }

    /// Fill of one kernel map: gauges `enforcer_map_entries{map}` and `enforcer_map_capacity{map}`.
    pub fn set_map_fill(&self, map: &str, entries: u64, capacity: u64) {
        let labels = MapLabels {
            map: map.to_owned(),
        };
        self.inner.map_entries.get_or_create(&labels).set(entries);
        self.inner.map_capacity.get_or_create(&labels).set(capacity);
    }

    /// Time from exec to attested identity in the maps, seconds.
    ///
    /// Negative values (clock steps) count as 0; NaN and infinities are ignored.
    pub fn observe_attestation(&self, seconds: f64) {
        if seconds.is_finite() {
            self.inner.attestation.observe(seconds.max(0.0));
        }
    }

    /// Grants in force: gauge `enforcer_grants_active`.
    pub fn set_grants_active(&self, n: u64) {
        self.inner.grants_active.set(n);
    }

    /// One grant event (`grant`, `expired`, `revoked`): `enforcer_grant_events_total{event}`.
    pub fn grant_event(&self, event: &str) {
        self.inner
            .grant_events
            .get_or_create(&GrantLabels {
                event: event.to_owned(),
            })
            .inc();
    }

    /// Liveness and readiness, served as `/healthz` and `/readyz`.
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    /// Text exposition (OpenMetrics) of the registry.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &self.inner.registry) {
            // Writing to a String cannot fail; only a metric's own encoder could.
            tracing::error!("encoding metrics failed: {err}");
        }
        out
    }

    /// Serve GET /metrics on addr until the returned handle is aborted; Err if the bind fails (message names the address and says what to do).
    ///
    /// Aborting the handle stops accepting and closes the connections being served. Use
    /// [`Metrics::serve_bound`] to learn the address actually bound (port 0).
    pub async fn serve(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
        self.serve_bound(addr).await.map(|(handle, _)| handle)
    }

    /// Like [`Metrics::serve`], and also returns the address actually bound: with port 0 the
    /// kernel picks a free port, reported here.
    pub async fn serve_bound(
        &self,
        addr: SocketAddr,
    ) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        let metrics = self.clone();
        let handle = tokio::spawn(async move { metrics.accept_loop(listener).await });
        tracing::info!("serving metrics on http://{bound}/metrics");
        Ok((handle, bound))
    }

    /// Accepts until the task is aborted; connections live in a [`JoinSet`] owned by this task,
    /// so aborting it closes them too.
    async fn accept_loop(self, listener: TcpListener) {
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!("metrics endpoint: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if connections.len() >= MAX_CONNECTIONS {
                tracing::debug!("metrics endpoint: too many connections, closing one from {peer}");
                continue;
            }
            let metrics = self.clone();
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let response = metrics.respond(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(err) = served {
                    tracing::debug!("metrics endpoint: connection from {peer}: {err}");
                }
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics, liveness at /healthz, readiness at /readyz\n",
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let health = match path {
            "/healthz" => Some(self.inner.health.live()),
            "/readyz" => Some(self.inner.health.ready()),
            _ => None,
        };
        if let Some(state) = health {
            return match state {
                Ok(()) => plain(StatusCode::OK, "ok\n"),
                Err(why) => plain_owned(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            };
        }
        let mut response = Response::new(Full::new(Bytes::from(self.render())));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        response
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    plain_owned(status, body.to_owned())
}

fn plain_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::*;

    /// A plain HTTP/1.1 client: the whole response as text.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read");
            response
        })
        .await
        .expect("client task")
    }

    #[test]
    fn render_has_all_series() {
        let metrics = Metrics::new();
        metrics.decision("spiffe://example.org/ns/web/sa/frontend", "allow");
        metrics.decision("spiffe://example.org/ns/web/sa/frontend", "allow");
        metrics.decision("none", "deny");
        metrics.clone().decision("none", "audit");
        metrics.set_lost_events(7);
        metrics.set_dropped_events(3);
        metrics.set_map_fill("identities", 12, 4096);
        metrics.observe_attestation(0.002);
        metrics.observe_attestation(f64::NAN);
        metrics.observe_attestation(-1.0);

        let text = metrics.render();
        for line in [
            "# TYPE enforcer_decisions counter",
            r#"enforcer_decisions_total{identity="spiffe://example.org/ns/web/sa/frontend",verdict="allow"} 2"#,
            r#"enforcer_decisions_total{identity="none",verdict="deny"} 1"#,
            r#"enforcer_decisions_total{identity="none",verdict="audit"} 1"#,
            "# TYPE enforcer_events_lost counter",
            "enforcer_events_lost_total 7",
            "# TYPE enforcer_events_dropped counter",
            "enforcer_events_dropped_total 3",
            "# TYPE enforcer_map_entries gauge",
            r#"enforcer_map_entries{map="identities"} 12"#,
            r#"enforcer_map_capacity{map="identities"} 4096"#,
            "# TYPE enforcer_attestation_seconds histogram",
            "# UNIT enforcer_attestation_seconds seconds",
            r#"enforcer_attestation_seconds_bucket{le="0.00005"} 1"#,
            r#"enforcer_attestation_seconds_bucket{le="5.0"} 2"#,
            r#"enforcer_attestation_seconds_bucket{le="+Inf"} 2"#,
            "enforcer_attestation_seconds_count 2",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }

        // Absolute values: a later read replaces, it does not add.
        metrics.set_lost_events(9);
        metrics.set_map_fill("identities", 3, 4096);
        let text = metrics.render();
        assert!(text.contains("enforcer_events_lost_total 9\n"), "{text}");
        assert!(
            text.contains("enforcer_map_entries{map=\"identities\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn buckets_span_50us_to_5s() {
        let buckets: Vec<f64> = attestation_buckets().collect();
        assert_eq!(buckets.len(), 16);
        assert_eq!(buckets.first(), Some(&50e-6));
        assert_eq!(buckets.last(), Some(&5.0));
        assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
    }

    #[tokio::test]
    async fn serves_metrics_and_404() {
        let metrics = Metrics::new();
        metrics.decision("none", "deny");
        metrics.set_map_fill("identities", 1, 1024);
        let (handle, addr) = metrics
            .serve_bound(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("serve");
        assert_ne!(addr.port(), 0);

        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{response}"
        );
        for name in [
            "enforcer_decisions_total{identity=\"none\",verdict=\"deny\"} 1",
            "enforcer_events_lost_total",
            "enforcer_map_entries",
            "enforcer_map_capacity",
            "enforcer_attestation_seconds_bucket",
            "# EOF",
        ] {
            assert!(response.contains(name), "missing {name:?} in:\n{response}");
        }

        let response = get(addr, "/other").await;
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

        // Health: live once the loop ticks; ready only once the daemon found it so.
        metrics.health().tick();
        let response = get(addr, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        let response = get(addr, "/readyz").await;
        assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
        assert!(
            response.ends_with("\r\n\r\nnot ready: the agent is starting\n"),
            "{response}"
        );
        metrics.health().set_readiness(crate::health::Readiness {
            policy_applied: true,
            ..Default::default()
        });
        let response = get(addr, "/readyz").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(response.ends_with("\r\n\r\nok\n"), "{response}");

        handle.abort();
        assert!(handle.await.expect_err("aborted").is_cancelled());
    }

    #[tokio::test]
    async fn abort_closes_open_connections() {
        let (handle, addr) = Metrics::new()
            .serve_bound(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("serve");
        let read = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // Half a request: the connection stays open, waiting for the rest.
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\n")
                .expect("write");
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).map(|_| rest)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        handle.abort();
        let rest = read
            .await
            .expect("client task")
            .expect("closed, not timed out");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = Metrics::new().serve(addr).await.expect_err("port is taken");
        let message = err.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("--metrics-addr"), "{message}");
    }
}

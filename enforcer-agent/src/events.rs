//! The event sink: where each decision goes once the agent has described it. JSON lines on
//! stdout (or `--events-file`), metrics, the recent history and `events --follow` clients.
//!
//! Nothing here ever blocks the event loop: the JSON lines go through a bounded queue to a
//! writer thread of their own; when the queue is full (stdout is a pipe nobody reads, a slow
//! disk) the line is dropped and counted (`enforcer_events_dropped_total`, `status`).
//! Followers get each frame with a non-blocking write, or are dropped.

use std::{
    collections::VecDeque,
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
};

use enforcer_common::Verdict;

use crate::{
    api::{self, reply},
    metrics::Metrics,
};

/// Decisions kept for `events` without `--follow`.
pub const HISTORY: usize = 1000;
/// JSON lines waiting for the writer thread before new ones are dropped.
pub const QUEUE: usize = 4096;

/// Recent decisions and live `events --follow` clients.
#[derive(Default)]
pub struct Feed {
    history: VecDeque<api::Decision>,
    followers: Vec<(std::os::unix::net::UnixStream, bool)>,
}

impl Feed {
    /// Number of live `events --follow` clients.
    pub fn followers(&self) -> usize {
        self.followers.len()
    }

    /// True when a follower asked for allowed decisions too.
    pub fn wants_allows(&self) -> bool {
        self.followers.iter().any(|(_, all)| *all)
    }

    /// The recent decisions (allowed ones only with `all`).
    pub fn history(&self, all: bool) -> Vec<api::Decision> {
        self.history
            .iter()
            .filter(|d| all || d.verdict != Verdict::Allow.name())
            .cloned()
            .collect()
    }

    /// Adds a follower (its socket is made non-blocking).
    pub fn follow(&mut self, s: std::os::unix::net::UnixStream, all: bool) {
        if s.set_nonblocking(true).is_ok() {
            self.followers.push((s, all));
        }
    }

    pub fn push(&mut self, d: api::Decision) {
        let frame = api::frame(&api::Reply {
            kind: Some(reply::Kind::Event(d.clone())),
        });
        // A follower that cannot take the whole frame now is dropped: the agent never waits
        // on a client.
        self.followers.retain_mut(|(s, all)| {
            if !*all && d.verdict == Verdict::Allow.name() {
                return true;
            }
            write_now(s, &frame)
        });
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(d);
    }
}

fn write_now(s: &mut std::os::unix::net::UnixStream, frame: &[u8]) -> bool {
    let mut off = 0;
    while off < frame.len() {
        match s.write(&frame[off..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => off += n,
        }
    }
    true
}

/// Where decisions go.
pub struct EventSink {
    lines: SyncSender<String>,
    dropped: Arc<AtomicU64>,
    /// Connections closed by revocation since the agent started.
    closed: u64,
    pub metrics: Metrics,
    pub feed: Feed,
}

impl EventSink {
    /// A sink writing JSON lines to `out` (None: stdout) from a thread of its own, through a
    /// queue of `depth` lines.
    pub fn new(
        out: Option<std::fs::File>,
        metrics: Metrics,
        depth: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<String>(depth);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("enforcer-events".into())
            .spawn(move || {
                let mut w: Box<dyn std::io::Write> = match out {
                    Some(f) => Box::new(std::io::BufWriter::new(f)),
                    None => Box::new(std::io::BufWriter::new(std::io::stdout())),
                };
                let mut warned = false;
                while let Ok(first) = rx.recv() {
                    let mut line = Some(first);
                    // Write what is queued, then flush once.
                    while let Some(l) = line {
                        if writeln!(w, "{l}").is_err() {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        line = rx.try_recv().ok();
                    }
                    if let Err(e) = w.flush()
                        && !warned
                    {
                        tracing::warn!(
                            "writing decisions failed; they are counted as dropped: {e}"
                        );
                        warned = true;
                    }
                }
            })?;
        Ok(Self {
            lines: tx,
            dropped,
            closed: 0,
            metrics,
            feed: Feed::default(),
        })
    }

    /// Reports one decision: metrics, the JSON line (dropped and counted if the writer is
    /// behind), the history and followers. Never blocks.
    pub fn emit(&mut self, d: api::Decision) {
        self.metrics
            .decision(d.identity.as_deref().unwrap_or("none"), &d.verdict);
        self.output(d);
    }

    /// Reports one connection closed by revocation (or that would be, in audit mode: not
    /// counted): counted by identity and reason, then written like a decision.
    pub fn emit_closure(&mut self, d: api::Decision) {
        if d.closed == Some(true) {
            self.closed += 1;
            self.metrics.connection_closed(
                d.identity.as_deref().unwrap_or("none"),
                d.reason.as_deref().unwrap_or(""),
            );
        }
        self.output(d);
    }

    /// Connections closed by revocation so far.
    pub fn closed(&self) -> u64 {
        self.closed
    }

    fn output(&mut self, d: api::Decision) {
        match serde_json::to_string(&d) {
            Ok(line) => match self.lines.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    self.metrics.set_dropped_events(n);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            dropped = n,
                            "decision output is not keeping up (is stdout read?); lines are dropped and counted"
                        );
                    }
                }
            },
            Err(e) => tracing::warn!("encoding an event: {e}"),
        }
        self.feed.push(d);
    }

    /// Reports a record shaped like a decision that is not one (a grant made, over or
    /// revoked): the JSON line, the history and followers, but no decision metric.
    pub fn record(&mut self, d: api::Decision) {
        self.emit_line(&d);
        self.feed.push(d);
    }

    /// Writes one JSON line that is not a decision (a tamper event); dropped and counted like
    /// a decision line when the writer is behind.
    pub fn emit_line(&mut self, record: &impl serde::Serialize) {
        match serde_json::to_string(record) {
            Ok(line) => {
                if self.lines.try_send(line).is_err() {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    self.metrics.set_dropped_events(n);
                }
            }
            Err(e) => tracing::warn!("encoding an event: {e}"),
        }
    }

    /// Decision lines dropped so far (output full or failing).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(verdict: &str) -> api::Decision {
        api::Decision {
            verdict: verdict.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_full_output_drops_and_counts_instead_of_blocking() {
        // A pipe nobody reads: the writer thread blocks on it once the pipe is full.
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut sink =
            EventSink::new(Some(std::fs::File::from(w)), Metrics::new(), 8).expect("sink");
        let t0 = std::time::Instant::now();
        for _ in 0..20_000 {
            sink.emit(decision("deny"));
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "emit blocked"
        );
        assert!(sink.dropped() > 0, "a full pipe must drop lines");
        assert_eq!(sink.feed.history(false).len(), HISTORY);
        assert!(sink.feed.history(true).len() == HISTORY);
        drop(r);
    }

    #[test]
    fn lines_reach_the_output() {
        let dir = std::env::temp_dir().join(format!("enforcer-events-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("events.jsonl");
        let f = std::fs::File::create(&path).expect("file");
        let mut sink = EventSink::new(Some(f), Metrics::new(), QUEUE).expect("sink");
        sink.emit(decision("deny"));
        sink.emit(decision("allow"));
        let t0 = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                assert!(text.contains("\"verdict\":\"deny\""), "{text}");
                break;
            }
            assert!(t0.elapsed().as_secs() < 5, "lines never written: {text}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(sink.dropped(), 0);
        assert_eq!(sink.feed.history(false).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

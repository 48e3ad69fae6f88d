//! The audit log: one JSON object a line for every decision, and one more when an allowed
//! connection closes. Field names are documented in the README and never change once shipped.
//!
//! Recording a line never waits for the sink. The line is made on the caller's thread and put on
//! a bounded queue, in order; one writer thread (`writer`) writes the queue out. A line is
//! queued before the client is answered, so the log keeps the order in which clients were
//! answered, and `flush` waits until what was queued is written. A line that cannot be queued
//! (the queue is full: the sink stopped taking lines) or written is counted as lost and reported
//! on stderr, never retried into a growing buffer. While the queue is full, `refuses_new` tells
//! the connection path to refuse new connections (`[audit] on_stall = "refuse"`, the default)
//! or to serve them and count what is lost (`"count"`).
//!
//! Every line carries `prev`, the hash of the line before it (`chain`); `chain::ChainCheck`
//! verifies a log (`egress-proxy audit verify`).

pub mod chain;
mod writer;

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::OnStall;
use crate::denied::{Entry, TopDenied};
use crate::metrics::Metrics;

pub use writer::QUEUE_LINES;

/// Where audit lines go. Recording an event queues its line *and* moves its metrics, so the log
/// and the counters cannot disagree (a line that is lost is counted as lost).
pub struct Audit {
    queue: writer::Queue,
    on_stall: OnStall,
    metrics: Metrics,
    denied: Mutex<TopDenied>,
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Listener {
    Http,
    Tls,
    Plain,
    CatchAll,
}

impl Listener {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tls => "tls",
            Self::Plain => "plain",
            Self::CatchAll => "catch_all",
        }
    }
}

/// The outcome class of a decision line.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed and connected.
    Allow,
    /// Refused by the proxy: by the policy, as malformed, or at a limit.
    Deny,
    /// Allowed by the policy, but the name did not resolve or the upstream could not be reached.
    Fail,
    /// Report mode: refused by the policy, and let through; `reason` says why enforcement would
    /// have refused it.
    WouldDeny,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Fail => "fail",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// Distinct refused destinations remembered for `/denied`.
const TOP_DENIED: usize = 1_000;

/// One decision about one request or connection.
#[derive(Debug, Serialize)]
pub struct Decided<'a> {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Listener,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    /// The address actually dialled, for allowed connections.
    pub dst_addr: Option<SocketAddr>,
    pub decision: Verdict,
    pub rule: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// Where a redirected connection was going (transparent listeners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    /// Something the operator should know about an allowed connection (`original_dst_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
    /// The server name a ClientHello presented where it is not the host decided (`sni_mismatch`):
    /// where the bytes were meant to go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<&'a str>,
}

/// The end of an allowed connection.
#[derive(Debug, Serialize)]
pub struct Closed<'a> {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Listener,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    pub dst_addr: Option<SocketAddr>,
    pub rule: Option<&'a str>,
    /// Why an allowed exchange failed after the allow line (a forwarded request's upstream broke).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// The server name a second ClientHello presented, where it is not the host decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<&'a str>,
    /// Bytes from the client to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the client.
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// One DNS decision, as its audit line has it.
#[derive(Debug, Serialize)]
pub struct DnsDecided<'a> {
    pub client: SocketAddr,
    pub name: &'a str,
    #[serde(rename = "type")]
    pub qtype: &'a str,
    /// The type as the metric labels it: one of the named types, `Unknown` for any other code.
    #[serde(skip)]
    pub type_label: &'static str,
    /// `allow`, `deny`, or (report mode) `would_deny`.
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    pub rule: Option<&'a str>,
}

/// The tunnelling alarm, as its audit line has it.
#[derive(Debug, Serialize)]
pub struct DnsAlarm<'a> {
    pub client: SocketAddr,
    pub suffix: &'a str,
    pub unique_names: usize,
    pub min_length: usize,
    pub window_s: u64,
}

/// A decision the `[shadow]` candidate policy would have made otherwise.
#[derive(Debug, Serialize)]
pub struct ShadowDiffers<'a> {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Listener,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    /// `shadow_would_allow` or `shadow_would_deny`.
    pub shadow: &'static str,
    /// The candidate's rule (the allowing one, or the one that would refuse).
    pub rule: Option<&'a str>,
    /// Why the candidate would refuse.
    pub reason: Option<&'static str>,
}

/// The moment a connection went past an upload limit of its rule: `upload_limit` (the tunnel is
/// closed) or `upload_budget` (the client's new connections under the rule are refused until the
/// window frees).
#[derive(Debug, Serialize)]
pub struct LimitCrossed<'a> {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Listener,
    pub host: Option<&'a str>,
    pub rule: &'a str,
    pub reason: &'static str,
    /// Bytes sent up: through this tunnel (`upload_limit`), or by the client in the window.
    pub bytes_up: u64,
    pub limit: u64,
    /// The window of an `upload_budget`, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_s: Option<u64>,
}

#[derive(Serialize)]
struct Line<'a, T> {
    #[serde(serialize_with = "crate::time::rfc3339")]
    ts: SystemTime,
    event: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

impl Audit {
    /// `-` for standard output, else a file opened for appending (created if missing). Starts
    /// the writer thread.
    pub fn open(path: &str, on_stall: OnStall, metrics: Metrics) -> io::Result<Self> {
        let queue = writer::Queue::open(path, metrics.clone())?;
        Ok(Self::with_queue(queue, on_stall, metrics))
    }

    fn with_queue(queue: writer::Queue, on_stall: OnStall, metrics: Metrics) -> Self {
        Self { queue, on_stall, metrics, denied: Mutex::new(TopDenied::new(TOP_DENIED)) }
    }

    pub fn decided(&self, d: &Decided<'_>) {
        self.write("decision", d);
        let listener = d.listener.as_str();
        let labels = [listener, d.decision.as_str(), d.rule.unwrap_or_default(), d.reason.unwrap_or_default()];
        self.metrics.decisions.with_label_values(&labels).inc();
        match (d.decision, d.host, d.port) {
            (Verdict::Allow, _, _) => self.metrics.open_tunnels.with_label_values(&[listener]).inc(),
            (Verdict::WouldDeny, host, port) => {
                // Let through: open like an allowed connection, and remembered with the refusals.
                self.metrics.open_tunnels.with_label_values(&[listener]).inc();
                if let (Some(host), Some(port), Ok(mut top)) = (host, port, self.denied.lock()) {
                    top.record(host, port, d.reason.unwrap_or_default(), SystemTime::now());
                }
            }
            (_, Some(host), Some(port)) => {
                if let Ok(mut top) = self.denied.lock() {
                    top.record(host, port, d.reason.unwrap_or_default(), SystemTime::now());
                }
            }
            _ => {}
        }
    }

    pub fn closed(&self, c: &Closed<'_>) {
        self.write("close", c);
        let listener = c.listener.as_str();
        self.metrics.open_tunnels.with_label_values(&[listener]).dec();
        self.metrics.bytes.with_label_values(&[listener, "up"]).inc_by(c.bytes_up);
        self.metrics.bytes.with_label_values(&[listener, "down"]).inc_by(c.bytes_down);
        self.metrics.tunnel_duration.with_label_values(&[listener]).observe(c.duration_ms as f64 / 1000.0);
    }

    /// Writes the line of one DNS question's decision, and counts it.
    pub fn dns_decided(&self, d: &DnsDecided<'_>) {
        self.write("dns", d);
        self.metrics.dns_queries.with_label_values(&[d.decision, d.type_label, d.reason.unwrap_or_default()]).inc();
    }

    /// Writes the line of a DNS tunnelling alarm, and counts it.
    pub fn dns_alarm(&self, a: &DnsAlarm<'_>) {
        self.write("dns_alarm", a);
        self.metrics.dns_alarms.inc();
    }

    /// Writes the line of a decision the shadow policy differs on, and moves its metric.
    pub fn shadow_differs(&self, s: &ShadowDiffers<'_>) {
        self.write("shadow", s);
        self.metrics.shadow_differences.with_label_values(&[s.shadow]).inc();
    }

    /// Writes the line of a crossed upload limit and moves its metric, at the moment it happens.
    pub fn limit_crossed(&self, l: &LimitCrossed<'_>) {
        self.write("limit", l);
        self.metrics.upload_limits.with_label_values(&[l.rule, l.reason]).inc();
    }

    /// The most refused destinations since start, most first.
    pub fn top_denied(&self, n: usize) -> Vec<Entry> {
        self.denied.lock().map(|t| t.top(n)).unwrap_or_default()
    }

    /// True while the queue is full: the sink is not taking lines, and lines recorded now are
    /// lost. Cheap: one atomic load.
    pub fn is_stalled(&self) -> bool {
        self.queue.is_stalled()
    }

    /// True while new connections must be refused (`audit_unavailable`): the log is stalled and
    /// `[audit] on_stall = "refuse"`.
    pub fn refuses_new(&self) -> bool {
        self.on_stall == OnStall::Refuse && self.is_stalled()
    }

    /// Reopens the log file by its path (append, create), for logrotate: lines recorded before
    /// go to the file open now, lines after to the file at the path, which goes on with a
    /// `chain_start`. Returns at once; the writer thread does the work. Nothing on stdout.
    pub fn reopen(&self) {
        self.queue.reopen();
    }

    /// Waits, at most `within`, until every line recorded before the call is written or lost;
    /// false if that did not happen in time. Blocks the calling thread: for shutdown and tests.
    pub fn flush(&self, within: Duration) -> bool {
        self.queue.flush(within)
    }

    fn write<T: Serialize>(&self, event: &'static str, body: &T) {
        match serde_json::to_vec(&Line { ts: SystemTime::now(), event, body }) {
            Ok(line) => self.queue.line(line),
            Err(_) => self.queue.lost("an audit line could not be serialised"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar};

    use super::*;

    /// A sink that holds every write while closed, and keeps what it was given.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<GateState>, Condvar)>);

    #[derive(Default)]
    struct GateState {
        open: bool,
        /// A write is waiting for the gate.
        held: bool,
        bytes: Vec<u8>,
    }

    impl Gate {
        fn open(&self) {
            let (m, c) = &*self.0;
            m.lock().unwrap().open = true;
            c.notify_all();
        }

        /// Waits until the writer is stuck in a write.
        fn until_held(&self) {
            let (m, c) = &*self.0;
            let _g = c.wait_while(m.lock().unwrap(), |g| !g.held).unwrap();
        }

        fn raw(&self) -> String {
            String::from_utf8(self.0 .0.lock().unwrap().bytes.clone()).unwrap()
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            self.raw().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        }
    }

    impl io::Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.0;
            let mut g = m.lock().unwrap();
            g.held = true;
            c.notify_all();
            let mut g = c.wait_while(g, |g| !g.open).unwrap();
            g.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl writer::TestSink for Gate {}

    fn gated(on_stall: OnStall) -> (Arc<Audit>, Gate, Metrics) {
        let (gate, metrics) = (Gate::default(), Metrics::new());
        let queue = writer::Queue::to(Box::new(gate.clone()), metrics.clone()).unwrap();
        (Arc::new(Audit::with_queue(queue, on_stall, metrics.clone())), gate, metrics)
    }

    fn refusal(id: u64) -> Decided<'static> {
        Decided {
            id,
            client: "127.0.0.1:5000".parse().unwrap(),
            listener: Listener::Http,
            method: Some("CONNECT"),
            host: Some("evil.example.com"),
            port: Some(443),
            dst_addr: None,
            decision: Verdict::Deny,
            rule: None,
            reason: Some("no_rule"),
            original_dst: None,
            note: None,
            sni: None,
        }
    }

    /// Records decisions `ids` on another thread; fails rather than hangs if recording blocks.
    fn record_within(audit: &Arc<Audit>, ids: std::ops::Range<u64>, limit: Duration) {
        let (done, wait) = std::sync::mpsc::channel();
        let audit = Arc::clone(audit);
        std::thread::spawn(move || {
            for id in ids {
                audit.decided(&refusal(id));
            }
            let _ = done.send(());
        });
        wait.recv_timeout(limit).expect("recording an audit line blocked on a stalled sink");
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_caller_refuses_while_full_and_counts_what_is_lost() {
        let (audit, gate, metrics) = gated(OnStall::Refuse);
        gate.until_held(); // on its chain_start line
        assert!(!audit.is_stalled() && !audit.refuses_new(), "one line held is not a stall");

        let queued = QUEUE_LINES as u64;
        record_within(&audit, 0..queued + 10, Duration::from_secs(10));
        assert!(audit.is_stalled() && audit.refuses_new());
        assert_eq!((metrics.audit_lost.get(), metrics.audit_lines.get()), (10, 0), "the queue holds {queued}");
        let deny = ["http", "deny", "", "no_rule"];
        assert_eq!(metrics.decisions.with_label_values(&deny).get(), queued + 10, "metrics move for lost lines too");

        gate.open();
        assert!(audit.flush(Duration::from_secs(10)));
        assert!(!audit.is_stalled() && !audit.refuses_new(), "the stall ends when the queue drains");
        let lines = gate.lines();
        assert_eq!(lines[0]["event"], "chain_start");
        let ids: Vec<u64> = lines[1..].iter().map(|l| l["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (0..queued).collect::<Vec<_>>(), "written in order, the lost ones missing");
        assert_eq!((metrics.audit_lost.get(), metrics.audit_lines.get()), (10, queued + 1));
    }

    #[test]
    fn with_on_stall_count_a_full_queue_does_not_refuse() {
        let (audit, gate, metrics) = gated(OnStall::Count);
        gate.until_held();
        record_within(&audit, 0..QUEUE_LINES as u64 + 2, Duration::from_secs(10));
        assert!(audit.is_stalled() && !audit.refuses_new());
        assert_eq!(metrics.audit_lost.get(), 2);
        gate.open();
        assert!(audit.flush(Duration::from_secs(10)));
    }

    #[test]
    fn flush_gives_up_on_a_sink_that_stays_stalled() {
        let (audit, gate, _) = gated(OnStall::Refuse);
        record_within(&audit, 0..1, Duration::from_secs(5));
        gate.until_held();
        assert!(!audit.flush(Duration::from_millis(50)));
        gate.open();
        assert!(audit.flush(Duration::from_secs(10)));
    }

    #[test]
    fn every_line_links_to_the_one_before_from_a_chain_start_of_zeros() {
        let (audit, gate, _) = gated(OnStall::Refuse);
        gate.open();
        record_within(&audit, 0..3, Duration::from_secs(5));
        assert!(audit.flush(Duration::from_secs(10)));
        let raw = gate.raw();
        let lines: Vec<&str> = raw.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].ends_with(&format!(r#""event":"chain_start","prev":"{}"}}"#, "0".repeat(64))), "{raw}");
        for pair in lines.windows(2) {
            let prev = chain::hex(&chain::digest(pair[0].as_bytes()));
            assert!(pair[1].ends_with(&format!(r#","prev":"{prev}"}}"#)), "{raw}");
        }
        let mut check = chain::ChainCheck::new();
        assert!(lines.iter().all(|l| check.check(l.as_bytes()).is_ok()));
    }
}

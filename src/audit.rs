//! The audit log: one JSON object a line for every decision, and one more when an allowed
//! connection closes. Field names are documented in the README and never change once shipped.
//!
//! Lines are written synchronously, under a lock, before the client is answered: an operator who
//! reads a refusal in the client's terminal finds it in the log already. A line that cannot be
//! written is counted as lost, never retried into a growing buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::denied::{Entry, TopDenied};
use crate::metrics::Metrics;

/// Where audit lines go. Recording an event writes its line *and* moves its metrics, so the log
/// and the counters cannot disagree.
pub struct Audit {
    sink: Mutex<Sink>,
    metrics: Metrics,
    denied: Mutex<TopDenied>,
}

enum Sink {
    Stdout,
    File(File),
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
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Fail => "fail",
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
    /// Bytes from the client to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the client.
    pub bytes_down: u64,
    pub duration_ms: u64,
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
    /// `-` for standard output, else a file opened for appending (created if missing).
    pub fn open(path: &str, metrics: Metrics) -> io::Result<Self> {
        let sink = match path {
            "-" => Sink::Stdout,
            p => Sink::File(OpenOptions::new().create(true).append(true).open(Path::new(p))?),
        };
        Ok(Self { sink: Mutex::new(sink), metrics, denied: Mutex::new(TopDenied::new(TOP_DENIED)) })
    }

    pub fn decided(&self, d: &Decided<'_>) {
        self.write("decision", d);
        let listener = d.listener.as_str();
        let labels = [listener, d.decision.as_str(), d.rule.unwrap_or_default(), d.reason.unwrap_or_default()];
        self.metrics.decisions.with_label_values(&labels).inc();
        match (d.decision, d.host, d.port) {
            (Verdict::Allow, _, _) => self.metrics.open_tunnels.with_label_values(&[listener]).inc(),
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

    /// The most refused destinations since start, most first.
    pub fn top_denied(&self, n: usize) -> Vec<Entry> {
        self.denied.lock().map(|t| t.top(n)).unwrap_or_default()
    }

    fn write<T: Serialize>(&self, event: &'static str, body: &T) {
        let line = serde_json::to_vec(&Line { ts: SystemTime::now(), event, body });
        let ok = match (line, self.sink.lock()) {
            (Ok(mut line), Ok(mut sink)) => {
                line.push(b'\n');
                match &mut *sink {
                    Sink::Stdout => io::stdout().lock().write_all(&line).is_ok(),
                    Sink::File(f) => f.write_all(&line).is_ok(),
                }
            }
            _ => false,
        };
        let counter = if ok { &self.metrics.audit_lines } else { &self.metrics.audit_lost };
        counter.inc();
        if !ok {
            tracing::error!(event, "Audit line lost: the audit sink could not be written");
        }
    }
}

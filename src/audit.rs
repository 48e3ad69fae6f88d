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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Where audit lines go.
pub struct Audit {
    sink: Mutex<Sink>,
    written: AtomicU64,
    lost: AtomicU64,
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
    /// Bytes from the client to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the client.
    pub bytes_down: u64,
    pub duration_ms: u64,
}

#[derive(Serialize)]
struct Line<'a, T> {
    ts: String,
    event: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

impl Audit {
    /// `-` for standard output, else a file opened for appending (created if missing).
    pub fn open(path: &str) -> io::Result<Self> {
        let sink = match path {
            "-" => Sink::Stdout,
            p => Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(p))?,
            ),
        };
        Ok(Self {
            sink: Mutex::new(sink),
            written: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    pub fn decided(&self, d: &Decided<'_>) {
        self.write("decision", d);
    }

    pub fn closed(&self, c: &Closed<'_>) {
        self.write("close", c);
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn write<T: Serialize>(&self, event: &'static str, body: &T) {
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let line = serde_json::to_vec(&Line { ts, event, body });
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
        let counter = if ok { &self.written } else { &self.lost };
        counter.fetch_add(1, Ordering::Relaxed);
        if !ok {
            tracing::error!(
                event,
                "Audit line lost: the audit sink could not be written"
            );
        }
    }
}

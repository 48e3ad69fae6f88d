//! The audit writer: one thread that owns the sink and writes the queue out in order, so that a
//! sink that stops taking bytes (a stdout reader that stopped reading, a hung disk) stops only
//! this thread, never a connection.
//!
//! The queue is bounded. A line that does not fit, or that the sink refuses, is lost: counted in
//! `egress_proxy_audit_lines_lost_total` and reported on stderr at most every ten seconds.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Lines that may wait for the sink: a burst, or a sink slow for a moment. At about 250 bytes a
/// line, 1 MiB at most.
pub const QUEUE_LINES: usize = 4096;

/// The sending side, shared by every connection.
pub struct Queue {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// What the queue carries, in order.
enum Msg {
    /// One serialised line, without its newline.
    Line(Vec<u8>),
    /// Answered once every message before it is done.
    Flush(mpsc::Sender<()>),
}

/// What the writer thread and the senders both see.
struct Shared {
    /// Messages in the queue. Raised before a send (lowered again if it failed), lowered when
    /// the writer takes one, so that it is never below what the queue holds.
    pending: AtomicUsize,
    /// Cleared when the writer thread ends (it never should).
    alive: AtomicBool,
    metrics: Metrics,
    report: Report,
}

/// Rate limit of the stderr report of lost lines.
struct Report {
    started: Instant,
    /// Milliseconds after `started` before which no report is made.
    next_ms: AtomicU64,
    /// Lines lost since the last report.
    unreported: AtomicU64,
}

/// The writer thread's own state.
struct Writer {
    sink: Sink,
    shared: Arc<Shared>,
}

enum Sink {
    Stdout(io::Stdout),
    File(File),
    #[cfg(test)]
    Other(Box<dyn Write + Send>),
}

/// How often, at most, lost lines are reported on stderr.
const REPORT_EVERY: Duration = Duration::from_secs(10);

// === impl Queue ===

impl Queue {
    /// `-` for standard output, else a file opened for appending (created if missing); starts the
    /// writer thread.
    pub fn open(path: &str, metrics: Metrics) -> io::Result<Self> {
        let sink = match path {
            "-" => Sink::Stdout(io::stdout()),
            p => Sink::File(OpenOptions::new().create(true).append(true).open(Path::new(p))?),
        };
        Self::start(sink, metrics)
    }

    /// A queue whose writer writes to `w` (tests: a sink that stalls on demand).
    #[cfg(test)]
    pub fn to(w: Box<dyn Write + Send>, metrics: Metrics) -> io::Result<Self> {
        Self::start(Sink::Other(w), metrics)
    }

    fn start(sink: Sink, metrics: Metrics) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            metrics,
            report: Report { started: Instant::now(), next_ms: AtomicU64::new(0), unreported: AtomicU64::new(0) },
        });
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let writer = Writer { sink, shared: Arc::clone(&shared) };
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || writer.run(rx))?;
        Ok(Self { tx, shared })
    }

    /// Queues one line (without its newline); never waits. A line that does not fit is counted
    /// as lost.
    pub fn line(&self, line: Vec<u8>) {
        if self.send(Msg::Line(line)).is_err() {
            self.shared.lost("the audit queue is full: the sink is not taking lines");
        }
    }

    /// Counts a line that could not even be made.
    pub fn lost(&self, why: &str) {
        self.shared.lost(why);
    }

    /// True while the queue is full (or the writer is gone): lines being recorded now are lost.
    pub fn is_stalled(&self) -> bool {
        !self.shared.alive.load(Ordering::Acquire) || self.shared.pending.load(Ordering::Acquire) >= QUEUE_LINES
    }

    /// Waits, at most `within`, until every line queued before the call is written (or lost).
    /// Blocks the calling thread: for shutdown and tests, never for a connection.
    pub fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let (done, wait) = mpsc::channel();
        let mut msg = Msg::Flush(done);
        loop {
            match self.send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        wait.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    fn send(&self, msg: Msg) -> Result<(), TrySendError<Msg>> {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        self.tx.try_send(msg).inspect_err(|_| {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

// === impl Shared ===

impl Shared {
    /// Counts one lost line; reports on stderr unless a report was made in the last ten seconds
    /// (that one counted the lines lost since).
    fn lost(&self, why: &str) {
        self.metrics.audit_lost.inc();
        let r = &self.report;
        r.unreported.fetch_add(1, Ordering::AcqRel);
        let now = u64::try_from(r.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = r.next_ms.load(Ordering::Acquire);
        let every = u64::try_from(REPORT_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && r.next_ms.compare_exchange(next, now.saturating_add(every), Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            let lost = r.unreported.swap(0, Ordering::AcqRel);
            tracing::error!(lost, why, "Audit lines lost (egress_proxy_audit_lines_lost_total)");
        }
    }
}

// === impl Writer ===

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            match msg {
                Msg::Line(line) => self.write(line),
                Msg::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Writes one line and its newline, and counts it written or lost.
    fn write(&mut self, mut line: Vec<u8>) {
        line.push(b'\n');
        let written = match &mut self.sink {
            Sink::Stdout(out) => out.write_all(&line).and_then(|()| out.flush()),
            Sink::File(f) => f.write_all(&line),
            #[cfg(test)]
            Sink::Other(w) => w.write_all(&line).and_then(|()| w.flush()),
        };
        match written {
            Ok(()) => self.shared.metrics.audit_lines.inc(),
            Err(e) => self.shared.lost(&format!("the audit sink cannot be written: {e}")),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
    }
}

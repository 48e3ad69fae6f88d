//! The audit writer: one thread that owns the sink and writes the queue out in order, so that a
//! sink that stops taking bytes (a stdout reader that stopped reading, a hung disk) stops only
//! this thread, never a connection. Being the one writer, it also keeps the hash chain: it ends
//! each line with `"prev"`, the hash of the line it wrote before (`chain`).
//!
//! The queue is bounded. A line that does not fit, or that the sink refuses, is lost: counted in
//! `egress_proxy_audit_lines_lost_total` and reported on stderr at most every ten seconds.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::chain::{self, LineHash, GENESIS};
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
    /// Reopen the file by its path (after a rotation), and go on with a `chain_start`.
    Reopen,
}

/// What the writer thread and the senders both see.
struct Shared {
    /// Messages in the queue. Raised before a send (lowered again if it failed), lowered when
    /// the writer takes one, so that it is never below what the queue holds.
    pending: AtomicUsize,
    /// Cleared when the writer thread ends (it never should).
    alive: AtomicBool,
    /// A reopen that did not fit in the queue: done before the next message.
    reopen: AtomicBool,
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
    /// The hash of the last line queued in `batch` (or written): the next line's `prev`.
    prev: LineHash,
    /// The hash of the last line written: what `prev` goes back to when a batch is lost.
    written: LineHash,
    /// Lines made (with `prev` and newline) and not yet written: what one `write` takes.
    batch: Vec<u8>,
    /// How many lines `batch` holds.
    batched: u64,
    shared: Arc<Shared>,
}

/// The line that starts (or continues) the chain in a sink just opened.
#[derive(Serialize)]
struct ChainStart {
    #[serde(serialize_with = "crate::time::rfc3339")]
    ts: SystemTime,
    event: &'static str,
}

enum Sink {
    Stdout(io::Stdout),
    File {
        file: File,
        path: PathBuf,
    },
    #[cfg(test)]
    Other(Box<dyn Write + Send>),
}

/// How often, at most, lost lines are reported on stderr.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// An audit line is well under this; a file whose last line is longer is not an audit log.
const MAX_TAIL: usize = 1024 * 1024;
/// How long the writer naps after a busy spell before it parks (see `Writer::run`).
const NAP: Duration = Duration::from_micros(500);
/// A batch this big is written at once, without waiting for the queue to empty.
const BATCH_BYTES: usize = 256 * 1024;

// === impl Queue ===

impl Queue {
    /// `-` for standard output, else a file opened for appending (created if missing); starts the
    /// writer thread. The chain starts with a `chain_start` line: in a file, written before this
    /// returns (a file that cannot be written stops the start), and linked to the file's last
    /// line; on stdout, the writer thread's first line, so that a stalled reader cannot hold up
    /// the start.
    pub fn open(path: &str, metrics: Metrics) -> io::Result<Self> {
        let shared = Shared::new(metrics);
        if path == "-" {
            return Self::start(Writer::new(Sink::Stdout(io::stdout()), GENESIS, shared), true);
        }
        let (file, prev) = open_file(Path::new(path), GENESIS)?;
        let mut writer = Writer::new(Sink::File { file, path: path.into() }, prev, shared);
        writer.append(chain_start()?)?;
        writer.write_batch().map_err(|(_, e)| e)?;
        Self::start(writer, false)
    }

    /// A queue whose writer writes to `w` (tests: a sink that stalls on demand).
    #[cfg(test)]
    pub fn to(w: Box<dyn Write + Send>, metrics: Metrics) -> io::Result<Self> {
        Self::start(Writer::new(Sink::Other(w), GENESIS, Shared::new(metrics)), true)
    }

    fn start(writer: Writer, chain_start: bool) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let shared = Arc::clone(&writer.shared);
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || writer.run(rx, chain_start))?;
        Ok(Self { tx, shared })
    }

    /// Queues one line (without its newline); never waits. A line that does not fit is counted
    /// as lost.
    pub fn line(&self, line: Vec<u8>) {
        if self.send(Msg::Line(line)).is_err() {
            self.shared.lost("the audit queue is full: the sink is not taking lines");
        }
    }

    /// Has the writer reopen the file after the lines queued so far (or, when the queue is full,
    /// before the next one it takes). Nothing to do on stdout.
    pub fn reopen(&self) {
        if self.send(Msg::Reopen).is_err() {
            self.shared.reopen.store(true, Ordering::Release);
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
    fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            reopen: AtomicBool::new(false),
            metrics,
            report: Report { started: Instant::now(), next_ms: AtomicU64::new(0), unreported: AtomicU64::new(0) },
        })
    }

    /// Counts one lost line, and reports it.
    fn lost(&self, why: &str) {
        self.lost_many(1, why);
    }

    /// Counts `n` lost lines, and reports them.
    fn lost_many(&self, n: u64, why: &str) {
        self.metrics.audit_lost.inc_by(n);
        self.report.unreported.fetch_add(n, Ordering::AcqRel);
        self.report(why);
    }

    /// Reports on stderr the lines lost since the last report, unless that was less than ten
    /// seconds ago (then a later loss, or the next line written, reports them).
    fn report(&self, why: &str) {
        let r = &self.report;
        if r.unreported.load(Ordering::Acquire) == 0 {
            return;
        }
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
    fn new(sink: Sink, prev: LineHash, shared: Arc<Shared>) -> Self {
        Self { sink, prev, written: prev, batch: Vec::new(), batched: 0, shared }
    }

    fn run(mut self, rx: Receiver<Msg>, chain_start: bool) {
        if chain_start {
            self.write_chain_start();
            self.write();
        }
        while let Ok(msg) = rx.recv() {
            self.handle(msg);
            // While lines keep coming, nap briefly instead of parking: a sender that finds the
            // writer parked must wake it, a futex call and a context switch on the data path
            // for every line. A nap costs only this thread, and a line waits at most one nap
            // (and one write). The lines that came meanwhile go out in one write.
            loop {
                while let Ok(msg) = rx.try_recv() {
                    self.handle(msg);
                }
                self.write();
                std::thread::sleep(NAP);
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        if self.shared.reopen.swap(false, Ordering::AcqRel) {
            self.reopen();
        }
        match msg {
            Msg::Line(line) => self.add(line),
            Msg::Reopen => self.reopen(),
            Msg::Flush(done) => {
                self.write();
                let _ = done.send(());
            }
        }
    }

    /// Adds one line to the batch (written at once if the batch is big), or counts it lost.
    fn add(&mut self, line: Vec<u8>) {
        match self.append(line) {
            Ok(()) if self.batch.len() >= BATCH_BYTES => self.write(),
            Ok(()) => {}
            Err(e) => self.shared.lost(&format!("an audit line could not be made: {e}")),
        }
    }

    /// Writes the batch, or counts its lines lost.
    fn write(&mut self) {
        if self.batched == 0 {
            return;
        }
        match self.write_batch() {
            Ok(()) => self.shared.report("lost before this report; the audit log is being written again"),
            Err((n, e)) => self.shared.lost_many(n, &format!("the audit sink cannot be written: {e}")),
        }
    }

    /// Opens the file at its path again (logrotate renamed it away), and goes on with a
    /// `chain_start` linked to the new file's last line, or, in a new file, to the last line
    /// written to the old one. If it cannot be opened, lines go on to the file open now.
    fn reopen(&mut self) {
        // The lines made so far belong to the file they link to.
        self.write();
        let Sink::File { file, path } = &mut self.sink else { return };
        match open_file(path, self.prev) {
            Ok((new, prev)) => {
                *file = new;
                self.prev = prev;
                self.written = prev;
                tracing::info!(path = %path.display(), "Audit log reopened");
                self.write_chain_start();
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "Cannot reopen the audit log; writing on to the file open before");
            }
        }
    }

    fn write_chain_start(&mut self) {
        match chain_start() {
            Ok(line) => self.add(line),
            Err(e) => self.shared.lost(&format!("the chain_start line could not be made: {e}")),
        }
    }

    /// Ends `line` (a serialised JSON object) with `"prev"` and a newline, adds it to the batch,
    /// and makes it the line the next one links to.
    fn append(&mut self, mut line: Vec<u8>) -> io::Result<()> {
        if line.pop() != Some(b'}') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "an audit line is not a JSON object"));
        }
        line.extend_from_slice(b",\"prev\":\"");
        line.extend_from_slice(chain::hex(&self.prev).as_bytes());
        line.extend_from_slice(b"\"}");
        self.prev = chain::digest(&line);
        self.batch.extend_from_slice(&line);
        self.batch.push(b'\n');
        self.batched += 1;
        Ok(())
    }

    /// Writes the batch in one write. Not written, its lines are lost (the error says how many)
    /// and the chain goes back to the last line written, so that the next line links to it.
    fn write_batch(&mut self) -> Result<(), (u64, io::Error)> {
        let done = match &mut self.sink {
            Sink::Stdout(out) => out.write_all(&self.batch).and_then(|()| out.flush()),
            Sink::File { file, .. } => file.write_all(&self.batch),
            #[cfg(test)]
            Sink::Other(w) => w.write_all(&self.batch).and_then(|()| w.flush()),
        };
        let lines = std::mem::take(&mut self.batched);
        self.batch.clear();
        if self.batch.capacity() > BATCH_BYTES {
            self.batch = Vec::new();
        }
        match done {
            Ok(()) => {
                self.written = self.prev;
                self.shared.metrics.audit_lines.inc_by(lines);
                Ok(())
            }
            Err(e) => {
                self.prev = self.written;
                Err((lines, e))
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
    }
}

/// A `chain_start` line, without `prev` (the writer adds it).
fn chain_start() -> io::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&ChainStart { ts: SystemTime::now(), event: "chain_start" })?)
}

/// Opens `path` for appending (created if missing), and returns it with the hash the next line
/// links to: the file's last line's, or `before` when the file is empty. A last line without its
/// newline (a write cut short) gets one, so that the next line starts on a line of its own.
fn open_file(path: &Path, before: LineHash) -> io::Result<(File, LineHash)> {
    let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
    let prev = match last_line(&file)? {
        None => before,
        Some((line, torn)) => {
            if torn {
                file.write_all(b"\n")?;
            }
            chain::digest(&line)
        }
    };
    Ok((file, prev))
}

/// The last line of `file` without its newline, and whether that newline is missing; `None` for
/// an empty file. Reads backwards from the end, a chunk at a time.
fn last_line(file: &File) -> io::Result<Option<(Vec<u8>, bool)>> {
    const CHUNK: u64 = 4096;
    let len = file.metadata()?.len();
    let Some(last) = len.checked_sub(1) else { return Ok(None) };
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, last)?;
    let torn = byte[0] != b'\n';
    let mut pos = if torn { len } else { last };
    let mut line = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        // At most CHUNK bytes: fits any usize.
        let mut chunk = vec![0u8; usize::try_from(pos - start).unwrap_or(0)];
        file.read_exact_at(&mut chunk, start)?;
        let newline = chunk.iter().rposition(|&b| b == b'\n');
        if let Some(i) = newline {
            chunk.drain(..=i);
        }
        chunk.extend_from_slice(&line);
        line = chunk;
        if newline.is_some() {
            break;
        }
        if line.len() > MAX_TAIL {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the last line is over 1 MiB: not an audit log"));
        }
        pos = start;
    }
    Ok(Some((line, torn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, bytes).unwrap();
        last_line(&File::open(&path).unwrap()).unwrap()
    }

    /// A sink that fails its next write when told to, and keeps what it was given.
    #[derive(Clone, Default)]
    struct Flaky(Arc<std::sync::Mutex<(Vec<u8>, bool, usize)>>);

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.2 += 1;
            if std::mem::take(&mut g.1) {
                return Err(io::Error::other("disk full"));
            }
            g.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(id: u32) -> Vec<u8> {
        format!(r#"{{"event":"decision","id":{id}}}"#).into_bytes()
    }

    #[test]
    fn lines_go_out_a_batch_a_write_and_a_lost_batch_leaves_the_chain_whole() {
        let (sink, metrics) = (Flaky::default(), Metrics::new());
        let mut w = Writer::new(Sink::Other(Box::new(sink.clone())), GENESIS, Shared::new(metrics.clone()));
        w.write_chain_start();
        for id in 1..3 {
            w.add(line(id));
        }
        w.write();
        assert_eq!(sink.0.lock().unwrap().2, 1, "three lines, one write");
        assert_eq!(metrics.audit_lines.get(), 3);

        sink.0.lock().unwrap().1 = true;
        w.add(line(3));
        w.add(line(4));
        w.write();
        assert_eq!((metrics.audit_lines.get(), metrics.audit_lost.get()), (3, 2), "the failed batch's lines are lost");

        w.add(line(5));
        w.write();
        let raw = String::from_utf8(sink.0.lock().unwrap().0.clone()).unwrap();
        let lines: Vec<&str> = raw.lines().collect();
        assert_eq!(lines.len(), 4, "{raw}");
        assert!(lines[3].contains(r#""id":5,"#), "{raw}");
        let mut check = chain::ChainCheck::new();
        assert!(
            lines.iter().all(|l| check.check(l.as_bytes()).is_ok()),
            "line 5 links to line 2, the last written: {raw}"
        );
    }

    #[test]
    fn the_last_line_is_found_however_long_and_however_the_file_ends() {
        assert_eq!(tail(b""), None);
        assert_eq!(tail(b"a\nbc\n"), Some((b"bc".to_vec(), false)));
        assert_eq!(tail(b"a\nbc"), Some((b"bc".to_vec(), true)));
        assert_eq!(tail(b"only\n"), Some((b"only".to_vec(), false)));
        assert_eq!(tail(b"a\n\n"), Some((Vec::new(), false)));
        let long: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut file = b"first\n".to_vec();
        file.extend_from_slice(&long);
        file.push(b'\n');
        assert_eq!(tail(&file), Some((long.clone(), false)), "across chunks");
        assert_eq!(tail(&long), Some((long, true)), "no newline at all");
    }
}

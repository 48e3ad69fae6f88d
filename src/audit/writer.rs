//! The audit writer: one thread that owns the sink and writes the queue out in order, so that a
//! sink that stops taking bytes (a stdout reader that stopped reading, a hung disk) stops only
//! this thread, never a connection. Being the one writer, it also keeps the hash chain: it ends
//! each line with `"prev"`, the hash of the line it wrote before (`chain`).
//!
//! The queue is bounded. A line that does not fit, or that the sink refuses, is lost: counted in
//! `egress_proxy_audit_lines_lost_total` and reported on stderr at most every ten seconds.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
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
    /// The sink holds the start of a line cut short, which could not be taken back: the next
    /// write begins with a newline, so that it ends the fragment and starts on a line of its own.
    torn: bool,
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
    Other(Box<dyn TestSink>),
}

/// A sink in tests: any writer, which may say that it can take back its last bytes, as a file
/// can (`Sink::take_back`).
#[cfg(test)]
pub trait TestSink: Write + Send {
    fn take_back(&mut self, _n: usize) -> bool {
        false
    }
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
    pub fn to(w: Box<dyn TestSink>, metrics: Metrics) -> io::Result<Self> {
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
        Self { sink, prev, written: prev, batch: Vec::new(), batched: 0, torn: false, shared }
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

    /// Writes the batch, in one write when the sink takes it all. The lines the sink took whole
    /// are written, and the chain goes on from the last of them; the others are lost (the error
    /// says how many), and the next line links to that last one. A line cut short (a disk that
    /// fills up during the write) is taken back off a file, so that the log stays whole lines
    /// that verify; where it cannot be, the next write ends it with a newline first.
    fn write_batch(&mut self) -> Result<(), (u64, io::Error)> {
        let mut took = 0;
        let done = self.end_torn().and_then(|()| self.sink.put(&self.batch, &mut took));
        let lines = std::mem::take(&mut self.batched);
        let result = match done {
            Ok(()) => {
                self.written = self.prev;
                self.shared.metrics.audit_lines.inc_by(lines);
                Ok(())
            }
            Err(e) => {
                let taken = self.batch.get(..took).unwrap_or_default();
                let whole = taken.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let lines_taken = chain_lines(taken.get(..whole).unwrap_or_default(), &mut self.written);
                self.shared.metrics.audit_lines.inc_by(lines_taken);
                let fragment = took - whole;
                if fragment > 0 && !self.sink.take_back(fragment) {
                    self.torn = true;
                }
                self.prev = self.written;
                Err((lines.saturating_sub(lines_taken), e))
            }
        };
        self.batch.clear();
        if self.batch.capacity() > BATCH_BYTES {
            self.batch = Vec::new();
        }
        result
    }

    /// Ends a fragment left by a write cut short (`torn`) with a newline.
    fn end_torn(&mut self) -> io::Result<()> {
        if self.torn {
            self.sink.put(b"\n", &mut 0)?;
            self.torn = false;
        }
        Ok(())
    }
}

/// Counts the whole lines in `lines` (each ending with a newline), and sets `last` to the hash of
/// the last one, if any: what the next line links to.
fn chain_lines(lines: &[u8], last: &mut LineHash) -> u64 {
    let mut count = 0;
    if let Some(line) = lines.strip_suffix(b"\n") {
        let start = line.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        *last = chain::digest(line.get(start..).unwrap_or_default());
        count = lines.iter().filter(|&&b| b == b'\n').count();
    }
    u64::try_from(count).unwrap_or(u64::MAX)
}

// === impl Sink ===

impl Sink {
    /// Writes all of `bytes`, counting in `took` what the sink took, also when it fails partway.
    /// Standard output is written to its descriptor, past std's buffer, so that the count is
    /// what reached it.
    fn put(&mut self, bytes: &[u8], took: &mut usize) -> io::Result<()> {
        while let Some(rest) = bytes.get(*took..).filter(|r| !r.is_empty()) {
            let wrote = match self {
                Self::Stdout(out) => rustix::io::write(out.as_fd(), rest).map_err(io::Error::from),
                Self::File { file, .. } => file.write(rest),
                #[cfg(test)]
                Self::Other(w) => w.write(rest),
            };
            match wrote {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => *took += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match self {
            #[cfg(test)]
            Self::Other(w) => w.flush(),
            _ => Ok(()),
        }
    }

    /// Takes the last `n` bytes written back off the sink, if it can: a file is cut to its length
    /// before them (lines are written by this thread only).
    fn take_back(&mut self, n: usize) -> bool {
        match self {
            Self::Stdout(_) => false,
            Self::File { file, .. } => {
                let n = u64::try_from(n).unwrap_or(u64::MAX);
                file.metadata().and_then(|m| file.set_len(m.len().saturating_sub(n))).is_ok()
            }
            #[cfg(test)]
            Self::Other(w) => w.take_back(n),
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

    impl TestSink for Flaky {}

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

    /// A sink that takes `room` more bytes (a short write when a write asks for more), then
    /// fails one write with ENOSPC, then takes everything again: a disk that fills up during a
    /// batch and is cleaned up afterwards. Keeps what it took, and the size of every write asked;
    /// takes back its last bytes if `file` (as a file can), not otherwise (as a pipe cannot).
    #[derive(Clone, Default)]
    struct Filling(Arc<std::sync::Mutex<FillingState>>);

    #[derive(Default)]
    struct FillingState {
        bytes: Vec<u8>,
        room: Option<usize>,
        asked: Vec<usize>,
        file: bool,
    }

    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.asked.push(buf.len());
            let n = match g.room {
                Some(0) => {
                    g.room = None;
                    return Err(io::Error::from_raw_os_error(28)); // ENOSPC
                }
                Some(room) => {
                    let n = room.min(buf.len());
                    g.room = Some(room - n);
                    n
                }
                None => buf.len(),
            };
            g.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl TestSink for Filling {
        fn take_back(&mut self, n: usize) -> bool {
            let mut g = self.0.lock().unwrap();
            let keep = g.bytes.len() - n;
            g.file && {
                g.bytes.truncate(keep);
                true
            }
        }
    }

    /// The promise: every line is in the log or counted lost, and the log verifies. A batch that
    /// the disk cuts short (some bytes taken, then ENOSPC) leaves whole lines that verify, counts
    /// as written the lines it wrote whole, and the next line links to the last of them. Where
    /// the cut line cannot be taken back (a pipe), it is ended on a line of its own, and the lines
    /// around it still link. (Found in review: the whole batch was counted lost, and the next
    /// batch went on after the fragment, linked to the line before the batch.)
    #[test]
    fn a_batch_cut_short_by_a_full_disk_leaves_whole_lines_that_verify_and_counts_right() {
        let line_len = |w: &mut Writer, id| {
            // The length of line `id` as it would be written now (with its prev and newline).
            let before = (w.batch.len(), w.batched, w.prev);
            w.append(line(id)).unwrap();
            let len = w.batch.len() - before.0;
            w.batch.truncate(before.0);
            w.batched = before.1;
            w.prev = before.2;
            len
        };
        for (extra, file) in [(10usize, true), (0, true), (10, false), (0, false)] {
            let case = format!("{extra} bytes of line 4, file {file}");
            let (sink, metrics) = (Filling::default(), Metrics::new());
            sink.0.lock().unwrap().file = file;
            let mut w = Writer::new(Sink::Other(Box::new(sink.clone())), GENESIS, Shared::new(metrics.clone()));
            w.write_chain_start();
            w.add(line(1));
            w.add(line(2));
            w.write();
            // The disk has room for line 3 and `extra` bytes of line 4; then it is full.
            let room = line_len(&mut w, 3) + extra;
            sink.0.lock().unwrap().room = Some(room);
            for id in 3..6 {
                w.add(line(id));
            }
            w.write();
            // Space is freed; the proxy goes on.
            w.add(line(6));
            w.write();

            let raw = String::from_utf8(sink.0.lock().unwrap().bytes.clone()).unwrap();
            let lines: Vec<&str> = raw.lines().collect();
            let fragment = extra > 0 && !file;
            // Where the fragment stays, it is a line of its own, between line 3 and line 6.
            let whole: Vec<&str> = if fragment {
                assert_eq!(lines.len(), 6, "{case}: {raw}");
                assert!(serde_json::from_str::<serde_json::Value>(lines[4]).is_err(), "{case}: {raw}");
                lines.iter().enumerate().filter(|&(i, _)| i != 4).map(|(_, l)| *l).collect()
            } else {
                lines.clone()
            };
            let mut check = chain::ChainCheck::new();
            for (n, l) in whole.iter().enumerate() {
                assert_eq!(check.check(l.as_bytes()), Ok(()), "{case}: line {} of {raw}", n + 1);
            }
            let ids: Vec<String> = whole
                .iter()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|v| v.get("id").map_or_else(|| "chain_start".into(), ToString::to_string))
                .collect();
            assert_eq!(ids, ["chain_start", "1", "2", "3", "6"], "{case}: {raw}");
            assert_eq!(metrics.audit_lines.get(), 5, "{case}: the lines written whole");
            assert_eq!(metrics.audit_lost.get(), 2, "{case}: lines 4 and 5");
        }
    }

    /// A file takes back a line cut short: the length goes back to before it, and what is
    /// appended next starts there.
    #[test]
    fn a_file_takes_back_the_bytes_of_a_line_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"whole\ncut sh").unwrap();
        let file = OpenOptions::new().read(true).append(true).open(&path).unwrap();
        let mut sink = Sink::File { file, path: path.clone() };
        assert!(sink.take_back(6));
        sink.put(b"next\n", &mut 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\nnext\n");
    }

    /// A flood of lines with no pause is written in pieces of about BATCH_BYTES: the batch never
    /// holds much more, and does not keep a big buffer afterwards.
    #[test]
    fn a_flood_is_written_in_batches_of_at_most_batch_bytes() {
        let (sink, metrics) = (Filling::default(), Metrics::new());
        let mut w = Writer::new(Sink::Other(Box::new(sink.clone())), GENESIS, Shared::new(metrics.clone()));
        let n = 3 * BATCH_BYTES / line(0).len();
        for id in 0..n {
            w.add(line(u32::try_from(id).unwrap()));
            assert!(w.batch.len() < BATCH_BYTES, "written once it reaches BATCH_BYTES");
        }
        w.write();
        let asked = sink.0.lock().unwrap().asked.clone();
        assert!(asked.len() >= 3, "{asked:?}");
        assert!(asked.iter().all(|&a| a < BATCH_BYTES + 200), "{asked:?}");
        assert!(w.batch.capacity() <= BATCH_BYTES, "a big batch's buffer is let go");
        assert_eq!(metrics.audit_lines.get(), n as u64);
    }

    /// A steady trickle keeps the writer napping, never parked; each line still goes out within
    /// about a nap, not when the trickle stops.
    #[test]
    fn a_steady_trickle_does_not_hold_lines_back() {
        let (sink, metrics) = (Flaky::default(), Metrics::new());
        let q = Arc::new(Queue::to(Box::new(sink.clone()), metrics).unwrap());
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let trickle = {
            let (q, stop, sent) = (Arc::clone(&q), Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                let mut id = 0;
                while !stop.load(Ordering::Acquire) {
                    q.line(line(id));
                    sent.store(u64::from(id), Ordering::Release);
                    id += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(30));
            let k = sent.load(Ordering::Acquire);
            let want = format!(r#""id":{k},"#);
            let start = Instant::now();
            while !String::from_utf8_lossy(&sink.0.lock().unwrap().0).contains(&want) {
                assert!(start.elapsed() < Duration::from_secs(2), "line {k} held back while the trickle goes on");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        stop.store(true, Ordering::Release);
        trickle.join().unwrap();
        assert!(q.flush(Duration::from_secs(10)));
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

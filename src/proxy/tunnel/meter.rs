//! The meter of one allowed connection: every chunk it carries, each way, passes `Flow::pass`
//! before it is written, replayed prefix bytes and forwarded bodies included. The close line reads
//! its totals, the idle timeout reads when bytes last moved (read, or written on: `Flow::wrote`),
//! and `pass` answers whether the chunk may go on: once the meter is cut, no further chunk is
//! written, and a tunnel waiting for bytes is woken and ends.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::budgets::{Crossed, Window};

/// Byte counts and the time of the last byte, for one connection.
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    /// Milliseconds after `start` at which bytes last moved.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    cut: AtomicBool,
    /// The meter was cut because the upload limit was reached.
    over_limit: AtomicBool,
    /// Wakes a tunnel that waits for bytes when the meter is cut.
    cut_signal: Notify,
    /// What the rule that allowed the connection lets the client send up; set once, when it is
    /// allowed.
    up_limits: OnceLock<UpLimits>,
}

/// The rule's upload limits, as the meter applies them to bytes going up.
pub struct UpLimits {
    /// `max_upload_bytes`: past it, the meter cuts.
    pub max: Option<u64>,
    /// The client's `upload_budget` window under the rule, and what to do when a chunk takes the
    /// client past it (write the audit line, move the metric).
    pub budget: Option<(Arc<Window>, OnCrossed)>,
}

/// What to do when a chunk takes the client past its budget.
pub type OnCrossed = Box<dyn Fn(Crossed) + Send + Sync>;

impl std::fmt::Debug for UpLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpLimits").field("max", &self.max).field("budget", &self.budget.is_some()).finish()
    }
}

/// Which way bytes move.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Direction {
    /// From the client to the upstream.
    Up,
    /// From the upstream to the client.
    Down,
}

/// One direction's handle on a meter: the copy in that direction reports every chunk here.
#[derive(Clone, Debug)]
pub struct Flow {
    meter: Arc<Meter>,
    direction: Direction,
}

/// Why `pass` told a copy to stop.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Cut;

// === impl Meter ===

impl Meter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            over_limit: AtomicBool::new(false),
            cut_signal: Notify::new(),
            up_limits: OnceLock::new(),
        })
    }

    /// Applies the rule's upload limits from now on (once; later calls are ignored).
    pub fn limit_up(&self, limits: UpLimits) {
        let _ = self.up_limits.set(limits);
    }

    /// Whether the meter was cut at the upload limit.
    pub fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    pub fn flow(self: &Arc<Self>, direction: Direction) -> Flow {
        Flow { meter: Arc::clone(self), direction }
    }

    /// Bytes moved so far: (up, down).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }

    /// Since the meter was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops both directions: `pass` answers `Break` from now on, and `cut_off` resolves.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        self.cut_signal.notify_waiters();
    }

    /// Resolves once the meter is cut.
    pub async fn cut_off(&self) {
        loop {
            // Registered before the check, so a cut between the two is not missed.
            let notified = self.cut_signal.notified();
            if self.cut.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once nothing has moved either way for `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let deadline = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

// === impl Flow ===

impl Flow {
    /// Asks to write `n` bytes this way. `Continue`: write them, they are counted. `Break`: the
    /// meter is cut (or these bytes would take the upload past its limit, which cuts it); write
    /// nothing, and stop.
    pub fn pass(&self, n: usize) -> ControlFlow<Cut> {
        let m = &self.meter;
        if m.cut.load(Ordering::Relaxed) {
            return ControlFlow::Break(Cut);
        }
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let count = match self.direction {
            Direction::Up => {
                if let Some(limits) = m.up_limits.get() {
                    if limits.max.is_some_and(|max| m.up.load(Ordering::Relaxed).saturating_add(n) > max) {
                        m.over_limit.store(true, Ordering::Relaxed);
                        m.cut();
                        return ControlFlow::Break(Cut);
                    }
                    if let Some((window, report)) = &limits.budget {
                        if let Some(crossed) = window.add(n) {
                            report(crossed);
                        }
                    }
                }
                &m.up
            }
            Direction::Down => &m.down,
        };
        count.fetch_add(n, Ordering::Relaxed);
        self.wrote();
        ControlFlow::Continue(())
    }

    /// Says that bytes passed earlier went out (part of a write, of a pipe's worth): the tunnel
    /// is not idle while it still delivers them, to a peer that reads slowly but steadily.
    pub fn wrote(&self) {
        let m = &self.meter;
        let elapsed = u64::try_from(m.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        m.last.store(elapsed, Ordering::Relaxed);
    }

    /// The most bytes the next chunk this way may carry: what is left of the upload limit going
    /// up, unbounded otherwise. Copies read no more than this, so that a cut at the limit lands
    /// on the byte, not a pipe's worth later.
    pub fn allowance(&self) -> usize {
        let m = &self.meter;
        match (self.direction, m.up_limits.get().and_then(|l| l.max)) {
            (Direction::Up, Some(max)) => {
                let left = max.saturating_sub(m.up.load(Ordering::Relaxed));
                // At the limit, one byte more is asked for, so that `pass` sees it and cuts.
                usize::try_from(left).unwrap_or(usize::MAX).max(1)
            }
            _ => usize::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_direction_apart_and_breaks_once_cut() {
        let m = Meter::new();
        let (up, down) = (m.flow(Direction::Up), m.flow(Direction::Down));
        assert_eq!(up.pass(10), ControlFlow::Continue(()));
        assert_eq!(down.pass(7), ControlFlow::Continue(()));
        assert_eq!(up.pass(5), ControlFlow::Continue(()));
        m.cut();
        assert_eq!(down.pass(1), ControlFlow::Break(Cut));
        assert_eq!(m.bytes(), (15, 7), "the chunk refused at the cut is not counted: it never moved");
    }

    #[test]
    fn the_upload_limit_cuts_before_the_byte_past_it_and_only_going_up() {
        let m = Meter::new();
        m.limit_up(UpLimits { max: Some(10), budget: None });
        let (up, down) = (m.flow(Direction::Up), m.flow(Direction::Down));
        assert_eq!(up.allowance(), 10);
        assert_eq!(up.pass(6), ControlFlow::Continue(()));
        assert_eq!(up.allowance(), 4);
        assert_eq!(down.pass(100), ControlFlow::Continue(()), "downloads are not limited");
        assert_eq!(up.pass(4), ControlFlow::Continue(()), "up to the limit exactly");
        assert!(!m.over_limit());
        assert_eq!(up.allowance(), 1, "one byte more is asked for, so that the cut is seen");
        assert_eq!(up.pass(1), ControlFlow::Break(Cut));
        assert!(m.over_limit());
        assert_eq!(m.bytes(), (10, 100));
    }
}

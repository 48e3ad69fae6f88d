//! The meter of one allowed connection: every chunk it carries, each way, passes `Flow::pass`
//! before it is written, replayed prefix bytes and forwarded bodies included. The close line reads
//! its totals, the idle timeout reads when bytes last moved, and `pass` answers whether the chunk
//! may go on: once the meter is cut, no further chunk is written, and a tunnel waiting for bytes
//! is woken and ends.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Byte counts and the time of the last byte, for one connection.
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    /// Milliseconds after `start` at which bytes last moved.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    cut: AtomicBool,
    /// Wakes a tunnel that waits for bytes when the meter is cut.
    cut_signal: Notify,
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
            cut_signal: Notify::new(),
        })
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
    /// meter is cut; write nothing, and stop.
    pub fn pass(&self, n: usize) -> ControlFlow<Cut> {
        let m = &self.meter;
        if m.cut.load(Ordering::Relaxed) {
            return ControlFlow::Break(Cut);
        }
        let count = match self.direction {
            Direction::Up => &m.up,
            Direction::Down => &m.down,
        };
        count.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
        let elapsed = u64::try_from(m.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        m.last.store(elapsed, Ordering::Relaxed);
        ControlFlow::Continue(())
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
}

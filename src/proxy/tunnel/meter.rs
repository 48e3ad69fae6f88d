//! The meter of one allowed connection: every byte it carries, each way, passes `Flow::pass`,
//! replayed prefix bytes and forwarded bodies included. The close line reads its totals, the idle
//! timeout reads when bytes last moved, and `pass` answers whether the copy may go on, so that a
//! limit can stop a copy at the byte where it is crossed.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

    /// Stops both directions at their next chunk: `pass` answers `Break` from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
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
    /// Counts `n` bytes that have moved this way, and says whether the copy may go on.
    pub fn pass(&self, n: usize) -> ControlFlow<Cut> {
        let m = &self.meter;
        let count = match self.direction {
            Direction::Up => &m.up,
            Direction::Down => &m.down,
        };
        count.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
        let elapsed = u64::try_from(m.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        m.last.store(elapsed, Ordering::Relaxed);
        if m.cut.load(Ordering::Relaxed) {
            ControlFlow::Break(Cut)
        } else {
            ControlFlow::Continue(())
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
        assert_eq!(m.bytes(), (15, 8), "the chunk that met the cut is still counted: it was moved");
    }
}

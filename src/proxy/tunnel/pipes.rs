//! A bounded pool of splice pipes (HAProxy's `maxpipes`). A tunnel direction takes a pipe when its
//! socket has bytes to read and gives it back once the socket is drained and the pipe is empty, so
//! an idle tunnel holds no pipe: two descriptors, not six. A pipe that still holds bytes when its
//! copy stops (an error, a cut) is closed rather than pooled, so no tunnel's bytes reach another.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use prometheus::{IntCounter, IntGauge};
use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};

use crate::metrics::Metrics;

/// A pipe used as the in-kernel buffer of one direction.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity: usize,
}

/// Pipes not in use, and how many exist, within `max`.
pub struct Pipes {
    inner: Mutex<Inner>,
    max: usize,
    in_use: IntGauge,
    fallbacks: IntCounter,
}

struct Inner {
    free: Vec<Pipe>,
    made: usize,
}

/// A pipe taken from the pool. Dropped empty, it goes back; dropped holding bytes, it is closed.
pub struct Lease<'a> {
    pool: &'a Pipes,
    pipe: Option<Pipe>,
    /// Bytes spliced in and not yet out.
    held: AtomicUsize,
}

// === impl Pipe ===

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A bigger pipe means fewer system calls; the default (64 KiB) is fine if refused.
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Self { read, write, capacity })
    }
}

// === impl Pipes ===

impl Pipes {
    /// A pool of at most `max` pipes (0: never splice), made on demand and kept for reuse.
    pub fn new(max: usize, metrics: &Metrics) -> Self {
        Self {
            inner: Mutex::new(Inner { free: Vec::new(), made: 0 }),
            max,
            in_use: metrics.pipes_in_use.clone(),
            fallbacks: metrics.pipe_fallbacks.clone(),
        }
    }

    /// A pipe for one burst of bytes, or `None` when all `max` are in use or none can be made
    /// (out of descriptors): the caller then copies through a small buffer.
    pub fn take(&self) -> Option<Lease<'_>> {
        let pipe = self.reuse_or_make();
        match pipe {
            Some(pipe) => {
                self.in_use.inc();
                Some(Lease { pool: self, pipe: Some(pipe), held: AtomicUsize::new(0) })
            }
            None => {
                self.fallbacks.inc();
                None
            }
        }
    }

    fn reuse_or_make(&self) -> Option<Pipe> {
        {
            let mut inner = self.lock();
            if let Some(pipe) = inner.free.pop() {
                return Some(pipe);
            }
            if inner.made >= self.max {
                return None;
            }
            inner.made += 1;
        }
        // Made outside the lock: two system calls that other directions need not wait for.
        Pipe::new().map_err(|e| tracing::debug!(error = %e, "Cannot make a splice pipe")).ok().or_else(|| {
            self.forget();
            None
        })
    }

    /// Pipes made and not closed: in use and free.
    pub fn made(&self) -> usize {
        self.lock().made
    }

    /// Pipes waiting in the pool.
    pub fn free(&self) -> usize {
        self.lock().free.len()
    }

    /// Closes the pipes waiting in the pool, giving their descriptors back (on a shortage).
    pub fn close_free(&self) {
        let free = {
            let mut inner = self.lock();
            let free = std::mem::take(&mut inner.free);
            inner.made = inner.made.saturating_sub(free.len());
            free
        };
        drop(free);
    }

    fn give_back(&self, pipe: Pipe) {
        self.lock().free.push(pipe);
    }

    fn forget(&self) {
        let mut inner = self.lock();
        inner.made = inner.made.saturating_sub(1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Lease ===

impl Lease<'_> {
    pub fn pipe(&self) -> &Pipe {
        // Always `Some` until drop.
        self.pipe.as_ref().unwrap_or_else(|| unreachable!("a lease holds its pipe until it is dropped"))
    }

    /// Records how many bytes the pipe holds (spliced in, not yet out).
    pub fn set_held(&self, n: usize) {
        self.held.store(n, Ordering::Relaxed);
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.in_use.dec();
        let Some(pipe) = self.pipe.take() else { return };
        if self.held.load(Ordering::Relaxed) == 0 {
            self.pool.give_back(pipe);
        } else {
            drop(pipe);
            self.pool.forget();
        }
    }
}

const PIPE_SIZE: usize = 1024 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_reused_bounded_and_closed_when_dropped_holding_bytes() {
        let pool = Pipes::new(2, &Metrics::new());
        let a = pool.take().expect("a first pipe");
        let b = pool.take().expect("a second pipe");
        assert!(pool.take().is_none(), "the pool is bounded");
        drop(a);
        assert_eq!((pool.made(), pool.free()), (2, 1), "an empty pipe goes back to the pool");
        let c = pool.take().expect("the pooled pipe");
        assert_eq!(pool.free(), 0);
        c.set_held(10);
        drop(c);
        assert_eq!((pool.made(), pool.free()), (1, 0), "a pipe holding bytes is closed, not pooled");
        drop(b);
        assert_eq!((pool.made(), pool.free()), (1, 1));
    }

    #[test]
    fn a_pool_of_none_never_splices() {
        assert!(Pipes::new(0, &Metrics::new()).take().is_none());
    }
}

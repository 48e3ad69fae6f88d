//! File descriptors: the soft limit raised to the hard one at start (as Go's runtime and nginx's
//! `worker_rlimit_nofile` do), the configured limits checked against it, and what happens when
//! descriptors run out anyway: a `Shortage` that counts, logs a few lines rather than one per
//! failure, and makes `/readyz` answer not ready while it lasts.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounterVec;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tokio::time::Instant;

use crate::config;

/// The descriptor limit before and after `raise_limit`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct NoFile {
    pub soft_before: Option<u64>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. `None` is unlimited.
pub fn raise_limit() -> NoFile {
    let before = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: before.maximum, maximum: before.maximum };
    let after = if before.current == before.maximum || setrlimit(Resource::Nofile, raised).is_err() {
        before.current
    } else {
        getrlimit(Resource::Nofile).current
    };
    NoFile { soft_before: before.current, soft: after, hard: before.maximum }
}

/// The hard `RLIMIT_NOFILE`: what `run` will raise the soft limit to. `None` is unlimited.
pub fn hard_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).maximum
}

/// Descriptors the configured limits can hold at once: two per connection (client and upstream),
/// two per splice pipe, one per admin connection, and a reserve for listeners, the audit log,
/// the resolver and the runtime.
pub fn needed(limits: &config::Limits, admin_connections: usize) -> u64 {
    let connections = *limits.max_connections.get_ref() as u64;
    let pipes = *limits.max_pipes.get_ref() as u64;
    2 * connections + 2 * pipes + admin_connections as u64 + RESERVE
}

/// A warning when the limits do not fit `limit` descriptors.
pub fn check(limits: &config::Limits, admin_connections: usize, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let needed = needed(limits, admin_connections);
    (needed > limit).then(|| {
        format!(
            "[limits] max_connections = {} and max_pipes = {} need up to {needed} file descriptors \
             (2 per connection, 2 per pipe, {admin_connections} for admin, {RESERVE} spare), but the \
             limit is {limit}: lower them or raise the limit (LimitNOFILE=, ulimit -n), or connections \
             will be refused with local_resources once descriptors run out",
            limits.max_connections.get_ref(),
            limits.max_pipes.get_ref(),
        )
    })
}

/// Whether an accept or connect failed for want of a descriptor or socket memory, which is the
/// proxy's shortage and not the client's or the upstream's fault.
pub fn is_shortage(e: &io::Error) -> bool {
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM))
}

/// Whether a listening socket has a connection waiting to be accepted. Linux takes the new
/// descriptor before it looks at the queue, so `accept` fails with EMFILE at the limit even when no
/// one is waiting: the spare is given up only when someone is.
pub fn has_pending(listener: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(poll(&mut fds, Some(&now)), Ok(1..))
}

/// Where the proxy ran short.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum At {
    Accept,
    Dial,
}

/// The proxy's record of running out of descriptors.
pub struct Shortage {
    start: Instant,
    /// Milliseconds after `start` of the last shortage, plus one (0: never).
    last: AtomicU64,
    /// Milliseconds after `start` of the last warning logged, plus one (0: never).
    logged: AtomicU64,
    /// Shortages since the last warning.
    unlogged: AtomicU64,
    counter: IntCounterVec,
}

impl At {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Dial => "dial",
        }
    }
}

impl Shortage {
    pub fn new(counter: IntCounterVec) -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            counter,
        }
    }

    /// Counts one shortage, and logs it unless one was logged in the last `LOG_EVERY`: the line
    /// says how many went unlogged since.
    pub fn note(&self, at: At, error: &io::Error) {
        self.counter.with_label_values(&[at.as_str()]).inc();
        let now = self.now();
        self.last.store(now, Ordering::Relaxed);
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed);
        let logged = self.logged.load(Ordering::Relaxed);
        let due = logged == 0 || now.saturating_sub(logged) >= millis(LOG_EVERY);
        if due && self.logged.compare_exchange(logged, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.unlogged.store(0, Ordering::Relaxed);
            tracing::warn!(
                at = at.as_str(),
                error = %error,
                since_last_warning = unlogged,
                "Out of file descriptors: refusing with local_resources and backing off accepts"
            );
        }
    }

    /// Whether the proxy ran short within the last `READY_AGAIN_AFTER`.
    pub fn recent(&self) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last != 0 && self.now().saturating_sub(last) < millis(READY_AGAIN_AFTER)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One descriptor held in reserve (on /dev/null) by a listener that must answer even when the
/// process is out of descriptors: given up so that one accept can go through, taken again after.
pub struct Spare {
    held: Option<std::fs::File>,
}

impl Spare {
    /// A reserve of one descriptor, taken now if one is free.
    pub fn keep() -> Self {
        let mut spare = Self { held: None };
        spare.refill();
        spare
    }

    /// Gives the reserve up: `true` when there was one to give.
    pub fn release(&mut self) -> bool {
        self.held.take().is_some()
    }

    /// Takes the reserve again if a descriptor is free.
    pub fn refill(&mut self) {
        if self.held.is_none() {
            self.held = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// Descriptors kept aside for what is not a connection or a pipe.
const RESERVE: u64 = 64;
/// At most one shortage warning this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// `/readyz` answers ready again once no shortage was seen for this long.
const READY_AGAIN_AFTER: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_need_their_descriptors_and_are_checked_against_a_limit() {
        let limits = config::Limits::default();
        let needed = needed(&limits, 32);
        assert_eq!(needed, 2 * 4096 + 2 * 512 + 32 + 64);
        assert_eq!(check(&limits, 32, Some(needed)), None);
        assert_eq!(check(&limits, 32, None), None, "unlimited");
        let warning = check(&limits, 32, Some(1024)).expect("the defaults do not fit 1024");
        assert!(warning.contains("the limit is 1024"), "{warning}");
    }

    #[test]
    fn only_a_lack_of_descriptors_or_socket_memory_is_a_shortage() {
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            assert!(is_shortage(&io::Error::from(errno)), "{errno:?}");
        }
        for errno in [Errno::CONNREFUSED, Errno::HOSTUNREACH, Errno::TIMEDOUT] {
            assert!(!is_shortage(&io::Error::from(errno)), "{errno:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shortage_is_recent_for_two_seconds_and_counted_by_where() {
        let counter = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["at"]).unwrap();
        let s = Shortage::new(counter.clone());
        assert!(!s.recent());
        s.note(At::Dial, &io::Error::from(Errno::MFILE));
        s.note(At::Accept, &io::Error::from(Errno::MFILE));
        assert!(s.recent());
        tokio::time::advance(READY_AGAIN_AFTER).await;
        assert!(!s.recent());
        assert_eq!(counter.with_label_values(&["dial"]).get(), 1);
        assert_eq!(counter.with_label_values(&["accept"]).get(), 1);
    }
}

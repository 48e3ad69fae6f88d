//! Upload budgets: how much each client address has sent up through each rule that has an
//! `upload_budget`, in fixed windows. Keyed by rule name, not by the rule's place in a policy, so
//! that a reload keeps what was counted (a changed budget applies from the next window).
//!
//! The tunnel copies count into a client's `Window` as bytes go up; `authorize` asks `exhausted`
//! before it lets a new connection of that client through the rule. The clock is tokio's, so
//! tests move it instead of sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::UploadBudget;

/// Every client's window, per rule.
#[derive(Default)]
pub struct Budgets {
    windows: Mutex<HashMap<Key, Arc<Window>>>,
}

/// A rule's name and a client's address.
type Key = (Box<str>, IpAddr);

/// One client's use of one rule's budget.
#[derive(Debug)]
pub struct Window {
    state: Mutex<WindowState>,
}

#[derive(Debug)]
struct WindowState {
    budget: UploadBudget,
    start: Instant,
    used: u64,
    /// The crossing of this window has been reported.
    crossed: bool,
}

/// The moment a client's use went past its budget.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Crossed {
    /// Bytes sent in the window, this chunk included.
    pub used: u64,
    pub budget: UploadBudget,
}

impl Budgets {
    /// The window of `client` under `rule`, made on first use. `budget` is the rule's budget in
    /// the policy in force: a window whose budget changed (a reload) takes it from now on.
    pub fn window(&self, rule: &str, client: IpAddr, budget: UploadBudget) -> Arc<Window> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = windows.entry((rule.into(), client)).or_insert_with(|| {
            Arc::new(Window {
                state: Mutex::new(WindowState { budget, start: Instant::now(), used: 0, crossed: false }),
            })
        });
        window.lock().budget = budget;
        Arc::clone(window)
    }

    /// Whether `client` has used up its budget under `rule` in the current window.
    pub fn exhausted(&self, rule: &str, client: IpAddr, budget: UploadBudget) -> bool {
        self.window(rule, client, budget).is_exhausted()
    }

    /// Forgets windows that have run out and hold nothing, so that the map does not grow with
    /// every client ever seen.
    pub fn prune(&self) {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        windows.retain(|_, w| Arc::strong_count(w) > 1 || !w.lock().is_over(now));
    }
}

impl Window {
    /// Counts `n` bytes sent up. `Some` exactly once per window: when this chunk took the use
    /// past the budget.
    pub fn add(&self, n: u64) -> Option<Crossed> {
        let mut s = self.lock();
        s.roll(Instant::now());
        s.used = s.used.saturating_add(n);
        if s.used >= s.budget.bytes && !s.crossed {
            s.crossed = true;
            return Some(Crossed { used: s.used, budget: s.budget });
        }
        None
    }

    pub fn is_exhausted(&self) -> bool {
        let mut s = self.lock();
        s.roll(Instant::now());
        s.used >= s.budget.bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WindowState {
    fn is_over(&self, now: Instant) -> bool {
        now.duration_since(self.start) >= self.budget.per
    }

    /// Starts a new window once the current one has run its length.
    fn roll(&mut self, now: Instant) {
        if self.is_over(now) {
            self.start = now;
            self.used = 0;
            self.crossed = false;
        }
    }
}

/// How often `prune` runs.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: UploadBudget = UploadBudget { bytes: 1000, per: Duration::from_secs(3600) };

    #[tokio::test(start_paused = true)]
    async fn a_client_over_budget_is_exhausted_until_the_window_frees() {
        let budgets = Budgets::default();
        let (client, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let w = budgets.window("upload", client, BUDGET);
        assert_eq!(w.add(600), None);
        assert!(!budgets.exhausted("upload", client, BUDGET));
        let crossed = w.add(500);
        assert_eq!(crossed, Some(Crossed { used: 1100, budget: BUDGET }), "reported at the crossing");
        assert_eq!(w.add(10), None, "and only once");
        assert!(budgets.exhausted("upload", client, BUDGET));
        assert!(!budgets.exhausted("upload", other, BUDGET), "another client has its own budget");
        assert!(!budgets.exhausted("other-rule", client, BUDGET), "another rule has its own budget");

        tokio::time::advance(Duration::from_secs(3599)).await;
        assert!(budgets.exhausted("upload", client, BUDGET), "still within the window");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!budgets.exhausted("upload", client, BUDGET), "admitted again once the window frees");
        assert_eq!(w.add(999), None);
        assert!(w.add(1).is_some(), "a new window reports its own crossing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_survives_a_reload_and_a_changed_budget_applies_to_it() {
        let budgets = Budgets::default();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        budgets.window("upload", client, BUDGET).add(800);
        let smaller = UploadBudget { bytes: 500, ..BUDGET };
        assert!(budgets.exhausted("upload", client, smaller), "the bytes already sent count against the new budget");
    }

    #[tokio::test(start_paused = true)]
    async fn prune_forgets_only_idle_windows_that_ran_out() {
        let budgets = Budgets::default();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let held = budgets.window("held", client, BUDGET);
        budgets.window("idle", client, BUDGET).add(5);
        tokio::time::advance(BUDGET.per).await;
        budgets.prune();
        let left: Vec<Box<str>> = budgets.windows.lock().unwrap().keys().map(|(r, _)| r.clone()).collect();
        assert_eq!(left, vec![Box::<str>::from("held")], "a window a tunnel holds stays");
        drop(held);
    }
}

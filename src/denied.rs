//! The most refused destinations since start: a bounded top-K by count with first and last seen,
//! so that operators see *where* refusals go without putting host names in metric labels.
//!
//! Space-saving: when the table is full, a new destination takes the place of the least counted
//! one and inherits its count (an overestimate, never an underestimate), as in Metwally et al.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::Serialize;

/// Counts per destination, at most `capacity` of them.
#[derive(Debug)]
pub struct TopDenied {
    capacity: usize,
    entries: HashMap<(String, u16), Entry>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub host: String,
    pub port: u16,
    pub reason: String,
    pub count: u64,
    #[serde(serialize_with = "crate::time::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "crate::time::rfc3339")]
    pub last_seen: SystemTime,
}

impl TopDenied {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), entries: HashMap::new() }
    }

    pub fn record(&mut self, host: &str, port: u16, reason: &str, now: SystemTime) {
        let key = (host.to_string(), port);
        if let Some(e) = self.entries.get_mut(&key) {
            e.count += 1;
            e.last_seen = now;
            reason.clone_into(&mut e.reason);
            return;
        }
        let mut inherited = 0;
        if self.entries.len() >= self.capacity {
            if let Some(min_key) = self.entries.iter().min_by_key(|(_, e)| e.count).map(|(k, _)| k.clone()) {
                inherited = self.entries.remove(&min_key).map_or(0, |e| e.count);
            }
        }
        let entry = Entry {
            host: key.0.clone(),
            port,
            reason: reason.to_string(),
            count: inherited + 1,
            first_seen: now,
            last_seen: now,
        };
        self.entries.insert(key, entry);
    }

    /// The `n` most refused destinations, most first.
    pub fn top(&self, n: usize) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.entries.values().cloned().collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.host.cmp(&b.host)).then(a.port.cmp(&b.port)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_the_most_refused_within_its_capacity() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut top = TopDenied::new(2);
        for i in 0..5 {
            top.record("a.example.com", 443, "no_rule", t0 + Duration::from_secs(i));
        }
        top.record("b.example.com", 443, "no_rule", t0);
        top.record("c.example.com", 80, "port_not_allowed", t0);
        let got = top.top(10);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].host.as_str(), got[0].count), ("a.example.com", 5));
        assert_eq!(got[0].last_seen, t0 + Duration::from_secs(4));
        assert_eq!(
            (got[1].host.as_str(), got[1].port, got[1].count),
            ("c.example.com", 80, 2),
            "inherits the evicted count"
        );
    }
}

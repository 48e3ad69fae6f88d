//! Places in a limit, overall and per client address: taken when a connection (or a DNS question)
//! is admitted, given back when its `Slot` drops. The proxy's listeners and the DNS filter share
//! it, so that no single client can take every place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `total` places, at most `per_client` of them for one client address.
pub struct Admission {
    total: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_client: usize,
}

/// A place in the limits, given back on drop.
pub struct Slot {
    _total: OwnedSemaphorePermit,
    client: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    pub fn new(total: usize, per_client: usize) -> Self {
        Self { total: Arc::new(Semaphore::new(total)), per_client: Arc::default(), max_per_client: per_client }
    }

    /// A place for `client`, or `None` when every place, or every place a client may hold, is
    /// taken.
    pub fn admit(&self, client: IpAddr) -> Option<Slot> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut map = self.per_client.lock().ok()?;
        let n = map.entry(client).or_insert(0);
        if *n >= self.max_per_client {
            return None;
        }
        *n += 1;
        Some(Slot { _total: total, client, per_client: self.per_client.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.per_client.lock() {
            if let Some(n) = map.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.client);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_takes_at_most_its_share_and_gives_it_back() {
        let a = Admission::new(4, 2);
        let (one, two): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = [a.admit(one), a.admit(one)];
        assert!(first.iter().all(Option::is_some));
        assert!(a.admit(one).is_none(), "its share is taken");
        let others = [a.admit(two), a.admit(two)];
        assert!(others.iter().all(Option::is_some), "another client still gets in");
        drop(first);
        let again = a.admit(one);
        assert!(again.is_some(), "given back on drop");
        assert_eq!(a.per_client.lock().unwrap().len(), 2);
        drop((again, others));
        assert!(a.per_client.lock().unwrap().is_empty(), "a client with no place is forgotten");
    }
}

//! Name resolution for the proxy: `[resolve] static` first, then DNS through hickory-resolver,
//! asking `[resolve] upstream` (UDP, then TCP) or else the system's resolvers. hickory caches
//! answers for their TTL.
//!
//! Returns every address; the caller checks each one against the policy before dialling any.
//! Names are queried fully qualified (with a trailing dot) so that no search domain is appended.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{NameServerConfig, Protocol, ResolverConfig, ResolverOpts};
use hickory_resolver::error::ResolveErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioAsyncResolver;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::OnceCell;

use crate::metrics::Metrics;
use crate::policy::{fold_mapped, HostName};

pub struct Resolver {
    /// Replaced as a whole on reload.
    pins: ArcSwap<HashMap<HostName, Vec<IpAddr>>>,
    dns: OnceCell<TokioAsyncResolver>,
    /// `[resolve] upstream`; empty: the system's resolvers.
    upstream: Vec<SocketAddr>,
    timeout: Duration,
    lookups: IntCounter,
    failures: IntCounter,
    /// When each answer last seen stops being valid, by question: an answer that comes back with
    /// the same deadline came from hickory's cache (which keeps it), a fresh one has a new one.
    deadlines: Mutex<HashMap<(HostName, RecordType), std::time::Instant>>,
    cache: IntCounterVec,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("the name does not resolve")]
    NoAddress,
    #[error("DNS lookup timed out")]
    Timeout,
    #[error("no DNS resolver is configured")]
    NoResolver,
    #[error("the name does not exist (NXDOMAIN)")]
    NoSuchName,
}

impl Resolver {
    pub fn new(
        pins: HashMap<HostName, Vec<IpAddr>>,
        upstream: Vec<SocketAddr>,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        Self {
            pins: ArcSwap::from_pointee(pins),
            dns: OnceCell::new(),
            upstream,
            timeout,
            lookups: metrics.dns_lookups.clone(),
            failures: metrics.dns_failures.clone(),
            deadlines: Mutex::default(),
            cache: metrics.dns_cache.clone(),
        }
    }

    /// Replaces the `[resolve] static` pins (on reload).
    pub fn set_pins(&self, pins: HashMap<HostName, Vec<IpAddr>>) {
        self.pins.store(std::sync::Arc::new(pins));
    }

    /// Every address of `name`, pinned ones first and exclusively when pinned.
    pub async fn resolve(&self, name: &HostName) -> Result<Vec<IpAddr>, ResolveError> {
        self.lookups.inc();
        let result = self.lookup(name).await;
        if result.is_err() {
            self.failures.inc();
        }
        result
    }

    /// Lookups asked of this resolver, pinned or not.
    pub fn lookups(&self) -> u64 {
        self.lookups.get()
    }

    async fn lookup(&self, name: &HostName) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(pinned) = self.pins.load().get(name) {
            return Ok(pinned.clone());
        }
        let dns = self.dns.get_or_try_init(|| async { self.build() }).await.map_err(|e| {
            tracing::error!(error = %e, "Cannot set up the DNS client (the system resolver configuration)");
            ResolveError::NoResolver
        })?;
        let fqdn = format!("{name}.");
        match tokio::time::timeout(self.timeout, dns.lookup_ip(fqdn.as_str())).await {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Err(_)) => Err(ResolveError::NoAddress),
            Ok(Ok(answer)) => {
                self.count_cache(name, RecordType::A, answer.valid_until());
                let addrs: Vec<IpAddr> = answer.iter().map(fold_mapped).collect();
                if addrs.is_empty() {
                    Err(ResolveError::NoAddress)
                } else {
                    Ok(addrs)
                }
            }
        }
    }

    /// The records the upstream resolvers answer for `name` and `rtype` (a CNAME chain included),
    /// through the same client and cache as `resolve`: what the DNS filter hands a client is then
    /// what the proxy itself finds for that name, until its TTL. A pinned name answers A and AAAA
    /// from its pins.
    pub async fn lookup_records(&self, name: &HostName, rtype: RecordType) -> Result<Vec<Record>, ResolveError> {
        self.lookups.inc();
        let result = self.lookup_records_now(name, rtype).await;
        if result.is_err() {
            self.failures.inc();
        }
        result
    }

    async fn lookup_records_now(&self, name: &HostName, rtype: RecordType) -> Result<Vec<Record>, ResolveError> {
        let fqdn = Name::from_ascii(format!("{name}.")).map_err(|_| ResolveError::NoAddress)?;
        if let Some(pinned) = self.pins.load().get(name) {
            let records = pinned.iter().filter_map(|ip| match (ip, rtype) {
                (IpAddr::V4(v4), RecordType::A) => {
                    Some(Record::from_rdata(fqdn.clone(), PIN_TTL, RData::A((*v4).into())))
                }
                (IpAddr::V6(v6), RecordType::AAAA) => {
                    Some(Record::from_rdata(fqdn.clone(), PIN_TTL, RData::AAAA((*v6).into())))
                }
                _ => None,
            });
            return Ok(records.collect());
        }
        let dns = self.dns.get_or_try_init(|| async { self.build() }).await.map_err(|_| ResolveError::NoResolver)?;
        match tokio::time::timeout(self.timeout, dns.lookup(fqdn, rtype)).await {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Err(e)) => match e.kind() {
                ResolveErrorKind::NoRecordsFound { response_code: ResponseCode::NXDomain, .. } => {
                    Err(ResolveError::NoSuchName)
                }
                // The name exists, with no record of this type.
                ResolveErrorKind::NoRecordsFound { response_code: ResponseCode::NoError, .. } => Ok(Vec::new()),
                _ => Err(ResolveError::NoAddress),
            },
            Ok(Ok(answer)) => {
                self.count_cache(name, rtype, answer.valid_until());
                Ok(answer.records().to_vec())
            }
        }
    }

    /// Counts a DNS answer as a cache hit or miss: hickory hands out a cached answer with the
    /// deadline it was stored with, a fresh one with a new one.
    fn count_cache(&self, name: &HostName, rtype: RecordType, valid_until: std::time::Instant) {
        let mut seen = self.deadlines.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_DEADLINES {
            seen.clear();
        }
        let hit = seen.insert((name.clone(), rtype), valid_until) == Some(valid_until);
        self.cache.with_label_values(&[if hit { "hit" } else { "miss" }]).inc();
    }

    /// The DNS client: the configured upstreams, each over UDP and then TCP, with no search
    /// domains and no hosts file (`[resolve] static` is the place for pins); or else the system's.
    fn build(&self) -> Result<TokioAsyncResolver, std::io::Error> {
        if self.upstream.is_empty() {
            return TokioAsyncResolver::tokio_from_system_conf().map_err(std::io::Error::other);
        }
        let mut config = ResolverConfig::new();
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            for &addr in &self.upstream {
                config.add_name_server(NameServerConfig::new(addr, protocol));
            }
        }
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = false;
        opts.timeout = self.timeout;
        Ok(TokioAsyncResolver::tokio(config, opts))
    }
}

/// Questions whose answer deadline is remembered for the cache-hit count.
const MAX_DEADLINES: usize = 10_000;

/// The TTL of an answer made from `[resolve] static` pins.
const PIN_TTL: u32 = 60;

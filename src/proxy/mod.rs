//! The per-connection pipeline: decide → resolve → check every address → `Permit` → dial.
//!
//! A `Permit` can only be built here, after the policy allowed the destination and each address
//! that will be dialled; `dial` takes one. A refused name is never resolved.

pub mod dial;
pub mod http;
pub mod refusal;
mod splice;
pub mod tunnel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::audit::Audit;
use crate::config;
use crate::load::Loaded;
use crate::metrics::Metrics;
use crate::policy::{Decision, Destination, Host, Policy, Query, RuleId};
use crate::reload::{apply, PolicyInfo};
use crate::resolve::Resolver;
pub use refusal::Refusal;

/// Everything a connection needs, shared by all of them.
pub struct State {
    pub policy: ArcSwap<Policy>,
    /// What `/policy` shows about the policy in force.
    pub info: ArcSwap<PolicyInfo>,
    pub resolver: Resolver,
    pub audit: Audit,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Every configured listener is bound and accepting.
    pub ready: AtomicBool,
    next_id: AtomicU64,
}

/// Runtime limits and timeouts, from `[limits]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_request_head_bytes: usize,
    pub request_head_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub shutdown_grace: Duration,
}

/// Leave to dial: the addresses that passed the policy, each with the rule that allowed it.
#[derive(Debug)]
pub struct Permit {
    addrs: Vec<(SocketAddr, RuleId)>,
}

impl State {
    /// Builds the shared state for a loaded configuration and puts its policy in force.
    pub fn build(loaded: Loaded) -> std::io::Result<Self> {
        let metrics = Metrics::new();
        let config = &loaded.config;
        let resolver = Resolver::new(HashMap::new(), config.resolve.timeout.0, &metrics);
        let audit_path = match config.audit.path.as_deref().unwrap_or("-") {
            "-" => "-".to_string(),
            p => config.relative_path(p).display().to_string(),
        };
        let audit = Audit::open(&audit_path, metrics.clone())?;
        let state = Self {
            policy: ArcSwap::from_pointee(Policy::empty()),
            info: ArcSwap::from_pointee(PolicyInfo::default()),
            resolver,
            audit,
            metrics,
            limits: Limits::from(&config.limits),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        };
        apply(&state, loaded);
        Ok(state)
    }

    /// A fresh id for one decision, shared by its decision and close lines.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

impl From<&config::Limits> for Limits {
    fn from(l: &config::Limits) -> Self {
        Self {
            max_request_head_bytes: *l.max_request_head_bytes.get_ref(),
            request_head_timeout: l.request_head_timeout.0,
            connect_timeout: l.connect_timeout.0,
            idle_timeout: l.idle_timeout.0,
            max_connections: l.max_connections,
            max_connections_per_client: l.max_connections_per_client,
            shutdown_grace: l.shutdown_grace.0,
        }
    }
}

impl Permit {
    /// The rule that allowed `addr`.
    pub fn rule_for(&self, addr: SocketAddr) -> Option<RuleId> {
        self.addrs.iter().find(|(a, _)| *a == addr).map(|(_, r)| *r)
    }
}

/// Decides `dest` for `client`; for a name the policy allows, resolves it and keeps only the
/// addresses that pass the policy again (built-in protections, deny rules, combined rules).
pub async fn authorize(
    policy: &Policy,
    resolver: &Resolver,
    dest: &Destination,
    client: IpAddr,
) -> Result<Permit, Refusal> {
    let q = Query::new(&dest.host, dest.port).from(client);
    let rule = match policy.decide(&q) {
        Decision::Allow { rule } => rule,
        Decision::Deny { reason, rule } => return Err(Refusal::Policy { reason, rule }),
    };
    let name = match &dest.host {
        Host::Ip(ip) => return Ok(Permit { addrs: vec![(SocketAddr::new(*ip, dest.port), rule)] }),
        Host::Name(name) => name,
    };
    let resolved = resolver.resolve(name).await.map_err(|_| Refusal::ResolveFailed)?;
    let mut addrs = Vec::with_capacity(resolved.len());
    let mut first_refusal = None;
    for ip in resolved {
        match policy.check_addr(name, ip, dest.port, Some(client)) {
            Decision::Allow { rule } => addrs.push((SocketAddr::new(ip, dest.port), rule)),
            Decision::Deny { reason, rule } => {
                tracing::warn!(dst.host = %name, dst.addr = %ip, reason = reason.as_str(), "Resolved address refused");
                first_refusal.get_or_insert(Refusal::Policy { reason, rule });
            }
        }
    }
    match (addrs.is_empty(), first_refusal) {
        (true, Some(refusal)) => Err(refusal),
        (true, None) => Err(Refusal::ResolveFailed),
        (false, _) => Ok(Permit { addrs }),
    }
}

//! The per-connection pipeline: decide → resolve → check every address → `Permit` → dial.
//!
//! A `Permit` can only be built here, after the policy allowed the destination and each address
//! that will be dialled; `dial` takes one. A refused name is never resolved.

pub mod dial;
pub mod http;
pub mod refusal;
mod splice;
pub mod transparent;
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
use crate::policy::{fold_mapped, Decision, Destination, Host, HostName, Policy, Query, RuleId};
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
    /// `[transparent] original_dst_mismatch`.
    pub mismatch: config::Mismatch,
    /// Every configured listener is bound and accepting.
    pub ready: AtomicBool,
    next_id: AtomicU64,
}

/// Runtime limits and timeouts, from `[limits]`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
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
        let resolver = Resolver::new(HashMap::new(), config.resolve.timeout.get_ref().0, &metrics);
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
            mismatch: config.transparent.original_dst_mismatch,
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
            request_head_timeout: l.request_head_timeout.get_ref().0,
            connect_timeout: l.connect_timeout.get_ref().0,
            idle_timeout: l.idle_timeout.get_ref().0,
            max_connections: *l.max_connections.get_ref(),
            max_connections_per_client: *l.max_connections_per_client.get_ref(),
            shutdown_grace: l.shutdown_grace.get_ref().0,
        }
    }
}

impl Permit {
    /// The rule that allowed the first address.
    pub fn first_rule(&self) -> Option<RuleId> {
        self.addrs.first().map(|(_, r)| *r)
    }

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

/// What the transparent listeners learned about a connection before deciding it.
pub struct Redirected<'a> {
    /// The server name (TLS SNI or HTTP Host), when the client sent one.
    pub name: Option<&'a HostName>,
    /// Where the client was going before the redirect.
    pub original_dst: SocketAddr,
    pub client: IpAddr,
}

/// Decides a redirected connection. A name allowed by a host rule is resolved by the proxy and
/// dialled at its own addresses, never at the original destination on trust; when the original
/// destination is not among them, `mismatch` decides (`log`: go on, and say so; `deny`:
/// `sni_mismatch`). Without a name, or when no host rule allows it, the original destination is
/// decided against address rules and, if allowed, dialled.
pub async fn authorize_redirected(
    policy: &Policy,
    resolver: &Resolver,
    r: &Redirected<'_>,
    mismatch: config::Mismatch,
) -> Result<(Permit, bool), Refusal> {
    let port = r.original_dst.port();
    let by_name =
        r.name.map(|name| (name, policy.decide(&Query { name: Some(name), addr: None, port, source: Some(r.client) })));
    if let Some((name, Decision::Allow { .. })) = by_name {
        let dest = Destination { host: Host::Name(name.clone()), port };
        let permit = authorize(policy, resolver, &dest, r.client).await?;
        let matched = permit.addrs.iter().any(|(a, _)| a.ip() == fold_mapped(r.original_dst.ip()));
        if !matched && mismatch == config::Mismatch::Deny {
            return Err(Refusal::Policy { reason: crate::policy::DenyReason::SniMismatch, rule: None });
        }
        return Ok((permit, !matched));
    }
    // A deny rule on the name wins over any address rule.
    if let Some((_, Decision::Deny { reason: reason @ crate::policy::DenyReason::DeniedByRule, rule })) = by_name {
        return Err(Refusal::Policy { reason, rule });
    }
    let q = Query { name: None, addr: Some(fold_mapped(r.original_dst.ip())), port, source: Some(r.client) };
    match (policy.decide(&q), by_name) {
        (Decision::Allow { rule }, _) => Ok((Permit { addrs: vec![(r.original_dst, rule)] }, false)),
        // The name's own refusal says more than the address's `no_rule`.
        (_, Some((_, Decision::Deny { reason, rule }))) => Err(Refusal::Policy { reason, rule }),
        (Decision::Deny { reason, rule }, _) => Err(Refusal::Policy { reason, rule }),
    }
}

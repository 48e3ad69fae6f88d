//! The one place a destination becomes leave to dial: decide → resolve → check every address →
//! `Permit`. A `Permit`'s field is private to this file, so the compiler, not a convention,
//! makes `authorize` and `authorize_redirected` the only ways to get one, and `dial(&Permit)`
//! (with the clippy bans on every other connect) the only way out. A refused name is never
//! resolved, and each name is decided once.

use std::net::{IpAddr, SocketAddr};

use crate::config::Mismatch;
use crate::policy::{
    fold_mapped, Decision, DenyReason, Destination, Host, HostName, Policy, Query, RuleId, TunnelOptions,
};
use crate::resolve::{ResolveError, Resolver};

use super::refusal::Refusal;

/// Leave to dial: the addresses that passed the policy, each with what its rule grants.
#[derive(Debug)]
pub struct Permit {
    addrs: Vec<(SocketAddr, Grant)>,
    /// A redirected connection whose original destination is not among `addrs`, let through
    /// because `[transparent] original_dst_mismatch = "log"`.
    mismatch: bool,
}

/// What the rule that allowed an address grants: its id (for the audit line) and its tunnel
/// options, read from the policy once, here.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Grant {
    pub rule: RuleId,
    pub tunnel: TunnelOptions,
}

/// What the transparent listeners learned about a connection before deciding it.
pub struct Redirected<'a> {
    /// The server name (TLS SNI or HTTP Host), when the client sent one.
    pub name: Option<&'a HostName>,
    /// Where the client was going before the redirect.
    pub original_dst: SocketAddr,
    pub client: IpAddr,
}

impl Permit {
    /// The addresses to try, in order, with their grants.
    pub fn addrs(&self) -> impl Iterator<Item = (SocketAddr, Grant)> + '_ {
        self.addrs.iter().copied()
    }

    /// True when a redirected connection goes to the name's own addresses instead of its original
    /// destination (`original_dst_mismatch = "log"`).
    pub fn is_mismatch(&self) -> bool {
        self.mismatch
    }
}

impl Grant {
    fn of(policy: &Policy, rule: RuleId) -> Self {
        let tunnel = policy.rule(rule).map_or(TunnelOptions::STRICT, |r| r.tunnel_options());
        Self { rule, tunnel }
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
    match &dest.host {
        Host::Ip(ip) => Ok(single(policy, SocketAddr::new(*ip, dest.port), rule)),
        Host::Name(name) => resolve_allowed(policy, resolver, name, dest.port, client).await,
    }
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
    mismatch: Mismatch,
) -> Result<Permit, Refusal> {
    let port = r.original_dst.port();
    let by_name =
        r.name.map(|name| (name, policy.decide(&Query { name: Some(name), addr: None, port, source: Some(r.client) })));
    match by_name {
        Some((name, Decision::Allow { .. })) => {
            let mut permit = resolve_allowed(policy, resolver, name, port, r.client).await?;
            let original = fold_mapped(r.original_dst.ip());
            permit.mismatch = !permit.addrs.iter().any(|(a, _)| a.ip() == original);
            if permit.mismatch && mismatch == Mismatch::Deny {
                return Err(Refusal::Policy { reason: DenyReason::SniMismatch, rule: None });
            }
            return Ok(permit);
        }
        // A deny rule on the name wins over any address rule.
        Some((_, Decision::Deny { reason: reason @ DenyReason::DeniedByRule, rule })) => {
            return Err(Refusal::Policy { reason, rule })
        }
        _ => {}
    }
    let q = Query { name: None, addr: Some(fold_mapped(r.original_dst.ip())), port, source: Some(r.client) };
    match (policy.decide(&q), by_name) {
        // `names = "listed"`: the address rule serves connections without a name; this one has a
        // name no host rule allows, and its own refusal stands.
        (Decision::Allow { rule }, Some((_, Decision::Deny { reason, rule: by })))
            if policy.rule(rule).is_some_and(|r| r.names_listed) =>
        {
            Err(Refusal::Policy { reason, rule: by })
        }
        (Decision::Allow { rule }, _) => Ok(single(policy, r.original_dst, rule)),
        // The name's own refusal says more than the address's `no_rule`.
        (_, Some((_, Decision::Deny { reason, rule }))) => Err(Refusal::Policy { reason, rule }),
        (Decision::Deny { reason, rule }, _) => Err(Refusal::Policy { reason, rule }),
    }
}

fn single(policy: &Policy, addr: SocketAddr, rule: RuleId) -> Permit {
    Permit { addrs: vec![(addr, Grant::of(policy, rule))], mismatch: false }
}

/// Resolves a name the policy has already allowed, and keeps the addresses that pass the policy.
async fn resolve_allowed(
    policy: &Policy,
    resolver: &Resolver,
    name: &HostName,
    port: u16,
    client: IpAddr,
) -> Result<Permit, Refusal> {
    let resolved = resolver.resolve(name).await.map_err(|e| match e {
        ResolveError::Timeout => Refusal::ResolveTimeout,
        ResolveError::NoAddress | ResolveError::NoResolver => Refusal::ResolveFailed,
    })?;
    let mut addrs = Vec::with_capacity(resolved.len());
    let mut first_refusal = None;
    for ip in resolved {
        match policy.check_addr(name, ip, port, Some(client)) {
            Decision::Allow { rule } => addrs.push((SocketAddr::new(ip, port), Grant::of(policy, rule))),
            Decision::Deny { reason, rule } => {
                tracing::warn!(dst.host = %name, dst.addr = %ip, reason = reason.as_str(), "Resolved address refused");
                first_refusal.get_or_insert(Refusal::Policy { reason, rule });
            }
        }
    }
    match (addrs.is_empty(), first_refusal) {
        (true, Some(refusal)) => Err(refusal),
        (true, None) => Err(Refusal::ResolveFailed),
        (false, _) => Ok(Permit { addrs, mismatch: false }),
    }
}

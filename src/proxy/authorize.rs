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
    /// Report mode: the refusal that enforcement would have made, and the rule that made it.
    reported: Option<(DenyReason, Option<RuleId>)>,
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

    /// The refusal only reported (report mode), if this permit is one.
    pub fn reported(&self) -> Option<(DenyReason, Option<RuleId>)> {
        self.reported
    }

    /// Marks the permit as one that enforcement would refuse for `reason` (a refusal made after
    /// the permit, such as an upload budget), to be audited as `would_deny`.
    pub fn report(&mut self, reason: DenyReason, rule: Option<RuleId>) {
        self.reported.get_or_insert((reason, rule));
    }
}

/// Report mode: leave to dial a destination whose refusal `policy.reports`. The built-in
/// protections still hold: every address must pass them, and a name is resolved only because its
/// refusal is only reported (with the whole policy in report mode, that is any name).
pub async fn authorize_reported(
    policy: &Policy,
    resolver: &Resolver,
    dest: &Destination,
    reason: DenyReason,
    rule: Option<RuleId>,
) -> Result<Permit, Refusal> {
    let addrs = match &dest.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => resolver.resolve(name).await.map_err(resolve_refusal)?,
    };
    reported_permit(policy, addrs.into_iter().map(|ip| SocketAddr::new(ip, dest.port)), reason, rule)
}

/// Report mode for a redirected connection: it goes where it was going, if the built-in
/// protections let it.
pub fn authorize_redirected_reported(
    policy: &Policy,
    r: &Redirected<'_>,
    reason: DenyReason,
    rule: Option<RuleId>,
) -> Result<Permit, Refusal> {
    reported_permit(policy, std::iter::once(r.original_dst), reason, rule)
}

fn reported_permit(
    policy: &Policy,
    addrs: impl Iterator<Item = SocketAddr>,
    reason: DenyReason,
    rule: Option<RuleId>,
) -> Result<Permit, Refusal> {
    // Already `would_deny`: the checks of the tunnel's first bytes would only report again, so
    // they are off. The refusing rule's upload limits, if it has any, still count.
    let base = rule.map_or(TunnelOptions::STRICT, |r| Grant::of(policy, r).tunnel);
    let tunnel = TunnelOptions { sni_check: false, allow_ech: true, tls_only: false, names_listed: false, ..base };
    let grant = Grant { rule: rule.unwrap_or(RuleId::NONE), tunnel };
    let addrs: Vec<(SocketAddr, Grant)> = addrs.filter(|a| !policy.protected(a.ip())).map(|a| (a, grant)).collect();
    if addrs.is_empty() {
        return Err(Refusal::Policy { reason: DenyReason::InternalAddress, rule: None });
    }
    Ok(Permit { addrs, mismatch: false, reported: Some((reason, rule)) })
}

fn resolve_refusal(e: ResolveError) -> Refusal {
    match e {
        ResolveError::Timeout => Refusal::ResolveTimeout,
        ResolveError::NoAddress | ResolveError::NoResolver | ResolveError::NoSuchName => Refusal::ResolveFailed,
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
    if r.original_dst.ip().is_unspecified() {
        // Steered, not redirected: the server name is all there is to decide on.
        return match by_name {
            Some((name, Decision::Allow { .. })) => resolve_allowed(policy, resolver, name, port, r.client).await,
            Some((_, Decision::Deny { reason, rule })) => Err(Refusal::Policy { reason, rule }),
            None => Err(Refusal::NoOriginalDst),
        };
    }
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
    // The name goes with the address: a deny rule with both hosts and cidrs waits for an address
    // to decide on, and this is the one (no host rule allows the name, so it adds no allow).
    let q = Query { name: r.name, addr: Some(fold_mapped(r.original_dst.ip())), port, source: Some(r.client) };
    match (policy.decide(&q), by_name) {
        (Decision::Deny { reason: reason @ DenyReason::DeniedByRule, rule }, _) => {
            Err(Refusal::Policy { reason, rule })
        }
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
    Permit { addrs: vec![(addr, Grant::of(policy, rule))], mismatch: false, reported: None }
}

/// Resolves a name the policy has already allowed, and keeps the addresses that pass the policy.
async fn resolve_allowed(
    policy: &Policy,
    resolver: &Resolver,
    name: &HostName,
    port: u16,
    client: IpAddr,
) -> Result<Permit, Refusal> {
    let resolved = resolver.resolve(name).await.map_err(resolve_refusal)?;
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
        (false, _) => Ok(Permit { addrs, mismatch: false, reported: None }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, Mismatch, Origin};
    use crate::policy::service_tags::TagTable;

    /// A deny rule with hosts and cidrs refuses a redirected connection that matches it on both,
    /// as it refuses the same name and address asked directly. (Found in review: the name was
    /// decided with no address, for which such a rule waits, and the address with no name.)
    #[tokio::test]
    async fn a_deny_rule_with_hosts_and_cidrs_refuses_a_redirected_connection() {
        let text =
            "[[rule]]\nname = \"no-evil\"\naction = \"deny\"\nhosts = [\"*.evil.example\"]\ncidrs = [\"20.0.0.0/8\"]\n\
                    [[rule]]\nname = \"azure-range\"\naction = \"allow\"\ncidrs = [\"20.0.0.0/8\"]\n";
        let config = Config::from_str(text, Origin::File("t.toml".into())).unwrap();
        let tags = TagTable::parse(r#"{"changeNumber":1,"cloud":"Public","values":[{"name":"Other","properties":{"addressPrefixes":["20.0.0.0/8"]}}]}"#).unwrap();
        let policy = crate::policy::compile(&config, &tags).unwrap().policy;
        let resolver =
            Resolver::new(HashMap::new(), Vec::new(), Duration::from_secs(1), &crate::metrics::Metrics::new());
        let client = "10.9.0.1".parse().unwrap();
        let redirected = |name| Redirected { name, original_dst: "20.1.1.1:443".parse().unwrap(), client };

        let evil = HostName::parse("x.evil.example").unwrap();
        let refused = authorize_redirected(&policy, &resolver, &redirected(Some(&evil)), Mismatch::Log).await;
        assert!(
            matches!(refused, Err(Refusal::Policy { reason: DenyReason::DeniedByRule, rule: Some(_) })),
            "{:?}",
            refused.map(|p| p.addrs().map(|(a, _)| a).collect::<Vec<_>>())
        );
        // Another name, and no name, still pass on the address rule.
        let other = HostName::parse("x.fine.example").unwrap();
        for name in [Some(&other), None] {
            let permit = authorize_redirected(&policy, &resolver, &redirected(name), Mismatch::Log).await;
            assert!(permit.is_ok(), "{name:?}");
        }
    }
}

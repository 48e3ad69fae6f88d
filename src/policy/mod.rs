//! The policy engine: given a destination (and the client), decide allow or deny, and say why.
//!
//! Pure: no sockets, files, clocks, environment or logging. `compile` builds a `Policy` from a
//! parsed configuration and a service-tag table; `decide` then only looks things up.
//!
//! Order of checks in `decide`:
//! 1. An address (IP literal, resolved address or original destination) inside a built-in
//!    protection is refused (`internal_address`) unless `[safety] allow_internal` names it.
//! 2. A matching deny rule refuses (`denied_by_rule`). Deny rules always win.
//! 3. A matching allow rule allows. Rules that matched the name come before address-only rules;
//!    among each, the first in the file wins.
//! 4. Otherwise refused: `port_not_allowed`, `source_not_allowed` or `address_not_allowed` when a
//!    rule matched all but that, else `no_rule`.
//!
//! A rule with hosts and address ranges matches only when both match. A rule with only address
//! ranges never matches a name whose address is not yet known: the proxy never resolves a name that
//! no host rule allows, since the DNS question itself would carry data out.

mod compile;
mod decision;
mod host;
mod names;
mod nets;
mod ports;
mod safety;
pub mod service_tags;

use std::net::IpAddr;

use ipnet::IpNet;

pub use compile::{compile, Compiled, Warning};
pub use decision::{Decision, DenyReason, RuleId};
pub use host::{fold_mapped, Destination, Host, HostError, HostName};
pub use names::{Pattern, PatternError};
pub use ports::PortSet;
pub use safety::classify;

use crate::config::{Action, Protocol};
use names::NameIndex;
use nets::RangeIndex;
use safety::Safety;

/// A compiled policy. Immutable; a reload builds a new one.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    names: NameIndex,
    nets: RangeIndex,
    safety: Safety,
    /// `[policy] mode = "report"`: every refusal but the built-in protections is only reported.
    report: bool,
}

/// One enabled rule, compiled.
#[derive(Debug)]
pub struct Rule {
    pub name: Box<str>,
    pub action: Action,
    pub protocol: Protocol,
    pub ports: PortSet,
    /// Client ranges; empty means any client.
    pub sources: Box<[IpNet]>,
    /// Expanded host patterns.
    pub patterns: Vec<Pattern>,
    /// Expanded service tags as Azure spells them, with their prefix counts.
    pub tags: Vec<(String, usize)>,
    pub cidrs: Vec<IpNet>,
    /// Every range of the rule: its cidrs and the prefixes of its tags.
    pub ranges: Vec<IpNet>,
    /// Check the TLS server name against the CONNECT host.
    pub sni_check: bool,
    /// Let ClientHellos with Encrypted Client Hello through.
    pub allow_ech: bool,
    /// A tunnel must begin with a TLS ClientHello.
    pub tls_only: bool,
    /// `names = "listed"`: a connection that carries a server name passes this rule by its address
    /// only if a host rule allows the name.
    pub names_listed: bool,
    /// `max_upload_bytes`: bytes one tunnel may carry up.
    pub max_upload: Option<u64>,
    /// `upload_budget`: bytes one client may send up through this rule per window.
    pub upload_budget: Option<UploadBudget>,
    /// `mode = "report"`: what this rule would refuse is let through as `would_deny`.
    pub report: bool,
    /// Record types the DNS filter answers for this rule's names beyond the default ones.
    pub dns_types: Vec<Box<str>>,
}

/// Bytes one client address may send up through a rule, per window.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct UploadBudget {
    pub bytes: u64,
    pub per: std::time::Duration,
}

/// What a rule says about the bytes of a tunnel it allows. Read once, when the rule is chosen, and
/// carried with the connection from then on.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct TunnelOptions {
    /// Check the TLS server name against the name that was decided.
    pub sni_check: bool,
    /// Let ClientHellos with Encrypted Client Hello through.
    pub allow_ech: bool,
    /// A tunnel must begin with a TLS ClientHello (`not_tls` otherwise).
    pub tls_only: bool,
    /// A server name in the tunnel must be allowed by a host rule (`names = "listed"`).
    pub names_listed: bool,
    /// Bytes the tunnel may carry up (`max_upload_bytes`).
    pub max_upload: Option<u64>,
    /// What the client may send up through the rule per window (`upload_budget`).
    pub upload_budget: Option<UploadBudget>,
}

impl TunnelOptions {
    /// The defaults of a rule that says nothing: every check on.
    pub const STRICT: Self = Self {
        sni_check: true,
        allow_ech: false,
        tls_only: true,
        names_listed: true,
        max_upload: None,
        upload_budget: None,
    };
}

impl Rule {
    pub fn tunnel_options(&self) -> TunnelOptions {
        TunnelOptions {
            sni_check: self.sni_check,
            allow_ech: self.allow_ech,
            tls_only: self.tls_only,
            names_listed: self.names_listed,
            max_upload: self.max_upload,
            upload_budget: self.upload_budget,
        }
    }
}

/// One question for the policy. Build it with `Query::new` and the `from`/`at` setters.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    pub name: Option<&'a HostName>,
    /// The address to be dialled, when known: an IP literal, a resolved address, or the original
    /// destination of a redirected connection.
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub source: Option<IpAddr>,
}

impl<'a> Query<'a> {
    /// A query for a destination as the client named it.
    pub fn new(host: &'a Host, port: u16) -> Self {
        match host {
            Host::Name(n) => Self { name: Some(n), addr: None, port, source: None },
            Host::Ip(ip) => Self { name: None, addr: Some(*ip), port, source: None },
        }
    }

    pub fn from(mut self, source: IpAddr) -> Self {
        self.source = Some(fold_mapped(source));
        self
    }

    pub fn at(mut self, addr: IpAddr) -> Self {
        self.addr = Some(fold_mapped(addr));
        self
    }
}

// === impl Policy ===

impl Policy {
    /// Decides one destination for one client. Same input, same answer; does not allocate unless a
    /// glob pattern matches.
    pub fn decide(&self, q: &Query<'_>) -> Decision {
        if q.name.is_none() && q.addr.is_none() {
            return Decision::deny(DenyReason::InvalidHost);
        }
        if let Some(ip) = q.addr {
            if !self.safety.permits(ip) {
                return Decision::deny(DenyReason::InternalAddress);
            }
        }
        let in_range = q.addr.map_or(&[][..], |ip| self.nets.lookup(ip));
        let mut best = Best::default();
        if let Some(name) = q.name {
            self.names.for_each_match(name, |r| self.consider(r, true, q, in_range, &mut best));
        }
        for &r in in_range {
            self.consider(r, false, q, in_range, &mut best);
        }
        best.decision()
    }

    /// Checks an address the proxy is about to dial for a name a host rule already allowed: the
    /// built-in protections, deny rules, and the address ranges of combined rules.
    pub fn check_addr(&self, name: &HostName, addr: IpAddr, port: u16, source: Option<IpAddr>) -> Decision {
        let q = Query { name: Some(name), addr: Some(fold_mapped(addr)), port, source: source.map(fold_mapped) };
        self.decide(&q)
    }

    /// A policy with no rules: refuses everything.
    pub fn empty() -> Self {
        Self {
            rules: Vec::new(),
            names: NameIndex::default(),
            nets: RangeIndex::default(),
            safety: Safety::default(),
            report: false,
        }
    }

    /// Whether a refusal is only reported (`would_deny`) rather than enforced: the whole policy or
    /// the rule that made it is in report mode. The built-in protections (`internal_address`) and a
    /// host that is not one (`invalid_host`) are enforced in every mode.
    pub fn reports(&self, reason: DenyReason, rule: Option<RuleId>) -> bool {
        if matches!(reason, DenyReason::InternalAddress | DenyReason::InvalidHost) {
            return false;
        }
        self.report || rule.and_then(|r| self.rule(r)).is_some_and(|r| r.report)
    }

    /// For the DNS filter: whether some enabled allow rule could let a connection to `name`
    /// through, on any port, for `client`: the first such rule, or why not. A deny rule whose
    /// hosts match the name wins, whatever its ports, since an answer serves every port.
    pub fn name_could_be_allowed(
        &self,
        name: &HostName,
        client: IpAddr,
    ) -> Result<RuleId, (DenyReason, Option<RuleId>)> {
        // Weighed as `decide` weighs them (`Best`), with no port or address to miss on.
        let mut best = Best::default();
        self.names.for_each_match(name, |id| {
            let Some(rule) = self.rule(id) else { return };
            if rule.protocol != Protocol::Tcp {
                return;
            }
            if !rule.sources.is_empty() && !rule.sources.iter().any(|n| n.contains(&fold_mapped(client))) {
                if rule.action == Action::Allow {
                    best.near_miss(DenyReason::SourceNotAllowed, id, rule.report);
                }
                return;
            }
            best.matched(id, rule, true);
        });
        match best.decision() {
            Decision::Allow { rule } => Ok(rule),
            Decision::Deny { reason, rule } => Err((reason, rule)),
        }
    }

    /// `[policy] mode = "report"`.
    pub fn is_report_only(&self) -> bool {
        self.report
    }

    /// Whether the built-in protections refuse `addr` (loopback, private, link-local, metadata),
    /// whatever the rules say.
    pub fn protected(&self, addr: IpAddr) -> bool {
        !self.safety.permits(fold_mapped(addr))
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        self.rules.get(id.index())
    }

    /// The name of a rule, or `"-"` for an id from another policy.
    pub fn rule_name(&self, id: RuleId) -> &str {
        self.rule(id).map_or("-", |r| &r.name)
    }

    /// `rule=NAME` for an allow or a deny by rule, `reason=NAME` otherwise: one line of explanation.
    pub fn explain(&self, d: &Decision) -> String {
        match d {
            Decision::Allow { rule } => format!("rule={}", self.rule_name(*rule)),
            Decision::Deny { reason, rule: Some(rule) } => format!("reason={reason} rule={}", self.rule_name(*rule)),
            Decision::Deny { reason, rule: None } => format!("reason={reason}"),
        }
    }

    /// Number of disjoint address segments in the range index.
    pub fn segment_count(&self) -> usize {
        self.nets.segment_count()
    }

    /// Looks at one rule that matched the name (`by_name`) or the address, and records the outcome.
    fn consider(&self, id: RuleId, by_name: bool, q: &Query<'_>, in_range: &[RuleId], best: &mut Best) {
        let Some(rule) = self.rule(id) else { return };
        if rule.protocol != Protocol::Tcp {
            return;
        }
        let has_hosts = !rule.patterns.is_empty();
        if has_hosts != by_name {
            return; // a host rule is only considered through its name, an address rule through its address
        }
        if !rule.ranges.is_empty() {
            match q.addr {
                // A rule reached through its address is in range by construction.
                Some(_) if by_name && in_range.binary_search(&id).is_err() => {
                    if rule.action == Action::Allow {
                        best.near_miss(DenyReason::AddressNotAllowed, id, rule.report);
                    }
                    return;
                }
                Some(_) => {}
                // Name matched, address not known yet: an allow is provisional, checked again on
                // every address the name resolves to; a deny waits for the address.
                None if rule.action == Action::Deny => return,
                None => {}
            }
        }
        if !rule.ports.contains(q.port) {
            if rule.action == Action::Allow {
                best.near_miss(DenyReason::PortNotAllowed, id, rule.report);
            }
            return;
        }
        if !rule.sources.is_empty() && !q.source.is_some_and(|s| rule.sources.iter().any(|n| n.contains(&s))) {
            if rule.action == Action::Allow {
                best.near_miss(DenyReason::SourceNotAllowed, id, rule.report);
            }
            return;
        }
        best.matched(id, rule, by_name);
    }
}

/// What `decide` has seen so far: the first rule of each kind in the file, with the refusals of
/// rules in report mode apart from those enforced.
#[derive(Default)]
struct Best {
    deny: Option<RuleId>,
    deny_reported: Option<RuleId>,
    by_name: Option<RuleId>,
    by_addr: Option<RuleId>,
    near_miss: Option<(RuleId, DenyReason)>,
    near_miss_reported: Option<(RuleId, DenyReason)>,
}

impl Best {
    /// A rule that matched (through its name, or through its address), kept if it is the first
    /// of its kind in the file: rules are reported in no particular order.
    fn matched(&mut self, id: RuleId, rule: &Rule, by_name: bool) {
        let slot = match (rule.action, by_name) {
            (Action::Deny, _) if rule.report => &mut self.deny_reported,
            (Action::Deny, _) => &mut self.deny,
            (Action::Allow, true) => &mut self.by_name,
            (Action::Allow, false) => &mut self.by_addr,
        };
        if slot.is_none_or(|first| id < first) {
            *slot = Some(id);
        }
    }

    fn near_miss(&mut self, reason: DenyReason, id: RuleId, reported: bool) {
        let slot = if reported { &mut self.near_miss_reported } else { &mut self.near_miss };
        if slot.is_none_or(|(r, _)| id < r) {
            *slot = Some((id, reason));
        }
    }

    /// A rule in report mode only ever reports a refusal of its own; it never stands in for one
    /// that enforcement makes, and never lets through what no rule allows:
    /// - an enforced deny rule refuses, whatever comes before it in the file;
    /// - a deny rule in report mode names the refusal only of what some rule allows (a name no
    ///   rule allows stays refused, unresolved);
    /// - with no rule allowing, an enforced rule's near miss outranks one in report mode.
    fn decision(&self) -> Decision {
        if let Some(rule) = self.deny {
            return Decision::Deny { reason: DenyReason::DeniedByRule, rule: Some(rule) };
        }
        if let Some(allow) = self.by_name.or(self.by_addr) {
            return match self.deny_reported {
                Some(rule) => Decision::Deny { reason: DenyReason::DeniedByRule, rule: Some(rule) },
                None => Decision::Allow { rule: allow },
            };
        }
        match self.near_miss.or(self.near_miss_reported) {
            Some((rule, reason)) => Decision::Deny { reason, rule: Some(rule) },
            None => Decision::deny(DenyReason::NoRule),
        }
    }
}

#[cfg(test)]
mod tests;

//! The outcome of a policy decision, and the stable names it is known by in logs and metrics.

use std::fmt;

/// Index of a rule in its policy, in config order. Cheap to copy; the policy turns it into a name.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct RuleId(pub(crate) u32);

impl RuleId {
    /// No rule: the id of a connection let through in report mode that no rule matched. It names
    /// no rule of any policy (`Policy::rule` gives `None`, `rule_name` gives `-`).
    pub const NONE: Self = Self(u32::MAX);

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// What the policy says about one destination. Refusal is the default: every path that is not a
/// positive match by an allow rule ends in `Deny`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Decision {
    Allow {
        rule: RuleId,
    },
    /// `rule` names the deny rule for `denied_by_rule`, and the rule that nearly matched for
    /// `port_not_allowed`, `source_not_allowed` and `address_not_allowed`.
    Deny {
        reason: DenyReason,
        rule: Option<RuleId>,
    },
}

impl Decision {
    pub const fn deny(reason: DenyReason) -> Self {
        Self::Deny { reason, rule: None }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// Why a destination was refused. `as_str` is the one name used in the audit log, the metric label,
/// the `X-Egress-Deny-Reason` header and the command line.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum DenyReason {
    /// A rule matched the name but the address it resolved to is outside the rule's ranges.
    AddressNotAllowed,
    /// A deny rule matched.
    DeniedByRule,
    /// The ClientHello carries Encrypted Client Hello, which hides the real name.
    EchPresent,
    /// The address is loopback, private, link-local, metadata or otherwise internal.
    InternalAddress,
    /// The host is not a valid host name or IP literal.
    InvalidHost,
    /// No rule matched.
    NoRule,
    /// A tunnel's first bytes are not a TLS ClientHello, and the rule wants TLS (`tls_only`).
    NotTls,
    /// A rule matched the host but not the port.
    PortNotAllowed,
    /// The TLS server name differs from the name the client asked the proxy for.
    SniMismatch,
    /// A rule matched the host and port but not the client's address.
    SourceNotAllowed,
    /// The client has sent its `upload_budget` through the rule in this window.
    UploadBudget,
    /// A tunnel carried the rule's `max_upload_bytes` up, and was closed.
    UploadLimit,
}

impl DenyReason {
    pub const ALL: [Self; 12] = [
        Self::AddressNotAllowed,
        Self::DeniedByRule,
        Self::EchPresent,
        Self::InternalAddress,
        Self::InvalidHost,
        Self::NoRule,
        Self::NotTls,
        Self::PortNotAllowed,
        Self::SniMismatch,
        Self::SourceNotAllowed,
        Self::UploadBudget,
        Self::UploadLimit,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AddressNotAllowed => "address_not_allowed",
            Self::DeniedByRule => "denied_by_rule",
            Self::EchPresent => "ech_present",
            Self::InternalAddress => "internal_address",
            Self::InvalidHost => "invalid_host",
            Self::NoRule => "no_rule",
            Self::NotTls => "not_tls",
            Self::PortNotAllowed => "port_not_allowed",
            Self::SniMismatch => "sni_mismatch",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::UploadBudget => "upload_budget",
            Self::UploadLimit => "upload_limit",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_name_is_unique_snake_case() {
        let names: HashSet<_> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DenyReason::ALL.len());
        for n in names {
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{n}");
        }
        let mut sorted = DenyReason::ALL;
        sorted.sort();
        assert_eq!(sorted, DenyReason::ALL, "ALL lists every variant in order");
    }
}

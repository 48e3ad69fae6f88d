//! Every way the proxy refuses, and the one table that maps each to an HTTP status and a name.
//!
//! The client's fault (400) is kept apart from the upstream's (502/504) and from the policy (403).

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::audit::Verdict;
use crate::policy::{DenyReason, RuleId};

use super::body::{full, ProxyBody};

/// The header that names the reason of a refusal.
pub const DENY_REASON: HeaderName = HeaderName::from_static("x-egress-deny-reason");

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Refusal {
    /// The policy said no.
    Policy { reason: DenyReason, rule: Option<RuleId> },
    /// The request is malformed or not something a forward proxy serves.
    BadRequest(&'static str),
    /// The client did not send a whole request head in time.
    HeadTimeout,
    /// The proxy is at its connection limit, overall or for this client.
    ConnectionLimit,
    /// The name does not resolve: no address, NXDOMAIN, SERVFAIL, or no resolver.
    ResolveFailed,
    /// No resolver answered within `[resolve] timeout`.
    ResolveTimeout,
    /// Every address refused the connection or was unreachable.
    UpstreamUnreachable,
    /// No address answered within the connect timeout.
    UpstreamTimeout,
    /// The upstream answered with something that is not HTTP.
    UpstreamProtocol,
    /// A redirected connection to a port no transparent listener serves: reset and logged.
    CatchAll,
    /// A redirected connection whose original destination cannot be read.
    NoOriginalDst,
    /// The client left (or the task serving it ended) before the connection was decided.
    ClientGone,
    /// The audit log is not taking lines, and `[audit] on_stall = "refuse"`: fail closed.
    AuditUnavailable,
    /// The proxy is out of file descriptors (or socket memory) for the upstream socket: its own
    /// shortage, not the upstream's.
    LocalResources,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Policy { .. } | Self::CatchAll | Self::NoOriginalDst => StatusCode::FORBIDDEN,
            Self::BadRequest(_) | Self::ClientGone => StatusCode::BAD_REQUEST,
            Self::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ConnectionLimit | Self::AuditUnavailable | Self::LocalResources => StatusCode::SERVICE_UNAVAILABLE,
            Self::ResolveFailed | Self::UpstreamUnreachable | Self::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout | Self::ResolveTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable snake_case name: audit `reason`, metric label, `X-Egress-Deny-Reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Policy { reason, .. } => reason.as_str(),
            Self::BadRequest(_) => "bad_request",
            Self::HeadTimeout => "request_head_timeout",
            Self::ConnectionLimit => "connection_limit",
            Self::ResolveFailed => "resolve_failed",
            Self::ResolveTimeout => "resolve_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamProtocol => "upstream_protocol_error",
            Self::CatchAll => "catch_all",
            Self::NoOriginalDst => "no_original_destination",
            Self::ClientGone => "client_gone",
            Self::AuditUnavailable => "audit_unavailable",
            Self::LocalResources => "local_resources",
        }
    }

    /// `deny` when the proxy refused, `fail` when the policy allowed but the upstream failed.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Policy { .. }
            | Self::BadRequest(_)
            | Self::HeadTimeout
            | Self::ConnectionLimit
            | Self::AuditUnavailable
            | Self::LocalResources
            | Self::CatchAll
            | Self::NoOriginalDst => Verdict::Deny,
            // The client left mid-way: what was under way may have reached the upstream, so the
            // line says `fail` rather than claim a refusal.
            Self::ResolveFailed
            | Self::ResolveTimeout
            | Self::UpstreamUnreachable
            | Self::UpstreamTimeout
            | Self::UpstreamProtocol
            | Self::ClientGone => Verdict::Fail,
        }
    }

    /// A policy refusal met inside a tunnel names the rule whose checks made it.
    pub fn with_rule(self, rule: RuleId) -> Self {
        match self {
            Self::Policy { reason, rule: None } => Self::Policy { reason, rule: Some(rule) },
            other => other,
        }
    }

    pub fn rule(&self) -> Option<RuleId> {
        match self {
            Self::Policy { rule, .. } => *rule,
            _ => None,
        }
    }

    /// The response for a refusal: status, one-line body, `X-Egress-Deny-Reason`, and
    /// `Connection: close` so that nothing more is read from this client.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(full(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(DENY_REASON, HeaderValue::from_static(self.reason()));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }

    /// `response`, as bytes on the wire: for a client whose request head never reached hyper.
    pub fn raw_response(&self) -> Vec<u8> {
        let (status, body) = (self.status(), self.body());
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{}: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default(),
            DENY_REASON,
            self.reason(),
            body.len(),
        )
        .into_bytes()
    }

    /// The one-line body sent with the status.
    pub fn body(&self) -> String {
        match self {
            Self::BadRequest(why) => format!("egress-proxy: bad_request: {why}\n"),
            other => format!("egress-proxy: refused: {}\n", other.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_client_policy_and_upstream_faults_apart() {
        let cases = [
            (Refusal::Policy { reason: DenyReason::NoRule, rule: None }, 403, "no_rule"),
            (Refusal::BadRequest("x"), 400, "bad_request"),
            (Refusal::ConnectionLimit, 503, "connection_limit"),
            (Refusal::AuditUnavailable, 503, "audit_unavailable"),
            (Refusal::LocalResources, 503, "local_resources"),
            (Refusal::ResolveFailed, 502, "resolve_failed"),
            (Refusal::ResolveTimeout, 504, "resolve_timeout"),
            (Refusal::UpstreamUnreachable, 502, "upstream_unreachable"),
            (Refusal::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (r, status, name) in cases {
            assert_eq!((r.status().as_u16(), r.reason()), (status, name));
        }
    }
}

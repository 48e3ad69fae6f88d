//! The explicit proxy listener (`[listen] http`): one hyper HTTP/1 service per client
//! connection; every request on it is decided on its own.
//!
//! The request line and headers are validated here into a `Destination`; then `connect.rs`
//! tunnels a CONNECT and `forward.rs` forwards an absolute-form request. Origin form to the proxy
//! itself is 400.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;

use super::body::ProxyBody;
use super::conn::{Conn, ConnCx};
use super::connect::connect;
use super::forward::forward;
use super::refusal::Refusal;
use crate::audit::Listener;
use crate::policy::{DenyReason, Destination, Host, HostError};
use crate::state::Limits;

/// Serves one request: validate → decide → CONNECT or forward. Every request gets its own
/// `Conn`, and with it exactly one decision line.
pub async fn handle(req: Request<Incoming>, cx: Arc<ConnCx>) -> Result<Response<ProxyBody>, Infallible> {
    cx.requests.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(&cx.state, cx.client, Listener::Http, None).with_method(req.method().clone());
    let target = Target::of(&req);
    let dest = match target.dest {
        Ok(dest) => dest,
        Err(refusal) => {
            conn.asked(target.raw, None);
            conn.refused(&refusal);
            return Ok(refusal.response());
        }
    };
    conn.asked(dest.host.to_string(), Some(dest.port));
    if req.method() == Method::CONNECT {
        return Ok(connect(req, &cx, conn, dest).await);
    }
    let permit = match conn.authorize(&dest).await {
        Ok(p) => p,
        Err(refusal) => {
            conn.refused(&refusal);
            return Ok(refusal.response());
        }
    };
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    Ok(forward(req, &cx, conn, &permit, &authority).await)
}

/// The HTTP/1 server settings of every listener that speaks HTTP to clients: the request head must
/// come within `request_head_timeout` and fit `max_request_head_bytes` (slowloris, size).
pub fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .max_buf_size(limits.max_request_head_bytes)
        // The buffer limit alone is soft (a head that completes within one more read passes):
        // this one is checked on the parsed head, to the byte (431 beyond it).
        .max_header_size(limits.max_request_head_bytes)
        .half_close(false);
    b
}

/// The destination as the client asked for it: parsed when it parses, raw for the audit log.
struct Target {
    raw: String,
    dest: Result<Destination, Refusal>,
}

impl Target {
    fn of(req: &Request<Incoming>) -> Self {
        let uri = req.uri();
        let raw = uri.authority().map_or_else(|| uri.to_string(), |a| redact_userinfo(a.as_str()));
        Self { raw: raw.chars().take(MAX_AUDIT_HOST).collect(), dest: destination(req) }
    }
}

/// An authority as the audit log may show it: userinfo (`alice:S3cret@`), which may be a
/// password, becomes `[redacted]@`. Everything up to the last `@` is userinfo.
fn redact_userinfo(authority: &str) -> String {
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("[redacted]@{host}"),
        None => authority.to_string(),
    }
}

/// Validates the request line and headers and returns the destination it names.
fn destination(req: &Request<Incoming>) -> Result<Destination, Refusal> {
    let uri = req.uri();
    let headers = req.headers();
    let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    let authority = if req.method() == Method::CONNECT {
        // hyper only accepts authority form for CONNECT; anything else has no authority here.
        if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(Refusal::BadRequest("CONNECT takes host:port"));
        }
        if has_body(headers) {
            return Err(Refusal::BadRequest("CONNECT with a body"));
        }
        uri.authority().ok_or(Refusal::BadRequest("CONNECT takes host:port"))?
    } else {
        match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(a)) => a,
            (Some(_), Some(_)) => {
                return Err(Refusal::BadRequest("only http:// URLs are forwarded; use CONNECT for TLS"))
            }
            _ => return Err(Refusal::BadRequest("this is a proxy: send CONNECT or an absolute-form request")),
        }
    };
    if let Some(host) = hosts.first() {
        if !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes())
            && !host_matches_default_port(host, authority.as_str(), req.method())
        {
            return Err(Refusal::BadRequest("Host header conflicts with the request target"));
        }
    }
    if authority.as_str().contains('@') {
        // `Authority::host` would drop the userinfo: refuse it rather than decide on half of it.
        return Err(Refusal::BadRequest("userinfo in the request target"));
    }
    // A port is present when a ':' follows the host (outside IPv6 brackets); parse it strictly
    // rather than trust `Authority::port`, which is `None` for a port it cannot read.
    let has_port = authority.as_str().rsplit(']').next().is_some_and(|tail| tail.contains(':'));
    let parsed = if req.method() == Method::CONNECT || has_port {
        Destination::parse_authority(authority.as_str())
    } else {
        Host::parse(authority.host()).map(|host| Destination { host, port: 80 })
    };
    parsed.map_err(|e| match e {
        HostError::InvalidPort | HostError::Userinfo => Refusal::BadRequest("malformed host:port"),
        _ => Refusal::Policy { reason: DenyReason::InvalidHost, rule: None },
    })
}

/// `Host: example.com` agrees with `http://example.com:80/`.
fn host_matches_default_port(host: &HeaderValue, authority: &str, method: &Method) -> bool {
    // CONNECT names its port explicitly: only absolute-form `http://` has a default (80) to drop.
    let Ok(host) = host.to_str() else { return false };
    if method == Method::CONNECT {
        return false;
    }
    authority.strip_suffix(":80").is_some_and(|a| a.eq_ignore_ascii_case(host))
        || host.strip_suffix(":80").is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
}

const MAX_AUDIT_HOST: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted_up_to_the_last_at() {
        assert_eq!(redact_userinfo("alice:S3cret@ml.azure.com:443"), "[redacted]@ml.azure.com:443");
        assert_eq!(redact_userinfo("a@b:c@ml.azure.com"), "[redacted]@ml.azure.com");
        assert_eq!(redact_userinfo("ml.azure.com:443"), "ml.azure.com:443");
    }
}

//! The explicit proxy listener (`[listen] http`): CONNECT tunnels and absolute-form forwarding.
//!
//! CONNECT: decide, resolve, check every address, dial, and only then answer 200 and tunnel.
//! Absolute form (`GET http://host/path`): the same decision, then one upstream HTTP/1.1 exchange
//! with hop-by-hop headers removed. Origin form to the proxy itself is 400.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dial::dial;
use super::tunnel::tunnel_tcp;
use super::{authorize, Refusal, State};
use crate::audit::{Closed, Decided, Listener, Verdict};
use crate::policy::{DenyReason, Destination, Host, HostError, HostName, Policy, RuleId};
use crate::tls::{self, Parsed};

pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every request on one client connection shares.
pub struct ConnCx {
    pub state: Arc<State>,
    pub client: SocketAddr,
    /// Tracks tunnels and upstream connections, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the shutdown grace period is over.
    pub stop: CancellationToken,
    /// Held by every task that serves this connection: the connection's slot in the limits.
    pub guard: Arc<dyn Send + Sync>,
    /// Requests served on this connection so far.
    pub requests: AtomicU64,
}

impl ConnCx {
    pub fn new(
        state: Arc<State>,
        client: SocketAddr,
        tracker: TaskTracker,
        stop: CancellationToken,
        guard: Arc<dyn Send + Sync>,
    ) -> Self {
        Self { state, client, tracker, stop, guard, requests: AtomicU64::new(0) }
    }
}

/// Serves one request.
pub async fn handle(req: Request<Incoming>, cx: Arc<ConnCx>) -> Result<Response<ProxyBody>, Infallible> {
    cx.requests.fetch_add(1, Ordering::Relaxed);
    let policy = cx.state.policy.load_full();
    let id = cx.state.next_id();
    let method = req.method().clone();
    let target = Target::of(&req);
    let outcome = if method == Method::CONNECT {
        connect(req, &cx, &policy, id, &target).await
    } else {
        forward(req, &cx, &policy, id, &target).await
    };
    Ok(outcome.unwrap_or_else(|refusal| {
        record_refusal(&cx, &policy, id, method.as_str(), &target, &refusal);
        refusal_response(&refusal)
    }))
}

/// The destination as the client asked for it: parsed when it parses, raw for the audit log.
struct Target {
    raw: String,
    dest: Result<Destination, Refusal>,
}

impl Target {
    fn of(req: &Request<Incoming>) -> Self {
        let uri = req.uri();
        let raw: String =
            uri.authority().map_or_else(|| uri.to_string(), |a| a.to_string()).chars().take(MAX_AUDIT_HOST).collect();
        Self { raw, dest: destination(req) }
    }

    fn host(&self) -> String {
        match &self.dest {
            Ok(d) => d.host.to_string(),
            Err(_) => self.raw.clone(),
        }
    }

    fn port(&self) -> Option<u16> {
        self.dest.as_ref().ok().map(|d| d.port)
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

/// An allowed destination, connected; its decision line is not written yet.
struct Opened {
    upstream: TcpStream,
    allowed: Allowed,
}

/// What the `allow` line of an opened connection says.
struct Allowed {
    dest: Destination,
    addr: SocketAddr,
    rule: Option<RuleId>,
}

impl Allowed {
    /// Writes the `allow` decision line and returns the close record that will pair with it.
    fn allow(&self, cx: &ConnCx, policy: &Policy, id: u64, method: &str) -> CloseRecord {
        let rule = self.rule.map(|r| policy.rule_name(r).to_string());
        let host = self.dest.host.to_string();
        cx.state.audit.decided(&Decided {
            id,
            client: cx.client,
            listener: Listener::Http,
            method: Some(method),
            host: Some(&host),
            port: Some(self.dest.port),
            dst_addr: Some(self.addr),
            decision: Verdict::Allow,
            rule: rule.as_deref(),
            reason: None,
            original_dst: None,
            note: None,
        });
        CloseRecord {
            state: Arc::clone(&cx.state),
            closed: OwnedClosed {
                listener: Listener::Http,
                id,
                client: cx.client,
                host,
                port: self.dest.port,
                addr: self.addr,
                rule,
            },
            up: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }
}

impl Allowed {
    /// The destination as a request target, for a refusal's audit line.
    fn target(&self) -> Target {
        Target { raw: self.dest.host.to_string(), dest: Ok(self.dest.clone()) }
    }
}

/// Decides, resolves, checks and dials the target.
async fn open(cx: &Arc<ConnCx>, policy: &Policy, target: &Target) -> Result<Opened, Refusal> {
    let dest = target.dest.clone()?;
    let state = &cx.state;
    let permit = authorize(policy, &state.resolver, &dest, cx.client.ip()).await?;
    let dialling = Instant::now();
    let (upstream, addr) = dial(&permit, state.limits.connect_timeout).await?;
    state.metrics.connect_duration.with_label_values(&["http"]).observe(dialling.elapsed().as_secs_f64());
    Ok(Opened { upstream, allowed: Allowed { dest, addr, rule: permit.rule_for(addr) } })
}

async fn connect(
    req: Request<Incoming>,
    cx: &Arc<ConnCx>,
    policy: &Arc<Policy>,
    id: u64,
    target: &Target,
) -> Result<Response<ProxyBody>, Refusal> {
    let opened = open(cx, policy, target).await?;
    let (cx, policy) = (Arc::clone(cx), Arc::clone(policy));
    // The tunnel task holds the connection's Arc, and with it its place in the limits.
    cx.tracker.clone().spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(id, error = %e, "CONNECT upgrade failed");
                let refusal = Refusal::BadRequest("the client left before the tunnel opened");
                return record_refusal(&cx, &policy, id, "CONNECT", &opened.allowed.target(), &refusal);
            }
        };
        // The client's own socket, and the bytes hyper read past the CONNECT head.
        let (client, early) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (parts.io.into_inner(), parts.read_buf.to_vec()),
            Err(_) => return tracing::error!(id, "CONNECT upgrade is not a TCP socket; closing"),
        };
        let Opened { mut upstream, allowed } = opened;
        let rule = allowed.rule.and_then(|r| policy.rule(r));
        let (sni_check, allow_ech) = rule.map_or((true, false), |r| (r.sni_check, r.allow_ech));
        let first = if sni_check || !allow_ech {
            let name = allowed.dest.host.name().filter(|_| sni_check);
            let wait = cx.state.limits.request_head_timeout;
            match inspect_hello(&client, &upstream, early, name, allow_ech, wait).await {
                Ok(first) => first,
                Err(reason) => {
                    let refusal = Refusal::Policy { reason, rule: allowed.rule };
                    return record_refusal(&cx, &policy, id, "CONNECT", &allowed.target(), &refusal);
                }
            }
        } else {
            early
        };
        let close = allowed.allow(&cx, &policy, id, "CONNECT");
        if upstream.write_all(&first).await.is_err() {
            return;
        }
        close.up.fetch_add(first.len() as u64, Ordering::Relaxed);
        let t = tunnel_tcp(client, upstream, cx.state.limits.idle_timeout, cx.stop.clone()).await;
        tracing::debug!(id, end = ?t.end, "Tunnel closed");
        close.up.fetch_add(t.up, Ordering::Relaxed);
        close.down.fetch_add(t.down, Ordering::Relaxed);
        drop(close); // writes the close line
    });
    Ok(Response::new(empty()))
}

/// Reads the client's first bytes inside a CONNECT tunnel until they make a whole ClientHello,
/// and checks it: Encrypted Client Hello unless `allow_ech`, and a server name other than `name`
/// (domain fronting through a shared front door). Bytes that are not TLS, or an upstream that
/// speaks first, end the inspection with nothing to check. Returns the bytes read, to be sent on.
async fn inspect_hello(
    client: &TcpStream,
    upstream: &TcpStream,
    mut buf: Vec<u8>,
    name: Option<&HostName>,
    allow_ech: bool,
    wait: Duration,
) -> Result<Vec<u8>, DenyReason> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match buf.first() {
            // Any TLS record type (an alert can come before the hello) or an SSLv2-style header is
            // read as TLS, so that only a real ClientHello gets through, and only once checked.
            Some(&b) if (TLS_CONTENT_TYPES).contains(&b) || b & 0x80 != 0 => match tls::parse(&buf) {
                Ok(Parsed::Hello(hello)) => {
                    if hello.ech && !allow_ech {
                        return Err(DenyReason::EchPresent);
                    }
                    return match (name, &hello.sni) {
                        (Some(asked), Some(sni)) if asked != sni => Err(DenyReason::SniMismatch),
                        _ => Ok(buf),
                    };
                }
                Ok(Parsed::NeedMore) if buf.len() <= tls::MAX_HELLO_BYTES => {}
                Ok(Parsed::NeedMore) | Err(_) => return Err(DenyReason::InvalidHost),
            },
            Some(_) => return Ok(buf), // not TLS: no server name to check
            None => {}
        }
        tokio::select! {
            r = client.readable() => {
                if r.is_err() {
                    return Err(DenyReason::InvalidHost);
                }
                let mut chunk = [0u8; 4096];
                match client.try_read(&mut chunk) {
                    Ok(0) => return if buf.is_empty() { Ok(buf) } else { Err(DenyReason::InvalidHost) },
                    Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(DenyReason::InvalidHost),
                }
            }
            // A server that speaks first (SSH, SMTP) is not TLS: nothing to check.
            _ = upstream.readable(), if buf.is_empty() => return Ok(buf),
            () = tokio::time::sleep_until(deadline) => return Err(DenyReason::InvalidHost),
        }
    }
}

/// change_cipher_spec, alert, handshake, application_data, heartbeat (RFC 8446 §5.1, RFC 6520).
const TLS_CONTENT_TYPES: std::ops::RangeInclusive<u8> = 0x14..=0x18;

async fn forward(
    mut req: Request<Incoming>,
    cx: &Arc<ConnCx>,
    policy: &Policy,
    id: u64,
    target: &Target,
) -> Result<Response<ProxyBody>, Refusal> {
    let method = req.method().clone();
    let Opened { upstream, allowed } = open(cx, policy, target).await?;
    let up = Arc::new(AtomicU64::new(0));

    // Origin form upstream, Host from the request target (RFC 9112 §3.2.2), hop-by-hop removed.
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *req.uri_mut() = Uri::try_from(path).map_err(|_| Refusal::BadRequest("malformed request target"))?;
    strip_hop_by_hop(req.headers_mut());
    let host_value = HeaderValue::from_str(&authority).map_err(|_| Refusal::BadRequest("malformed authority"))?;
    req.headers_mut().insert(header::HOST, host_value);
    let idle = cx.state.limits.idle_timeout;
    let req = req.map(|b| Counted::new(b, Arc::clone(&up), idle, None).boxed());

    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await.map_err(|_| Refusal::UpstreamProtocol)?;
    let stop = cx.stop.clone();
    cx.tracker.spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r { tracing::debug!(error = %e, "Upstream connection ended with an error") },
            () = stop.cancelled() => {}
        }
    });
    let response = tokio::time::timeout(cx.state.limits.idle_timeout, sender.send_request(req))
        .await
        .map_err(|_| Refusal::UpstreamTimeout)?
        .map_err(|_| Refusal::UpstreamProtocol)?;
    // Allowed and answered: only now the `allow` line, so that a failed exchange has one line.
    let mut close = allowed.allow(cx, policy, id, method.as_str());
    close.up = up;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let down = Arc::clone(&close.down);
    let body = Counted::new(body, down, idle, Some(close)).boxed();
    Ok(Response::from_parts(parts, body))
}

/// Writes the audit line for a refusal; called before the client is answered.
fn record_refusal(cx: &ConnCx, policy: &Policy, id: u64, method: &str, target: &Target, refusal: &Refusal) {
    let host = target.host();
    cx.state.audit.decided(&Decided {
        id,
        client: cx.client,
        listener: Listener::Http,
        method: Some(method),
        host: Some(&host),
        port: target.port(),
        dst_addr: None,
        decision: refusal.verdict(),
        rule: refusal.rule().map(|r| policy.rule_name(r)),
        reason: Some(refusal.reason()),
        original_dst: None,
        note: None,
    });
    tracing::info!(id, client.addr = %cx.client, dst.host = %host, reason = refusal.reason(), "Refused");
}

/// The response for a refusal: status, one-line body, `X-Egress-Deny-Reason`, and `Connection:
/// close` so that nothing more is read from this client.
pub fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let mut resp = Response::new(full(r.body()));
    *resp.status_mut() = r.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(DENY_REASON, HeaderValue::from_static(r.reason()));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Removes the headers that belong to one hop (RFC 9110 §7.6.1), including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const DENY_REASON: HeaderName = HeaderName::from_static("x-egress-deny-reason");
const MAX_AUDIT_HOST: usize = 300;

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(text: String) -> ProxyBody {
    Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

// === forwarding bookkeeping ===

pub(crate) struct OwnedClosed {
    pub(crate) listener: Listener,
    pub(crate) id: u64,
    pub(crate) client: SocketAddr,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) addr: SocketAddr,
    pub(crate) rule: Option<String>,
}

/// Writes the close line of an allowed connection when it is dropped: at the end of a tunnel, or
/// when a forwarded response body is done or abandoned.
pub(crate) struct CloseRecord {
    pub(crate) state: Arc<State>,
    pub(crate) closed: OwnedClosed,
    pub(crate) up: Arc<AtomicU64>,
    pub(crate) down: Arc<AtomicU64>,
    pub(crate) started: Instant,
}

impl Drop for CloseRecord {
    fn drop(&mut self) {
        let c = &self.closed;
        self.state.audit.closed(&Closed {
            id: c.id,
            client: c.client,
            listener: c.listener,
            host: Some(&c.host),
            port: Some(c.port),
            dst_addr: Some(c.addr),
            rule: c.rule.as_deref(),
            bytes_up: self.up.load(Ordering::Relaxed),
            bytes_down: self.down.load(Ordering::Relaxed),
            duration_ms: millis(self.started),
        });
    }
}

/// A body that counts the bytes that pass through it, ends in an error when no frame comes for
/// the idle timeout (a trickling peer must not hold a connection slot forever), and writes the
/// close line (if it carries one) when it is dropped.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _close: Option<CloseRecord>,
}

impl<B> Counted<B> {
    fn new(inner: B, count: Arc<AtomicU64>, idle: Duration, close: Option<CloseRecord>) -> Self {
        Self { inner, count, idle, deadline: Box::pin(tokio::time::sleep(idle)), _close: close }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("body idle for longer than idle_timeout".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! The transparent listeners: connections redirected by nftables, which do not know about the
//! proxy. `tls` reads the ClientHello, `plain` the HTTP request head, and both decide on the name
//! they carry, the original destination and the port together; `catch_all` resets and logs every
//! other redirected connection, so that "refused and logged" covers all egress.
//!
//! `tls` and `catch_all`: detect → authorize → check → dial → tunnel → close. What was read to
//! decide is replayed upstream as the start of the tunnel; nothing reaches the upstream before the
//! decision. A refusal resets the connection.
//!
//! `plain` serves one HTTP/1 request per connection: its head is read and checked strictly
//! (`detect`: a bare LF, obs-fold, or an absolute-form target that disagrees with Host is 400),
//! then hyper serves it, it is decided on the host it names and forwarded as the explicit listener
//! forwards, and the response says `Connection: close`. A second request never rides on the
//! first one's decision.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::conn::{Conn, ConnCx};
use super::detect::{check_hello, detect, Detected, Hello, RequestHead};
use super::forward::forward;
use super::http::http1_builder;
use super::prefixed::Prefixed;
use super::refusal::Refusal;
use super::retry::tunnel_tls;
use crate::audit::Listener;
use crate::policy::{Host, HostName};
use crate::tls;

/// The transparent listeners.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Redirect {
    /// `[listen] tls`: decided on the ClientHello's server name.
    Tls,
    /// `[listen] plain`: decided on the HTTP request's host.
    Plain,
    /// `[listen] catch_all`: every other redirected port; refused and logged.
    CatchAll,
}

impl Redirect {
    pub const fn listener(self) -> Listener {
        match self {
            Self::Tls => Listener::Tls,
            Self::Plain => Listener::Plain,
            Self::CatchAll => Listener::CatchAll,
        }
    }
}

/// Serves one redirected connection whose original destination is `original_dst`.
pub async fn serve(kind: Redirect, stream: TcpStream, original_dst: SocketAddr, cx: Arc<ConnCx>) {
    match kind {
        Redirect::Tls => serve_tls(stream, original_dst, cx).await,
        Redirect::Plain => serve_plain(stream, original_dst, cx).await,
        Redirect::CatchAll => {
            let conn = Conn::redirected(&cx.state, cx.client, Listener::CatchAll, original_dst);
            refuse(conn, &Refusal::CatchAll, stream);
        }
    }
}

/// `tls`: read the ClientHello, decide once on its server name and the original destination,
/// check the rest of the hello, dial, then tunnel, the hello replayed first.
async fn serve_tls(stream: TcpStream, original_dst: SocketAddr, cx: Arc<ConnCx>) {
    let mut conn = Conn::redirected(&cx.state, cx.client, Listener::Tls, original_dst);
    let wait = cx.state.limits.request_head_timeout;
    let Detected { value: hello, prefix } =
        match detect(&stream, Vec::new(), &mut Hello, tls::MAX_HELLO_BYTES, wait, None).await {
            Ok(d) => d,
            Err(refusal) => return refuse(conn, &refusal, stream),
        };
    if let Some(name) = &hello.sni {
        conn.asked(name.to_string(), Some(original_dst.port()));
    }
    let permit = match conn.authorize_redirected(hello.sni.as_ref()).await {
        Ok(p) => p,
        Err(refusal) => return refuse(conn, &refusal, stream),
    };
    // The server name is what got decided: what else the hello carries (ECH) is checked against
    // every rule that may be dialled, before anything is dialled.
    let refused = permit.addrs().find_map(|(_, g)| check_hello(&hello, None, g.tunnel).err().map(|r| (r, g.rule)));
    if let Some((reason, rule)) = refused {
        return refuse(conn, &Refusal::Policy { reason, rule: Some(rule) }, stream);
    }
    let upstream = match conn.dial(&permit).await {
        Ok(u) => u,
        Err(refusal) => return refuse(conn, &refusal, stream),
    };
    drop(permit);
    if let Err(stream) = tunnel_tls(&cx, conn, stream, upstream, Some(hello), prefix).await {
        reset(stream);
    }
}

/// `plain`: one request, checked strictly, decided on its own, forwarded; then the connection
/// closes.
async fn serve_plain(stream: TcpStream, original_dst: SocketAddr, cx: Arc<ConnCx>) {
    let limits = cx.state.limits;
    let (limit, wait) = (limits.max_request_head_bytes, limits.request_head_timeout);
    let head = match detect(&stream, Vec::new(), &mut RequestHead, limit, wait, None).await {
        Ok(head) => head,
        Err(refusal) => {
            let conn = Conn::redirected(&cx.state, cx.client, Listener::Plain, original_dst);
            conn.refused(&refusal);
            return answer(stream, &refusal, wait).await;
        }
    };
    // An IP literal names no host: the original destination is decided instead.
    let name = match head.value.dest.map(|dest| dest.host) {
        Some(Host::Name(name)) => Some(name),
        Some(Host::Ip(_)) | None => None,
    };
    let svc_cx = Arc::clone(&cx);
    let svc = service_fn(move |req| plain_request(req, Arc::clone(&svc_cx), original_dst, name.clone()));
    // hyper reads the head again from the bytes detect read: the same bytes, checked already.
    let io = TokioIo::new(Prefixed::new(head.prefix, stream));
    let served = http1_builder(&limits).keep_alive(false).serve_connection(io, svc);
    let result = tokio::select! {
        r = served => r,
        () = cx.stop.cancelled() => return,
    };
    match result {
        // What the strict head check let through and hyper still refused (with its own 400).
        Err(e) if e.is_parse() || e.is_parse_too_large() => {
            let conn = Conn::redirected(&cx.state, cx.client, Listener::Plain, original_dst);
            conn.refused(&Refusal::BadRequest("malformed request"));
        }
        Err(e) => tracing::debug!(error = %e, "Plain connection ended with an error"),
        Ok(()) => {}
    }
}

/// The one request of a `plain` connection: decided on `name` (the host its head names, when
/// that is a name) and the original destination, then forwarded with the Host it carries.
async fn plain_request(
    req: Request<Incoming>,
    cx: Arc<ConnCx>,
    original_dst: SocketAddr,
    name: Option<HostName>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut conn =
        Conn::redirected(&cx.state, cx.client, Listener::Plain, original_dst).with_method(req.method().clone());
    if let Some(name) = &name {
        conn.asked(name.to_string(), Some(original_dst.port()));
    }
    let permit = match conn.authorize_redirected(name.as_ref()).await {
        Ok(p) => p,
        Err(refusal) => {
            conn.refused(&refusal);
            return Ok(refusal.response());
        }
    };
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(ToString::to_string))
        .unwrap_or_else(|| original_dst.to_string());
    Ok(forward(req, &cx, conn, &permit, &authority).await)
}

/// Answers a request that never reached hyper (its head was refused), then closes.
async fn answer(mut stream: TcpStream, refusal: &Refusal, wait: Duration) {
    let _ = tokio::time::timeout(wait, async {
        stream.write_all(&refusal.raw_response()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Audits a refusal and resets the connection: nothing was sent anywhere.
fn refuse(conn: Conn, refusal: &Refusal, stream: TcpStream) {
    conn.refused(refusal);
    reset(stream);
}

/// Closes a refused redirected connection with a reset (SO_LINGER 0), so that the client fails
/// at once instead of waiting, and reads nothing that looks like an answer.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

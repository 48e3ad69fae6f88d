//! CONNECT, read top-down: authorize → dial → 200 → detect the ClientHello → check it →
//! tunnel → close. The proxy answers 200 only once the upstream is connected, and sends the
//! upstream nothing until the first bytes of the tunnel have been checked.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::{empty, ProxyBody};
use super::conn::{Conn, ConnCx};
use super::detect::{check_hello, detect, TunnelHello};
use super::dial::Upstream;
use super::refusal::Refusal;
use super::retry::tunnel_tls;
use crate::policy::{Destination, Host};
use crate::tls::{self, ClientHello};

/// Answers a CONNECT to `dest`: 200 and a tunnel, or the refusal.
pub async fn connect(req: Request<Incoming>, cx: &Arc<ConnCx>, conn: Conn, dest: Destination) -> Response<ProxyBody> {
    let opened = async {
        let permit = conn.authorize(&dest).await?;
        conn.dial(&permit).await
    };
    let upstream = match opened.await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            conn.refused(&refusal);
            return refusal.response();
        }
    };
    // The tunnel task holds the connection's Arc, and with it its place in the limits.
    let task_cx = Arc::clone(cx);
    cx.tracker.spawn(async move { tunnel(req, &task_cx, conn, dest, upstream).await });
    Response::new(empty())
}

/// After the 200: takes over the client's socket, checks its first bytes, and tunnels.
async fn tunnel(req: Request<Incoming>, cx: &Arc<ConnCx>, mut conn: Conn, dest: Destination, upstream: Upstream) {
    let (client, prefix, hello) = match first_bytes(req, cx, &mut conn, &dest, &upstream).await {
        Ok(opened) => opened,
        Err(refusal) => return conn.refused(&refusal),
    };
    drop(dest);
    // A refused second hello is closed cleanly, like every refusal inside a CONNECT tunnel.
    let _ = tunnel_tls(cx, conn, client, upstream, hello, prefix).await;
}

/// The client's socket once hyper hands it over, and the tunnel's first bytes, checked: a
/// ClientHello must name what was decided and carry no ECH, unless the rule says otherwise. The
/// hello, when there is one, is followed further by `follow_retry`.
async fn first_bytes(
    req: Request<Incoming>,
    cx: &ConnCx,
    conn: &mut Conn,
    dest: &Destination,
    upstream: &Upstream,
) -> Result<(TcpStream, Vec<u8>, Option<ClientHello>), Refusal> {
    let wait = cx.state.limits.request_head_timeout;
    // A client that never takes up its tunnel must not hold the dialled upstream for long.
    let upgraded = match tokio::time::timeout(wait, hyper::upgrade::on(req)).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(e)) => {
            tracing::debug!(id = conn.id, error = %e, "CONNECT upgrade failed");
            return Err(Refusal::BadRequest("the client left before the tunnel opened"));
        }
        Err(_) => return Err(Refusal::HeadTimeout),
    };
    // The client's own socket, and the bytes hyper read past the CONNECT head.
    let (client, early) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf.to_vec()),
        // serve_http always hands hyper a TcpStream; anything else is refused, never tunnelled.
        Err(_) => return Err(Refusal::BadRequest("the upgraded connection is not a TCP socket")),
    };
    let grant = upstream.to.grant;
    // With `names = "listed"`, a tunnel to an address must show the name it carries, so it must
    // be TLS: plaintext would carry its name (a Host header) unchecked.
    let names_listed = grant.tunnel.names_listed && matches!(dest.host, Host::Ip(_));
    let tls_only = grant.tunnel.tls_only || names_listed;
    if !grant.tunnel.sni_check && grant.tunnel.allow_ech && !tls_only {
        return Ok((client, early, None));
    }
    // The rule that allowed the tunnel is the one whose checks refuse it.
    let by_rule = |reason| Refusal::Policy { reason, rule: Some(grant.rule) };
    let detected =
        detect(&client, early, &mut TunnelHello { tls_only }, tls::MAX_HELLO_BYTES, wait, Some(&upstream.stream)).await;
    let d = detected.map_err(|r| match r {
        Refusal::Policy { reason, rule: None } => by_rule(reason),
        other => other,
    })?;
    if let Some(hello) = &d.value {
        if let Some(sni) = &hello.sni {
            conn.presented(sni);
        }
        check_hello(hello, dest.host.name(), grant.tunnel).map_err(by_rule)?;
        // A tunnel to an address, allowed by an address rule: with `names = "listed"`, the name
        // it carries must be allowed by a host rule of its own.
        if let (true, Some(sni)) = (names_listed, &hello.sni) {
            conn.decide_name(sni, dest.port)?;
        }
    }
    Ok((client, d.prefix, d.value))
}

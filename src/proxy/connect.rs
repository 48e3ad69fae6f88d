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
use super::detect::{check_hello, detect, Detected, TunnelHello};
use super::dial::Upstream;
use super::refusal::Refusal;
use super::tunnel::meter::Meter;
use super::tunnel::tunnel_tcp;
use crate::policy::Destination;
use crate::tls;

/// Answers a CONNECT to `dest`: 200 and a tunnel, or the refusal.
pub async fn connect(req: Request<Incoming>, cx: &Arc<ConnCx>, conn: Conn, dest: Destination) -> Response<ProxyBody> {
    let opened = async {
        let permit = conn.authorize(&dest).await?;
        conn.dial(&permit).await
    };
    let upstream = match opened.await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            conn.refused(Some(&dest.host.to_string()), Some(dest.port), &refusal);
            return refusal.response();
        }
    };
    // The tunnel task holds the connection's Arc, and with it its place in the limits.
    let task_cx = Arc::clone(cx);
    cx.tracker.spawn(async move { tunnel(req, &task_cx, conn, dest, upstream).await });
    Response::new(empty())
}

/// After the 200: takes over the client's socket, checks its first bytes, and tunnels.
async fn tunnel(req: Request<Incoming>, cx: &ConnCx, conn: Conn, dest: Destination, upstream: Upstream) {
    let host = dest.host.to_string();
    let refuse = |refusal: Refusal| conn.refused(Some(&host), Some(dest.port), &refusal);
    let upgraded = match hyper::upgrade::on(req).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(id = conn.id, error = %e, "CONNECT upgrade failed");
            return refuse(Refusal::BadRequest("the client left before the tunnel opened"));
        }
    };
    // The client's own socket, and the bytes hyper read past the CONNECT head.
    let (client, early) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf.to_vec()),
        Err(_) => return tracing::error!(id = conn.id, "CONNECT upgrade is not a TCP socket; closing"),
    };
    let grant = upstream.to.grant;
    let prefix = if grant.tunnel.sni_check || !grant.tunnel.allow_ech {
        let wait = cx.state.limits.request_head_timeout;
        let detected =
            detect(&client, early, &mut TunnelHello, tls::MAX_HELLO_BYTES, wait, Some(&upstream.stream)).await;
        let checked = detected.and_then(|Detected { value, prefix }| match value {
            Some(hello) => check_hello(&hello, dest.host.name(), grant.tunnel)
                .map(|()| prefix)
                .map_err(|reason| Refusal::Policy { reason, rule: None }),
            None => Ok(prefix),
        });
        match checked {
            Ok(prefix) => prefix,
            // The rule that allowed the tunnel is the one whose checks refused it.
            Err(Refusal::Policy { reason, .. }) => return refuse(Refusal::Policy { reason, rule: Some(grant.rule) }),
            Err(other) => return refuse(other),
        }
    } else {
        early
    };
    let close = conn.allowed(host, dest.port, upstream.to, Meter::new());
    let (idle, stop) = (cx.state.limits.idle_timeout, cx.stop.clone());
    let end = tunnel_tcp(client, upstream.stream, &prefix, close.meter(), idle, stop).await;
    tracing::debug!(id = close.id(), ?end, "Tunnel closed");
}

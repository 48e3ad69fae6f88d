//! Accepts connections on bound listeners within the limits, and drains on shutdown.
//!
//! `run` takes bound listeners and a shutdown token, so tests bind 127.0.0.1:0 and pass them in.
//! On shutdown: stop accepting, let open connections and tunnels finish for the grace period,
//! then close what is left.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin;
use crate::admission::Admission;
use crate::audit::Listener;
use crate::descriptors::{has_pending, is_shortage, At, Spare};
use crate::dns::{self, DnsFilter};
use crate::policy::fold_mapped;
use crate::proxy::conn::{Conn, ConnCx};
use crate::proxy::http::{handle, http1_builder};
use crate::proxy::transparent::{self, Redirect};
use crate::proxy::Refusal;
use crate::reload::Reloader;
use crate::state::State;

/// The bound listeners; each is optional.
#[derive(Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    pub plain: Option<TcpListener>,
    pub catch_all: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    /// The DNS filter's sockets (UDP and TCP on one address), and the filter.
    pub dns: Option<DnsListener>,
}

/// `[listen] dns`: a UDP socket and a TCP listener on the same address.
pub struct DnsListener {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
    pub filter: Arc<DnsFilter>,
}

/// Serves until `shutdown` is cancelled, then drains.
pub async fn run(
    listeners: Listeners,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let admission = Arc::new(Admission::new(state.limits.max_connections, state.limits.max_connections_per_client));
    // Bounds the tasks that answer 503, so that a flood cannot grow them without limit.
    let overflow = Arc::new(Semaphore::new(OVERFLOW_ANSWERS));
    let mut accepts = Vec::new();
    for (kind, listener) in
        [(Redirect::Tls, listeners.tls), (Redirect::Plain, listeners.plain), (Redirect::CatchAll, listeners.catch_all)]
    {
        if let Some(l) = listener {
            let (state, tracker, stop, shutdown, admission) =
                (state.clone(), tracker.clone(), stop.clone(), shutdown.clone(), admission.clone());
            accepts.push(tokio::spawn(accept_redirected(kind, l, state, tracker, stop, shutdown, admission)));
        }
    }
    if let Some(l) = listeners.http {
        let (state, tracker, stop, shutdown, admission) =
            (state.clone(), tracker.clone(), stop.clone(), shutdown.clone(), admission.clone());
        let overflow = overflow.clone();
        accepts.push(tokio::spawn(accept_http(l, state, tracker, stop, shutdown, admission, overflow)));
    }
    if let Some(DnsListener { udp, tcp, filter }) = listeners.dns {
        let (tracker, shutdown) = (tracker.clone(), shutdown.clone());
        accepts.push(tokio::spawn(dns::serve_udp(udp, Arc::clone(&filter), shutdown.clone(), tracker.clone())));
        accepts.push(tokio::spawn(accept_dns_tcp(tcp, filter, state.clone(), tracker, shutdown)));
    }
    if let Some(l) = listeners.admin {
        let (state, tracker, stop, shutdown) = (state.clone(), tracker.clone(), stop.clone(), shutdown.clone());
        accepts.push(tokio::spawn(accept_admin(l, state, reloader, tracker, stop, shutdown)));
    }
    state.ready.store(true, Ordering::Relaxed);
    shutdown.cancelled().await;
    state.ready.store(false, Ordering::Relaxed);
    for a in accepts {
        let _ = a.await;
    }
    tracker.close();
    let grace = state.limits.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "Grace period over: closing open connections");
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}

async fn accept_http(
    listener: TcpListener,
    state: Arc<State>,
    tracker: TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
    admission: Arc<Admission>,
    overflow: Arc<Semaphore>,
) {
    let mut spare = Spare::keep();
    while let Some((stream, client)) = accept_next(&listener, &shutdown, &state, &mut spare).await {
        match admission.admit(client.ip()) {
            Some(slot) => {
                let cx = Arc::new(ConnCx::new(state.clone(), client, tracker.clone(), stop.clone(), Arc::new(slot)));
                let span = tracing::debug_span!("conn", client.addr = %client, listener = "http");
                tracker.spawn(serve_http(stream, cx, shutdown.clone()).instrument(span));
            }
            None => match overflow.clone().try_acquire_owned() {
                Ok(permit) => {
                    tracker.spawn(reject(stream, client, state.clone(), permit));
                }
                Err(_) => drop(stream),
            },
        }
    }
}

/// Sets TCP_NODELAY on a listening socket, once at start: every connection accepted from it
/// inherits it (Linux copies the listener's socket options to the connection), so no accept pays
/// a system call for it. A handshake's small writes must not wait for delayed ACKs (a transparent
/// listener without it took 44 ms more per new tunnel).
pub fn nodelay_for_every_connection(listener: &TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_nodelay(true)
}

/// The next connection, or `None` once `shutdown` is cancelled. TCP_NODELAY comes from the
/// listener (`nodelay_for_every_connection`).
///
/// A failed accept backs off, 10 ms doubling to 1 s, instead of spinning. When it failed for want
/// of a descriptor, the shortage is noted (counted, logged a few times, `/readyz` not ready) and
/// the pool's free pipes are closed; and when a client is waiting, `spare`, the listener's one
/// descriptor in reserve, is given up so that its accept goes through: the client then hears `503 local_resources` (or,
/// on the admin listener, gets its answer) instead of waiting unanswered in the backlog.
pub(crate) async fn accept_next(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    state: &State,
    spare: &mut Spare,
) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let error = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    spare.refill();
                    return Some((stream, client));
                }
                Err(e) => e,
            },
        };
        if is_shortage(&error) {
            state.shortage.note(At::Accept, &error);
            state.pipes.close_free();
            if has_pending(listener) && spare.release() {
                continue;
            }
        } else {
            tracing::debug!(error = %error, "Accept failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
        spare.refill();
    }
}

/// Accepts DNS-over-TCP connections, within their own limit, and drains them with the rest.
async fn accept_dns_tcp(
    listener: TcpListener,
    filter: Arc<DnsFilter>,
    state: Arc<State>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let slots = Admission::new(dns::TCP_CONNECTIONS, dns::TCP_CONNECTIONS_PER_CLIENT);
    let mut spare = Spare::keep();
    while let Some((stream, client)) = accept_next(&listener, &shutdown, &state, &mut spare).await {
        let Some(slot) = slots.admit(fold_mapped(client.ip())) else { continue };
        let filter = Arc::clone(&filter);
        tracker.spawn(async move {
            let _ = dns::serve_tcp_conn(stream, client, &filter).await;
            drop(slot);
        });
    }
}

/// Accepts admin connections, within their own limit, and drains them with the rest.
async fn accept_admin(
    listener: TcpListener,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    // Its own descriptor in reserve, so that /readyz can say "not ready" while the data path is
    // short.
    let mut spare = Spare::keep();
    while let Some((stream, client)) = accept_next(&listener, &shutdown, &state, &mut spare).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client.addr = %client, limit = ADMIN_CONNECTIONS, "Admin connection refused: at its limit");
            continue;
        };
        let (state, reloader, stop, shutdown) = (state.clone(), reloader.clone(), stop.clone(), shutdown.clone());
        tracker.spawn(async move {
            let svc = service_fn(move |req| admin::respond(req, state.clone(), reloader.clone()));
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(ADMIN_HEAD_TIMEOUT);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = until_shutdown(conn, &shutdown, &stop, |c| c.graceful_shutdown()).await;
            if let Some(Err(e)) = result {
                tracing::debug!(error = %e, "Admin connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// Accepts redirected connections for one transparent listener.
async fn accept_redirected(
    kind: Redirect,
    listener: TcpListener,
    state: Arc<State>,
    tracker: TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
    admission: Arc<Admission>,
) {
    let mut spare = Spare::keep();
    while let Some((stream, client)) = accept_next(&listener, &shutdown, &state, &mut spare).await {
        let Some(slot) = admission.admit(client.ip()) else {
            Conn::new(&state, client, kind.listener(), None).refused(&Refusal::ConnectionLimit);
            transparent::reset(stream);
            continue;
        };
        let Some(original_dst) = original_dst(&stream).or_else(|| steered(kind, &state)) else {
            Conn::new(&state, client, kind.listener(), None).refused(&Refusal::NoOriginalDst);
            transparent::reset(stream);
            continue;
        };
        let cx = Arc::new(ConnCx::new(state.clone(), client, tracker.clone(), stop.clone(), Arc::new(slot)));
        let listener = kind.listener().as_str();
        let span = tracing::debug_span!("conn", client.addr = %client, listener, dst.orig = %original_dst);
        tracker.spawn(transparent::serve(kind, stream, original_dst, cx).instrument(span));
    }
}

/// A connection that was not redirected, on a listener with a `[transparent.steered]` port: the
/// unspecified address with that port, which `authorize_redirected` reads as "the server name
/// decides, on this port" (no original destination exists to compare or fall back to).
fn steered(kind: Redirect, state: &State) -> Option<SocketAddr> {
    let port = match kind {
        Redirect::Tls => state.steered.tls,
        Redirect::Plain => state.steered.plain,
        Redirect::CatchAll => None,
    }?;
    Some(SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port))
}

/// Where a redirected connection was going (SO_ORIGINAL_DST, IPv4 and IPv6). On a dual-stack
/// listener (`[::]:port`) an IPv4 connection has a v4-mapped local address, and its original
/// destination is in the IPv4 table. `None` for a connection that was not redirected: no NAT
/// entry, or one that names the listener itself.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let is_v4 = match stream.local_addr().ok()?.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let addr = if is_v4 { sock.original_dst() } else { sock.original_dst_ipv6() };
    let addr = addr.ok()?.as_socket()?;
    let local = stream.local_addr().ok()?;
    let to_listener = addr.port() == local.port() && fold_mapped(addr.ip()) == fold_mapped(local.ip());
    (!to_listener).then_some(addr)
}

async fn serve_http(stream: TcpStream, cx: Arc<ConnCx>, shutdown: CancellationToken) {
    let limits = cx.state.limits;
    let svc_cx = cx.clone();
    let svc = service_fn(move |req| handle(req, svc_cx.clone()));
    let conn = http1_builder(&limits).serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::pin!(conn);
    let Some(result) = until_shutdown(conn, &shutdown, &cx.stop, |c| c.graceful_shutdown()).await else {
        return;
    };
    if let Err(e) = result {
        // hyper restarts the head timer when a kept-alive connection goes idle: a timeout after
        // a served request is an idle client going away, not a slow request head.
        let served = cx.requests.load(Ordering::Relaxed) > 0;
        let refusal = if e.is_timeout() && !served {
            Some(Refusal::HeadTimeout)
        } else if e.is_incomplete_message() && !served {
            // A first request head the client left halfway: audited, as on the `plain` listener.
            Some(Refusal::BadRequest("closed before the head was read"))
        } else if e.is_parse() || e.is_parse_too_large() {
            Some(Refusal::BadRequest("malformed request"))
        } else {
            None
        };
        match refusal {
            Some(r) => Conn::new(&cx.state, cx.client, Listener::Http, None).refused(&r),
            None => tracing::debug!(error = %e, "Connection ended with an error"),
        }
    }
}

/// Drives an HTTP connection; once `shutdown` is cancelled, asks it to finish the request in
/// flight and close (`graceful`), and waits for that until `stop` (the end of the grace period):
/// `None` when the connection was cut there.
async fn until_shutdown<C: Future>(
    mut conn: Pin<&mut C>,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Option<C::Output> {
    tokio::select! {
        r = conn.as_mut() => return Some(r),
        () = shutdown.cancelled() => graceful(conn.as_mut()),
    }
    tokio::select! {
        r = conn => Some(r),
        () = stop.cancelled() => None,
    }
}

/// Answers 503 to a client over a limit, then closes.
async fn reject(stream: TcpStream, client: SocketAddr, state: Arc<State>, _permit: OwnedSemaphorePermit) {
    Conn::new(&state, client, Listener::Http, None).refused(&Refusal::ConnectionLimit);
    let svc = service_fn(|_req| async { Ok::<_, std::convert::Infallible>(Refusal::ConnectionLimit.response()) });
    let _ = http1_builder(&state.limits).keep_alive(false).serve_connection(TokioIo::new(stream), svc).await;
}

const OVERFLOW_ANSWERS: usize = 64;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Admin connections open at once (Prometheus, probes, an operator's curl).
pub const ADMIN_CONNECTIONS: usize = 32;
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_inherit_nodelay_from_their_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodelay_for_every_connection(&listener).unwrap();
        #[allow(clippy::disallowed_methods)]
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "the accepted connection has TCP_NODELAY without a call of its own");
    }
}

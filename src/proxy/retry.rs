//! A server that answers the first ClientHello with a HelloRetryRequest makes the client send a
//! second one (RFC 8446 §4.1.4). A proxy that checked only the first would let the second name
//! anyone on a shared front end: this follows the handshake that far, and checks the second hello
//! as the first was checked, with the same server name.
//!
//! Every byte it moves passes the connection's meter; the tunnel then carries the rest.
//! `tunnel_tls` is the end every checked tunnel shares, on the explicit and the transparent
//! listener: the allow line, the retry followed, then the tunnel.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::policy::{DenyReason, TunnelOptions};
use crate::tls::server_hello::{classify, second_hello_start, First};
use crate::tls::{self, ClientHello, Parsed};

use super::conn::{CloseRecord, Conn, ConnCx};
use super::detect::{check_hello, detect, Detect, Step, Stop};
use super::dial::Upstream;
use super::read::{read_some_into, Read, READ_CHUNK};
use super::refusal::Refusal;
use super::tunnel::meter::{Direction, Flow, Meter};
use super::tunnel::tunnel_tcp;

/// The allow line, then, for a TLS hello, `follow_retry`, then the tunnel with what is left of
/// `prefix` replayed first. `Err` hands the client's socket back when the second hello was
/// refused (the close line says why), for the listener to close it its own way.
///
/// The tunnel runs as a task of its own, which holds only what a tunnel needs: the task that
/// read, decided and dialled ends here, and the memory of its larger state with it. An idle
/// tunnel costs what its own small future costs, for as long as it stays open.
pub async fn tunnel_tls(
    cx: &Arc<ConnCx>,
    conn: Conn,
    mut client: TcpStream,
    upstream: Upstream,
    hello: Option<ClientHello>,
    prefix: Vec<u8>,
) -> Result<(), TcpStream> {
    let Upstream { stream: mut upstream, to } = upstream;
    let mut close = conn.allowed(to, Meter::new());
    let limits = cx.state.limits;
    let mut rest = prefix;
    if let Some(hello) = hello {
        let wait = limits.request_head_timeout;
        if let Err(refusal) =
            follow_retry(&mut client, &mut upstream, &hello, &rest, to.grant.tunnel, &mut close, wait).await
        {
            close.failed(&refusal.with_rule(to.grant.rule));
            return Err(client);
        }
        // Sent: the tunnel carries the rest, and holds neither the hello nor its bytes.
        rest = Vec::new();
    }
    let (task_cx, idle) = (Arc::clone(cx), limits.idle_timeout);
    // `close` is moved into the task as it is: rebinding it inside would store it twice in the
    // state every idle tunnel holds.
    cx.tracker.spawn(async move {
        let (pipes, meter, stop) = (&task_cx.state.pipes, close.meter(), task_cx.stop.clone());
        let end = tunnel_tcp(client, upstream, rest, pipes, meter, idle, stop).await;
        close.check_upload_limit();
        tracing::debug!(id = close.id(), ?end, "Tunnel closed");
    });
    Ok(())
}

/// Sends `prefix` (the first hello, checked) upstream, passes the server's first bytes back, and,
/// when they are a HelloRetryRequest, reads, checks and sends on the client's second hello.
pub async fn follow_retry(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    first: &ClientHello,
    prefix: &[u8],
    rule: TunnelOptions,
    close: &mut CloseRecord,
    wait: Duration,
) -> Result<(), Refusal> {
    let (up, down) = (close.meter().flow(Direction::Up), close.meter().flow(Direction::Down));
    // Only the first hello's own records go now. Bytes read with it are the client's next: held
    // back with what it sends while the server is awaited, and checked as a second hello if the
    // server asks for one. (Sent on unchecked, a start of a second hello could have named another
    // server once the client finished it with a record that passes on its own.)
    let hello_len =
        tls::hello_records_len(prefix).ok_or(Refusal::Policy { reason: DenyReason::InvalidHost, rule: None })?;
    let (hello, next) = prefix.split_at(hello_len);
    send(upstream, hello, &up, wait).await?;
    let server = server_first(client, upstream, next.to_vec(), wait).await?;
    send(client, &server.bytes, &down, wait).await?;
    if !server.retry {
        // Not a retry: what the client sent meanwhile goes on, and the tunnel carries the rest.
        return send(upstream, &server.held, &up, wait).await;
    }
    let second = detect(client, server.held, &mut SecondHello, tls::MAX_HELLO_BYTES, wait, None).await?;
    if second.value.sni != first.sni {
        if let Some(sni) = &second.value.sni {
            close.presented(sni);
        }
        return Err(Refusal::Policy { reason: DenyReason::SniMismatch, rule: None });
    }
    check_hello(&second.value, None, rule).map_err(|reason| Refusal::Policy { reason, rule: None })?;
    send(upstream, &second.prefix, &up, wait).await
}

/// The server's first bytes, and what the client sent while they were awaited.
struct ServerFirstFlight {
    bytes: Vec<u8>,
    retry: bool,
    /// Held back: it may be a second hello sent ahead of the retry request.
    held: Vec<u8>,
}

/// Waits for the server's first bytes, within `wait`. The client's bytes meanwhile are held back
/// after those it had already sent (`held`), not sent; a client that closes its side with nothing
/// held has its end of stream passed on, so that a server waiting for it can answer.
async fn server_first(
    client: &TcpStream,
    upstream: &TcpStream,
    mut held: Vec<u8>,
    wait: Duration,
) -> Result<ServerFirstFlight, Refusal> {
    let deadline = tokio::time::Instant::now() + wait;
    let (mut bytes, mut client_done) = (Vec::new(), false);
    loop {
        match classify(&bytes) {
            First::NeedMore if bytes.len() < SERVER_FIRST_LIMIT => {}
            First::RetryRequest => return Ok(ServerFirstFlight { bytes, retry: true, held }),
            First::NeedMore | First::Other => return Ok(ServerFirstFlight { bytes, retry: false, held }),
        }
        tokio::select! {
            r = upstream.readable() => {
                r.map_err(|_| Refusal::UpstreamUnreachable)?;
                match read_some_into(upstream, &mut bytes, READ_CHUNK) {
                    // The server closed: nothing more to follow.
                    Ok(Read::End) => return Ok(ServerFirstFlight { bytes, retry: false, held }),
                    Ok(_) => {}
                    Err(_) => return Err(Refusal::UpstreamUnreachable),
                }
            }
            r = client.readable(), if !client_done && held.len() < tls::MAX_HELLO_BYTES => {
                r.map_err(|_| Refusal::ClientGone)?;
                match read_some_into(client, &mut held, READ_CHUNK) {
                    Ok(Read::End) => {
                        client_done = true;
                        if held.is_empty() {
                            let _ = socket2::SockRef::from(upstream).shutdown(std::net::Shutdown::Write);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return Err(Refusal::ClientGone),
                }
            }
            () = tokio::time::sleep_until(deadline) => return Err(Refusal::UpstreamTimeout),
        }
    }
}

/// Writes `bytes` within `wait`: a peer that stops reading cannot hold the connection here.
async fn send(to: &mut TcpStream, bytes: &[u8], flow: &Flow, wait: Duration) -> Result<(), Refusal> {
    if bytes.is_empty() {
        return Ok(());
    }
    if let ControlFlow::Break(_) = flow.pass(bytes.len()) {
        // The meter is cut: the tunnel that follows ends at once; send nothing more.
        return Ok(());
    }
    match tokio::time::timeout(wait, to.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(Refusal::ClientGone),
    }
}

/// The client's second flight after a HelloRetryRequest, up to a whole second ClientHello.
struct SecondHello;

impl Detect for SecondHello {
    type Output = ClientHello;

    fn step(&mut self, buf: &[u8]) -> Step<ClientHello> {
        let Some(at) = second_hello_start(buf) else { return Step::NeedMore };
        match tls::parse(buf.get(at..).unwrap_or_default()) {
            Ok(Parsed::Hello(hello)) => Step::Done(hello),
            Ok(Parsed::NeedMore) => Step::NeedMore,
            Err(_) => Step::Refuse(Refusal::Policy { reason: DenyReason::InvalidHost, rule: None }),
        }
    }

    fn stopped(&mut self, _buf: &[u8], why: Stop) -> Result<ClientHello, Refusal> {
        Err(match why {
            Stop::Timeout => Refusal::HeadTimeout,
            Stop::Eof | Stop::Error | Stop::PeerSpoke => Refusal::ClientGone,
            Stop::TooLong => Refusal::Policy { reason: DenyReason::InvalidHost, rule: None },
        })
    }
}

/// A ServerHello fits in far less; more means this is not one.
const SERVER_FIRST_LIMIT: usize = 16 * 1024;

//! A server that answers the first ClientHello with a HelloRetryRequest makes the client send a
//! second one (RFC 8446 §4.1.4). A proxy that checked only the first would let the second name
//! anyone on a shared front end: this follows the handshake that far, and checks the second hello
//! as the first was checked, with the same server name.
//!
//! Every byte it moves passes the connection's meter; the tunnel then carries the rest.

use std::ops::ControlFlow;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::policy::{DenyReason, TunnelOptions};
use crate::tls::server_hello::{classify, second_hello_start, First};
use crate::tls::{self, ClientHello, Parsed};

use super::detect::{check_hello, detect, Detect, Step, Stop};
use super::refusal::Refusal;
use super::tunnel::meter::{Direction, Flow, Meter};

/// Sends `prefix` (the first hello, checked) upstream, passes the server's first bytes back, and,
/// when they are a HelloRetryRequest, reads, checks and sends on the client's second hello.
pub async fn follow_retry(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    first: &ClientHello,
    prefix: &[u8],
    rule: TunnelOptions,
    meter: &std::sync::Arc<Meter>,
    wait: Duration,
) -> Result<(), Refusal> {
    let (up, down) = (meter.flow(Direction::Up), meter.flow(Direction::Down));
    send(upstream, prefix, &up, wait).await?;
    let server = detect(upstream, Vec::new(), &mut ServerFirst, SERVER_FIRST_LIMIT, wait, None).await?;
    send(client, &server.prefix, &down, wait).await?;
    if !server.value {
        return Ok(());
    }
    let second = detect(client, Vec::new(), &mut SecondHello, tls::MAX_HELLO_BYTES, wait, None).await?;
    if second.value.sni != first.sni {
        return Err(Refusal::Policy { reason: DenyReason::SniMismatch, rule: None });
    }
    check_hello(&second.value, None, rule).map_err(|reason| Refusal::Policy { reason, rule: None })?;
    send(upstream, &second.prefix, &up, wait).await
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

/// A server's first bytes: `true` for a HelloRetryRequest.
struct ServerFirst;

impl Detect for ServerFirst {
    type Output = bool;

    fn step(&mut self, buf: &[u8]) -> Step<bool> {
        match classify(buf) {
            First::NeedMore => Step::NeedMore,
            First::RetryRequest => Step::Done(true),
            First::Other => Step::Done(false),
        }
    }

    fn stopped(&mut self, _buf: &[u8], why: Stop) -> Result<bool, Refusal> {
        match why {
            // No answer in time: the second hello could not be followed, so nothing goes on.
            Stop::Timeout => Err(Refusal::UpstreamTimeout),
            // The server closed or said too little to follow: nothing more can come of it.
            Stop::Eof | Stop::Error | Stop::TooLong | Stop::PeerSpoke => Ok(false),
        }
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

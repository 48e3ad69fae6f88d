//! The transparent listeners: connections redirected by nftables, which do not know about the
//! proxy. `tls` reads the ClientHello, `plain` the HTTP request head, and both decide on the name
//! they carry, the original destination and the port together; `catch_all` resets and logs every
//! other redirected connection, so that "refused and logged" covers all egress.
//!
//! What was read to decide is replayed upstream before the tunnel starts; nothing reaches the
//! upstream before the decision.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::dial::dial;
use super::http::{CloseRecord, ConnCx, OwnedClosed};
use super::tunnel::tunnel_tcp;
use super::{authorize_redirected, Redirected, Refusal};
use crate::audit::{Decided, Listener, Verdict};
use crate::policy::{DenyReason, Host, HostName, Policy};
use crate::tls::{self, Parsed};

/// Serves one redirected connection whose original destination is `original_dst`.
pub async fn serve(listener: Listener, stream: TcpStream, original_dst: SocketAddr, cx: Arc<ConnCx>) {
    let policy = cx.state.policy.load_full();
    let id = cx.state.next_id();
    let shown = original_dst.ip().to_string();
    let result = match listener {
        Listener::Tls => tls_conn(&stream, &cx).await,
        Listener::Plain => plain_conn(&stream, &cx).await,
        Listener::CatchAll | Listener::Http => Err((Refusal::CatchAll, None)),
    };
    let (head, name) = match result {
        Ok(read) => read,
        Err((refusal, name)) => {
            return refuse(
                &cx,
                &policy,
                listener,
                id,
                name.as_ref().map_or(&shown, |n| n.as_str()),
                original_dst,
                &refusal,
                stream,
            )
        }
    };
    let host = name.as_ref().map_or(shown.clone(), |n| n.to_string());
    let r = Redirected { name: name.as_ref(), original_dst, client: cx.client.ip() };
    let (permit, mismatch) = match authorize_redirected(&policy, &cx.state.resolver, &r, cx.state.mismatch).await {
        Ok(p) => p,
        Err(refusal) => return refuse(&cx, &policy, listener, id, &host, original_dst, &refusal, stream),
    };
    if let (Listener::Tls, Some(hello)) = (listener, &head.hello) {
        let rule = permit.first_rule().and_then(|r| policy.rule(r));
        if hello.ech && !rule.is_some_and(|r| r.allow_ech) {
            let refusal = Refusal::Policy { reason: DenyReason::EchPresent, rule: permit.first_rule() };
            return refuse(&cx, &policy, listener, id, &host, original_dst, &refusal, stream);
        }
    }
    let (mut upstream, addr) = match dial(&permit, cx.state.limits.connect_timeout).await {
        Ok(u) => u,
        Err(refusal) => return refuse(&cx, &policy, listener, id, &host, original_dst, &refusal, stream),
    };
    let rule = permit.rule_for(addr).map(|r| policy.rule_name(r).to_string());
    cx.state.audit.decided(&Decided {
        id,
        client: cx.client,
        listener,
        method: None,
        host: Some(&host),
        port: Some(original_dst.port()),
        dst_addr: Some(addr),
        decision: Verdict::Allow,
        rule: rule.as_deref(),
        reason: None,
        original_dst: Some(original_dst),
        note: mismatch.then_some("original_dst_mismatch"),
    });
    let close = CloseRecord {
        state: Arc::clone(&cx.state),
        closed: OwnedClosed { listener, id, client: cx.client, host, port: original_dst.port(), addr, rule },
        up: Arc::new(AtomicU64::new(0)),
        down: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
    };
    if upstream.write_all(&head.bytes).await.is_err() {
        return;
    }
    close.up.fetch_add(head.bytes.len() as u64, Ordering::Relaxed);
    let t = tunnel_tcp(stream, upstream, cx.state.limits.idle_timeout, cx.stop.clone()).await;
    close.up.fetch_add(t.up, Ordering::Relaxed);
    close.down.fetch_add(t.down, Ordering::Relaxed);
}

/// What was read before deciding: the bytes (replayed upstream) and, for TLS, the hello.
struct Head {
    bytes: Vec<u8>,
    hello: Option<tls::ClientHello>,
}

type Read = Result<(Head, Option<HostName>), (Refusal, Option<HostName>)>;

async fn tls_conn(stream: &TcpStream, cx: &ConnCx) -> Read {
    let limits = cx.state.limits;
    let mut hello = None;
    let bytes = read_until(stream, limits.request_head_timeout, tls::MAX_HELLO_BYTES, |buf| match tls::parse(buf) {
        Ok(Parsed::NeedMore) => Ok(false),
        Ok(Parsed::Hello(h)) => {
            hello = Some(h);
            Ok(true)
        }
        Err(_) => Err(()),
    })
    .await
    .map_err(|r| (r, None))?;
    let name = hello.as_ref().and_then(|h| h.sni.clone());
    Ok((Head { bytes, hello }, name))
}

async fn plain_conn(stream: &TcpStream, cx: &ConnCx) -> Read {
    let limits = cx.state.limits;
    let bytes = read_until(stream, limits.request_head_timeout, limits.max_request_head_bytes, |buf| {
        Ok(buf.windows(4).any(|w| w == b"\r\n\r\n"))
    })
    .await
    .map_err(|r| (r, None))?;
    let name = host_header(&bytes).map_err(|r| (r, None))?;
    Ok((Head { bytes, hello: None }, name))
}

/// The name in the request head's single Host header; `None` for an IP literal or no header.
fn host_header(head: &[u8]) -> Result<Option<HostName>, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| Refusal::BadRequest("request head is not text"))?;
    let mut hosts = text.split("\r\n").skip(1).filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    });
    let Some(value) = hosts.next() else { return Ok(None) };
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    let host = match value.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || value.starts_with('[') => {
            if !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Refusal::BadRequest("malformed Host header"));
            }
            h
        }
        _ => value,
    };
    match Host::parse(host) {
        Ok(Host::Name(n)) => Ok(Some(n)),
        Ok(Host::Ip(_)) => Ok(None),
        Err(_) => Err(Refusal::Policy { reason: DenyReason::InvalidHost, rule: None }),
    }
}

/// Reads until `done` says the bytes suffice, within `wait` and `limit`. What is read is replayed
/// upstream once the connection is allowed.
async fn read_until(
    stream: &TcpStream,
    wait: Duration,
    limit: usize,
    mut done: impl FnMut(&[u8]) -> Result<bool, ()>,
) -> Result<Vec<u8>, Refusal> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    loop {
        let readable = tokio::time::timeout_at(deadline, stream.readable()).await;
        match readable {
            Err(_) => return Err(Refusal::HeadTimeout),
            Ok(Err(_)) => return Err(Refusal::BadRequest("connection error")),
            Ok(Ok(())) => {}
        }
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(Refusal::BadRequest("closed before the head was read")),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Refusal::BadRequest("connection error")),
        }
        match done(&buf) {
            Ok(true) => return Ok(buf),
            Ok(false) if buf.len() < limit => {}
            Ok(false) | Err(()) => return Err(Refusal::Policy { reason: DenyReason::InvalidHost, rule: None }),
        }
    }
}

/// Audits a refusal and resets the connection: nothing was sent anywhere.
#[allow(clippy::too_many_arguments)]
fn refuse(
    cx: &ConnCx,
    policy: &Policy,
    listener: Listener,
    id: u64,
    host: &str,
    original_dst: SocketAddr,
    refusal: &Refusal,
    stream: TcpStream,
) {
    cx.state.audit.decided(&Decided {
        id,
        client: cx.client,
        listener,
        method: None,
        host: Some(host),
        port: Some(original_dst.port()),
        dst_addr: None,
        decision: refusal.verdict(),
        rule: refusal.rule().map(|r| policy.rule_name(r)),
        reason: Some(refusal.reason()),
        original_dst: Some(original_dst),
        note: None,
    });
    // SO_LINGER 0: close with a reset, so the client fails at once instead of waiting.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

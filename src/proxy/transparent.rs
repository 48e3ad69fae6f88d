//! The transparent listeners: connections redirected by nftables, which do not know about the
//! proxy. `tls` reads the ClientHello, `plain` the HTTP request head, and both decide on the name
//! they carry, the original destination and the port together; `catch_all` resets and logs every
//! other redirected connection, so that "refused and logged" covers all egress.
//!
//! The path of one connection: detect → authorize → dial → check → tunnel → close. What was read
//! to decide is replayed upstream as the start of the tunnel; nothing reaches the upstream before
//! the decision. A refusal resets the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::{Conn, ConnCx};
use super::detect::{check_hello, detect, Hello, RequestHead};
use super::refusal::Refusal;
use super::tunnel::meter::Meter;
use super::tunnel::tunnel_tcp;
use crate::audit::Listener;
use crate::policy::{Host, HostName};
use crate::tls::{self, ClientHello};

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

/// What was read before deciding: the name it carries, the hello to check, the bytes to replay.
struct Detected {
    name: Option<HostName>,
    hello: Option<ClientHello>,
    prefix: Vec<u8>,
}

/// Serves one redirected connection whose original destination is `original_dst`.
pub async fn serve(kind: Redirect, stream: TcpStream, original_dst: SocketAddr, cx: Arc<ConnCx>) {
    let mut conn = Conn::new(&cx.state, cx.client, kind.listener(), Some(original_dst));
    conn.asked(original_dst.ip().to_string(), Some(original_dst.port()));
    let detected = match read(kind, &stream, &cx).await {
        Ok(d) => d,
        Err(refusal) => return refuse(conn, &refusal, stream),
    };
    if let Some(name) = &detected.name {
        conn.asked(name.to_string(), Some(original_dst.port()));
    }
    let permit = match conn.authorize_redirected(detected.name.as_ref()).await {
        Ok(p) => p,
        Err(refusal) => return refuse(conn, &refusal, stream),
    };
    // The server name is what got decided: what else the hello carries (ECH) is checked against
    // every rule that may be dialled, before anything is dialled.
    if let Some(hello) = &detected.hello {
        let refused = permit.addrs().find_map(|(_, g)| check_hello(hello, None, g.tunnel).err().map(|r| (r, g.rule)));
        if let Some((reason, rule)) = refused {
            return refuse(conn, &Refusal::Policy { reason, rule: Some(rule) }, stream);
        }
    }
    let upstream = match conn.dial(&permit).await {
        Ok(u) => u,
        Err(refusal) => return refuse(conn, &refusal, stream),
    };
    let close = conn.allowed(upstream.to, Meter::new());
    let (idle, stop) = (cx.state.limits.idle_timeout, cx.stop.clone());
    let end = tunnel_tcp(stream, upstream.stream, &detected.prefix, close.meter(), idle, stop).await;
    tracing::debug!(id = close.id(), ?end, "Tunnel closed");
}

/// Reads what the listener decides on.
async fn read(kind: Redirect, stream: &TcpStream, cx: &ConnCx) -> Result<Detected, Refusal> {
    let limits = cx.state.limits;
    let wait = limits.request_head_timeout;
    match kind {
        Redirect::Tls => {
            let d = detect(stream, Vec::new(), &mut Hello, tls::MAX_HELLO_BYTES, wait, None).await?;
            Ok(Detected { name: d.value.sni.clone(), hello: Some(d.value), prefix: d.prefix })
        }
        Redirect::Plain => {
            let d = detect(stream, Vec::new(), &mut RequestHead, limits.max_request_head_bytes, wait, None).await?;
            // An IP literal names no host: the original destination is decided instead.
            let name = match d.value.dest.map(|dest| dest.host) {
                Some(Host::Name(name)) => Some(name),
                Some(Host::Ip(_)) | None => None,
            };
            Ok(Detected { name, hello: None, prefix: d.prefix })
        }
        Redirect::CatchAll => Err(Refusal::CatchAll),
    }
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

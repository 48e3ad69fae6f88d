//! The only place an outbound socket is opened. It takes a `Permit`, which only
//! `proxy::authorize` builds, after the policy allowed the destination and every address in it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::descriptors::is_shortage;

use crate::policy::{DenyReason, RuleId};

use super::authorize::{Grant, Permit};
use super::refusal::Refusal;

/// A connected upstream socket, and what was dialled.
pub struct Upstream {
    pub stream: TcpStream,
    pub to: Dialled,
}

/// The address dialled and what its rule grants.
#[derive(Clone, Copy, Debug)]
pub struct Dialled {
    pub addr: SocketAddr,
    pub grant: Grant,
    /// Dialled at the name's own address, not the redirected connection's original destination.
    pub mismatch: bool,
    /// Report mode: the refusal enforcement would have made (the decision line says `would_deny`).
    pub reported: Option<(DenyReason, Option<RuleId>)>,
}

/// Why a dial failed.
#[derive(Debug)]
pub enum DialError {
    /// The upstream refused, did not answer in time, or was unreachable.
    Upstream(Refusal),
    /// The proxy had no descriptor (or socket memory) for the socket: its own shortage.
    Shortage(std::io::Error),
}

/// Connects to the permit's addresses in order until one answers, within `timeout` in all.
pub async fn dial(permit: &Permit, timeout: Duration) -> Result<Upstream, DialError> {
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    for (addr, grant) in permit.addrs() {
        // The one sanctioned outbound connect: `addr` was checked by `authorize`.
        #[allow(clippy::disallowed_methods)]
        let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(Upstream {
                    stream,
                    to: Dialled { addr, grant, mismatch: permit.is_mismatch(), reported: permit.reported() },
                });
            }
            Ok(Err(e)) if is_shortage(&e) => return Err(DialError::Shortage(e)),
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "Upstream connect failed"),
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    Err(DialError::Upstream(if timed_out { Refusal::UpstreamTimeout } else { Refusal::UpstreamUnreachable }))
}

//! The only place an outbound socket is opened. It takes a `Permit`, which only
//! `proxy::authorize` builds, after the policy allowed the destination and every address in it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Permit, Refusal};

/// Connects to the permit's addresses in order until one answers, within `timeout` in all.
/// Returns the stream and the address actually dialled.
pub async fn dial(permit: &Permit, timeout: Duration) -> Result<(TcpStream, SocketAddr), Refusal> {
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    for &(addr, _) in &permit.addrs {
        // The one sanctioned outbound connect: `addr` was checked by `authorize`.
        #[allow(clippy::disallowed_methods)]
        let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "Upstream connect failed"),
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    Err(if timed_out { Refusal::UpstreamTimeout } else { Refusal::UpstreamUnreachable })
}

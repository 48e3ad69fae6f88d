//! Bidirectional copy with half-close and an idle timeout. Byte counts survive cancellation, so the
//! close record is right however the tunnel ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a tunnel ended and what it carried.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Tunnelled {
    /// Bytes from the client to the upstream.
    pub up: u64,
    /// Bytes from the upstream to the client.
    pub down: u64,
    pub end: End,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum End {
    /// Both sides closed their write half.
    Closed,
    /// A read or write failed (reset, broken pipe).
    Error,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The proxy is shutting down and the grace period is over.
    Shutdown,
}

/// Copies `client` ⇄ `upstream` until both directions end, one fails, nothing moves for `idle`,
/// or `stop` is cancelled. A direction that reaches end of stream shuts down the other side's
/// write half and the other direction goes on (half-close).
pub async fn tunnel<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stop: CancellationToken,
) -> Tunnelled
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let both = async {
        let (a, b) = tokio::join!(
            copy(&mut cr, &mut uw, &up, &last, start),
            copy(&mut ur, &mut cw, &down, &last, start)
        );
        if a.is_ok() && b.is_ok() {
            End::Closed
        } else {
            End::Error
        }
    };
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since + idle;
            if Instant::now() >= deadline {
                return End::Idle;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let end = tokio::select! {
        end = both => end,
        end = watchdog => end,
        () = stop.cancelled() => End::Shutdown,
    };
    Tunnelled {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        end,
    }
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the end of stream on, keep the other direction open.
            return w.shutdown().await;
        }
        w.write_all(buf.get(..n).unwrap_or_default()).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(elapsed, Ordering::Relaxed);
    }
}

const COPY_BUF: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn carries_every_byte_both_ways_with_half_close() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let t = tokio::spawn(tunnel(
            client,
            upstream,
            Duration::from_secs(5),
            CancellationToken::new(),
        ));
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&p2).await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_peer.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "upstream got every byte, then end of stream");
        upstream_peer
            .write_all(b"reply after half-close")
            .await
            .unwrap();
        upstream_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let done = t.await.unwrap();
        assert_eq!(
            done,
            Tunnelled {
                up: 100_000,
                down: 22,
                end: End::Closed
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closes_an_idle_tunnel() {
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let done = tunnel(
            client,
            upstream,
            Duration::from_secs(30),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(done.end, End::Idle);
    }
}

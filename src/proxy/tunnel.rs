//! Bidirectional copy with half-close and an idle timeout. Byte counts survive cancellation, so the
//! close record is right however the tunnel ends.
//!
//! Between two TCP sockets the bytes are spliced in the kernel (`splice.rs`); otherwise (a hyper
//! upgrade that is not a plain socket, or no pipe available) they are copied through a buffer.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::splice::{splice_one_way, Pipe};

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

/// Counts bytes and remembers when the last ones moved, for the idle timeout.
pub struct Meter {
    start: Instant,
    /// Milliseconds after `start` at which bytes last moved.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    fn new() -> Self {
        Self { start: Instant::now(), last: AtomicU64::new(0), up: AtomicU64::new(0), down: AtomicU64::new(0) }
    }

    pub fn moved(&self, count: &AtomicU64, n: usize) {
        count.fetch_add(n as u64, Ordering::Relaxed);
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle(&self, idle: Duration) -> End {
        loop {
            let deadline = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return End::Idle;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    fn finish(&self, end: End) -> Tunnelled {
        Tunnelled { up: self.up.load(Ordering::Relaxed), down: self.down.load(Ordering::Relaxed), end }
    }
}

/// Carries bytes between two TCP sockets until both directions end, one fails, nothing moves
/// for `idle`, or `stop` is cancelled. Splices in the kernel when it can.
pub async fn tunnel_tcp(client: TcpStream, upstream: TcpStream, idle: Duration, stop: CancellationToken) -> Tunnelled {
    let (up_pipe, down_pipe) = match (Pipe::new(), Pipe::new()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return tunnel(client, upstream, idle, stop).await,
    };
    let meter = Meter::new();
    let up = splice_one_way(&client, &upstream, &up_pipe, &meter.up, &meter);
    let down = splice_one_way(&upstream, &client, &down_pipe, &meter.down, &meter);
    drive(up, down, &meter, idle, stop).await
}

/// The same as `tunnel_tcp` for any byte streams, copying through a buffer.
pub async fn tunnel<C, U>(client: C, upstream: U, idle: Duration, stop: CancellationToken) -> Tunnelled
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let meter = Meter::new();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = copy(&mut cr, &mut uw, &meter.up, &meter);
    let down = copy(&mut ur, &mut cw, &meter.down, &meter);
    drive(up, down, &meter, idle, stop).await
}

/// Runs both directions together under the idle watchdog and the stop token.
async fn drive(
    up: impl Future<Output = std::io::Result<()>>,
    down: impl Future<Output = std::io::Result<()>>,
    meter: &Meter,
    idle: Duration,
    stop: CancellationToken,
) -> Tunnelled {
    let both = async {
        // A failed direction ends the tunnel at once; a finished one waits for the other.
        match tokio::try_join!(up, down) {
            Ok(_) => End::Closed,
            Err(_) => End::Error,
        }
    };
    let end = tokio::select! {
        end = both => end,
        end = meter.idle(idle) => end,
        () = stop.cancelled() => End::Shutdown,
    };
    meter.finish(end)
}

async fn copy<R, W>(r: &mut R, w: &mut W, count: &AtomicU64, meter: &Meter) -> std::io::Result<()>
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
        meter.moved(count, n);
    }
}

const COPY_BUF: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;
    use tokio::net::TcpListener;

    async fn half_close_exchange<C, U>(client_peer: C, upstream_peer: U) -> (u64, u64)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut client_peer, mut upstream_peer) = (client_peer, upstream_peer);
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
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
        assert!(got == payload, "upstream got every byte in order, then end of stream");
        upstream_peer.write_all(b"reply after half-close").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        (payload.len() as u64, 22)
    }

    #[tokio::test]
    async fn copies_every_byte_both_ways_with_half_close() {
        let (client, client_peer) = duplex(1024);
        let (upstream, upstream_peer) = duplex(1024);
        let t = tokio::spawn(tunnel(client, upstream, Duration::from_secs(5), CancellationToken::new()));
        let (up, down) = half_close_exchange(client_peer, upstream_peer).await;
        assert_eq!(t.await.unwrap(), Tunnelled { up, down, end: End::Closed });
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        #[allow(clippy::disallowed_methods)]
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn splices_every_byte_both_ways_with_half_close() {
        let (client_peer, client) = tcp_pair().await;
        let (upstream, upstream_peer) = tcp_pair().await;
        let t = tokio::spawn(tunnel_tcp(client, upstream, Duration::from_secs(5), CancellationToken::new()));
        let (up, down) = half_close_exchange(client_peer, upstream_peer).await;
        assert_eq!(t.await.unwrap(), Tunnelled { up, down, end: End::Closed });
    }

    #[tokio::test(start_paused = true)]
    async fn closes_an_idle_tunnel() {
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let done = tunnel(client, upstream, Duration::from_secs(30), CancellationToken::new()).await;
        assert_eq!(done.end, End::Idle);
    }
}

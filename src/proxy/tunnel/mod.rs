//! Bidirectional copy with half-close and an idle timeout. Every byte passes the connection's
//! `Meter`, so the close record is right however the tunnel ends, and a cut stops the copy.
//!
//! Between two TCP sockets the bytes are spliced in the kernel (`splice.rs`), through pipes taken
//! from a bounded pool (`pipes.rs`) only while bytes flow; otherwise (a stream that is not a plain
//! socket) they are copied through a buffer.
//! Bytes read before the tunnel (a ClientHello or request head read to decide) are replayed to
//! the upstream first, through the same meter.

pub mod meter;
pub mod pipes;
mod splice;

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use meter::{Cut, Direction, Flow, Meter};
use pipes::Pipes;
use splice::splice_one_way;

/// How a tunnel ended.
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
    /// The meter said stop.
    Cut,
}

/// Why one direction stopped before its end of stream.
#[derive(Debug)]
pub enum Halted {
    Io(std::io::Error),
    Cut(Cut),
}

impl From<std::io::Error> for Halted {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Replays `prefix` to the upstream, then carries bytes between two TCP sockets until both
/// directions end, one fails, nothing moves for `idle`, the meter cuts, or `stop` is cancelled.
/// Splices in the kernel through `pipes` when the pool has one to give. The prefix is freed once
/// replayed: a tunnel that waits holds no buffer.
///
/// A plain function returning an `async move` block rather than an `async fn`: an `async fn`
/// keeps a second copy of its arguments in its state, and every idle tunnel would carry it.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn tunnel_tcp<'a>(
    client: TcpStream,
    mut upstream: TcpStream,
    prefix: Vec<u8>,
    pipes: &'a Pipes,
    meter: &'a Arc<Meter>,
    idle: Duration,
    stop: CancellationToken,
) -> impl Future<Output = End> + Send + 'a {
    async move {
        let (up, down) = (meter.flow(Direction::Up), meter.flow(Direction::Down));
        if let Err(end) = replay(&mut upstream, &prefix, &up, idle, &stop).await {
            return end;
        }
        drop(prefix);
        let up_half = pin!(splice_one_way(&client, &upstream, pipes, &up));
        let down_half = pin!(splice_one_way(&upstream, &client, pipes, &down));
        drive(up_half, down_half, meter, idle, stop).await
    }
}

/// The same as `tunnel_tcp` for any byte streams, copying through a buffer.
pub async fn tunnel<C, U>(
    client: C,
    mut upstream: U,
    prefix: &[u8],
    meter: &Arc<Meter>,
    idle: Duration,
    stop: CancellationToken,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = (meter.flow(Direction::Up), meter.flow(Direction::Down));
    if let Err(end) = replay(&mut upstream, prefix, &up, idle, &stop).await {
        return end;
    }
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up_half = pin!(copy(&mut cr, &mut uw, &up));
    let down_half = pin!(copy(&mut ur, &mut cw, &down));
    drive(up_half, down_half, meter, idle, stop).await
}

/// Writes the bytes read before the tunnel to the upstream, under the same idle timeout and stop
/// token as the tunnel: an upstream that does not read cannot hold the connection.
async fn replay<U: AsyncWrite + Unpin>(
    upstream: &mut U,
    prefix: &[u8],
    up: &Flow,
    idle: Duration,
    stop: &CancellationToken,
) -> Result<(), End> {
    if prefix.is_empty() {
        return Ok(());
    }
    if let ControlFlow::Break(Cut) = up.pass(prefix.len()) {
        return Err(End::Cut);
    }
    tokio::select! {
        written = upstream.write_all(prefix) => written.map_err(|_| End::Error),
        () = tokio::time::sleep(idle) => Err(End::Idle),
        () = stop.cancelled() => Err(End::Shutdown),
    }
}

/// Runs both directions together under the idle watchdog and the stop token. The halves are
/// pinned where they were made and borrowed here: moved in, each would be stored twice in the
/// tunnel's future, which every idle tunnel holds.
async fn drive(
    up: Pin<&mut impl Future<Output = Result<(), Halted>>>,
    down: Pin<&mut impl Future<Output = Result<(), Halted>>>,
    meter: &Meter,
    idle: Duration,
    stop: CancellationToken,
) -> End {
    let both = async {
        // A failed direction ends the tunnel at once; a finished one waits for the other.
        match tokio::try_join!(up, down) {
            Ok(_) => End::Closed,
            Err(Halted::Io(_)) => End::Error,
            Err(Halted::Cut(Cut)) => End::Cut,
        }
    };
    tokio::select! {
        end = both => end,
        () = meter.idle(idle) => End::Idle,
        () = meter.cut_off() => End::Cut,
        () = stop.cancelled() => End::Shutdown,
    }
}

async fn copy<R, W>(r: &mut R, w: &mut W, flow: &Flow) -> Result<(), Halted>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let len = buf.len().min(flow.allowance());
        let n = r.read(buf.get_mut(..len).unwrap_or_default()).await?;
        if n == 0 {
            // Half-close: pass the end of stream on, keep the other direction open.
            return Ok(w.shutdown().await?);
        }
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        let mut chunk = buf.get(..n).unwrap_or_default();
        while !chunk.is_empty() {
            match w.write(chunk).await? {
                0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                m => chunk = chunk.get(m..).unwrap_or_default(),
            }
            flow.wrote();
        }
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
        let meter = Meter::new();
        let m = meter.clone();
        let t = tokio::spawn(async move {
            tunnel(client, upstream, b"", &m, Duration::from_secs(5), CancellationToken::new()).await
        });
        let (up, down) = half_close_exchange(client_peer, upstream_peer).await;
        assert_eq!(t.await.unwrap(), End::Closed);
        assert_eq!(meter.bytes(), (up, down));
    }

    fn pipes() -> Arc<Pipes> {
        pool(8)
    }

    /// A pool of at most `max_pipes` pipes (0: every burst takes the copy fallback).
    fn pool(max_pipes: usize) -> Arc<Pipes> {
        Arc::new(Pipes::new(max_pipes, &crate::metrics::Metrics::new()))
    }

    /// Sends 20,000 bytes (more than the scratch buffer, so the rest goes to a pipe if there is
    /// one), one urgent byte (MSG_OOB, out of band), and `tail`.
    fn send_past_an_urgent_byte(s: &socket2::SockRef<'_>) {
        let head = vec![b'a'; 20_000];
        assert_eq!(s.send(&head).unwrap(), head.len());
        assert_eq!(s.send_out_of_band(b"X").unwrap(), 1);
        assert_eq!(s.send(b"tail").unwrap(), 4);
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        #[allow(clippy::disallowed_methods)]
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        // As the proxy's own sockets are, and without Nagle's 40 ms waits on small writes.
        a.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        (a, b)
    }

    /// A tunnel between two TCP pairs, running as a task, and the far ends of both.
    struct Running {
        client_peer: TcpStream,
        upstream_peer: TcpStream,
        task: tokio::task::JoinHandle<End>,
        meter: Arc<Meter>,
    }

    async fn run_tunnel(pool: Arc<Pipes>, prefix: &[u8], idle: Duration) -> Running {
        let (client_peer, client) = tcp_pair().await;
        let (upstream, upstream_peer) = tcp_pair().await;
        let (meter, prefix) = (Meter::new(), prefix.to_vec());
        let m = meter.clone();
        let task = tokio::spawn(async move {
            tunnel_tcp(client, upstream, prefix, &pool, &m, idle, CancellationToken::new()).await
        });
        Running { client_peer, upstream_peer, task, meter }
    }

    #[tokio::test]
    async fn splices_every_byte_both_ways_with_half_close() {
        let r = run_tunnel(pipes(), b"", Duration::from_secs(5)).await;
        let (up, down) = half_close_exchange(r.client_peer, r.upstream_peer).await;
        assert_eq!(r.task.await.unwrap(), End::Closed);
        assert_eq!(r.meter.bytes(), (up, down));
    }

    #[tokio::test]
    async fn copies_through_a_small_buffer_when_the_pool_has_no_pipe() {
        let none = pool(0);
        let r = run_tunnel(none, b"", Duration::from_secs(5)).await;
        let (up, down) = half_close_exchange(r.client_peer, r.upstream_peer).await;
        assert_eq!(r.task.await.unwrap(), End::Closed);
        assert_eq!(r.meter.bytes(), (up, down));
    }

    #[tokio::test]
    async fn an_idle_tunnel_holds_no_pipe() {
        let metrics = crate::metrics::Metrics::new();
        let pool = Arc::new(Pipes::new(8, &metrics));
        let Running { mut client_peer, mut upstream_peer, task: t, .. } =
            run_tunnel(pool.clone(), b"", Duration::from_secs(30)).await;
        let mut got = vec![0u8; 100_000];
        client_peer.write_all(&vec![1u8; got.len()]).await.unwrap();
        upstream_peer.read_exact(&mut got).await.unwrap();
        upstream_peer.write_all(b"back").await.unwrap();
        client_peer.read_exact(&mut got[..4]).await.unwrap();
        // Both directions have gone back to waiting: every pipe made is back in the pool.
        let settled = async {
            while metrics.pipes_in_use.get() != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), settled).await.expect("the pipes go back while idle");
        assert!(pool.made() >= 1 && pool.free() == pool.made(), "made {}, free {}", pool.made(), pool.free());
        assert!(!t.is_finished(), "the tunnel itself is still open");
        t.abort();
    }

    /// Request and reply, `rounds` times, each of the next size in `sizes`: the upstream peer echoes
    /// every message back, through a tunnel with a pool of `max_pipes`. Returns the pipes the pool
    /// made meanwhile.
    async fn ping_pong(sizes: &[usize], rounds: usize, max_pipes: usize) -> usize {
        let pool = pool(max_pipes);
        let Running { mut client_peer, upstream_peer, task: t, .. } =
            run_tunnel(pool.clone(), b"", Duration::from_secs(30)).await;
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = upstream_peer.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let exchange = async {
            for (round, size) in sizes.iter().cycle().take(rounds).enumerate() {
                let msg: Vec<u8> = (0..*size).map(|i| (i + round) as u8).collect();
                client_peer.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                client_peer.read_exact(&mut back).await.unwrap();
                assert!(back == msg, "round {round}: {size} bytes came back intact");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), exchange).await.expect("no round stalls");
        t.abort();
        echo.abort();
        pool.made()
    }

    #[tokio::test]
    async fn small_messages_pass_without_a_pipe_and_never_stall() {
        // Each message is one read: the short read that drains the socket ends the burst, and
        // the next message must still wake the tunnel.
        let made = ping_pong(&[1, 5, 517, 1500, 4096, 16_383], 3_000, 8).await;
        assert_eq!(made, 0, "messages under the scratch buffer's size take no pipe");
    }

    #[tokio::test]
    async fn messages_around_the_scratch_size_and_bulk_ones_all_arrive() {
        let sizes = [16_384, 16_385, 1, 40_000, 32_768, 700_000, 3];
        let made = ping_pong(&sizes, 300, 8).await;
        assert!(made >= 1, "bulk bursts go through a pipe");
        // And through the copy fallback when the pool has none.
        assert_eq!(ping_pong(&sizes, 300, 0).await, 0);
    }

    #[tokio::test]
    async fn an_upstream_that_stops_reading_holds_a_bounded_amount_and_is_cut_when_idle() {
        let started = std::time::Instant::now();
        let Running { mut client_peer, upstream_peer: _deaf, task: t, meter } =
            run_tunnel(pipes(), b"", Duration::from_millis(500)).await;
        // The client pushes until the kernel buffers on both sides and the tunnel's one pending
        // chunk are full; then its writes stop being taken.
        let chunk = vec![7u8; 64 * 1024];
        let mut pushed = 0usize;
        while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(200), client_peer.write_all(&chunk)).await {
            pushed += chunk.len();
            assert!(pushed < 64 * 1024 * 1024, "a deaf upstream must stop the client's writes");
        }
        let end = tokio::time::timeout(Duration::from_secs(5), t).await.expect("cut by the idle timeout").unwrap();
        assert_eq!(end, End::Idle);
        assert!(started.elapsed() >= Duration::from_millis(500));
        let (up, _) = meter.bytes();
        assert!(up as usize <= pushed + chunk.len(), "counted {up} of {pushed} pushed");
    }

    #[tokio::test(start_paused = true)]
    async fn closes_an_idle_tunnel() {
        let (client, _c) = duplex(64);
        let (upstream, _u) = duplex(64);
        let done =
            tunnel(client, upstream, b"", &Meter::new(), Duration::from_secs(30), CancellationToken::new()).await;
        assert_eq!(done, End::Idle);
    }

    #[tokio::test]
    async fn replays_the_prefix_through_the_meter_before_the_stream() {
        let Running { mut client_peer, mut upstream_peer, task: t, meter } =
            run_tunnel(pipes(), b"hello ", Duration::from_secs(5)).await;
        client_peer.write_all(b"world").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        upstream_peer.shutdown().await.unwrap();
        assert_eq!(t.await.unwrap(), End::Closed);
        assert_eq!(meter.bytes(), (11, 0));
    }

    #[tokio::test]
    async fn a_cut_meter_ends_the_tunnel_and_writes_nothing_more() {
        let Running { mut client_peer, mut upstream_peer, task: t, meter } =
            run_tunnel(pipes(), b"", Duration::from_secs(5)).await;
        client_peer.write_all(b"first").await.unwrap();
        let mut first = [0u8; 5];
        upstream_peer.read_exact(&mut first).await.unwrap();
        meter.cut();
        assert_eq!(t.await.unwrap(), End::Cut, "a cut wakes a tunnel that waits for bytes");
        // The proxy's side is gone: this write may succeed or be reset; either way nothing passes.
        let _ = client_peer.write_all(b"second").await;
        let mut rest = Vec::new();
        let read = upstream_peer.read_to_end(&mut rest).await;
        assert_eq!(read.map_err(|e| e.kind()), Ok(0), "nothing after the cut reached the upstream");
        assert_eq!(meter.bytes(), (5, 0));
    }

    /// The client sends bytes, one urgent (MSG_OOB) byte, more bytes, then its end of stream, all
    /// before the tunnel reads. The urgent byte itself is out of band (not part of the stream),
    /// but the bytes after it are. splice(2) from a TCP socket stops at the urgent mark and, the
    /// FIN being in, answers 0 there: taken for the end of stream, it lost the bytes behind the
    /// mark (found in review). Both paths, pipes and the copy fallback, carry them.
    #[tokio::test]
    async fn bytes_behind_an_urgent_byte_are_not_lost_when_end_of_stream_follows() {
        let mut lost = Vec::new();
        for max_pipes in [0, 8] {
            let Running { client_peer, mut upstream_peer, task: t, .. } =
                run_tunnel(pool(max_pipes), b"", Duration::from_secs(5)).await;
            // Written before the tunnel task first runs (this test's runtime has one thread).
            let s = socket2::SockRef::from(&client_peer);
            send_past_an_urgent_byte(&s);
            s.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), upstream_peer.read_to_end(&mut got))
                .await
                .expect("the upstream sees an end of stream")
                .unwrap();
            if !got.ends_with(b"tail") {
                lost.push((max_pipes, got.len()));
            }
            drop(upstream_peer);
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        assert!(lost.is_empty(), "(max_pipes, bytes the upstream got of 20004): {lost:?}");
    }

    /// Guard: `max_upload_bytes` lands on the byte on both paths, the pool's pipes and the copy
    /// fallback (the integration test covers only a pool with pipes), at a limit that is neither a
    /// multiple of the scratch buffer nor of a pipe.
    #[tokio::test]
    async fn the_upload_limit_lands_on_the_byte_through_pipes_and_through_the_copy_fallback() {
        for max_pipes in [0, 8] {
            let Running { mut client_peer, mut upstream_peer, task: t, meter } =
                run_tunnel(pool(max_pipes), b"", Duration::from_secs(5)).await;
            // Before the tunnel task first runs.
            const LIMIT: u64 = 100_001;
            meter.limit_up(meter::UpLimits { max: Some(LIMIT), budget: None });
            let writer = tokio::spawn(async move {
                let chunk = vec![0x42u8; 7_000];
                for _ in 0..300 {
                    if client_peer.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), upstream_peer.read_to_end(&mut got)).await;
            assert!(read.is_ok(), "max_pipes {max_pipes}: the tunnel is closed at the limit");
            assert_eq!(got.len() as u64, LIMIT, "max_pipes {max_pipes}: exactly the limit went up");
            assert_eq!(t.await.unwrap(), End::Cut);
            assert!(meter.over_limit());
            assert_eq!(meter.bytes().0, LIMIT);
            writer.abort();
        }
    }

    /// Bulk bytes, an urgent byte, more bytes, and no end of stream: splice(2) stops at the mark
    /// and answers EAGAIN there, which a read steps over. The bytes behind the mark go on once
    /// the client sends again, on both paths. (Not before: a read that stops at the mark looks
    /// like one that drained the socket, here as in tokio's own reads; see `read.rs`.)
    #[tokio::test]
    async fn bytes_behind_an_urgent_byte_go_on_when_the_client_sends_again() {
        for max_pipes in [0, 8] {
            let Running { client_peer, mut upstream_peer, task: t, .. } =
                run_tunnel(pool(max_pipes), b"", Duration::from_secs(5)).await;
            let s = socket2::SockRef::from(&client_peer);
            send_past_an_urgent_byte(&s);
            let mut got = vec![0u8; 20_000];
            upstream_peer.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(s.send(b"more").unwrap(), 4);
            let mut rest = [0u8; 8];
            let read = tokio::time::timeout(Duration::from_secs(2), upstream_peer.read_exact(&mut rest)).await;
            assert!(read.is_ok(), "max_pipes {max_pipes}: the upstream got {:?}", String::from_utf8_lossy(&rest));
            assert_eq!(&rest, b"tailmore", "max_pipes {max_pipes}");
            t.abort();
        }
    }

    /// A client that reads slowly but steadily (64 KiB every 50 ms, small socket buffers) takes
    /// longer than `idle` to empty a pipe's worth (1 MiB), so the tunnel writes for longer than
    /// that without reading: its writes move bytes, so it is not idle. (The watchdog once counted
    /// only reads, and cut it; found in review.)
    #[tokio::test]
    async fn a_slow_but_steady_reader_is_not_cut_as_idle() {
        let idle = Duration::from_millis(600);
        let (mut client_peer, client) = tcp_pair().await;
        let (upstream, mut upstream_peer) = tcp_pair().await;
        // The kernel's queues small beside the pipe, so that the pipe is what drains slowly.
        socket2::SockRef::from(&client).set_send_buffer_size(32 * 1024).unwrap();
        socket2::SockRef::from(&client_peer).set_recv_buffer_size(32 * 1024).unwrap();
        let (pool, meter) = (pipes(), Meter::new());
        let t = tokio::spawn(async move {
            tunnel_tcp(client, upstream, Vec::new(), &pool, &meter, idle, CancellationToken::new()).await
        });
        let writer = tokio::spawn(async move {
            let chunk = vec![9u8; 64 * 1024];
            for _ in 0..128 {
                if upstream_peer.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        let (mut got, mut buf) = (0usize, vec![0u8; 64 * 1024]);
        while started.elapsed() < Duration::from_millis(3000) && !t.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), client_peer.read(&mut buf)).await {
                got += n;
            }
        }
        let finished = t.is_finished();
        let end = if finished { Some(t.await.unwrap()) } else { None };
        writer.abort();
        assert!(!finished, "ended {end:?} after {:?}, the client having read {got} bytes", started.elapsed());
        assert!(got > 1024 * 1024, "the client read more than a pipe's worth: {got} bytes");
    }

    /// Guard: a tunnel cut while its pipe holds bytes for a peer that stopped reading closes that
    /// pipe; every pipe left in the pool is empty, so no tunnel's bytes reach the next one.
    #[tokio::test]
    async fn a_pipe_holding_bytes_at_the_cut_is_not_pooled() {
        let pool = pipes();
        let Running { mut client_peer, upstream_peer: _deaf, task: t, .. } =
            run_tunnel(pool.clone(), b"", Duration::from_millis(300)).await;
        let chunk = vec![7u8; 64 * 1024];
        let (mut pushed, mut peak) = (0usize, 0usize);
        while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(200), client_peer.write_all(&chunk)).await {
            pushed += chunk.len();
            peak = peak.max(pool.made());
            assert!(pushed < 64 * 1024 * 1024, "a deaf upstream must stop the client's writes");
        }
        assert_eq!(peak, 1, "the bulk bytes went through a pipe");
        let end = tokio::time::timeout(Duration::from_secs(5), t).await.expect("cut when idle").unwrap();
        assert_eq!(end, End::Idle);
        let free = pool.free();
        assert_eq!((pool.made(), free), (0, 0), "the pipe that held the deaf upstream's bytes was closed");
    }

    #[tokio::test]
    async fn an_upstream_that_stops_reading_cannot_hold_the_replay() {
        let (_client_peer, client) = tcp_pair().await;
        // The upstream never reads, and the prefix is far more than loopback socket buffers take:
        // the replay blocks until the idle timeout cuts it.
        let (upstream, _upstream_peer) = tcp_pair().await;
        let prefix = vec![0x5a; 64 * 1024 * 1024];
        let (meter, idle) = (Meter::new(), Duration::from_millis(300));
        let pool = pipes();
        let replay = tunnel_tcp(client, upstream, prefix, &pool, &meter, idle, CancellationToken::new());
        let end = tokio::time::timeout(Duration::from_secs(5), replay).await;
        assert_eq!(end, Ok(End::Idle), "cut at the idle timeout, not held");
    }
}

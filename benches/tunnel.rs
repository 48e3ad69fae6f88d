//! CONNECT tunnels per second, and bulk throughput through a tunnel against a direct loopback
//! connection. A load tool, not a criterion bench: each figure is a median over several runs.
//!
//! Run with `cargo bench --bench tunnel`. Everything is on 127.0.0.1: an origin that sends the
//! number of bytes asked for, a sink that counts what it is sent, and the proxy in-process,
//! allowing only their ports. The upload figures compare a rule without upload limits to one with
//! `max_upload_bytes` and `upload_budget` set (too high to be reached), which every byte up is
//! counted against.
//! Loops are bounded by count and time.
#![allow(clippy::disallowed_methods)] // the client side connects directly, by design

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use egress_proxy::load::load;
use egress_proxy::server::{self, Listeners};
use egress_proxy::state::State;

const BULK: u64 = 512 * 1024 * 1024;
const RUNS: usize = 5;
const RATE_SECS: u64 = 3;
const RATE_MAX: usize = 50_000;
const RATE_CONCURRENCY: usize = 8;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let origin = origin().await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy(origin, dir.path()).await;

        let mut direct = Vec::new();
        let mut tunnelled = Vec::new();
        for _ in 0..RUNS {
            direct.push(bulk(origin, None).await);
            tunnelled.push(bulk(proxy, Some(origin)).await);
        }
        let (d, t) = (median(&mut direct), median(&mut tunnelled));
        println!("bulk {} MiB x {RUNS} runs, median:", BULK >> 20);
        println!("  direct loopback      {:>8.0} MiB/s", d);
        println!("  through CONNECT      {:>8.0} MiB/s", t);
        println!("  tunnel / direct      {:>8.1} %", 100.0 * t / d);

        let (n, secs) = rate(proxy, origin).await;
        println!("CONNECT tunnels (open, 1-byte exchange, close), {RATE_CONCURRENCY} clients: {n} in {secs:.2} s = {:.0} tunnels/s", n as f64 / secs);

        let sink = sink().await;
        let plain_dir = tempfile::tempdir().unwrap();
        let limited_dir = tempfile::tempdir().unwrap();
        let plain = proxy_with(&[sink.port()], plain_dir.path(), "").await;
        let limits = "max_upload_bytes = 1000000000000\nupload_budget = { bytes = 1000000000000, per = \"1h\" }\n";
        let limited = proxy_with(&[sink.port()], limited_dir.path(), limits).await;
        let (mut d, mut p, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            d.push(upload(sink, None).await);
            p.push(upload(plain, Some(sink)).await);
            l.push(upload(limited, Some(sink)).await);
        }
        let (d, p, l) = (median(&mut d), median(&mut p), median(&mut l));
        println!("upload {} MiB x {RUNS} runs, median:", BULK >> 20);
        println!("  direct loopback      {:>8.0} MiB/s", d);
        println!("  CONNECT, no limits   {:>8.0} MiB/s", p);
        println!("  CONNECT, counted     {:>8.0} MiB/s  (max_upload_bytes + upload_budget)", l);
        println!("  counted / no limits  {:>8.1} %", 100.0 * l / p);
    });
}

/// Reads everything it is sent, then answers with the count (8 bytes, big-endian).
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_u64(n).await;
            });
        }
    });
    addr
}

/// MiB/s for one upload of `BULK` bytes, counted by the sink.
async fn upload(addr: SocketAddr, via_sink: Option<SocketAddr>) -> f64 {
    let mut s = open(addr, via_sink).await;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < BULK {
        s.write_all(&buf).await.unwrap();
        sent += buf.len() as u64;
    }
    s.shutdown().await.unwrap();
    assert_eq!(s.read_u64().await.unwrap(), BULK);
    (BULK as f64 / (1 << 20) as f64) / start.elapsed().as_secs_f64()
}

/// Sends the number of bytes each client asks for (an 8-byte big-endian count), then closes.
async fn origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let Ok(mut n) = s.read_u64().await else {
                    return;
                };
                let buf = vec![0x5au8; 256 * 1024];
                while n > 0 {
                    let k = n.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    n -= k as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn proxy(origin: SocketAddr, dir: &std::path::Path) -> SocketAddr {
    proxy_with(&[origin.port()], dir, "").await
}

/// The proxy allowing `ports` on 127.0.0.1, with `rule_extra` lines on its rule.
async fn proxy_with(ports: &[u16], dir: &std::path::Path, rule_extra: &str) -> SocketAddr {
    let cfg = dir.join("bench.toml");
    let audit = dir.join("audit.jsonl");
    let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    std::fs::write(
        &cfg,
        format!(
            "[audit]\npath = {:?}\n[safety]\nallow_internal = [\"127.0.0.1/32\"]\n[limits]\nmax_connections = 100000\nmax_connections_per_client = 100000\n[[rule]]\nname = \"origin\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{ports}]\ntls_only = false\n{rule_extra}",
            audit.display().to_string(),
        ),
    )
    .unwrap();
    let state = Arc::new(State::build(load(Some(&cfg), &[]).unwrap()).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(server::run(
        Listeners { http: Some(l), ..Listeners::default() },
        state,
        None,
        CancellationToken::new(),
    ));
    addr
}

/// Opens a connection to `addr` (through CONNECT to `via_origin` when given), ready for bytes.
async fn open(addr: SocketAddr, via_origin: Option<SocketAddr>) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    if let Some(o) = via_origin {
        s.write_all(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    }
    s
}

/// MiB/s for one bulk download of `BULK` bytes.
async fn bulk(addr: SocketAddr, via_origin: Option<SocketAddr>) -> f64 {
    let mut s = open(addr, via_origin).await;
    let start = Instant::now();
    s.write_u64(BULK).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, BULK);
    (BULK as f64 / (1 << 20) as f64) / start.elapsed().as_secs_f64()
}

/// Tunnels completed by `RATE_CONCURRENCY` clients within `RATE_SECS` (at most `RATE_MAX`).
async fn rate(proxy: SocketAddr, origin: SocketAddr) -> (usize, f64) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(RATE_SECS);
    let per_client = RATE_MAX / RATE_CONCURRENCY;
    let tasks: Vec<_> = (0..RATE_CONCURRENCY)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0;
                while done < per_client && Instant::now() < deadline {
                    let mut s = open(proxy, Some(origin)).await;
                    s.write_u64(1).await.unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    (n, start.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

//! Upload limits, end to end on loopback: a tunnel cut at `max_upload_bytes` to the byte, and a
//! client past its `upload_budget` refused under the rule while another client is not. (That a
//! client is admitted again once its window frees is shown with the clock moved, not slept, in
//! `budgets.rs`.)
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// `up.test` pinned to 127.0.0.1, allowed on the echo origin's port, with `limits` on the rule.
fn rules(port: u16, limits: &str) -> String {
    format!(
        "[resolve.static]\n\"up.test\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"upload\"\naction = \"allow\"\nhosts = [\"up.test\"]\nports = [{port}]\ntls_only = false\n{limits}\n"
    )
}

/// A CONNECT tunnel to `up.test` from `from` (a loopback address), after its 200; else the head.
async fn tunnel(proxy: SocketAddr, from: &str, port: u16) -> Result<TcpStream, String> {
    match connect_from(proxy, from, &format!("up.test:{port}")).await {
        (head, s) if head.starts_with("HTTP/1.1 200") => Ok(s),
        (head, _) => Err(head),
    }
}

/// Writes `n` bytes up (as far as the tunnel takes them) while reading back what the echo origin
/// returns, until the tunnel ends or `n` came back: the bytes that made the round trip.
async fn push(s: TcpStream, n: usize) -> usize {
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x42u8; 64 * 1024];
        let mut sent = 0;
        while sent < n {
            let k = chunk.len().min(n - sent);
            if w.write_all(&chunk[..k]).await.is_err() {
                break;
            }
            sent += k;
        }
        w
    });
    let mut back = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while back < n {
        match tokio::time::timeout(WAIT, r.read(&mut buf)).await {
            Ok(Ok(k)) if k > 0 => back += k,
            _ => break,
        }
    }
    drop(writer.await);
    back
}

fn with_event<'a>(lines: &'a [Value], event: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}

async fn metric(proxy: &TestProxy, series: &str) -> f64 {
    let page = admin_page(proxy.admin_addr, "/metrics").await;
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn a_tunnel_is_cut_at_max_upload_bytes_to_the_byte_and_the_cut_is_audited() {
    let origin = support::origins::CountingOrigin::start().await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&rules(port, "max_upload_bytes = 300000")).await;
    let mut s = tunnel(proxy.addr, "127.0.0.1", port).await.unwrap();
    let chunk = vec![0x42u8; 64 * 1024];
    let mut sent = 0;
    while sent < 2_000_000 && s.write_all(&chunk).await.is_ok() {
        sent += chunk.len();
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect("the proxy closed the tunnel");
    let got = origin.received_at_least(1).await;
    assert_eq!(got[0].len(), 300_000, "exactly the limit reached the origin, not a pipe's worth more");

    let lines = proxy.audit_at_least(3).await;
    let limit = with_event(&lines, "limit");
    assert_eq!(limit.len(), 1, "{lines:?}");
    assert_eq!((limit[0]["reason"].as_str(), limit[0]["rule"].as_str()), (Some("upload_limit"), Some("upload")));
    assert_eq!((limit[0]["bytes_up"].as_u64(), limit[0]["limit"].as_u64()), (Some(300_000), Some(300_000)));
    let close = with_event(&lines, "close");
    assert_eq!((close[0]["reason"].as_str(), close[0]["bytes_up"].as_u64()), (Some("upload_limit"), Some(300_000)));
    let cut = metric(&proxy, "egress_proxy_upload_limits_total{limit=\"upload_limit\",rule=\"upload\"}").await;
    assert_eq!(cut, 1.0);

    // The limit is per tunnel: the next one carries its own bytes.
    let mut s = tunnel(proxy.addr, "127.0.0.1", port).await.unwrap();
    s.write_all(&[1u8; 1000]).await.unwrap();
    drop(s);
    let got = origin.received_at_least(2).await;
    assert_eq!(got[1].len(), 1000);
}

#[tokio::test]
async fn a_client_past_its_upload_budget_is_refused_under_the_rule_and_another_client_is_not() {
    let echo = echo_origin().await;
    let budget = "upload_budget = { bytes = 200000, per = \"1h\" }";
    let proxy = TestProxy::start(&rules(echo.port(), budget)).await;

    // The crossing is audited and counted while the tunnel that crossed is still open, and that
    // tunnel is not cut: the budget governs new connections.
    let s = tunnel(proxy.addr, "127.0.0.1", echo.port()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(&vec![7u8; 250_000]).await.unwrap();
    let mut back = vec![0u8; 250_000];
    tokio::time::timeout(WAIT, r.read_exact(&mut back)).await.unwrap().unwrap();
    let lines = proxy.audit_at_least(2).await;
    let limit = with_event(&lines, "limit");
    assert_eq!(limit.len(), 1, "{lines:?}");
    assert_eq!(limit[0]["reason"], "upload_budget");
    assert_eq!((limit[0]["limit"].as_u64(), limit[0]["per_s"].as_u64()), (Some(200_000), Some(3600)));
    assert!(limit[0]["bytes_up"].as_u64().unwrap() >= 200_000);
    assert!(with_event(&lines, "close").is_empty(), "the crossing tunnel is still open");
    let crossed = metric(&proxy, "egress_proxy_upload_limits_total{limit=\"upload_budget\",rule=\"upload\"}").await;
    assert_eq!(crossed, 1.0);
    w.write_all(b"still open").await.unwrap();
    let mut more = [0u8; 10];
    tokio::time::timeout(WAIT, r.read_exact(&mut more)).await.unwrap().unwrap();
    assert_eq!(&more, b"still open");

    // A new connection of the same client under the rule: refused.
    let refused = tunnel(proxy.addr, "127.0.0.1", echo.port()).await.unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("x-egress-deny-reason: upload_budget"), "{refused}");
    // Another client address has its own budget.
    let other = tunnel(proxy.addr, "127.0.0.2", echo.port()).await.expect("another client is let through");
    assert_eq!(push(other, 1000).await, 1000);

    let lines = proxy.audit().into_iter().filter(|l| l["event"] == "decision").collect::<Vec<_>>();
    let refusal = lines.iter().find(|l| l["decision"] == "deny").expect("the refusal is audited");
    assert_eq!((refusal["reason"].as_str(), refusal["rule"].as_str()), (Some("upload_budget"), Some("upload")));
}

/// A forwarded request's head carries bytes up as its body does (a URL, a header field): it
/// counts against `max_upload_bytes`. A GET with 30 KB in its target and a header field, under a
/// rule limited to 100 bytes, is refused as `upload_limit`, and the origin gets nothing. (Found in
/// review: only bodies were counted.)
#[tokio::test]
async fn a_forwarded_request_head_counts_against_max_upload_bytes() {
    let origin = support::origins::HostOrigin::start().await;
    let p = origin.addr.port();
    let proxy = TestProxy::start(&rules(p, "max_upload_bytes = 100")).await;
    let data = "A".repeat(15_000);
    let req = format!(
        "GET http://up.test:{p}/?d={data} HTTP/1.1\r\nHost: up.test:{p}\r\nX-Data: {data}\r\nConnection: close\r\n\r\n"
    );
    let (resp, _) = raw_exchange(proxy.addr, req.as_bytes(), WAIT).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(!resp.starts_with("HTTP/1.1 200"), "{}", resp.lines().next().unwrap_or(""));
    let lines = proxy.audit_at_least(3).await;
    let close = with_event(&lines, "close");
    assert_eq!(close.len(), 1, "{lines:?}");
    assert_eq!(close[0]["reason"], "upload_limit");
    assert_eq!(with_event(&lines, "limit").len(), 1, "{lines:?}");
    assert!(origin.hosts().is_empty(), "the origin was asked: {:?}", origin.hosts());

    // A small request under the same rule goes through, and its head is what its close line
    // counts up.
    let small = format!("GET http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nConnection: close\r\n\r\n");
    let (resp, _) = raw_exchange(proxy.addr, small.as_bytes(), WAIT).await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"));
    let lines = proxy.audit_at_least(5).await;
    let close = with_event(&lines, "close");
    let up = close.last().unwrap()["bytes_up"].as_u64().unwrap();
    assert!((30..=100).contains(&up), "the small request's head: {up} bytes up");
}

/// Heads count against `upload_budget` too: requests on one kept-alive connection, each with
/// 30 KB in its target and a header field, are refused once the client is past a budget of
/// 1,000 bytes an hour, and the crossing is audited.
#[tokio::test]
async fn forwarded_request_heads_count_against_the_upload_budget() {
    let origin = support::origins::HostOrigin::start().await;
    let p = origin.addr.port();
    let proxy = TestProxy::start(&rules(p, "upload_budget = { bytes = 1000, per = \"1h\" }")).await;
    let data = "B".repeat(15_000);
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut served = 0;
    for i in 0..20 {
        let req =
            format!("GET http://up.test:{p}/{i}?d={data} HTTP/1.1\r\nHost: up.test:{p}\r\nX-Data: {data}\r\n\r\n");
        if c.write_all(req.as_bytes()).await.is_err() {
            break;
        }
        // The answer is `served up.test:PORT` with its Content-Length: read it whole.
        let want = format!("served up.test:{p}");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(want.as_bytes()) {
            match tokio::time::timeout(WAIT, c.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
            if got.starts_with(b"HTTP/1.1 4") && got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        if !got.starts_with(b"HTTP/1.1 200") {
            break;
        }
        served += 1;
    }
    drop(c);
    assert!(served <= 1, "{served} requests of 30 KB each went up under a 1,000-byte budget");
    let lines = proxy.audit_at_least(3).await;
    assert!(
        with_event(&lines, "limit").iter().any(|l| l["reason"] == "upload_budget"),
        "the crossing is audited: {lines:?}"
    );
}

/// An origin that answers `200 ok` as soon as it has a request head, then goes on reading until
/// the peer closes: the bytes it got in all.
async fn early_answering_origin() -> (SocketAddr, tokio::sync::oneshot::Receiver<usize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (mut got, mut buf, mut answered) = (Vec::new(), vec![0u8; 64 * 1024], false);
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if !answered && got.windows(4).any(|w| w == b"\r\n\r\n") {
                answered = true;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            }
        }
        let _ = tx.send(got.len());
    });
    (addr, rx)
}

/// Sends a POST head for `len` body bytes, reads the early answer whole, then sends `len` body
/// bytes (as far as they are taken) and closes: the audit lines after.
async fn post_after_the_answer(proxy: &TestProxy, origin: SocketAddr, len: usize) -> Vec<Value> {
    let p = origin.port();
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST http://up.test:{p}/u HTTP/1.1\r\nHost: up.test:{p}\r\nContent-Length: {len}\r\n\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    while !resp.ends_with(b"ok") {
        match tokio::time::timeout(WAIT, c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => resp.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    let chunk = vec![0x42u8; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let k = chunk.len().min(len - sent);
        if c.write_all(&chunk[..k]).await.is_err() {
            break;
        }
        sent += k;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    proxy.audit_at_least(2).await
}

/// An origin that answers before it has read the request body still takes that body: the close
/// line waits for it, and counts it. (Found in review: it was written when the response ended,
/// with `bytes_up` the head alone, while a megabyte went up after it.)
#[tokio::test]
async fn a_forwarded_body_sent_after_the_response_is_counted_on_the_close_line() {
    let (origin, got) = early_answering_origin().await;
    let proxy = TestProxy::start(&rules(origin.port(), "")).await;
    const N: usize = 1_000_000;
    let lines = post_after_the_answer(&proxy, origin, N).await;
    let reached = tokio::time::timeout(WAIT, got).await.unwrap().unwrap() as u64;
    let close = with_event(&lines, "close");
    assert_eq!(close.len(), 1, "{lines:?}");
    assert_eq!(close[0]["bytes_up"].as_u64(), Some(reached), "every byte the origin got, head and body");
    assert!(reached > N as u64);
}

/// A body cut at `max_upload_bytes` after the response is audited as such: a `limit` line, and
/// `upload_limit` on the close line. The cut itself holds to the byte.
#[tokio::test]
async fn a_forwarded_body_cut_after_the_response_is_audited() {
    let (origin, got) = early_answering_origin().await;
    let proxy = TestProxy::start(&rules(origin.port(), "max_upload_bytes = 1000")).await;
    let lines = post_after_the_answer(&proxy, origin, 100_000).await;
    let reached = tokio::time::timeout(WAIT, got).await.unwrap().unwrap();
    assert!(reached <= 1000, "{reached} bytes reached the origin");
    assert_eq!(with_event(&lines, "limit").len(), 1, "{lines:?}");
    let close = with_event(&lines, "close");
    assert_eq!((close.len(), close[0]["reason"].as_str()), (1, Some("upload_limit")), "{lines:?}");
}

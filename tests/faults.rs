//! Load and faults, bounded, on loopback: slow clients, upstreams that refuse, reset, blackhole or
//! answer slowly, names whose lookup times out, fails or finds nothing (through a DNS server of
//! the test's own, `support::dns`), file descriptors and tasks after a burst, and
//! byte integrity across many parallel tunnels. Each fault gets its documented status (README,
//! "Refusals") and audit line.
//!
//! The test that counts the process's file descriptors runs alone: every other test here holds
//! `GATE` shared, and it holds it exclusively (tests in one binary share the process).
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::origins::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::RwLock;

const WAIT: Duration = Duration::from_secs(5);

/// Held shared by every test, exclusively by the one that counts file descriptors.
static GATE: RwLock<()> = RwLock::const_new(());

/// `ok.test` (and `hole.test`) pinned to 127.0.0.1 and `empty.test` to nothing, allowed on `port`,
/// tunnels not held to TLS (the origins here speak raw bytes or plain HTTP). Every name a test
/// uses is pinned: the proxy must never ask the system's resolver anything from a test.
fn rules(port: u16, extra: &str) -> String {
    format!(
        "{extra}\n[resolve.static]\n\"ok.test\" = [\"127.0.0.1\"]\n\"hole.test\" = [\"127.0.0.1\"]\n\"empty.test\" = []\n\
         [[rule]]\nname = \"ok\"\naction = \"allow\"\nhosts = [\"ok.test\", \"empty.test\"]\nports = [{port}]\ntls_only = false\n"
    )
}

fn get(host: &str, port: u16, path: &str) -> String {
    format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n")
}

fn connect(host: &str, port: u16) -> String {
    format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n")
}

/// The status line of a response, and its `X-Egress-Deny-Reason`.
fn status_and_reason(resp: &[u8]) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(resp);
    let status = text.lines().next().unwrap_or_default().to_string();
    let lower = text.to_ascii_lowercase();
    let reason = lower.split("x-egress-deny-reason: ").nth(1).and_then(|r| r.split("\r\n").next()).map(str::to_string);
    (status, reason)
}

/// (event, decision or "-", reason or "-", host or "-") of every line.
fn summary(lines: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |l: &Value, k: &str| l[k].as_str().unwrap_or("-").to_string();
    lines.iter().map(|l| (s(l, "event"), s(l, "decision"), s(l, "reason"), s(l, "host"))).collect()
}

fn line(event: &str, decision: &str, reason: &str, host: &str) -> (String, String, String, String) {
    (event.into(), decision.into(), reason.into(), host.into())
}

/// Opens a tunnel through the proxy, from `from` when given (a second client address), and
/// proves it carries bytes both ways.
async fn tunnel_from(proxy: SocketAddr, from: Option<&str>, port: u16) -> TcpStream {
    let mut s = match from {
        None => TcpStream::connect(proxy).await.unwrap(),
        Some(ip) => {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(proxy).await.unwrap()
        }
    };
    s.write_all(format!("{}ping", connect("ok.test", port)).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"ping") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("tunnel answers").unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&got));
    s
}

/// GET on the admin server; the body.
async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let (resp, _) = raw_exchange(admin, req.as_bytes(), WAIT).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The value of one sample (`name{labels}`) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

// === slow clients ===

/// Trickles a request head one byte every 200 ms (for 5 s at most) and reads what comes back:
/// the bytes, how it ended, and when.
async fn slowloris(mut s: TcpStream, start: Vec<u8>) -> (Vec<u8>, Ending, Duration) {
    let began = Instant::now();
    s.set_nodelay(true).unwrap();
    s.write_all(&start).await.unwrap();
    let trickle = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for byte in trickle.iter().take(25) {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            // Nothing yet: one more byte (the proxy may have closed already; reading says so).
            Err(_) => {
                let _ = s.write_all(std::slice::from_ref(byte)).await;
            }
            Ok(Ok(0)) => return (out, Ending::Eof, began.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (out, Ending::Reset, began.elapsed())
            }
            Ok(Err(e)) => panic!("slowloris read: {e}"),
        }
    }
    (out, Ending::Open, began.elapsed())
}

#[tokio::test]
async fn a_slowloris_is_cut_at_the_head_timeout_while_other_clients_are_served() {
    let _shared = GATE.read().await;
    let echo = echo_origin().await;
    let port = echo.port();
    let proxy = TestProxy::start(&rules(port, "[limits]\nrequest_head_timeout = \"1s\"")).await;
    let slow = tokio::spawn(slowloris(
        TcpStream::connect(proxy.addr).await.unwrap(),
        format!("CONNECT ok.test:{port} HTTP/1.1\r\n").into_bytes(),
    ));
    // Meanwhile, five tunnels, each opened, used and closed, while the slow head is still open.
    for _ in 0..5 {
        drop(tunnel_from(proxy.addr, None, port).await);
    }
    assert!(!slow.is_finished(), "the others are served while the slow client is still being read");
    let (out, ending, after) = slow.await.unwrap();
    // hyper drops a head that is not complete in time; the explicit listener answers nothing.
    // The close is clean unless a trickled byte was still unread at that moment (a reset).
    assert_eq!(String::from_utf8_lossy(&out), "");
    assert!(matches!(ending, Ending::Eof | Ending::Reset), "still open after {after:?}");
    assert!(after >= Duration::from_secs(1) && after < Duration::from_secs(3), "cut after {after:?}");
    let lines = proxy.audit_at_least(11).await;
    let refused: Vec<_> = summary(&lines).into_iter().filter(|l| l.1 != "allow" && l.0 == "decision").collect();
    assert_eq!(refused, [line("decision", "deny", "request_head_timeout", "-")]);
    assert_eq!(summary(&lines).iter().filter(|l| l.1 == "allow").count(), 5);
}

#[tokio::test]
async fn a_slowloris_on_the_plain_listener_gets_408_while_other_clients_are_served() {
    let _shared = GATE.read().await;
    let origin = HostOrigin::start().await;
    let port = origin.addr.port();
    let t = Transparent::new(&rules(port, "[limits]\nrequest_head_timeout = \"1s\""));
    let slow = tokio::spawn(slowloris(
        t.connect(egress_proxy::proxy::transparent::Redirect::Plain, origin.addr).await,
        b"GET / HTTP/1.1\r\nHost: ok.test\r\n".to_vec(),
    ));
    for _ in 0..5 {
        let mut c = t.connect(egress_proxy::proxy::transparent::Redirect::Plain, origin.addr).await;
        c.write_all(format!("GET / HTTP/1.1\r\nHost: ok.test:{port}\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, c.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with(&format!("served ok.test:{port}")), "{out}");
    }
    assert!(!slow.is_finished(), "the others are served while the slow client is still being read");
    let (out, ending, after) = slow.await.unwrap();
    let (status, reason) = status_and_reason(&out);
    assert_eq!((status.as_str(), reason.as_deref()), ("HTTP/1.1 408 Request Timeout", Some("request_head_timeout")));
    // As above: a reset only when a trickled byte was still unread when the proxy closed.
    assert!(matches!(ending, Ending::Eof | Ending::Reset), "still open after {after:?}");
    assert!(after >= Duration::from_secs(1) && after < Duration::from_secs(3), "cut after {after:?}");
    let lines = t.audit_at_least(11).await;
    let refused: Vec<_> = summary(&lines).into_iter().filter(|l| l.0 == "decision" && l.1 != "allow").collect();
    assert_eq!(refused, [line("decision", "deny", "request_head_timeout", "127.0.0.1")]);
    assert_eq!(origin.hosts().len(), 5);
}

#[tokio::test]
async fn a_half_open_flood_meets_the_per_client_limit_and_spares_another_client() {
    let _shared = GATE.read().await;
    let echo = echo_origin().await;
    let port = echo.port();
    const LIMIT: usize = 16;
    let proxy = TestProxy::start(&rules(port, &format!("[limits]\nmax_connections_per_client = {LIMIT}"))).await;
    // LIMIT connections from 127.0.0.1 that send nothing: each holds a slot until its head
    // timeout (10 s by default).
    let mut flood = Vec::new();
    for _ in 0..LIMIT {
        flood.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // The accept loop takes connections in order: this one comes after the flood.
    let (resp, ending) = raw_exchange(proxy.addr, connect("ok.test", port).as_bytes(), WAIT).await;
    let (status, reason) = status_and_reason(&resp);
    assert_eq!(
        (status.as_str(), reason.as_deref(), ending),
        ("HTTP/1.1 503 Service Unavailable", Some("connection_limit"), Ending::Eof)
    );
    // Another client address is not held to 127.0.0.1's count.
    let other = tunnel_from(proxy.addr, Some("127.0.0.2"), port).await;
    drop(other);
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(
        summary(&lines[..2]),
        [line("decision", "deny", "connection_limit", "-"), line("decision", "allow", "-", "ok.test")]
    );
    assert!(lines[0]["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{}", lines[0]);
    assert!(lines[1]["client"].as_str().unwrap().starts_with("127.0.0.2:"), "{}", lines[1]);
    // The flood leaves; its slots come back (within 5 s, tried every 20 ms). A tunnel that
    // opens stays open (the echo origin holds it), so each try reads for 300 ms at most.
    drop(flood);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let open = format!("{}ping", connect("ok.test", port));
        let (resp, _) = raw_exchange(proxy.addr, open.as_bytes(), Duration::from_millis(300)).await;
        if resp.starts_with(b"HTTP/1.1 200") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("127.0.0.1's slots never came back");
}

// === upstream faults ===

/// A listener whose accept queue is full: new SYNs are dropped, so a connect to it hangs. The
/// returned handles keep the queue full.
async fn blackhole() -> (socket2::Socket, SocketAddr, Vec<tokio::task::JoinHandle<()>>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..3 {
        fillers.push(tokio::spawn(async move {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(s);
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (socket, addr, fillers)
}

#[tokio::test]
async fn an_upstream_that_refuses_is_502_and_one_that_blackholes_is_504() {
    let _shared = GATE.read().await;
    let closed = closed_port();
    let (_queue, hole, fillers) = blackhole().await;
    let extra = format!(
        "[limits]\nconnect_timeout = \"300ms\"\n\
         [[rule]]\nname = \"hole\"\naction = \"allow\"\nhosts = [\"hole.test\"]\nports = [{}]\ntls_only = false\n",
        hole.port()
    );
    let proxy = TestProxy::start(&rules(closed, &extra)).await;
    let cases = [
        (connect("ok.test", closed), "HTTP/1.1 502 Bad Gateway", "upstream_unreachable", "ok.test"),
        (get("ok.test", closed, "/"), "HTTP/1.1 502 Bad Gateway", "upstream_unreachable", "ok.test"),
        (connect("hole.test", hole.port()), "HTTP/1.1 504 Gateway Timeout", "upstream_timeout", "hole.test"),
        (get("hole.test", hole.port(), "/"), "HTTP/1.1 504 Gateway Timeout", "upstream_timeout", "hole.test"),
    ];
    for (i, (req, want_status, want_reason, host)) in cases.iter().enumerate() {
        let began = Instant::now();
        let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), WAIT).await;
        let (status, reason) = status_and_reason(&resp);
        assert_eq!(
            (status.as_str(), reason.as_deref(), ending),
            (*want_status, Some(*want_reason), Ending::Eof),
            "{req}"
        );
        assert!(began.elapsed() < Duration::from_secs(3), "{req}: answered after {:?}", began.elapsed());
        // Refused before anything was allowed: one `fail` line, no close line.
        let lines = proxy.audit_at_least(i + 1).await;
        assert_eq!(summary(&lines[i..]), [line("decision", "fail", want_reason, host)], "{req}");
        assert_eq!(lines[i]["dst_addr"], Value::Null);
    }
    fillers.iter().for_each(|f| f.abort());
}

/// An origin for one connection: reads until `until` has come, sends `reply`, reads until `then`
/// has come, waits until `go` fires, then resets the connection (SO_LINGER 0). The task returns
/// what it read.
async fn resetting_origin(
    until: &'static [u8],
    reply: Vec<u8>,
    then: &'static [u8],
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(until) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client left before sending {until:?}");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(&reply).await.unwrap();
        while !got.ends_with(then) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client left before sending {then:?}");
            got.extend_from_slice(&buf[..n]);
        }
        let _ = tokio::time::timeout(WAIT, wait).await;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        got
    });
    (addr, go, task)
}

/// Reads until `n` bytes have come after the response head: the head and the bytes after it.
async fn read_past_head(s: &mut TcpStream, n: usize) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() - end - 4 >= n {
                let body = got.split_off(end + 4);
                return (String::from_utf8_lossy(&got).into_owned(), body);
            }
        }
        let r = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("bytes keep coming").unwrap();
        assert!(r > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..r]);
    }
}

/// Reads to the end, within `WAIT`: the bytes, and how the stream ended.
async fn read_rest(s: &mut TcpStream) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    let ending = match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Err(_) => Ending::Open,
        Ok(Ok(_)) => Ending::Eof,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ending::Reset,
        Ok(Err(e)) => panic!("{e}"),
    };
    (out, ending)
}

#[tokio::test]
async fn an_upstream_reset_mid_tunnel_cuts_the_tunnel_and_the_close_line_counts_the_bytes() {
    let _shared = GATE.read().await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (origin, go, task) = resetting_origin(b"go", data.clone(), b"ack").await;
    let proxy = TestProxy::start(&rules(origin.port(), "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("{}go", connect("ok.test", origin.port())).as_bytes()).await.unwrap();
    let (head, body) = read_past_head(&mut s, data.len()).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(body == data, "the tunnel carried the origin's bytes");
    s.write_all(b"ack").await.unwrap();
    // The origin resets once the client has everything and its reply has come through.
    let _ = go.send(());
    assert_eq!(task.await.unwrap(), b"goack");
    let (rest, ending) = read_rest(&mut s).await;
    assert_eq!((rest.len(), ending), (0, Ending::Eof), "the tunnel is closed");
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(summary(&lines), [line("decision", "allow", "-", "ok.test"), line("close", "-", "-", "ok.test")]);
    assert_eq!((lines[1]["bytes_up"].as_u64(), lines[1]["bytes_down"].as_u64()), (Some(5), Some(data.len() as u64)));
}

#[tokio::test]
async fn an_upstream_reset_mid_body_cuts_the_response_and_the_close_line_counts_the_bytes() {
    let _shared = GATE.read().await;
    const SENT: usize = 40_000;
    let body: Vec<u8> = (0..SENT).map(|i| (i % 253) as u8).collect();
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    reply.extend_from_slice(&body);
    let (origin, go, task) = resetting_origin(b"\r\n\r\n", reply, b"").await;
    let port = origin.port();
    let proxy = TestProxy::start(&rules(port, "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(get("ok.test", port, "/cut").as_bytes()).await.unwrap();
    let (head, got) = read_past_head(&mut s, SENT).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("content-length: 100000\r\n"), "{head}");
    assert!(got == body);
    let _ = go.send(());
    let seen = task.await.unwrap();
    assert!(seen.starts_with(b"GET /cut HTTP/1.1\r\n"), "{}", String::from_utf8_lossy(&seen));
    // The client learns the body is cut: the connection ends short of Content-Length.
    let (rest, ending) = read_rest(&mut s).await;
    assert_eq!((rest.len(), ending), (0, Ending::Eof));
    let lines = proxy.audit_at_least(2).await;
    let cut = line("close", "-", "upstream_protocol_error", "ok.test");
    assert_eq!(summary(&lines), [line("decision", "allow", "-", "ok.test"), cut]);
    // Up: the request head, counted as the origin got it, to the byte.
    let up = seen.len() as u64;
    assert_eq!((lines[1]["bytes_up"].as_u64(), lines[1]["bytes_down"].as_u64()), (Some(up), Some(SENT as u64)));
}

#[tokio::test]
async fn a_forwarded_response_cut_mid_body_says_why_in_its_close_line() {
    let _shared = GATE.read().await;
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    reply.extend_from_slice(&[7; 1000]);
    let (origin, go, _task) = resetting_origin(b"\r\n\r\n", reply, b"").await;
    let proxy = TestProxy::start(&rules(origin.port(), "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(get("ok.test", origin.port(), "/cut").as_bytes()).await.unwrap();
    let _ = read_past_head(&mut s, 1000).await;
    let _ = go.send(());
    let _ = read_rest(&mut s).await;
    let lines = proxy.audit_at_least(2).await;
    assert_eq!((lines[1]["event"].as_str(), lines[1]["bytes_down"].as_u64()), (Some("close"), Some(1000)));
    let reason = lines[1]["reason"].as_str();
    assert!(
        matches!(reason, Some("upstream_protocol_error" | "upstream_unreachable" | "upstream_timeout")),
        "the close line of a cut response names why: {}",
        lines[1]
    );
}

/// An HTTP origin for one connection that reads the request head, then writes each step's bytes
/// after its pause, then holds the connection open (10 s at most).
async fn scripted_origin(steps: Vec<(Duration, Vec<u8>)>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        for (pause, bytes) in steps {
            tokio::time::sleep(pause).await;
            if s.write_all(&bytes).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_answers_slowly_is_cut_only_once_idle_for_the_idle_timeout() {
    let _shared = GATE.read().await;
    let idle = "[limits]\nidle_timeout = \"500ms\"";
    let ms = Duration::from_millis;

    // No response head within the idle timeout: 504, after the allow line (the request went up).
    let silent = scripted_origin(Vec::new()).await;
    let proxy = TestProxy::start(&rules(silent.port(), idle)).await;
    let began = Instant::now();
    let (resp, ending) = raw_exchange(proxy.addr, get("ok.test", silent.port(), "/").as_bytes(), WAIT).await;
    let (status, reason) = status_and_reason(&resp);
    assert_eq!(
        (status.as_str(), reason.as_deref(), ending),
        ("HTTP/1.1 504 Gateway Timeout", Some("upstream_timeout"), Ending::Eof)
    );
    assert!(began.elapsed() >= ms(500) && began.elapsed() < ms(3000), "{:?}", began.elapsed());
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(
        summary(&lines),
        [line("decision", "allow", "-", "ok.test"), line("close", "-", "upstream_timeout", "ok.test")]
    );

    // A body that trickles, each pause shorter than the idle timeout, for longer than it in all:
    // delivered whole.
    let mut steps = vec![(Duration::ZERO, b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n".to_vec())];
    steps.extend((0..8u8).map(|i| (ms(150), vec![b'a' + i; 1024])));
    let trickle = scripted_origin(steps).await;
    let proxy = TestProxy::start(&rules(trickle.port(), idle)).await;
    let began = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(get("ok.test", trickle.port(), "/").as_bytes()).await.unwrap();
    let (head, body) = read_past_head(&mut s, 8192).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, (0..8u8).flat_map(|i| vec![b'a' + i; 1024]).collect::<Vec<u8>>());
    assert!(began.elapsed() >= ms(1200), "{:?}", began.elapsed());
    drop(s);
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(summary(&lines), [line("decision", "allow", "-", "ok.test"), line("close", "-", "-", "ok.test")]);
    assert_eq!(lines[1]["bytes_down"], 8192);

    // A tunnel with nothing moving either way is closed after the idle timeout.
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&rules(echo.port(), idle)).await;
    let mut held = tunnel_from(proxy.addr, None, echo.port()).await;
    let began = Instant::now();
    let (rest, ending) = read_rest(&mut held).await;
    assert_eq!((rest.len(), ending), (0, Ending::Eof));
    assert!(began.elapsed() >= ms(450) && began.elapsed() < ms(3000), "{:?}", began.elapsed());
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(summary(&lines), [line("decision", "allow", "-", "ok.test"), line("close", "-", "-", "ok.test")]);
    assert_eq!((lines[1]["bytes_up"].as_u64(), lines[1]["bytes_down"].as_u64()), (Some(4), Some(4)));
}

#[tokio::test]
async fn a_stalled_body_on_the_plain_listener_is_cut_after_the_idle_timeout() {
    let _shared = GATE.read().await;
    let origin =
        scripted_origin(vec![(Duration::ZERO, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc".to_vec())]).await;
    let t = Transparent::new(&rules(origin.port(), "[limits]\nidle_timeout = \"500ms\""));
    let mut c = t.connect(egress_proxy::proxy::transparent::Redirect::Plain, origin).await;
    let began = Instant::now();
    c.write_all(format!("GET / HTTP/1.1\r\nHost: ok.test:{}\r\n\r\n", origin.port()).as_bytes()).await.unwrap();
    let (out, ending) = read_rest(&mut c).await;
    assert_eq!(ending, Ending::Eof, "the stalled body was cut");
    assert!(
        out.starts_with(b"HTTP/1.1 200 OK\r\n") && out.ends_with(b"\r\n\r\nabc"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(began.elapsed() >= Duration::from_millis(500) && began.elapsed() < Duration::from_secs(3));
    let lines = t.audit_at_least(2).await;
    let cut = line("close", "-", "upstream_timeout", "ok.test");
    assert_eq!(summary(&lines), [line("decision", "allow", "-", "ok.test"), cut]);
    assert_eq!(lines[1]["bytes_down"], 3);
}

// === DNS faults ===

// A pinned name with no address, and lookups through `[resolve] upstream` pointed at a DNS server
// of the test's own on loopback (`support::dns`) that times out, fails or answers nothing. (A
// name whose every address is refused is `internal_address`, in tests/explicit.rs.)

/// Rules whose `*.dns.test` names are resolved by `dns` (within 1 s), allowed on `port`.
fn dns_rules(dns: SocketAddr, port: u16) -> String {
    format!(
        "[resolve]\nupstream = [\"{dns}\"]\ntimeout = \"1s\"\n\
         [[rule]]\nname = \"dns\"\naction = \"allow\"\nhosts = [\"*.dns.test\"]\nports = [{port}]\ntls_only = false\n"
    )
}

#[tokio::test]
async fn a_lookup_that_times_out_fails_or_finds_nothing_gets_its_status_and_line_and_nothing_is_dialled() {
    let _shared = GATE.read().await;
    let dns = support::dns::DnsServer::start().await;
    let origin = HostOrigin::start().await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&rules(port, &dns_rules(dns.addr, port))).await;
    let cases = [
        ("ok.dns.test", "HTTP/1.1 200 Connection established", None),
        ("slow.dns.test", "HTTP/1.1 504 Gateway Timeout", Some("resolve_timeout")),
        ("fail.dns.test", "HTTP/1.1 502 Bad Gateway", Some("resolve_failed")),
        ("nothing.dns.test", "HTTP/1.1 502 Bad Gateway", Some("resolve_failed")),
        ("missing.dns.test", "HTTP/1.1 502 Bad Gateway", Some("resolve_failed")),
    ];
    for (name, want_status, want_reason) in cases {
        for req in [connect(name, port), get(name, port, "/")] {
            let began = Instant::now();
            // An open tunnel and a kept-alive response do not end by themselves: read for a while.
            let limit = if want_reason.is_none() { Duration::from_millis(500) } else { WAIT };
            let (resp, _) = raw_exchange(proxy.addr, req.as_bytes(), limit).await;
            let (status, reason) = status_and_reason(&resp);
            if want_reason.is_none() {
                // The lookup works: CONNECT is established, and the forwarded GET is served.
                let served = status.starts_with("HTTP/1.1 200");
                assert!(served, "{req}: {}", String::from_utf8_lossy(&resp));
                continue;
            }
            assert_eq!((status.as_str(), reason.as_deref()), (want_status, want_reason), "{req}");
            let took = began.elapsed();
            assert!(took < Duration::from_secs(3), "{req}: answered after {took:?}, past [resolve] timeout");
        }
    }
    let lines = proxy.audit_at_least(2 * 5 + 2).await;
    let refusals: Vec<_> = summary(&lines).into_iter().filter(|l| l.1 == "fail").collect();
    let fail = |reason: &str, host: &str| vec![line("decision", "fail", reason, host); 2];
    let want = [
        fail("resolve_timeout", "slow.dns.test"),
        fail("resolve_failed", "fail.dns.test"),
        fail("resolve_failed", "nothing.dns.test"),
        fail("resolve_failed", "missing.dns.test"),
    ]
    .concat();
    assert_eq!(refusals, want);
    assert_eq!(origin.hosts().len(), 1, "only the name that resolved reached the origin (the GET)");

    // A name no rule allows is refused before any question is asked: the question itself could
    // carry data out.
    let (resp, _) = raw_exchange(proxy.addr, connect("leak.evil.test", port).as_bytes(), WAIT).await;
    assert_eq!(status_and_reason(&resp).1.as_deref(), Some("no_rule"));
    let asked = dns.asked();
    assert!(asked.iter().all(|q| q.contains(".dns.test.")), "only allowed names were asked: {asked:?}");
    assert!(asked.iter().any(|q| q.starts_with("slow.dns.test.")), "the upstream was asked: {asked:?}");
}

#[tokio::test]
async fn a_name_that_resolves_to_nothing_is_502_resolve_failed_on_every_listener() {
    let _shared = GATE.read().await;
    let origin = HostOrigin::start().await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&rules(port, "")).await;
    for req in [connect("empty.test", port), get("empty.test", port, "/")] {
        let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), WAIT).await;
        let (status, reason) = status_and_reason(&resp);
        assert_eq!(
            (status.as_str(), reason.as_deref(), ending),
            ("HTTP/1.1 502 Bad Gateway", Some("resolve_failed"), Ending::Eof),
            "{req}"
        );
    }
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(summary(&lines), vec![line("decision", "fail", "resolve_failed", "empty.test"); 2]);
    assert_eq!(lines.iter().map(|l| l["rule"].clone()).collect::<Vec<_>>(), [Value::Null, Value::Null]);

    // The plain listener: the name, not the original destination, is what is dialled, so a name
    // with no address is not sent to the original destination instead.
    let t = Transparent::new(&rules(port, ""));
    let mut c = t.connect(egress_proxy::proxy::transparent::Redirect::Plain, origin.addr).await;
    c.write_all(format!("GET / HTTP/1.1\r\nHost: empty.test:{port}\r\n\r\n").as_bytes()).await.unwrap();
    let (out, ending) = read_rest(&mut c).await;
    let (status, reason) = status_and_reason(&out);
    assert_eq!(
        (status.as_str(), reason.as_deref(), ending),
        ("HTTP/1.1 502 Bad Gateway", Some("resolve_failed"), Ending::Eof)
    );
    let lines = t.audit_at_least(1).await;
    assert_eq!(summary(&lines), [line("decision", "fail", "resolve_failed", "empty.test")]);
    assert_eq!(origin.accepted(), 0, "nothing reached the original destination");
}

// === leaks ===

/// File descriptors open in this process now.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// `refused` CONNECTs to a name no rule allows (403), `allowed` tunnels to the echo origin
/// (opened, used, closed), and `dns_faults` CONNECTs to names whose lookup times out, fails or
/// finds nothing (502/504), 50 at a time.
async fn burst(proxy: SocketAddr, port: u16, refused: usize, allowed: usize, dns_faults: usize) {
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..refused + allowed + dns_faults {
        if jobs.len() >= 50 {
            jobs.join_next().await.unwrap().unwrap();
        }
        jobs.spawn(async move {
            if i < refused {
                let (resp, ending) = raw_exchange(proxy, connect("nobody.test", port).as_bytes(), WAIT).await;
                assert!(resp.starts_with(b"HTTP/1.1 403 ") && ending == Ending::Eof);
            } else if i < refused + allowed {
                drop(tunnel_from(proxy, None, port).await);
            } else {
                let name = ["fail.dns.test", "nothing.dns.test", "slow.dns.test", "missing.dns.test"][i % 4];
                let (resp, ending) = raw_exchange(proxy, connect(name, port).as_bytes(), WAIT).await;
                let refused = resp.starts_with(b"HTTP/1.1 502 ") || resp.starts_with(b"HTTP/1.1 504 ");
                assert!(refused && ending == Ending::Eof, "{name}: {}", String::from_utf8_lossy(&resp));
            }
        });
    }
    while let Some(done) = jobs.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_short_connections_and_failed_lookups_leaves_no_fd_task_or_open_tunnel_behind() {
    // Alone in the process: every other test here waits, so the fd count is this test's own.
    let _alone = GATE.write().await;
    let echo = echo_origin().await;
    let port = echo.port();
    let dns = support::dns::DnsServer::start().await;
    let proxy = TestProxy::start(&rules(port, &dns_rules(dns.addr, port))).await;
    let runtime = tokio::runtime::Handle::current().metrics();
    // A first, small burst, so that whatever the runtime or the proxy opens once and keeps
    // (the blocking pool, pipes, buffers) is in the baseline.
    burst(proxy.addr, port, 20, 20, 20).await;
    let idle = proxy.audit_at_least(20 + 2 * 20 + 20).await.len();
    assert_eq!(idle, 80);
    // The warm-up's connections close asynchronously (echo tasks, close lines): let them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds, tasks) = (open_fds(), runtime.num_alive_tasks());

    burst(proxy.addr, port, 200, 200, 100).await;
    let lines = proxy.audit_at_least(80 + 200 + 2 * 200 + 100).await;
    // Slack for descriptors the process may hold for a moment apart from the proxy's: the test
    // harness's own output capture, the runtime's timer and I/O driver registrations. The
    // connections themselves must all be gone: 400 of them would be 1,000+ descriptors.
    const SLACK: usize = 10;
    // Within 5 s, looked at every 20 ms.
    for _ in 0..250 {
        if open_fds() <= fds + SLACK && runtime.num_alive_tasks() <= tasks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (fds_after, tasks_after) = (open_fds(), runtime.num_alive_tasks());
    assert!(fds_after <= fds + SLACK, "{fds} descriptors before the burst, {fds_after} after");
    assert!(tasks_after <= tasks, "{tasks} tasks before the burst, {tasks_after} after");

    let burst_lines = summary(&lines[80..]);
    let count = |want: (&str, &str, &str, &str)| {
        burst_lines.iter().filter(|l| **l == line(want.0, want.1, want.2, want.3)).count()
    };
    assert_eq!(count(("decision", "deny", "no_rule", "nobody.test")), 200);
    assert_eq!(count(("decision", "allow", "-", "ok.test")), 200);
    assert_eq!(count(("close", "-", "-", "ok.test")), 200);
    assert_eq!(count(("decision", "fail", "resolve_timeout", "slow.dns.test")), 25);
    assert_eq!(burst_lines.iter().filter(|l| l.2 == "resolve_failed").count(), 75);
    assert_eq!(burst_lines.len(), 700);
    let metrics = admin_get(proxy.admin_addr, "/metrics").await;
    assert_eq!(sample(&metrics, "egress_proxy_open_tunnels{listener=\"http\"}"), Some(0.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "egress_proxy_decisions_total{decision=\"allow\",listener=\"http\",reason=\"\",rule=\"ok\"}"),
        Some(220.0)
    );
}

// === integrity ===

/// SHA-256 from ring (through rustls's provider, a dev-dependency already): its assembly runs at
/// full speed in the unoptimised test profile, where `sha2` manages about 24 MiB/s on the
/// 2-core development machine, too slow for 2 GiB.
fn sha256_context() -> Box<dyn rustls::crypto::hash::Context> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let hash = suite.tls13().expect("a TLS 1.3 suite").common.hash_provider;
    assert_eq!(hash.algorithm(), rustls::crypto::hash::HashAlgorithm::SHA256);
    hash.start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_tunnels_carry_5_mib_each_way_byte_for_byte() {
    let _shared = GATE.read().await;
    const TUNNELS: usize = 200;
    const SIZE: usize = 5 * 1024 * 1024;
    let echo = echo_origin().await;
    let port = echo.port();
    let proxy = TestProxy::start(&rules(port, "")).await;
    // One pseudo-random block; tunnel i sends its own tag, then the block rotated by its own
    // offset, so that no two tunnels carry the same bytes at the same place.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let block: Arc<Vec<u8>> = Arc::new(
        (0..SIZE / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect(),
    );
    let began = Instant::now();
    let mut tunnels = tokio::task::JoinSet::new();
    for i in 0..TUNNELS {
        let block = block.clone();
        tunnels.spawn(async move {
            let tag = format!("tunnel {i:03}\n").into_bytes();
            let at = (i * 26_041) % SIZE;
            let s = connect_tunnel(proxy.addr, "ok.test", port).await;
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let mut sent = sha256_context();
                let mut n = 0;
                for part in [&tag[..], &block[at..], &block[..at]] {
                    for chunk in part.chunks(64 * 1024) {
                        sent.update(chunk);
                        w.write_all(chunk).await.unwrap();
                        n += chunk.len();
                    }
                }
                w.shutdown().await.unwrap();
                (n, sent.finish().as_ref().to_vec())
            });
            let mut received = sha256_context();
            let mut n = 0;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = r.read(&mut buf).await.unwrap();
                if got == 0 {
                    break;
                }
                received.update(&buf[..got]);
                n += got;
            }
            let (sent_n, sent_hash) = writer.await.unwrap();
            assert_eq!((n, received.finish().as_ref().to_vec()), (sent_n, sent_hash), "tunnel {i}");
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tunnels.join_next().await {
        total += n.unwrap();
    }
    let tagged = SIZE + "tunnel 000\n".len();
    assert_eq!(total, TUNNELS * tagged);
    let took = began.elapsed();
    let lines = proxy.audit_at_least(2 * TUNNELS).await;
    let closes: Vec<&Value> = lines.iter().filter(|l| l["event"] == "close").collect();
    assert_eq!(closes.len(), TUNNELS);
    for c in closes {
        assert_eq!(
            (c["bytes_up"].as_u64(), c["bytes_down"].as_u64()),
            (Some(tagged as u64), Some(tagged as u64)),
            "{c}"
        );
    }
    eprintln!("{TUNNELS} tunnels x {SIZE} bytes each way in {took:?}");
}

//! The explicit proxy end to end, on loopback: CONNECT and plain HTTP forwarding with real clients
//! (reqwest and the curl binary), refusals, limits, and graceful shutdown.
#![allow(clippy::disallowed_methods)]

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMES: &[&str] = &["ml.azure.com", "mcr.microsoft.com", "evil.example.com"];

/// Rules allowing ml.azure.com and mcr.microsoft.com on the origin's port, pinned to loopback.
fn rules_for(origin: std::net::SocketAddr, extra: &str) -> String {
    let port = origin.port();
    format!(
        "[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\"mcr.microsoft.com\" = [\"127.0.0.1\"]\n\
         \"evil.example.com\" = [\"127.0.0.1\"]\n\"pinned.azure.com\" = [\"10.0.0.5\"]\n\"empty.azure.com\" = []\n\
         [[rule]]\nname = \"azureml\"\naction = \"allow\"\nhosts = [\"ml.azure.com\", \"mcr.microsoft.com\", \"pinned.azure.com\", \"empty.azure.com\"]\nports = [{port}]\n\
         {extra}"
    )
}

/// `rules_for`, for tunnels that carry bytes that are not TLS (the echo origin): `tls_only = false`.
fn echo_rules_for(origin: std::net::SocketAddr, extra: &str) -> String {
    rules_for(origin, &format!("tls_only = false\n{extra}"))
}

fn decisions(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["event"] == "decision").collect()
}

#[tokio::test]
async fn allowed_name_gets_its_page_and_a_10_mb_body_intact() {
    let origin = TlsOrigin::start(NAMES).await;
    let proxy = TestProxy::start(&rules_for(origin.addr, "")).await;
    let client = proxy.reqwest(&origin.ca_pem);
    let base = format!("https://ml.azure.com:{}", origin.addr.port());

    let page = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap(), "hello from ml.azure.com");

    let big = client.get(format!("{base}/big")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(big.len(), BIG);
    assert_eq!(sha256(&big), sha256(&big_body()));

    drop(client); // closes the pooled tunnel, which writes its close line
    let lines = proxy.audit_at_least(2).await;
    let allow = decisions(&lines);
    assert!(allow.iter().all(|d| d["decision"] == "allow" && d["rule"] == "azureml" && d["method"] == "CONNECT"));
    assert_eq!(allow[0]["host"], "ml.azure.com");
    assert_eq!(allow[0]["dst_addr"], format!("127.0.0.1:{}", origin.addr.port()));
    assert_eq!(allow[0]["listener"], "http");
    let closes: Vec<&Value> = lines.iter().filter(|l| l["event"] == "close").collect();
    assert!(closes.iter().any(|c| c["bytes_down"].as_u64().unwrap() > BIG as u64), "{closes:#?}");
    assert!(closes.iter().all(|c| c["bytes_up"].as_u64().unwrap() > 0 && c["rule"] == "azureml"));
}

#[tokio::test]
async fn curl_through_the_proxy_gets_the_page_and_is_refused_elsewhere() {
    let origin = TlsOrigin::start(NAMES).await;
    let proxy = TestProxy::start(&rules_for(origin.addr, "")).await;
    let port = origin.addr.port();
    let (proxy_addr, ca_path) = (proxy.addr, origin.ca_path.clone());
    let curl = move |host: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--noproxy", "", "-x", &format!("http://{proxy_addr}")])
            .arg("--cacert")
            .arg(&ca_path)
            .args(["-w", "\n%{http_connect}", &format!("https://{host}:{port}/")])
            .output()
            .expect("the curl binary is needed (.ci/run installs it)");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let (ok, denied) =
        tokio::task::spawn_blocking(move || (curl("mcr.microsoft.com"), curl("evil.example.com"))).await.unwrap();
    assert_eq!(ok, "hello from mcr.microsoft.com\n200");
    assert_eq!(denied, "\n403");
}

#[tokio::test]
async fn denied_name_gets_403_with_reason_and_one_audit_line_and_is_never_resolved() {
    let origin = TlsOrigin::start(NAMES).await;
    let proxy = TestProxy::start(&rules_for(origin.addr, "")).await;
    let req =
        format!("CONNECT evil.example.com:{0} HTTP/1.1\r\nHost: evil.example.com:{0}\r\n\r\n", origin.addr.port());
    let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(resp.contains("x-egress-deny-reason: no_rule\r\n"), "{resp}");
    assert!(resp.ends_with("egress-proxy: refused: no_rule\n"), "{resp}");
    assert_eq!(ending, Ending::Eof, "the connection is closed after a refusal");
    assert_eq!(proxy.state.resolver.lookups(), 0, "a refused name is never resolved");
    let lines = proxy.audit();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let l = &lines[0];
    assert_eq!(
        (l["decision"].as_str(), l["reason"].as_str(), l["host"].as_str()),
        (Some("deny"), Some("no_rule"), Some("evil.example.com"))
    );
    assert_eq!(l["port"], origin.addr.port());
    assert!(l["dst_addr"].is_null() && l["rule"].is_null());
    assert!(l["ts"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn denied_port_gets_port_not_allowed() {
    let proxy = TestProxy::start(&rules_for("127.0.0.1:9".parse().unwrap(), "")).await;
    let client = proxy.reqwest(&TlsOrigin::start(NAMES).await.ca_pem);
    let err = client.get("https://ml.azure.com:8443/").send().await.unwrap_err();
    assert!(format!("{err:?}").contains("TunnelUnsuccessful"), "{err:?}");
    let lines = proxy.audit();
    assert_eq!(lines[0]["reason"], "port_not_allowed");
    assert_eq!(lines[0]["rule"], "azureml");
}

#[tokio::test]
async fn allowed_name_pinned_to_a_private_address_is_refused_before_any_connect() {
    let proxy = TestProxy::start(&rules_for("127.0.0.1:443".parse().unwrap(), "")).await;
    let (resp, _) =
        raw_exchange(proxy.addr, b"CONNECT pinned.azure.com:443 HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("x-egress-deny-reason: internal_address"), "{resp}");
    let lines = proxy.audit();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0]["reason"].as_str(), lines[0]["dst_addr"].is_null()), (Some("internal_address"), true));
    assert_eq!(proxy.state.resolver.lookups(), 1, "resolved once, then refused on the address");
}

#[tokio::test]
async fn ip_literals_are_decided_on_the_address() {
    let echo = echo_origin().await;
    let extra = format!(
        "[[rule]]\nname = \"loopback-one\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{}]\ntls_only = false\n",
        echo.port()
    );
    let proxy = TestProxy::start(&echo_rules_for(echo, &extra)).await;
    let inside = format!("CONNECT 127.0.0.1:{0} HTTP/1.1\r\n\r\nping", echo.port());
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(inside.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"ping") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&got));
    drop(s);

    let outside = format!("CONNECT 127.0.0.2:{0} HTTP/1.1\r\n\r\n", echo.port());
    let (resp, _) = raw_exchange(proxy.addr, outside.as_bytes(), Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&resp).contains("x-egress-deny-reason: no_rule"));
    let (resp, _) =
        raw_exchange(proxy.addr, b"CONNECT [::ffff:7f00:1]:1 HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        String::from_utf8_lossy(&resp).contains("x-egress-deny-reason: port_not_allowed"),
        "mapped IPv6 is the IPv4 address"
    );
    let lines = proxy.audit_at_least(3).await;
    assert_eq!(decisions(&lines)[0]["rule"], "loopback-one");
}

#[tokio::test]
async fn bytes_sent_before_the_200_are_delivered_after_it() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&echo_rules_for(echo, "")).await;
    let req = format!("CONNECT ml.azure.com:{} HTTP/1.1\r\n\r\nearly bytes", echo.port());
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nearly bytes"), "{out}");
}

#[tokio::test]
async fn plain_http_is_forwarded_both_ways_without_hop_by_hop_headers() {
    let origin = http_origin().await;
    let proxy = TestProxy::start(&rules_for(origin, "")).await;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", proxy.addr)).unwrap())
        .build()
        .unwrap();
    let base = format!("http://ml.azure.com:{}", origin.port());

    let big = client.get(format!("{base}/big")).send().await.unwrap();
    assert_eq!(big.status(), 200);
    assert!(big.headers().get("keep-alive").is_none(), "hop-by-hop response header removed");
    assert_eq!(big.headers()["x-origin"], "yes");
    assert_eq!(sha256(&big.bytes().await.unwrap()), sha256(&big_body()));

    let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let echo = client
        .post(format!("{base}/echo"))
        .header("proxy-connection", "keep-alive")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("x-end-to-end", "kept")
        .body(upload.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (summary, headers) = echo.split_once('\n').unwrap();
    assert_eq!(summary, format!("{} {}", upload.len(), sha256(&upload)));
    let headers: Vec<&str> = headers.split(',').collect();
    assert!(headers.contains(&"x-end-to-end") && headers.contains(&"host"), "{headers:?}");
    for hop in ["proxy-connection", "connection", "x-secret", "keep-alive"] {
        assert!(!headers.contains(&hop), "{hop} reached the origin: {headers:?}");
    }
    drop(client);
    let lines = proxy.audit_at_least(4).await;
    // Up: the body and the head the origin got (its request line and header fields).
    let up = upload.len() as u64;
    let post_close = lines
        .iter()
        .find(|l| l["event"] == "close" && l["bytes_up"].as_u64().is_some_and(|b| (up + 50..up + 1024).contains(&b)));
    assert!(post_close.is_some(), "{lines:#?}");
    assert_eq!(decisions(&lines)[1]["method"], "POST");
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let proxy = TestProxy::start(&rules_for("127.0.0.1:443".parse().unwrap(), "")).await;
    let cases: &[&[u8]] = &[
        b"GET /index.html HTTP/1.1\r\nHost: ml.azure.com\r\n\r\n",
        b"CONNECT ml.azure.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"CONNECT ml.azure.com:443 HTTP/1.1\r\nHost: ml.azure.com:443\r\nHost: evil.example.com:443\r\n\r\n",
        b"CONNECT ml.azure.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n",
        b"GET http://ml.azure.com/ HTTP/1.1\r\nHost: evil.example.com\r\n\r\n",
        b"CONNECT ml.azure.com:443 HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n",
        b"CONNECT ml.azure.com HTTP/1.1\r\n\r\n",
        b"GET https://ml.azure.com/ HTTP/1.1\r\nHost: ml.azure.com\r\n\r\n",
        b"GET http://user@ml.azure.com/ HTTP/1.1\r\n\r\n",
        b"CONNECT user@ml.azure.com:443 HTTP/1.1\r\n\r\n",
    ];
    for case in cases {
        // Each case is one write the proxy reads whole before answering, so nothing is left
        // unread to turn its close into a reset.
        let (resp, ending) = raw_exchange(proxy.addr, case, Duration::from_secs(5)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400 "), "{}\n→ {resp}", String::from_utf8_lossy(case));
        assert_eq!(ending, Ending::Eof, "{}", String::from_utf8_lossy(case));
    }
    assert_eq!(proxy.state.resolver.lookups(), 0);
}

#[tokio::test]
async fn upstream_failures_are_502_and_audited_as_fail() {
    let port = closed_port();
    let proxy = TestProxy::start(&rules_for(format!("127.0.0.1:{port}").parse().unwrap(), "")).await;
    let (resp, _) = raw_exchange(
        proxy.addr,
        format!("CONNECT ml.azure.com:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 502 ") && resp.contains("x-egress-deny-reason: upstream_unreachable"), "{resp}");
    let (resp, _) = raw_exchange(
        proxy.addr,
        format!("CONNECT empty.azure.com:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 502 ") && resp.contains("x-egress-deny-reason: resolve_failed"), "{resp}");
    let lines = proxy.audit();
    assert_eq!(
        lines.iter().map(|l| (l["decision"].as_str().unwrap(), l["reason"].as_str().unwrap())).collect::<Vec<_>>(),
        [("fail", "upstream_unreachable"), ("fail", "resolve_failed")]
    );
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_and_logged() {
    let proxy =
        TestProxy::start(&rules_for("127.0.0.1:443".parse().unwrap(), "[limits]\nrequest_head_timeout = \"500ms\"\n"))
            .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"CONNECT ml.azure.com:443 HTTP/1.1\r\nX-Slow: ").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Keep trickling a byte at a time; the proxy must still drop us.
            if s.write_all(b"a").await.is_err() {
                break;
            }
            tokio::select! {
                r = s.read_to_end(&mut out) => { let _ = r; break; }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the proxy did not drop a slow client");
    assert!(started.elapsed() < Duration::from_secs(3));
    let lines = proxy.audit_at_least(1).await;
    assert_eq!(lines[0]["reason"], "request_head_timeout");
}

#[tokio::test]
async fn connection_limit_is_answered_503() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&echo_rules_for(echo, "[limits]\nmax_connections = 1\n")).await;
    let held = hold_tunnel(proxy.addr, echo).await;
    let (resp, _) =
        raw_exchange(proxy.addr, b"CONNECT ml.azure.com:443 HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 503 ") && resp.contains("x-egress-deny-reason: connection_limit"), "{resp}");
    drop(held);
    // The slot comes back when the tunnel closes.
    for _ in 0..100 {
        let (resp, _) =
            raw_exchange(proxy.addr, b"CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
        if resp.starts_with(b"HTTP/1.1 403") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the connection slot was never given back");
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_download_finish() {
    let origin = TlsOrigin::start(NAMES).await;
    let proxy = TestProxy::start(&rules_for(origin.addr, "")).await;
    let client = proxy.reqwest(&origin.ca_pem);
    let mut resp = client.get(format!("https://ml.azure.com:{}/slow", origin.addr.port())).send().await.unwrap();
    let mut body = resp.chunk().await.unwrap().unwrap().to_vec();
    proxy.shutdown.cancel();
    // New connections are refused once the listener is closed: within 5 s, tried every 20 ms.
    // Until then a connect gets through (and is dropped at once), or is reset when the listener
    // closes with it still in the accept queue; neither is the closed port this waits for.
    let mut refused = false;
    for _ in 0..250 {
        match tokio::net::TcpStream::connect(proxy.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connecting after shutdown: {e}"),
            Ok(early) => drop(early),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting 5 s after shutdown");
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(sha256(&body), sha256(&big_body()));
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), proxy.done).await.expect("run returned after draining").unwrap();
}

#[tokio::test]
async fn per_client_limit_is_answered_503() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&echo_rules_for(echo, "[limits]\nmax_connections_per_client = 1\n")).await;
    let _held = hold_tunnel(proxy.addr, echo).await;
    let (resp, _) =
        raw_exchange(proxy.addr, b"CONNECT ml.azure.com:443 HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&resp).contains("x-egress-deny-reason: connection_limit"));
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(lines[1]["reason"], "connection_limit");
}

#[tokio::test]
async fn upstream_connect_timeout_is_504() {
    // A listener whose accept queue is full drops new SYNs, so a connect to it hangs.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let full: std::net::SocketAddr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..3 {
        fillers.push(tokio::spawn(tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(full))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxy = TestProxy::start(&rules_for(full, "[limits]\nconnect_timeout = \"300ms\"\n")).await;
    let started = std::time::Instant::now();
    let (resp, _) = raw_exchange(
        proxy.addr,
        format!("CONNECT ml.azure.com:{} HTTP/1.1\r\n\r\n", full.port()).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 504 ") && resp.contains("x-egress-deny-reason: upstream_timeout"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(proxy.audit()[0]["decision"], "fail");
    drop(socket);
}

/// A TLS client over a CONNECT tunnel to `connect_host`, sending `sni` in its ClientHello.
async fn tls_through(
    proxy: std::net::SocketAddr,
    connect_host: &str,
    port: u16,
    sni: &str,
    ca_pem: &str,
) -> std::io::Result<String> {
    https_get(connect_tunnel(proxy, connect_host, port).await, sni, ca_pem).await
}

#[tokio::test]
async fn a_server_name_other_than_the_connect_host_is_refused_as_sni_mismatch() {
    let origin = TlsOrigin::start(NAMES).await;
    let proxy = TestProxy::start(&rules_for(origin.addr, "")).await;
    let port = origin.addr.port();
    // Domain fronting: CONNECT to an allowed name, then ask the shared front end for another one.
    let fronted = tls_through(proxy.addr, "ml.azure.com", port, "mcr.microsoft.com", &origin.ca_pem).await;
    // The CONNECT listener closes a refused tunnel cleanly (no SO_LINGER, and the whole hello was
    // read), so the client's handshake meets the end of the stream, not a reset.
    assert_eq!(fronted.map_err(|e| e.kind()), Err(std::io::ErrorKind::UnexpectedEof));
    let honest = tls_through(proxy.addr, "ml.azure.com", port, "ml.azure.com", &origin.ca_pem).await.unwrap();
    assert!(honest.ends_with("hello from ml.azure.com"), "{honest}");
    let lines = proxy.audit_at_least(3).await;
    let d = decisions(&lines);
    assert_eq!(
        (d[0]["decision"].as_str(), d[0]["reason"].as_str(), d[0]["rule"].as_str()),
        (Some("deny"), Some("sni_mismatch"), Some("azureml"))
    );
    // Where the bytes were meant to go (found in review: the fronted name was nowhere).
    assert_eq!((d[0]["host"].as_str(), d[0]["sni"].as_str()), (Some("ml.azure.com"), Some("mcr.microsoft.com")));
    assert_eq!(d[1]["decision"], "allow");
    assert!(d[1].get("sni").is_none(), "a hello that names the host decided adds nothing: {:?}", d[1]);
}

#[tokio::test]
async fn sni_check_can_be_switched_off_per_rule() {
    let origin = TlsOrigin::start(NAMES).await;
    let port = origin.addr.port();
    let rules = format!(
        "[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n[[rule]]\nname = \"fronting-ok\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{port}]\nsni_check = false\n"
    );
    let proxy = TestProxy::start(&rules).await;
    let out = tls_through(proxy.addr, "ml.azure.com", port, "mcr.microsoft.com", &origin.ca_pem).await.unwrap();
    assert!(out.ends_with("hello from mcr.microsoft.com"), "{out}");
}

#[tokio::test]
async fn encrypted_client_hello_is_refused_unless_the_rule_allows_it() {
    let echo = echo_origin().await;
    let port = echo.port();
    let extra = format!("[[rule]]\nname = \"ech-ok\"\naction = \"allow\"\nhosts = [\"evil.example.com\"]\nports = [{port}]\nallow_ech = true\n");
    let proxy = TestProxy::start(&rules_for(echo, &extra)).await;
    for (host, want_echo) in [("ml.azure.com", false), ("evil.example.com", true)] {
        let hello = hello_with_ech(host);
        let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n").into_bytes();
        req.extend_from_slice(&hello);
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut resp = Vec::new();
        let mut buf = [0u8; 1024];
        // Until the hello comes back through the echo origin, or the proxy closes the tunnel:
        // cleanly, since the CONNECT listener sets no SO_LINGER and has read the whole hello (a
        // reset fails the unwrap).
        let mut closed = false;
        while !resp.ends_with(&hello) {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap() {
                0 => {
                    closed = true;
                    break;
                }
                n => resp.extend_from_slice(&buf[..n]),
            }
        }
        let echoed = resp.ends_with(&hello);
        assert_eq!((echoed, closed), (want_echo, !want_echo), "{host}");
        assert!(resp.starts_with(b"HTTP/1.1 200 OK\r\n"), "{host}");
    }
    // An alert record before the hello does not get a hello past the check.
    let mut req = format!("CONNECT ml.azure.com:{port} HTTP/1.1\r\n\r\n").into_bytes();
    req.extend_from_slice(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00]);
    req.extend_from_slice(&hello_with_ech("mcr.microsoft.com"));
    let (resp, _) = raw_exchange(proxy.addr, &req, Duration::from_secs(5)).await;
    assert!(resp.starts_with(b"HTTP/1.1 200") && resp.ends_with(b"\r\n\r\n"), "nothing after the 200 head");
    let lines = proxy.audit_at_least(3).await;
    let d = decisions(&lines);
    assert_eq!(d[2]["reason"], "invalid_host");
    assert_eq!((d[0]["reason"].as_str(), d[0]["host"].as_str()), (Some("ech_present"), Some("ml.azure.com")));
    assert_eq!((d[1]["decision"].as_str(), d[1]["rule"].as_str()), (Some("allow"), Some("ech-ok")));
}

/// Opens a CONNECT tunnel to the echo origin and proves it carries bytes. Not TLS: the tunnel
/// opens (and is audited) as soon as the first bytes show it.
async fn hold_tunnel(proxy: std::net::SocketAddr, echo: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut held = tokio::net::TcpStream::connect(proxy).await.unwrap();
    held.write_all(format!("CONNECT ml.azure.com:{} HTTP/1.1\r\n\r\nping", echo.port()).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"ping") {
        let n = held.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    held
}

#[tokio::test]
async fn a_forwarded_body_that_stalls_is_cut_after_the_idle_timeout() {
    // An origin that promises 100 bytes, sends 3, then holds the connection open.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = stall.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = stall.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let rules = format!(
        "[limits]\nidle_timeout = \"500ms\"\n[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"plain\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{}]\n",
        origin.port()
    );
    let proxy = TestProxy::start(&rules).await;
    let req = format!("GET http://ml.azure.com:{0}/ HTTP/1.1\r\nHost: ml.azure.com:{0}\r\n\r\n", origin.port());
    let started = std::time::Instant::now();
    let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(ending, Ending::Eof, "the stalled body was not cut");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(resp.starts_with(b"HTTP/1.1 200") && resp.ends_with(b"abc"), "{}", String::from_utf8_lossy(&resp));
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(lines[1]["event"], "close");
    assert_eq!(lines[1]["bytes_down"], 3);
}

#[tokio::test]
async fn a_forwarded_request_is_allowed_in_the_log_before_it_reaches_the_origin() {
    // An origin that reads the request, reports it, and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = silent.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = silent.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let _ = got_tx.send(buf[..n].to_vec());
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let rules = format!(
        "[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"plain\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{}]\n",
        origin.port()
    );
    let proxy = TestProxy::start(&rules).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET http://ml.azure.com:{0}/?exfil=1 HTTP/1.1\r\nHost: ml.azure.com:{0}\r\n\r\n", origin.port());
    client.write_all(req.as_bytes()).await.unwrap();
    let reached = tokio::time::timeout(Duration::from_secs(5), got_rx).await.unwrap().unwrap();
    assert!(reached.starts_with(b"GET /?exfil=1 HTTP/1.1"), "the request reached the origin");
    // The client resets before the origin answers.
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    // The allow line was written before the request went upstream; the close line when the client
    // left.
    let lines = proxy.audit_at_least(2).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(
        (&lines[0]["event"], &lines[0]["decision"], &lines[0]["host"], &lines[0]["method"]),
        (&"decision".into(), &"allow".into(), &"ml.azure.com".into(), &"GET".into())
    );
    assert_eq!((&lines[1]["event"], &lines[1]["id"]), (&"close".into(), &lines[0]["id"]));
}

#[tokio::test]
async fn a_tunnel_must_begin_with_a_tls_hello_unless_the_rule_says_tls_only_false() {
    let echo = echo_origin().await;
    let port = echo.port();
    let proxy = TestProxy::start(&rules_for(echo, "")).await;
    let smuggled = [
        format!("GET / HTTP/1.1\r\nHost: evil.example.com:{port}\r\n\r\n"),
        format!("CONNECT evil.example.com:{port} HTTP/1.1\r\n\r\n"),
    ];
    for inner in &smuggled {
        let req = format!("CONNECT ml.azure.com:{port} HTTP/1.1\r\n\r\n{inner}");
        let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("\r\n\r\n"), "nothing came back: {resp}");
        assert_eq!(ending, Ending::Eof, "the tunnel is closed");
    }
    let lines = proxy.audit_at_least(2).await;
    let d: Vec<(&str, &str, &str)> = decisions(&lines)
        .iter()
        .map(|l| (l["decision"].as_str().unwrap(), l["reason"].as_str().unwrap(), l["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(d, [("deny", "not_tls", "azureml"), ("deny", "not_tls", "azureml")]);

    // `tls_only = false` (SSH over CONNECT and the like): the bytes go through.
    let open = TestProxy::start(&echo_rules_for(echo, "")).await;
    let req = format!("CONNECT ml.azure.com:{port} HTTP/1.1\r\n\r\n{}", smuggled[0]);
    let (resp, _) = raw_exchange(open.addr, req.as_bytes(), Duration::from_millis(500)).await;
    assert!(String::from_utf8_lossy(&resp).ends_with(smuggled[0].as_str()), "echoed back");
}

#[tokio::test]
async fn with_names_listed_a_tunnel_to_an_address_must_carry_a_listed_name() {
    let origin = TlsOrigin::start(NAMES).await;
    let port = origin.addr.port();
    let extra = format!(
        "[[rule]]\nname = \"loopback-listed\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{port}]\nnames = \"listed\"\n"
    );
    let proxy = TestProxy::start(&rules_for(origin.addr, &extra)).await;
    // CONNECT to the address, then a server name no host rule allows: refused in the tunnel.
    let unlisted = tls_through(proxy.addr, "127.0.0.1", port, "evil.example.com", &origin.ca_pem).await;
    assert_eq!(unlisted.map_err(|e| e.kind()), Err(std::io::ErrorKind::UnexpectedEof));
    // A name the host rule allows goes through.
    let listed = tls_through(proxy.addr, "127.0.0.1", port, "ml.azure.com", &origin.ca_pem).await.unwrap();
    assert!(listed.ends_with("hello from ml.azure.com"), "{listed}");
    let lines = proxy.audit_at_least(3).await;
    let d = decisions(&lines);
    assert_eq!(
        (d[0]["decision"].as_str(), d[0]["reason"].as_str(), d[0]["host"].as_str()),
        (Some("deny"), Some("no_rule"), Some("127.0.0.1"))
    );
    assert_eq!((d[1]["decision"].as_str(), d[1]["rule"].as_str()), (Some("allow"), Some("loopback-listed")));
}

/// A HelloRetryRequest record (RFC 8446 §4.1.3: a ServerHello whose random is this constant).
fn hello_retry_request() -> Vec<u8> {
    let random = [
        0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91, 0xc2, 0xa2,
        0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
    ];
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&random);
    body.extend_from_slice(&[0, 0x13, 0x01, 0, 0, 0]);
    let mut rec = vec![0x16, 0x03, 0x03, 0, (body.len() + 4) as u8, 0x02, 0, 0, body.len() as u8];
    rec.extend_from_slice(&body);
    rec
}

/// An upstream that answers the first hello with a HelloRetryRequest and reports every byte it
/// got after that.
async fn retrying_upstream() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut first = vec![0u8; 4096];
        let _ = s.read(&mut first).await.unwrap();
        s.write_all(&hello_retry_request()).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        let _ = tx.send(rest);
    });
    (addr, rx)
}

#[tokio::test]
async fn a_second_hello_after_a_retry_request_must_name_the_same_server() {
    let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
    for (second_sni, passes) in [("evil.example.com", false), ("ml.azure.com", true)] {
        let (upstream, got) = retrying_upstream().await;
        let proxy = TestProxy::start(&rules_for(upstream, "")).await;
        let mut s = connect_tunnel(proxy.addr, "ml.azure.com", upstream.port()).await;
        s.write_all(&client_hello("ml.azure.com", &[])).await.unwrap();
        let hrr = hello_retry_request();
        let mut back = vec![0u8; hrr.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, hrr, "the retry request reaches the client");
        let second = [&ccs[..], &client_hello(second_sni, &[])].concat();
        s.write_all(&second).await.unwrap();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let got = got.await.unwrap();
        drop(s); // ends an open tunnel, which writes its close line
        let lines = proxy.audit_at_least(2).await;
        if passes {
            assert_eq!(got, second, "the second hello goes on");
            assert_eq!(lines[1]["reason"], Value::Null);
        } else {
            assert_eq!(ended.expect("the tunnel is closed").map_err(|e| e.kind()), Ok(0));
            assert!(got.is_empty(), "nothing of the second hello went upstream: {got:?}");
            assert_eq!(
                (lines[1]["event"].as_str(), lines[1]["reason"].as_str(), lines[1]["rule"].as_str()),
                (Some("close"), Some("sni_mismatch"), Some("azureml"))
            );
            assert_eq!(lines[1]["sni"], "evil.example.com", "the second hello's name");
        }
    }
}

/// A second hello smuggled in the first flight (found in review): the client sends its hello for
/// the allowed name and, in the same write, the first record of a second hello naming another
/// server, its last extension (GREASE) left open. After the retry request it sends one record
/// that is, on its own, a whole hello for the allowed name, and to the server the rest of that
/// open extension. The proxy sent the first flight's extra bytes on unchecked and checked only the
/// last record; now only the first hello's records go before the retry request, and the second
/// hello is read from where the server would read it.
#[tokio::test]
async fn a_second_hello_pipelined_with_the_first_is_read_as_the_server_reads_it() {
    let first = client_hello("ml.azure.com", &[]);
    let decoy = client_hello("ml.azure.com", &[]);
    let decoy_msg = &decoy[5..];
    let (_, sni) = sni_ext(&[b"evil.example.com"]);
    let mut exts = Vec::new();
    exts.extend_from_slice(&0u16.to_be_bytes());
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni);
    exts.extend_from_slice(&0x7a7au16.to_be_bytes());
    exts.extend_from_slice(&(decoy_msg.len() as u16).to_be_bytes());
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&[0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&((exts.len() + decoy_msg.len()) as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&((body.len() + decoy_msg.len()) as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut pipelined = vec![0x16, 0x03, 0x03];
    pipelined.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    pipelined.extend_from_slice(&hs);
    // The same bytes read two ways: the decoy alone names the allowed server, the server's
    // reading of the whole second flight names the other.
    let sni_of = |b: &[u8]| match egress_proxy::tls::parse(b) {
        Ok(egress_proxy::tls::Parsed::Hello(h)) => h.sni.map(|n| n.to_string()),
        other => panic!("{other:?}"),
    };
    assert_eq!(sni_of(&decoy).as_deref(), Some("ml.azure.com"));
    assert_eq!(sni_of(&[&pipelined[..], &decoy].concat()).as_deref(), Some("evil.example.com"));

    let (upstream, got) = retrying_upstream().await;
    let proxy = TestProxy::start(&rules_for(upstream, "")).await;
    let mut s = connect_tunnel(proxy.addr, "ml.azure.com", upstream.port()).await;
    s.write_all(&[&first[..], &pipelined].concat()).await.unwrap();
    let hrr = hello_retry_request();
    let mut back = vec![0u8; hrr.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hrr, "the retry request reaches the client");
    s.write_all(&decoy).await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert_eq!(ended.expect("the tunnel is closed").map_err(|e| e.kind()), Ok(0));
    let got = got.await.unwrap();
    assert!(!got.windows(16).any(|w| w == b"evil.example.com"), "the other name reached the server: {got:?}");
    let lines = proxy.audit_at_least(2).await;
    assert_eq!((lines[1]["event"].as_str(), lines[1]["reason"].as_str()), (Some("close"), Some("sni_mismatch")));
}

#[tokio::test]
async fn max_request_head_bytes_is_exact() {
    let origin = http_origin().await;
    let proxy = TestProxy::start(&rules_for(origin, "[limits]\nmax_request_head_bytes = 32768\n")).await;
    let head = |len: usize| {
        let start = "GET http://evil.example.com/ HTTP/1.1\r\nHost: evil.example.com\r\nX-Pad: ";
        let pad = "a".repeat(len - start.len() - 4);
        format!("{start}{pad}\r\n\r\n")
    };
    for (len, status) in [(32 * 1024, "403"), (32 * 1024 + 1, "431"), (48 * 1024, "431")] {
        let req = head(len);
        assert_eq!(req.len(), len);
        let (resp, _) = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{len} bytes: {resp}");
    }
}

#[tokio::test]
async fn userinfo_in_a_refused_target_is_redacted_in_the_audit_log() {
    let proxy = TestProxy::start(&rules_for("127.0.0.1:443".parse().unwrap(), "")).await;
    let cases: &[(&[u8], &str)] = &[
        (b"CONNECT alice:S3cret@ml.azure.com:443 HTTP/1.1\r\n\r\n", "[redacted]@ml.azure.com:443"),
        (b"GET http://alice:S3cret@ml.azure.com/ HTTP/1.1\r\n\r\n", "[redacted]@ml.azure.com"),
        (b"GET http://a@b:S3cret@ml.azure.com:8080/x HTTP/1.1\r\n\r\n", "[redacted]@ml.azure.com:8080"),
    ];
    for (req, _) in cases {
        let (resp, _) = raw_exchange(proxy.addr, req, Duration::from_secs(5)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400 "), "{}\n→ {resp}", String::from_utf8_lossy(req));
    }
    let lines = proxy.audit_at_least(cases.len()).await;
    let hosts: Vec<&str> = decisions(&lines).iter().map(|d| d["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, cases.iter().map(|(_, host)| *host).collect::<Vec<_>>());
    assert!(decisions(&lines).iter().all(|d| d["reason"] == "bad_request"), "{lines:#?}");
    let raw = std::fs::read_to_string(&proxy.audit_path).unwrap();
    assert!(!raw.contains("S3cret") && !raw.contains("alice"), "{raw}");
}

#[tokio::test]
async fn with_names_listed_a_tunnel_to_an_address_must_be_tls_even_when_the_rule_allows_other_bytes() {
    let echo = echo_origin().await;
    let port = echo.port();
    let extra = format!(
        "[[rule]]\nname = \"loopback-listed\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{port}]\n\
         names = \"listed\"\ntls_only = false\nsni_check = false\nallow_ech = true\n"
    );
    let proxy = TestProxy::start(&rules_for(echo, &extra)).await;
    // Plaintext would carry its name in a Host header that nothing checks: refused.
    let req = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: evil.example.com\r\n\r\n");
    let (resp, ending) = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("\r\n\r\n"), "nothing echoed: {resp}");
    assert_eq!(ending, Ending::Eof);
    let lines = proxy.audit_at_least(1).await;
    let d = decisions(&lines);
    assert_eq!(
        (d[0]["decision"].as_str(), d[0]["reason"].as_str(), d[0]["rule"].as_str()),
        (Some("deny"), Some("not_tls"), Some("loopback-listed"))
    );
}

/// A client that sends part of a first request head and leaves is audited, as on the `plain`
/// listener: a refusal line, `bad_request`. (Found in review: the explicit listener wrote
/// nothing.)
#[tokio::test]
async fn a_first_request_head_cut_by_the_client_is_audited() {
    let proxy = TestProxy::start(&rules_for("127.0.0.1:9".parse().unwrap(), "")).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"CONNECT evil.example.com:443 HTTP/1.1\r\nX-D: secret").await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let lines = proxy.audit_at_least(1).await;
    let d = decisions(&lines);
    assert_eq!(d.len(), 1, "{lines:#?}");
    assert_eq!((d[0]["decision"].as_str(), d[0]["reason"].as_str()), (Some("deny"), Some("bad_request")));
}

//! The transparent listeners' handlers on loopback, with the original destination handed in as
//! SO_ORIGINAL_DST would give it (the nftables redirect itself is exercised in network namespaces).
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use egress_proxy::proxy::transparent::Redirect;
use serde_json::Value;
use support::origins::Transparent;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The shared transparent harness, with the rules these tests share.
struct Harness(Transparent);

impl Harness {
    fn new(port: u16, extra: &str) -> Self {
        Self(Transparent::new(&format!(
            "{extra}\n\
             [resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\"evil.example.com\" = [\"127.0.0.1\"]\n\
             [[rule]]\nname = \"azureml\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{port}]\n\
             [[rule]]\nname = \"loopback\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{port}]\n"
        )))
    }

    /// A client connection whose server side is served by `listener` as if redirected from `original_dst`.
    async fn connect(&self, listener: Redirect, original_dst: SocketAddr) -> TcpStream {
        self.0.connect(listener, original_dst).await
    }

    async fn audit(&self, n: usize) -> Vec<Value> {
        self.0.audit_at_least(n).await
    }
}

#[tokio::test]
async fn tls_listener_dials_the_names_own_address_and_audits_a_mismatch() {
    let origin = TlsOrigin::start(&["ml.azure.com", "evil.example.com"]).await;
    let port = origin.addr.port();
    let h = Harness::new(port, "");
    let honest: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let elsewhere: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();

    let page = https_get(h.connect(Redirect::Tls, honest).await, "ml.azure.com", &origin.ca_pem).await.unwrap();
    assert!(page.ends_with("hello from ml.azure.com"), "{page}");
    // The client aimed at another address: it reaches ml.azure.com's own address, audited.
    let page = https_get(h.connect(Redirect::Tls, elsewhere).await, "ml.azure.com", &origin.ca_pem).await.unwrap();
    assert!(page.ends_with("hello from ml.azure.com"), "{page}");
    // A refused name is reset (SO_LINGER 0) before anything is sent anywhere.
    let refused = https_get(h.connect(Redirect::Tls, elsewhere).await, "evil.example.com", &origin.ca_pem).await;
    assert_eq!(refused.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));

    let lines = h.audit(5).await;
    let d: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    assert_eq!(
        (d[0]["listener"].as_str(), d[0]["rule"].as_str(), d[0]["note"].is_null()),
        (Some("tls"), Some("azureml"), true)
    );
    assert_eq!(d[1]["original_dst"], elsewhere.to_string());
    assert_eq!(d[1]["dst_addr"], honest.to_string());
    assert_eq!(d[1]["note"], "original_dst_mismatch");
    assert_eq!((d[2]["decision"].as_str(), d[2]["reason"].as_str()), (Some("deny"), Some("no_rule")));
}

#[tokio::test]
async fn an_address_rule_allows_an_unknown_name_but_never_a_denied_one() {
    let origin = TlsOrigin::start(&["evil.example.com", "blocked.example.com"]).await;
    let port = origin.addr.port();
    let deny = format!(
        "[[rule]]\nname = \"no-blocked\"\naction = \"deny\"\nhosts = [\"blocked.example.com\"]\nports = [{port}]\n"
    );
    let h = Harness::new(port, &deny);
    let to_loopback: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // No host rule names evil.example.com, but the address rule allows its original destination.
    let page =
        https_get(h.connect(Redirect::Tls, to_loopback).await, "evil.example.com", &origin.ca_pem).await.unwrap();
    assert!(page.ends_with("hello from evil.example.com"));
    let blocked = https_get(h.connect(Redirect::Tls, to_loopback).await, "blocked.example.com", &origin.ca_pem).await;
    assert_eq!(blocked.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    let lines = h.audit(3).await;
    let d: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    assert_eq!(d[0]["rule"], "loopback");
    assert_eq!((d[1]["reason"].as_str(), d[1]["rule"].as_str()), (Some("denied_by_rule"), Some("no-blocked")));
}

#[tokio::test]
async fn original_dst_mismatch_deny_refuses() {
    let origin = TlsOrigin::start(&["ml.azure.com"]).await;
    let port = origin.addr.port();
    let h = Harness::new(port, "[transparent]\noriginal_dst_mismatch = \"deny\"\n");
    let elsewhere: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let refused = https_get(h.connect(Redirect::Tls, elsewhere).await, "ml.azure.com", &origin.ca_pem).await;
    assert_eq!(refused.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    assert_eq!(h.audit(1).await[0]["reason"], "sni_mismatch");
}

#[tokio::test]
async fn without_sni_the_original_destination_is_decided_on_address_rules() {
    let origin = TlsOrigin::start(&["127.0.0.1"]).await;
    let port = origin.addr.port();
    let h = Harness::new(port, "");
    // rustls sends no SNI for an IP address.
    let page = https_get(h.connect(Redirect::Tls, origin.addr).await, "127.0.0.1", &origin.ca_pem).await.unwrap();
    assert!(page.ends_with("hello from -"), "{page}");
    let d = &h.audit(1).await[0];
    assert_eq!((d["rule"].as_str(), d["host"].as_str()), (Some("loopback"), Some("127.0.0.1")));
}

#[tokio::test]
async fn plain_listener_decides_on_the_host_header() {
    let origin = http_origin().await;
    let h = Harness::new(origin.port(), "");
    let mut c = h.connect(Redirect::Plain, origin).await;
    c.write_all(
        format!("GET / HTTP/1.1\r\nHost: ml.azure.com:{}\r\nConnection: close\r\n\r\n", origin.port()).as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("hello from plain"), "{out}");
    drop(c); // ends the tunnel, which writes its close line
             // Not allowed by name, and the original destination is outside the address rule.
    let elsewhere: SocketAddr = format!("127.0.0.2:{}", origin.port()).parse().unwrap();
    let mut c = h.connect(Redirect::Plain, elsewhere).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: evil.example.com\r\n\r\n").await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    let out = out.to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 403") && out.contains("x-egress-deny-reason: no_rule\r\n"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    let lines = h.audit(3).await;
    let d: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    assert_eq!((d[0]["listener"].as_str(), d[0]["rule"].as_str()), (Some("plain"), Some("azureml")));
    assert_eq!((d[1]["reason"].as_str(), d[1]["host"].as_str()), (Some("no_rule"), Some("evil.example.com")));
}

#[tokio::test]
async fn catch_all_resets_and_logs_the_original_destination() {
    let h = Harness::new(443, "");
    let dst: SocketAddr = "127.0.0.9:22".parse().unwrap();
    let mut c = h.connect(Redirect::CatchAll, dst).await;
    let mut out = Vec::new();
    let read = c.read_to_end(&mut out).await;
    assert_eq!(read.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    assert!(out.is_empty());
    let d = &h.audit(1).await[0];
    assert_eq!((d["listener"].as_str(), d["reason"].as_str()), (Some("catch_all"), Some("catch_all")));
    assert_eq!(d["original_dst"], "127.0.0.9:22");
}

#[tokio::test]
async fn tls_listener_refuses_encrypted_client_hello_before_dialling() {
    // An origin that counts the connections it is offered.
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = origin.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let h = Harness::new(port, "");
    let honest: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = h.connect(Redirect::Tls, honest).await;
    c.write_all(&hello_with_ech("ml.azure.com")).await.unwrap();
    let mut out = Vec::new();
    let read = c.read_to_end(&mut out).await;
    assert_eq!(read.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    let d = &h.audit(1).await[0];
    assert_eq!(
        (d["decision"].as_str(), d["reason"].as_str(), d["rule"].as_str()),
        (Some("deny"), Some("ech_present"), Some("azureml"))
    );
    assert_eq!(d["dst_addr"], Value::Null);
    // A dial would have completed before the line above was written; give the origin's accept
    // loop time to count it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was dialled");
}

/// An HTTP origin on 127.0.0.1:0 that answers every request with the Host it was sent, keeps
/// connections alive, and records every Host it served.
async fn host_recording_origin() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper::service::service_fn;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let host = req.headers().get("host").map_or("-".into(), |h| h.to_str().unwrap().to_string());
                    record.lock().unwrap().push(host.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(format!("served {host}")),
                        )))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, seen)
}

/// What a client gets back for `req` sent on the `plain` listener, redirected from `origin`.
async fn plain_exchange(h: &Harness, origin: SocketAddr, req: &[u8]) -> String {
    let mut c = h.connect(Redirect::Plain, origin).await;
    c.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await.expect("answered and closed");
    read.unwrap();
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

#[tokio::test]
async fn plain_listener_decides_every_request_on_its_own_host() {
    let (origin, seen) = host_recording_origin().await;
    let port = origin.port();
    let deny = format!("[[rule]]\nname = \"bad\"\naction = \"deny\"\nhosts = [\"bad.cdn.test\"]\nports = [{port}]\n");
    let h = Harness::new(port, &deny);

    // An absolute-form target is what is decided, and it must agree with Host.
    let fronted = format!("GET http://bad.cdn.test/ HTTP/1.1\r\nHost: good.cdn.test:{port}\r\n\r\n");
    let out = plain_exchange(&h, origin, fronted.as_bytes()).await;
    assert!(out.starts_with("http/1.1 400") && out.contains("x-egress-deny-reason: bad_request"), "{out}");

    // A bare LF is not a line ending here: 400, not a decision on the address.
    let bare_lf = b"GET /d HTTP/1.1\nHost: bad.cdn.test\r\n\r\n";
    let out = plain_exchange(&h, origin, bare_lf).await;
    assert!(out.starts_with("http/1.1 400") && out.contains("x-egress-deny-reason: bad_request"), "{out}");

    // obs-fold: 400.
    let folded = b"GET / HTTP/1.1\r\nHost: good.cdn.test\r\nX-A: b\r\n Host: bad.cdn.test\r\n\r\n";
    let out = plain_exchange(&h, origin, folded).await;
    assert!(out.starts_with("http/1.1 400") && out.contains("x-egress-deny-reason: bad_request"), "{out}");

    // The deny rule holds on its own.
    let denied = format!("GET / HTTP/1.1\r\nHost: bad.cdn.test:{port}\r\n\r\n");
    let out = plain_exchange(&h, origin, denied.as_bytes()).await;
    assert!(out.starts_with("http/1.1 403") && out.contains("x-egress-deny-reason: denied_by_rule"), "{out}");

    // A second request on the same connection never rides on the first one's decision: the first
    // is answered with `Connection: close` and the second never reaches the origin, pipelined or not.
    let two = format!(
        "GET / HTTP/1.1\r\nHost: good.cdn.test:{port}\r\n\r\nGET / HTTP/1.1\r\nHost: bad.cdn.test:{port}\r\n\r\n"
    );
    let out = plain_exchange(&h, origin, two.as_bytes()).await;
    assert!(out.starts_with("http/1.1 200") && out.contains("connection: close\r\n"), "{out}");
    assert_eq!(out.matches("http/1.1 ").count(), 1, "one answer: {out}");
    let mut c = h.connect(Redirect::Plain, origin).await;
    c.write_all(format!("GET / HTTP/1.1\r\nHost: good.cdn.test:{port}\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = vec![0u8; 4096];
    let n = c.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).ends_with(&format!("served good.cdn.test:{port}")));
    let _ = c.write_all(format!("GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n").as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("closed");
    assert!(rest.is_empty(), "nothing after the first answer: {}", String::from_utf8_lossy(&rest));

    let served = seen.lock().unwrap().clone();
    assert_eq!(served, vec![format!("good.cdn.test:{port}"), format!("good.cdn.test:{port}")]);
    let lines = h.audit(7).await;
    let d: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| (l["decision"].as_str().unwrap(), l["host"].as_str().unwrap()))
        .collect();
    assert_eq!(
        d,
        [
            ("deny", "127.0.0.1"),
            ("deny", "127.0.0.1"),
            ("deny", "127.0.0.1"),
            ("deny", "bad.cdn.test"),
            ("allow", "good.cdn.test"),
            ("allow", "good.cdn.test"),
        ]
    );
}

#[tokio::test]
async fn with_names_listed_an_address_rule_serves_only_connections_without_a_name() {
    let origin = TlsOrigin::start(&["evil.example.com", "ml.azure.com"]).await;
    let port = origin.addr.port();
    let h = Harness::new(port, "[transparent]\nnames = \"listed\"\n");
    let to_loopback: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The address rule allows 127.0.0.1, but no host rule allows evil.example.com: refused.
    let unlisted = https_get(h.connect(Redirect::Tls, to_loopback).await, "evil.example.com", &origin.ca_pem).await;
    assert_eq!(unlisted.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    // A name a host rule allows still passes.
    let page = https_get(h.connect(Redirect::Tls, to_loopback).await, "ml.azure.com", &origin.ca_pem).await.unwrap();
    assert!(page.ends_with("hello from ml.azure.com"));
    let lines = h.audit(3).await;
    let d: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| (l["decision"].as_str().unwrap(), l["reason"].as_str().or(l["rule"].as_str()).unwrap()))
        .collect();
    assert_eq!(d, [("deny", "no_rule"), ("allow", "azureml")]);
}

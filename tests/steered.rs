//! `[transparent.steered]`: a connection that reaches the `tls` listener without being
//! redirected (DNS steering: the allowed names resolve to the proxy itself) is decided on its
//! server name alone and dialled on the configured port; without a name, or with a refused one,
//! it goes nowhere. Through the real accept path, on loopback.
#![allow(clippy::disallowed_methods)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use egress_proxy::load::load;
use egress_proxy::server::{self, Listeners};
use egress_proxy::state::State;
use support::origins::CountingOrigin;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn an_unredirected_tls_connection_is_dialled_by_its_server_name_on_the_steered_port() {
    let origin = CountingOrigin::start().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\npath = {:?}\n[safety]\nallow_internal = [\"127.0.0.0/8\"]\n[transparent.steered]\ntls = {port}\n\
             [resolve.static]\n\"steered.test\" = [\"127.0.0.1\"]\n\
             [[rule]]\nname = \"steered\"\naction = \"allow\"\nhosts = [\"steered.test\"]\nports = [{port}]\n",
            audit.display().to_string()
        ),
    )
    .unwrap();
    let state = Arc::new(State::build(load(Some(&config), &[]).unwrap()).unwrap());
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tls.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let listeners = Listeners { tls: Some(tls), ..Listeners::default() };
    tokio::spawn(server::run(listeners, state, None, shutdown.clone()));

    // Allowed name: dialled at its own address on the steered port, the hello replayed to it.
    let hello = client_hello("steered.test", &[]);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let got = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if origin.accepted() > 0 || tokio::time::Instant::now() > deadline {
                break origin.accepted();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(got, 1, "the allowed name reached its server");
    drop(s);
    let received = origin.received_at_least(1).await;
    assert!(received[0].starts_with(&hello), "the hello was replayed first");

    // A refused name, and no name at all: nothing is dialled.
    for first in [client_hello("evil.test", &[]), b"GET / HTTP/1.1\r\nHost: steered.test\r\n\r\n".to_vec()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&first).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(origin.accepted(), 1, "no other connection reached the origin");
    let lines = lines_at_least(|| read_audit(&audit), 4).await;
    let decisions: Vec<(String, String, String)> = lines
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or("-").to_string();
            (s("host"), s("decision"), s("original_dst"))
        })
        .collect();
    let steered = format!("0.0.0.0:{port}");
    assert_eq!(decisions[0], ("steered.test".into(), "allow".into(), steered.clone()));
    assert_eq!(decisions[1], ("evil.test".into(), "deny".into(), steered.clone()));
    assert_eq!(decisions[2].1, "deny");
    shutdown.cancel();
}

//! The admin server: exact metric deltas after allowed, refused and failed connections; health,
//! readiness, `/policy` and `/denied`; reloads with a good file, a broken file, and a file that
//! removes a rule while a tunnel through it is open; the file watcher; the admin connection limit.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rules(echo_port: u16, extra_rule: &str) -> String {
    format!(
        "[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\"mcr.microsoft.com\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"azureml\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{echo_port}, {closed}]\n\
         tls_only = false\n{extra_rule}",
        closed = 1
    )
}

fn mcr_rule(port: u16) -> String {
    format!("[[rule]]\nname = \"mcr\"\naction = \"allow\"\nhosts = [\"mcr.microsoft.com\"]\nports = [{port}]\ntls_only = false\n")
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::Client::new().get(format!("http://{addr}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A POST with the proxy's admin bearer token.
async fn post(proxy: &TestProxy, path: &str) -> (u16, String) {
    post_as(proxy.admin_addr, path, Some(&proxy.admin_token)).await
}

async fn post_as(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut r = reqwest::Client::new().post(format!("http://{addr}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `info.hash` of `/policy`: the SHA-256 of the config and tag data in force. The rest of the
/// document (`loaded_at`) changes with every reload, so only this field says whether the policy did.
async fn policy_hash(proxy: &TestProxy) -> String {
    let (status, body) = get(proxy.admin_addr, "/policy").await;
    assert_eq!(status, 200);
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hash = policy["info"]["hash"].as_str().unwrap_or_else(|| panic!("no info.hash in {body}"));
    assert_eq!(hash.len(), 64, "{hash}");
    hash.to_string()
}

/// Every sample of the exposition, by its full name with labels.
async fn scrape(proxy: &TestProxy) -> HashMap<String, f64> {
    let (status, text) = get(proxy.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

async fn echo_round(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, msg);
}

/// The status line the proxy answers `req` with.
async fn status_of(proxy: std::net::SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => line.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).trim_end().to_string()
}

#[tokio::test]
async fn metrics_move_by_exactly_the_right_amounts() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&rules(echo.port(), "")).await;
    let before = scrape(&proxy).await;

    let mut s = connect_tunnel(proxy.addr, "ml.azure.com", echo.port()).await;
    echo_round(&mut s, b"hello").await;
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(status_of(proxy.addr, "CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n").await.contains("403"));
    assert!(status_of(proxy.addr, "CONNECT ml.azure.com:1 HTTP/1.1\r\n\r\n").await.contains("502"));
    proxy.audit_at_least(4).await;

    let after = scrape(&proxy).await;
    let d = |k: &str| delta(&before, &after, k);
    assert_eq!(d(r#"egress_proxy_decisions_total{decision="allow",listener="http",reason="",rule="azureml"}"#), 1.0);
    assert_eq!(d(r#"egress_proxy_decisions_total{decision="deny",listener="http",reason="no_rule",rule=""}"#), 1.0);
    assert_eq!(
        d(r#"egress_proxy_decisions_total{decision="fail",listener="http",reason="upstream_unreachable",rule=""}"#),
        1.0
    );
    assert_eq!(d(r#"egress_proxy_bytes_total{direction="up",listener="http"}"#), 5.0);
    assert_eq!(d(r#"egress_proxy_bytes_total{direction="down",listener="http"}"#), 5.0);
    assert_eq!(after[r#"egress_proxy_open_tunnels{listener="http"}"#], 0.0);
    assert_eq!(d(r#"egress_proxy_upstream_connect_duration_seconds_count{listener="http"}"#), 1.0);
    assert_eq!(d(r#"egress_proxy_tunnel_duration_seconds_count{listener="http"}"#), 1.0);
    assert_eq!(d("egress_proxy_dns_lookups_total"), 2.0, "the refused name was never looked up");
    assert_eq!(d("egress_proxy_dns_failures_total"), 0.0);
    assert_eq!(d("egress_proxy_audit_lines_total"), 4.0, "three decisions and one close");
    assert_eq!(after["egress_proxy_audit_lines_lost_total"], 0.0);
    assert_eq!(after["egress_proxy_service_tags_change_number"], 374.0);
    assert!(after["egress_proxy_service_tags_file_timestamp_seconds"] > 1.5e9);
    assert!(after.keys().any(|k| k.starts_with("egress_proxy_config_info{hash=")));
    let labels = after.keys().filter(|k| k.contains("evil.example.com")).count();
    assert_eq!(labels, 0, "host names never appear in labels");
}

#[tokio::test]
async fn health_readiness_policy_and_denied() {
    let proxy = TestProxy::start(&rules(9, "")).await;
    assert_eq!(get(proxy.admin_addr, "/healthz").await, (200, "ok\n".into()));
    for _ in 0..100 {
        if get(proxy.admin_addr, "/readyz").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(proxy.admin_addr, "/readyz").await, (200, "ready\n".into()));
    let (status, policy) = get(proxy.admin_addr, "/policy").await;
    assert_eq!(status, 200);
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap();
    assert_eq!(policy["info"]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(policy["info"]["service_tags_change_number"], 374);
    assert_eq!(policy["rules"][0]["name"], "azureml");
    assert_eq!(policy["rules"][0]["hosts"][0], "ml.azure.com");

    for _ in 0..3 {
        status_of(proxy.addr, "CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n").await;
    }
    status_of(proxy.addr, "CONNECT other.example.com:8443 HTTP/1.1\r\n\r\n").await;
    let (_, denied) = get(proxy.admin_addr, "/denied").await;
    let denied: serde_json::Value = serde_json::from_str(&denied).unwrap();
    assert_eq!((denied[0]["host"].as_str(), denied[0]["count"].as_u64()), (Some("evil.example.com"), Some(3)));
    assert_eq!((denied[1]["host"].as_str(), denied[1]["port"].as_u64()), (Some("other.example.com"), Some(8443)));
    assert_eq!(denied[1]["reason"], "no_rule");
    assert_eq!(get(proxy.admin_addr, "/nope").await.0, 404);
    assert_eq!(post(&proxy, "/metrics").await.0, 405);
}

#[tokio::test]
async fn reload_applies_a_good_file_keeps_the_old_policy_on_a_broken_one_and_spares_open_tunnels() {
    let echo = echo_origin().await;
    // No file watcher: every reload here is a POST /reload, so each one is counted exactly once.
    let proxy = TestProxy::builder(&rules(echo.port(), "")).watch(false).start().await;
    let before = scrape(&proxy).await;
    let original = std::fs::read_to_string(&proxy.config).unwrap();
    let mcr = format!("CONNECT mcr.microsoft.com:{} HTTP/1.1\r\n\r\n", echo.port());
    assert!(status_of(proxy.addr, &mcr).await.contains("403"));
    let original_hash = policy_hash(&proxy).await;

    // A good file adds a rule: the next connection sees it.
    std::fs::write(&proxy.config, format!("{original}{}", mcr_rule(echo.port()))).unwrap();
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(status_of(proxy.addr, &mcr).await.contains("200"));
    let added_hash = policy_hash(&proxy).await;
    assert_ne!(added_hash, original_hash, "a changed policy has a new hash");
    assert_eq!(body, format!("reloaded {added_hash}\n"));

    // A tunnel through the mcr rule stays open across a reload that removes the rule.
    let mut open = connect_tunnel(proxy.addr, "mcr.microsoft.com", echo.port()).await;
    echo_round(&mut open, b"before").await;

    // A broken file changes nothing.
    std::fs::write(
        &proxy.config,
        format!("{original}{}[[rule]]\nname = \"x\"\nacton = \"allow\"\n", mcr_rule(echo.port())),
    )
    .unwrap();
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 500);
    assert!(body.contains("acton"), "{body}");
    assert!(status_of(proxy.addr, &mcr).await.contains("200"), "the old policy stays in force");
    assert_eq!(policy_hash(&proxy).await, added_hash, "and so does its hash");

    // The file without the rule: new connections are refused; the open tunnel keeps its bytes flowing.
    std::fs::write(&proxy.config, &original).unwrap();
    let (status, body) = post(&proxy, "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(status_of(proxy.addr, &mcr).await.contains("403"));
    assert_eq!(policy_hash(&proxy).await, original_hash, "the original files give the original hash");
    assert_eq!(body, format!("reloaded {original_hash}\n"));
    echo_round(&mut open, b"after the rule is gone").await;

    let after = scrape(&proxy).await;
    let d = |k: &str| delta(&before, &after, k);
    assert_eq!(d(r#"egress_proxy_config_reloads_total{result="failure"}"#), 1.0, "the broken file");
    assert_eq!(
        d(r#"egress_proxy_config_reloads_total{result="success"}"#),
        2.0,
        "the file with the rule, then without"
    );
    let info: Vec<&String> = after.keys().filter(|k| k.starts_with("egress_proxy_config_info{")).collect();
    assert_eq!(info, [&format!("egress_proxy_config_info{{hash=\"{original_hash}\"}}")], "one hash at a time");
}

#[tokio::test]
async fn the_file_watcher_applies_a_changed_file_once() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&rules(echo.port(), "")).await;
    let mcr = format!("CONNECT mcr.microsoft.com:{} HTTP/1.1\r\n\r\n", echo.port());
    assert!(status_of(proxy.addr, &mcr).await.contains("403"));
    let original_hash = policy_hash(&proxy).await;
    let before = scrape(&proxy).await;
    let (success, failure) = (
        r#"egress_proxy_config_reloads_total{result="success"}"#,
        r#"egress_proxy_config_reloads_total{result="failure"}"#,
    );

    // Written beside the config and renamed over it, so the watcher never reads half a file.
    let text = format!("{}{}", std::fs::read_to_string(&proxy.config).unwrap(), mcr_rule(echo.port()));
    let tmp = proxy.config.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &proxy.config).unwrap();
    // The reload is counted after the new policy is in force: wait for the count, up to 5 s.
    let mut after = scrape(&proxy).await;
    for _ in 0..250 {
        if delta(&before, &after, success) != 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(&proxy).await;
    }
    assert_eq!(delta(&before, &after, success), 1.0, "the watcher reloads the changed file once");
    assert_eq!(delta(&before, &after, failure), 0.0);
    assert!(status_of(proxy.addr, &mcr).await.contains("200"));
    assert_ne!(policy_hash(&proxy).await, original_hash);

    // Files that stay as they are are not reloaded again, however many times the watcher polls.
    tokio::time::sleep(WATCH_EVERY * 5).await;
    assert_eq!(delta(&before, &scrape(&proxy).await, success), 1.0);
}

#[tokio::test]
async fn admin_connections_have_a_limit_of_their_own_and_the_data_path_keeps_serving() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&rules(echo.port(), "")).await;
    let limit = egress_proxy::server::ADMIN_CONNECTIONS;
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(TcpStream::connect(proxy.admin_addr).await.unwrap());
    }
    // Accepted in order: every slot is taken, so the next connection is closed unanswered.
    let mut over = TcpStream::connect(proxy.admin_addr).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut out)).await;
    assert_eq!(read.expect("closed at once").map_err(|e| e.kind()), Ok(0), "a clean close, nothing read");

    // The data path has its own limits: a tunnel still opens and carries bytes.
    let mut t = connect_tunnel(proxy.addr, "ml.azure.com", echo.port()).await;
    echo_round(&mut t, b"still serving").await;

    // A freed slot serves again.
    drop(held.pop());
    let mut answered = String::new();
    for _ in 0..250 {
        answered = status_of(proxy.admin_addr, "GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        if !answered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn reload_needs_the_bearer_token_and_concurrent_requests_share_one_reload() {
    let echo = echo_origin().await;
    let proxy = TestProxy::builder(&rules(echo.port(), "")).watch(false).start().await;
    let before = scrape(&proxy).await;
    assert_eq!(post_as(proxy.admin_addr, "/reload", None).await.0, 401);
    assert_eq!(post_as(proxy.admin_addr, "/reload", Some("not-the-token")).await.0, 401);
    let reloads = r#"egress_proxy_config_reloads_total{result="success"}"#;
    assert_eq!(delta(&before, &scrape(&proxy).await, reloads), 0.0, "refused requests reload nothing");

    // Many requests at once: each is answered by a reload that started after it was made, and
    // they share runs instead of queueing one each.
    const REQUESTS: usize = 12;
    let asked: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (addr, token) = (proxy.admin_addr, proxy.admin_token.clone());
            tokio::spawn(async move { post_as(addr, "/reload", Some(&token)).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for a in asked {
        let (status, body) = a.await.unwrap();
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    bodies.dedup();
    assert_eq!(bodies.len(), 1, "one policy, one hash: {bodies:?}");
    let runs = delta(&before, &scrape(&proxy).await, reloads);
    assert!((1.0..REQUESTS as f64).contains(&runs), "{runs} reloads for {REQUESTS} requests");
}

#[tokio::test]
async fn without_a_token_file_reload_is_refused() {
    let echo = echo_origin().await;
    let proxy = TestProxy::builder(&rules(echo.port(), "")).watch(false).admin_token(false).start().await;
    let (status, body) = post_as(proxy.admin_addr, "/reload", Some(&proxy.admin_token)).await;
    assert_eq!((status, body.as_str()), (403, "set [admin] token_file to use this endpoint\n"));
}

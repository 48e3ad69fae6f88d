//! Report mode and the shadow policy, end to end on loopback: what enforcement would refuse is let through and audited
//! as `would_deny` with its reason, and counted apart; the built-in protections still refuse.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Sends a CONNECT and returns the response head, and the stream (a tunnel after a 200).
async fn connect(proxy: std::net::SocketAddr, target: &str) -> (String, TcpStream) {
    connect_from(proxy, "127.0.0.1", target).await
}

/// Proves a tunnel carries bytes both ways (through the echo origin).
async fn echoes(s: &mut TcpStream) {
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping");
}

fn decisions(lines: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |l: &Value, k: &str| l[k].as_str().unwrap_or("-").to_string();
    lines
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| (s(l, "host"), s(l, "decision"), s(l, "reason"), s(l, "rule")))
        .collect()
}

fn line(host: &str, decision: &str, reason: &str, rule: &str) -> (String, String, String, String) {
    (host.into(), decision.into(), reason.into(), rule.into())
}

#[tokio::test]
async fn with_the_whole_policy_in_report_mode_refusals_are_let_through_as_would_deny_but_metadata_is_not() {
    let echo = echo_origin().await;
    let port = echo.port();
    let rules = format!(
        "[policy]\nmode = \"report\"\n[resolve.static]\n\"known.test\" = [\"127.0.0.1\"]\n\"unknown.test\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"known\"\naction = \"allow\"\nhosts = [\"known.test\"]\nports = [{port}]\ntls_only = false\n"
    );
    let proxy = TestProxy::start(&rules).await;
    let (head, mut s) = connect(proxy.addr, &format!("known.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echoes(&mut s).await;
    // No rule allows this name: in report mode it is resolved and let through.
    let (head, mut s) = connect(proxy.addr, &format!("unknown.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echoes(&mut s).await;
    // The metadata address is a built-in protection: refused in every mode.
    let (head, _) = connect(proxy.addr, "169.254.169.254:80").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-egress-deny-reason: internal_address"), "{head}");

    let lines = proxy.audit_at_least(3).await;
    assert_eq!(
        decisions(&lines),
        [
            line("known.test", "allow", "-", "known"),
            line("unknown.test", "would_deny", "no_rule", "-"),
            line("169.254.169.254", "deny", "internal_address", "-"),
        ]
    );
    let metrics = admin_metrics(&proxy).await;
    assert!(
        metrics.contains(
            "egress_proxy_decisions_total{decision=\"would_deny\",listener=\"http\",reason=\"no_rule\",rule=\"\"} 1"
        ),
        "counted apart: {metrics}"
    );
    let policy = admin_get(&proxy, "/policy").await;
    assert!(policy.contains("\"mode\": \"report\""), "/policy says it: {policy}");
}

#[tokio::test]
async fn a_deny_rule_in_report_mode_reports_while_an_enforced_one_refuses() {
    let echo = echo_origin().await;
    let port = echo.port();
    let rules = format!(
        "[resolve.static]\n\"a.cdn.test\" = [\"127.0.0.1\"]\n\"new.cdn.test\" = [\"127.0.0.1\"]\n\"old.cdn.test\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"new-block\"\naction = \"deny\"\nhosts = [\"new.cdn.test\"]\nports = [{port}]\nmode = \"report\"\n\
         [[rule]]\nname = \"old-block\"\naction = \"deny\"\nhosts = [\"old.cdn.test\"]\nports = [{port}]\n\
         [[rule]]\nname = \"cdn\"\naction = \"allow\"\nhosts = [\"*.cdn.test\"]\nports = [{port}]\ntls_only = false\n"
    );
    let proxy = TestProxy::start(&rules).await;
    let (head, mut s) = connect(proxy.addr, &format!("new.cdn.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the rule only reports: {head}");
    echoes(&mut s).await;
    let (head, _) = connect(proxy.addr, &format!("old.cdn.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "the enforced rule refuses: {head}");
    // A name no rule allows is refused: only the rule is in report mode, not the policy.
    let (head, _) = connect(proxy.addr, &format!("elsewhere.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let lines = proxy.audit_at_least(3).await;
    assert_eq!(
        decisions(&lines),
        [
            line("new.cdn.test", "would_deny", "denied_by_rule", "new-block"),
            line("old.cdn.test", "deny", "denied_by_rule", "old-block"),
            line("elsewhere.test", "deny", "no_rule", "-"),
        ]
    );
    let policy = admin_get(&proxy, "/policy").await;
    assert!(policy.contains("\"report_only_rules\": [\n      \"new-block\"\n    ]"), "{policy}");
}

async fn admin_get(proxy: &TestProxy, path: &str) -> String {
    admin_page(proxy.admin_addr, path).await
}

async fn admin_metrics(proxy: &TestProxy) -> String {
    admin_page(proxy.admin_addr, "/metrics").await
}

// === shadow policy ===

async fn promote(proxy: &TestProxy) -> String {
    let req = format!(
        "POST /shadow/promote HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        proxy.admin_token
    );
    let (resp, _) = raw_exchange(proxy.admin_addr, req.as_bytes(), WAIT).await;
    String::from_utf8_lossy(&resp).into_owned()
}

fn shadow_lines(lines: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |l: &Value, k: &str| l[k].as_str().unwrap_or("-").to_string();
    lines
        .iter()
        .filter(|l| l["event"] == "shadow")
        .map(|l| (s(l, "host"), s(l, "shadow"), s(l, "reason"), s(l, "rule")))
        .collect()
}

#[tokio::test]
async fn a_shadow_policy_reports_where_it_differs_and_is_promoted_only_when_it_loads() {
    let echo = echo_origin().await;
    let port = echo.port();
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate.toml");
    let good = format!(
        "[safety]\nallow_internal = [\"127.0.0.0/8\"]\n[resolve.static]\n\"a.test\" = [\"127.0.0.1\"]\n\"b.test\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"b-only\"\naction = \"allow\"\nhosts = [\"b.test\"]\nports = [{port}]\ntls_only = false\n"
    );
    std::fs::write(&candidate, &good).unwrap();
    let rules = format!(
        "[shadow]\nconfig = {:?}\n[resolve.static]\n\"a.test\" = [\"127.0.0.1\"]\n\"b.test\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"a-only\"\naction = \"allow\"\nhosts = [\"a.test\"]\nports = [{port}]\ntls_only = false\n",
        candidate.display().to_string()
    );
    let proxy = TestProxy::builder(&rules).watch(false).start().await;
    let policy = admin_get(&proxy, "/policy").await;
    assert!(policy.contains("candidate.toml (sha256 "), "/policy names the candidate: {policy}");

    // The candidate is never enforced: each decision stands, and the difference is audited.
    let (head, mut s) = connect(proxy.addr, &format!("a.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echoes(&mut s).await;
    let (head, _) = connect(proxy.addr, &format!("b.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let lines = proxy.audit_at_least(3).await;
    assert_eq!(
        shadow_lines(&lines),
        [line("a.test", "shadow_would_deny", "no_rule", "-"), line("b.test", "shadow_would_allow", "-", "b-only"),]
    );
    let metrics = admin_metrics(&proxy).await;
    for difference in ["shadow_would_allow", "shadow_would_deny"] {
        let series = format!("egress_proxy_shadow_differences_total{{difference=\"{difference}\"}} 1");
        assert!(metrics.contains(&series), "{series}: {metrics}");
    }

    // A candidate that no longer loads is not promoted: the policy in force stays.
    std::fs::write(&candidate, "[[rule]]\nname = \"b-only\"\naction = \"alow\"\n").unwrap();
    let refused = promote(&proxy).await;
    assert!(refused.starts_with("HTTP/1.1 500"), "{refused}");
    assert!(refused.contains("candidate.toml:3"), "the error names the file and line: {refused}");
    let (head, _) = connect(proxy.addr, &format!("a.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Promoted: the candidate is the policy in force.
    std::fs::write(&candidate, &good).unwrap();
    let promoted = promote(&proxy).await;
    assert!(promoted.starts_with("HTTP/1.1 200"), "{promoted}");
    let (head, mut s) = connect(proxy.addr, &format!("b.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echoes(&mut s).await;
    let (head, _) = connect(proxy.addr, &format!("a.test:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Promoting needs the admin token, like a reload.
    let req = "POST /shadow/promote HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (resp, _) = raw_exchange(proxy.admin_addr, req.as_bytes(), WAIT).await;
    assert!(resp.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&resp));
}

//! The DNS filter on loopback, in front of a DNS server of the test's own (`support::dns`) as its
//! upstream: allowed names are answered from upstream, every other question is refused without
//! leaving the machine, CNAME chains that escape are cut, and the answers prime the proxy's own
//! resolver. Nothing is sent anywhere but 127.0.0.1.
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::Value;
use support::dns::DnsServer;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(5);

/// `*.dns.test` allowed (resolved by `upstream`), `front.test` names only followed as CNAME
/// targets, plus `extra` config.
async fn proxy(upstream: &DnsServer, extra: &str) -> TestProxy {
    let rules = format!(
        "[resolve]\nupstream = [\"{}\"]\ntimeout = \"1s\"\n[dns]\nfollow_cnames = [\"front.test\"]\n{extra}\n\
         [[rule]]\nname = \"dns-test\"\naction = \"allow\"\nhosts = [\"*.dns.test\"]\nports = [443]\n\
         [[rule]]\nname = \"no-blocked\"\naction = \"deny\"\nhosts = [\"blocked.dns.test\"]\nports = [8443]\n",
        upstream.addr
    );
    TestProxy::builder(&rules).watch(false).dns(true).start().await
}

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id).set_message_type(MessageType::Query).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

async fn ask_udp(dns: SocketAddr, packet: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_millis(1500), socket.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(Message::from_vec(&buf[..n]).unwrap())
}

async fn ask(dns: SocketAddr, name: &str, rtype: RecordType) -> Message {
    ask_udp(dns, &query(7, name, rtype)).await.expect("an answer")
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            Some(RData::A(a)) => Some(IpAddr::V4(a.0)),
            Some(RData::AAAA(a)) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn dns_lines(proxy: &TestProxy) -> Vec<(String, String, String, String)> {
    let s = |l: &Value, k: &str| l[k].as_str().unwrap_or("-").to_string();
    proxy
        .audit()
        .iter()
        .filter(|l| l["event"] == "dns")
        .map(|l| (s(l, "name"), s(l, "type"), s(l, "decision"), s(l, "reason")))
        .collect()
}

fn line(name: &str, t: &str, decision: &str, reason: &str) -> (String, String, String, String) {
    (name.into(), t.into(), decision.into(), reason.into())
}

async fn wait_for_lines(proxy: &TestProxy, n: usize) -> Vec<(String, String, String, String)> {
    for _ in 0..200 {
        let lines = dns_lines(proxy);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    dns_lines(proxy)
}

#[tokio::test]
async fn allowed_names_are_answered_from_upstream_and_every_other_question_is_refused_without_leaving() {
    let upstream = DnsServer::start().await;
    let proxy = proxy(&upstream, "").await;
    let dns = proxy.dns_addr.unwrap();

    let ok = ask(dns, "ok.dns.test.", RecordType::A).await;
    assert_eq!((ok.response_code(), addrs(&ok)), (ResponseCode::NoError, vec!["127.0.0.1".parse().unwrap()]));
    assert_eq!(ok.id(), 7);
    for (name, rtype) in [
        ("stolen-bytes.attacker.example.", RecordType::A),
        ("blocked.dns.test.", RecordType::A),
        ("ok.dns.test.", RecordType::TXT),
        ("ok.dns.test.", RecordType::NULL),
    ] {
        let refused = ask(dns, name, rtype).await;
        assert_eq!(refused.response_code(), ResponseCode::Refused, "{name} {rtype}");
        assert!(refused.answers().is_empty());
    }
    let asked = upstream.asked();
    assert_eq!(asked, ["ok.dns.test. A"], "only the allowed question left the machine");

    // A chain through a followed suffix is answered whole; one that leaves the allowed names is cut.
    let chain = ask(dns, "chain.dns.test.", RecordType::A).await;
    assert_eq!((chain.response_code(), chain.answers().len()), (ResponseCode::NoError, 2));
    let escape = ask(dns, "escape.dns.test.", RecordType::A).await;
    assert_eq!((escape.response_code(), escape.answers().len()), (ResponseCode::Refused, 0));
    // The upstream's own failures pass on as such.
    assert_eq!(ask(dns, "missing.dns.test.", RecordType::A).await.response_code(), ResponseCode::NXDomain);
    assert_eq!(ask(dns, "fail.dns.test.", RecordType::A).await.response_code(), ResponseCode::ServFail);

    let lines = wait_for_lines(&proxy, 9).await;
    assert_eq!(
        lines,
        [
            line("ok.dns.test", "A", "allow", "-"),
            line("stolen-bytes.attacker.example", "A", "deny", "no_rule"),
            line("blocked.dns.test", "A", "deny", "denied_by_rule"),
            line("ok.dns.test", "TXT", "deny", "dns_type_not_allowed"),
            line("ok.dns.test", "NULL", "deny", "dns_type_not_allowed"),
            line("chain.dns.test", "A", "allow", "-"),
            line("escape.dns.test", "A", "deny", "cname_escape"),
            line("missing.dns.test", "A", "deny", "dns_nxdomain"),
            line("fail.dns.test", "A", "deny", "dns_upstream_failed"),
        ]
    );
}

#[tokio::test]
async fn refusals_can_be_nxdomain_and_a_rule_can_allow_more_types() {
    let upstream = DnsServer::start().await;
    let extra = "refuse_with = \"nxdomain\"\n[[rule]]\nname = \"txt\"\naction = \"allow\"\nhosts = [\"txt.example\"]\ndns_types = [\"TXT\"]";
    let proxy = proxy(&upstream, extra).await;
    let dns = proxy.dns_addr.unwrap();
    assert_eq!(ask(dns, "exfil.attacker.example.", RecordType::A).await.response_code(), ResponseCode::NXDomain);
    let txt = ask(dns, "txt.example.", RecordType::TXT).await;
    assert_eq!(txt.response_code(), ResponseCode::NoError, "the rule lists TXT");
    assert_eq!(upstream.asked(), ["txt.example. TXT"]);
}

#[tokio::test]
async fn tcp_works_and_garbage_truncation_and_oversized_names_never_take_the_listener_down() {
    let upstream = DnsServer::start().await;
    let proxy = proxy(&upstream, "max_label_length = 40").await;
    let dns = proxy.dns_addr.unwrap();

    // Garbage: dropped, or FORMERR when it has an id; the listener goes on.
    for junk in [&b""[..], b"\x01", b"\x12\x34\xff\xff\xff\xff\xff", &[0xc0; 300][..]] {
        if let Some(answer) = ask_udp(dns, junk).await {
            assert_eq!(answer.response_code(), ResponseCode::FormErr);
        }
    }
    // A compression pointer that points at itself.
    let mut looped = query(9, "ok.dns.test.", RecordType::A);
    looped.truncate(12);
    looped.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    if let Some(answer) = ask_udp(dns, &looped).await {
        assert_eq!(answer.response_code(), ResponseCode::FormErr);
    }
    let long = format!("{}.dns.test.", "a".repeat(50));
    assert_eq!(ask(dns, &long, RecordType::A).await.response_code(), ResponseCode::Refused, "label over 40");

    // TCP: framed, answered; truncated framing just closes.
    let mut s = TcpStream::connect(dns).await.unwrap();
    let q = query(11, "ok.dns.test.", RecordType::A);
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut len)).await.unwrap().unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    let answer = Message::from_vec(&body).unwrap();
    assert_eq!((answer.id(), answer.response_code()), (11, ResponseCode::NoError));
    let mut cut = TcpStream::connect(dns).await.unwrap();
    cut.write_all(&[0x00, 0x40, 0x01, 0x02]).await.unwrap();
    drop(cut);

    let ok = ask(dns, "ok.dns.test.", RecordType::A).await;
    assert_eq!(ok.response_code(), ResponseCode::NoError, "still answering");
}

#[tokio::test]
async fn many_unique_long_names_under_one_suffix_raise_the_tunnelling_alarm_once() {
    let upstream = DnsServer::start().await;
    let extra = "[dns.tunnel_alarm]\nunique_names = 10\nmin_length = 30\nwindow = \"60s\"";
    let proxy = proxy(&upstream, extra).await;
    let dns = proxy.dns_addr.unwrap();
    for i in 0..25 {
        let name = format!("c2V{i:03}jcmV0LWRhdGEtY2h1bms.attacker.example.");
        assert_eq!(ask(dns, &name, RecordType::A).await.response_code(), ResponseCode::Refused);
    }
    // Short names do not count.
    for i in 0..20 {
        ask(dns, &format!("a{i}.ok.example."), RecordType::A).await;
    }
    let alarms: Vec<Value> = proxy.audit().into_iter().filter(|l| l["event"] == "dns_alarm").collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(
        (alarms[0]["suffix"].as_str(), alarms[0]["unique_names"].as_u64()),
        (Some("attacker.example"), Some(10))
    );
    let resp = admin_page(proxy.admin_addr, "/metrics").await;
    assert!(resp.contains("egress_proxy_dns_tunnel_alarms_total 1"));
    assert!(upstream.asked().is_empty(), "none of them left the machine");
}

#[tokio::test]
async fn an_answer_given_to_a_client_is_the_address_the_proxy_dials_for_that_name() {
    let upstream = DnsServer::start().await;
    let extra = "[[rule]]\nname = \"rotate\"\naction = \"allow\"\nhosts = [\"rotate.dns.test\"]\nports = [\"1024-65535\"]\ntls_only = false";
    let proxy = proxy(&upstream, extra).await;
    let dns = proxy.dns_addr.unwrap();
    // The upstream hands out a new address (127.0.0.N) for every question.
    let given = addrs(&ask(dns, "rotate.dns.test.", RecordType::A).await);
    assert_eq!(given.len(), 1);
    let origin = tokio::net::TcpListener::bind(SocketAddr::new(given[0], 0)).await.unwrap();
    let port = origin.local_addr().unwrap().port();
    // The client connects by name; the proxy resolves it itself, and gets the answer the client
    // got, from the cache the DNS filter shares, not the upstream's next one.
    let mut tunnel = connect_tunnel(proxy.addr, "rotate.dns.test", port).await;
    // The allow line comes once the tunnel's first bytes are read.
    tunnel.write_all(b"hello").await.unwrap();
    let decided = || proxy.audit().into_iter().filter(|l| l["event"] == "decision").collect::<Vec<_>>();
    let decisions = lines_at_least(decided, 1).await;
    assert_eq!(
        decisions[0]["dst_addr"].as_str(),
        Some(SocketAddr::new(given[0], port).to_string().as_str()),
        "{decisions:?}"
    );
    let asked_a = upstream.asked().iter().filter(|q| q.as_str() == "rotate.dns.test. A").count();
    assert_eq!(asked_a, 1, "one question upstream: the proxy's own lookup was a cache hit");
    let resp = admin_page(proxy.admin_addr, "/metrics").await;
    let metrics = resp;
    for series in ["egress_proxy_dns_cache_total{result=\"miss\"} 1", "egress_proxy_dns_cache_total{result=\"hit\"} 1"]
    {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
    drop(tunnel);
}

#[tokio::test]
async fn a_client_over_its_rate_is_refused_and_the_upstream_is_spared() {
    let upstream = DnsServer::start().await;
    let proxy = proxy(&upstream, "rate_per_client = 5").await;
    let dns = proxy.dns_addr.unwrap();
    let mut codes = Vec::new();
    for i in 0..20 {
        codes.push(ask(dns, &format!("n{i}.dns.test."), RecordType::A).await.response_code());
    }
    let refused = codes.iter().filter(|c| **c == ResponseCode::Refused).count();
    assert!(refused >= 10, "a burst of 5, refilled at 5/s: {codes:?}");
    assert_eq!(upstream.asked().len(), 20 - refused, "refused questions never left");
    let lines = wait_for_lines(&proxy, 20 - refused + 1).await;
    let written = lines.iter().filter(|l| l.3 == "dns_rate_limit").count();
    assert!((1..=2).contains(&written), "one line a second, not one per refusal: {written} of {refused}");
    let resp = admin_page(proxy.admin_addr, "/metrics").await;
    let series =
        format!("egress_proxy_dns_queries_total{{decision=\"deny\",reason=\"dns_rate_limit\",type=\"A\"}} {refused}");
    assert!(resp.contains(&series), "every one counted: {series}");
}

#[tokio::test]
async fn in_report_mode_a_name_no_rule_allows_is_answered_as_would_deny() {
    let upstream = DnsServer::start().await;
    let proxy = proxy(&upstream, "[policy]\nmode = \"report\"").await;
    let dns = proxy.dns_addr.unwrap();
    let answer = ask(dns, "elsewhere.example.", RecordType::A).await;
    assert_eq!((answer.response_code(), addrs(&answer).len()), (ResponseCode::NoError, 1));
    assert_eq!(
        ask(dns, "ok.dns.test.", RecordType::TXT).await.response_code(),
        ResponseCode::Refused,
        "types still hold"
    );
    let lines = wait_for_lines(&proxy, 2).await;
    assert_eq!(lines[0], line("elsewhere.example", "A", "would_deny", "no_rule"));
}

/// One client cannot take every DNS-over-TCP connection: with 64 idle connections of its own
/// open (a quarter of them served, the rest closed at once), another client's question is still
/// answered. (Found in review: 64 in all, none per client, shut every other node out.)
#[tokio::test]
async fn one_client_holding_idle_tcp_connections_does_not_shut_out_another() {
    let proxy = TestProxy::builder("").watch(false).dns(true).start().await;
    let dns = proxy.dns_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(dns).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(dns).await.unwrap();
    let q = query(9, "stolen.attacker.example.", RecordType::A);
    other.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    other.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, other.read_exact(&mut len)).await.expect("answered in time").unwrap();
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    other.read_exact(&mut m).await.unwrap();
    assert_eq!(Message::from_vec(&m).unwrap().response_code(), ResponseCode::Refused);
    drop(held);
}

/// One client cannot take every UDP question in flight either: 300 questions for names whose
/// upstream answer is slow, within the client's rate, hold at most a quarter of the places, and
/// another client's question is answered meanwhile.
#[tokio::test]
async fn one_client_with_slow_questions_in_flight_does_not_shut_out_another() {
    let upstream = DnsServer::start().await;
    // Slow answers stay in flight for the whole of the resolver's timeout.
    let rules = format!(
        "[resolve]\nupstream = [\"{}\"]\ntimeout = \"5s\"\n\
         [[rule]]\nname = \"dns-test\"\naction = \"allow\"\nhosts = [\"*.dns.test\"]\nports = [443]\n",
        upstream.addr
    );
    let proxy = TestProxy::builder(&rules).watch(false).dns(true).start().await;
    let dns = proxy.dns_addr.unwrap();
    let flood = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..300u16 {
        flood.send_to(&query(i, &format!("slow.n{i}.dns.test."), RecordType::A), dns).await.unwrap();
        if i >= 200 {
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&query(7, "stolen.attacker.example.", RecordType::A), dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), other.recv_from(&mut buf))
        .await
        .expect("the other client is answered")
        .unwrap();
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().response_code(), ResponseCode::Refused);
}

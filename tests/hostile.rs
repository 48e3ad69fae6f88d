//! Hostile input, as tables. Each case says what the client sees (status, reset, end of stream,
//! bytes), what the audit line says (decision, reason, host), and that no origin in the test
//! counted a connection to a refused address: refused names are pinned to an origin of their
//! own, which must stay untouched.
//!
//! - names and IP spellings at the edges of every `*.` rule of the preset, decided by the
//!   library on the preset itself, and a handful through the live explicit proxy;
//! - request smuggling against the explicit and the transparent `plain` listener, with an origin
//!   that serves a site per Host header and records every Host it served;
//! - ClientHellos split byte by byte and across records, oversized, with two server names, with
//!   an IP literal as server name, and with ECH, through CONNECT and the transparent `tls`
//!   listener.
//!
//! Not here: IPv6 through the transparent listeners (network namespaces) and `names = "listed"`.
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use egress_proxy::load::load;
use egress_proxy::policy::{Decision, Destination, HostError, Query};
use egress_proxy::proxy::transparent::Redirect;
use serde_json::Value;
use support::origins::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);

// === names and IP spellings ===

/// What the preset's policy says about one `host:port` as a CONNECT names it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Want {
    /// Allowed by this rule.
    Allow(&'static str),
    /// Refused for this reason, naming this rule (deny rule or near miss) or none.
    Deny(&'static str, Option<&'static str>),
    /// Not a host the proxy reads: `invalid_host` (or 400 for a bad port), never decided.
    Unparsed(HostError),
}

impl Want {
    /// Whether `policy` says this about `authority`, and what it says.
    fn check(&self, policy: &egress_proxy::policy::Policy, authority: &str) -> Result<(), String> {
        let got = match Destination::parse_authority(authority) {
            Err(e) => format!("{:?}", Want::Unparsed(e)),
            Ok(dest) => match policy.decide(&Query::new(&dest.host, dest.port)) {
                Decision::Allow { rule } => format!("Allow({:?})", policy.rule_name(rule)),
                Decision::Deny { reason, rule } => {
                    format!("Deny({:?}, {:?})", reason.as_str(), rule.map(|r| policy.rule_name(r)))
                }
            },
        };
        match got == format!("{self:?}") {
            true => Ok(()),
            false => Err(format!("{authority:?}: want {self:?}, got {got}")),
        }
    }
}

#[test]
fn names_and_ip_spellings_at_the_edges_of_the_presets_wildcards_are_decided_exactly() {
    use HostError::*;
    use Want::*;
    const NO_RULE: Want = Deny("no_rule", None);
    const INTERNAL: Want = Deny("internal_address", None);
    let label63 = format!("{}.westus2.batch.azure.com:443", "a".repeat(63));
    let label64 = format!("{}.westus2.batch.azure.com:443", "a".repeat(64));
    let cases: Vec<(&str, Want)> = vec![
        // *.westus2.batch.azure.com: one label or more in front, never the suffix itself.
        ("a.westus2.batch.azure.com:443", Allow("azure-batch")),
        ("a.b.westus2.batch.azure.com:443", Allow("azure-batch")),
        (&label63, Allow("azure-batch")),
        (&label64, Unparsed(LabelTooLong)),
        ("westus2.batch.azure.com:443", NO_RULE),
        ("xwestus2.batch.azure.com:443", NO_RULE),
        ("x-westus2.batch.azure.com:443", NO_RULE),
        ("batch.azure.com:443", NO_RULE),
        ("a.eastus.batch.azure.com:443", NO_RULE),
        ("a.westus2.batch.azure.co:443", NO_RULE),
        ("a.westus2.batch.azure.com.evil.example:443", NO_RULE),
        ("batch.azure.com.evil.example:443", NO_RULE),
        ("westus2.batch.azure.com.evil.example:443", NO_RULE),
        // Spellings: one trailing dot and upper case are the same name; nothing else is.
        ("a.westus2.batch.azure.com.:443", Allow("azure-batch")),
        ("A.WestUS2.BATCH.azure.COM:443", Allow("azure-batch")),
        ("a.westus2.batch.azure.com..:443", Unparsed(EmptyLabel)),
        (".westus2.batch.azure.com:443", Unparsed(EmptyLabel)),
        ("*.westus2.batch.azure.com:443", Unparsed(InvalidCharacter)),
        ("a%2ewestus2.batch.azure.com:443", Unparsed(InvalidCharacter)),
        ("a.westus2%2Ebatch.azure.com:443", Unparsed(InvalidCharacter)),
        ("a.westus2.batch.azure.com%00:443", Unparsed(InvalidCharacter)),
        ("a.westus2.batch.azure.com\0:443", Unparsed(InvalidCharacter)),
        ("a.westus2.batch.\u{430}zure.com:443", Unparsed(InvalidCharacter)), // Cyrillic а
        ("a_b.westus2.batch.azure.com:443", NO_RULE),                        // a wildcard never covers an underscore
        ("-a.westus2.batch.azure.com:443", Unparsed(HyphenAtLabelEdge)),
        ("user@a.westus2.batch.azure.com:443", Unparsed(Userinfo)),
        ("a.westus2.batch.azure.com:80", Deny("port_not_allowed", Some("azure-batch"))),
        ("a.westus2.batch.azure.com:0443", Allow("azure-batch")),
        ("a.westus2.batch.azure.com:+443", Unparsed(InvalidPort)),
        ("a.westus2.batch.azure.com:65979", Unparsed(InvalidPort)), // 443 + 65536
        ("a.westus2.batch.azure.com", Unparsed(InvalidPort)),
        // *.westus2.service.batch.azure.com
        ("a.westus2.service.batch.azure.com:443", Allow("azure-batch")),
        ("westus2.service.batch.azure.com:443", NO_RULE),
        ("service.batch.azure.com:443", NO_RULE),
        ("a.westus2.service.batch.azure.com.evil.example:443", NO_RULE),
        // *.data.mcr.microsoft.com, next to the exact mcr.microsoft.com.
        ("westus2.data.mcr.microsoft.com:443", Allow("mcr")),
        ("a.b.data.mcr.microsoft.com:443", Allow("mcr")),
        ("data.mcr.microsoft.com:443", NO_RULE),
        ("xdata.mcr.microsoft.com:443", NO_RULE),
        ("mcr.microsoft.com:443", Allow("mcr")),
        ("MCR.microsoft.com.:443", Allow("mcr")),
        ("a.mcr.microsoft.com:443", NO_RULE),
        ("mcr.microsoft.com.evil.example:443", NO_RULE),
        ("westus2.data.mcr.microsoft.com.evil.example:443", NO_RULE),
        // Wildcard rules that are switched off in the preset.
        ("account.blob.core.windows.net:443", NO_RULE),
        ("x.instances.azureml.ms:443", NO_RULE),
        // Exact names.
        ("ml.azure.com:443", Allow("azureml")),
        ("x.ml.azure.com:443", NO_RULE),
        ("ml.azure.com.evil.example:443", NO_RULE),
        ("xml.azure.com:443", NO_RULE),
        // Loopback, however it is spelled: protected, or not an address at all.
        ("127.0.0.1:443", INTERNAL),
        ("[::1]:443", INTERNAL),
        ("[::ffff:127.0.0.1]:443", INTERNAL),
        ("[::ffff:7f00:1]:443", INTERNAL),
        ("[64:ff9b::7f00:1]:443", INTERNAL),
        ("[0:0:0:0:0:0:0:1]:443", INTERNAL),
        // Unbracketed, an IPv6 literal beside a port is ambiguous (RFC 3986 §3.2.2): refused
        // rather than guessed at.
        ("::1:443", Unparsed(InvalidIpv6)),
        ("0x7f.1:443", Unparsed(AmbiguousNumeric)),
        ("0x7f000001:443", Unparsed(AmbiguousNumeric)),
        ("2130706433:443", Unparsed(AmbiguousNumeric)),
        ("127.1:443", Unparsed(AmbiguousNumeric)),
        ("0177.0.0.1:443", Unparsed(AmbiguousNumeric)),
        ("127.0.0.1.:443", Unparsed(AmbiguousNumeric)),
        ("[fe80::1%25eth0]:443", Unparsed(ZoneId)),
        ("[fe80::1%eth0]:443", Unparsed(ZoneId)),
        ("[127.0.0.1]:443", Unparsed(InvalidIpv6)),
        ("169.254.169.254:443", INTERNAL),
        ("[fd00::1]:443", INTERNAL),
        ("10.0.0.1:443", INTERNAL),
        // An address in the AzureMachineLearning tag, and spellings of it.
        ("4.171.27.64:443", Allow("azureml-service")),
        ("[::ffff:4.171.27.64]:443", Allow("azureml-service")),
        ("[2603:1000:4::300]:443", Allow("azureml-service")),
        ("4.171.27.64:80", Deny("port_not_allowed", Some("azureml-service"))),
        ("78322496:443", Unparsed(AmbiguousNumeric)), // 4.171.27.64 as one number
        ("0x4.0xab.0x1b.0x40:443", Unparsed(AmbiguousNumeric)),
        ("4.171.27.064:443", Unparsed(AmbiguousNumeric)),
        ("13.66.225.240:443", Allow("batch-node-management")),
        ("8.8.8.8:443", NO_RULE),
    ];
    let preset = load(None, &["westus2".into()]).unwrap();
    let policy = &preset.compiled.policy;
    let mut wrong = Vec::new();
    for (authority, want) in &cases {
        if let Err(e) = want.check(policy, authority) {
            wrong.push(e);
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

/// The preset's `*.` rules (and its exact names) on an origin's port, names pinned to loopback:
/// names a rule allows to `127.0.0.1`, every other name to `127.0.0.2`, where the origin for
/// refused addresses listens on the same port.
fn preset_like_rules(port: u16, allowed: &[&str], refused: &[&str]) -> String {
    let mut pins = String::from("[resolve.static]\n");
    for (names, ip) in [(allowed, "127.0.0.1"), (refused, "127.0.0.2")] {
        for n in names {
            pins.push_str(&format!("{n:?} = [\"{ip}\"]\n"));
        }
    }
    format!(
        "{pins}[[rule]]\nname = \"azure-batch\"\naction = \"allow\"\n\
         hosts = [\"*.westus2.batch.azure.com\", \"*.westus2.service.batch.azure.com\"]\nports = [{port}]\ntls_only = false\n\
         [[rule]]\nname = \"mcr\"\naction = \"allow\"\nhosts = [\"mcr.microsoft.com\", \"*.data.mcr.microsoft.com\"]\n\
         ports = [{port}]\ntls_only = false\n"
    )
}

/// A listener on 127.0.0.2 at `port` (the port an origin on 127.0.0.1 was given).
async fn bind_second(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.2", port)).await.unwrap_or_else(|e| panic!("binding 127.0.0.2:{port}: {e}"))
}

/// Sends `head` and `payload` through the explicit proxy. On a 200, closes the sending side once
/// the head is read, so that the tunnel ends; returns the whole answer and how it ended.
async fn connect_and_send(proxy: SocketAddr, head: &str, payload: &[u8]) -> (Vec<u8>, Ending) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut req = head.as_bytes().to_vec();
    req.extend_from_slice(payload);
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let ending = tokio::time::timeout(WAIT, async {
        let mut shut = false;
        loop {
            if !shut && out.starts_with(b"HTTP/1.1 200") && out.windows(4).any(|w| w == b"\r\n\r\n") {
                s.shutdown().await.unwrap();
                shut = true;
            }
            match s.read(&mut buf).await {
                Ok(0) => return Ending::Eof,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ending::Reset,
                Err(e) => panic!("reading from the proxy: {e}"),
            }
        }
    })
    .await
    .unwrap_or(Ending::Open);
    (out, ending)
}

#[tokio::test]
async fn name_spellings_through_the_live_proxy_reach_only_the_allowed_origin() {
    let origin = CountingOrigin::start().await;
    let port = origin.addr.port();
    let refused_origin = CountingOrigin::on(bind_second(port).await);
    let allowed = ["a.westus2.batch.azure.com", "a.b.westus2.batch.azure.com", "x.data.mcr.microsoft.com"];
    let refused = [
        "westus2.batch.azure.com",
        "xwestus2.batch.azure.com",
        "batch.azure.com.evil.example",
        "a.westus2.batch.azure.com.evil.example",
        "data.mcr.microsoft.com",
        "a_b.westus2.batch.azure.com",
    ];
    let proxy = TestProxy::start(&preset_like_rules(port, &allowed, &refused)).await;
    // A target that does not parse is logged as the client sent it, port and all.
    let raw = |host: &str| format!("{host}:{port}");
    // (what the client names, the answer's status, its reason, the audit line's decision, reason
    // and host)
    type Case<'a> = (&'a str, u16, &'a str, (&'a str, &'a str, String));
    let cases: Vec<Case> = vec![
        ("a.westus2.batch.azure.com", 200, "-", ("allow", "-", "a.westus2.batch.azure.com".into())),
        ("A.B.WESTUS2.Batch.Azure.Com", 200, "-", ("allow", "-", "a.b.westus2.batch.azure.com".into())),
        ("a.westus2.batch.azure.com.", 200, "-", ("allow", "-", "a.westus2.batch.azure.com".into())),
        ("x.data.mcr.microsoft.com", 200, "-", ("allow", "-", "x.data.mcr.microsoft.com".into())),
        ("westus2.batch.azure.com", 403, "no_rule", ("deny", "no_rule", "westus2.batch.azure.com".into())),
        ("xwestus2.batch.azure.com", 403, "no_rule", ("deny", "no_rule", "xwestus2.batch.azure.com".into())),
        ("batch.azure.com.evil.example", 403, "no_rule", ("deny", "no_rule", "batch.azure.com.evil.example".into())),
        (
            "a.westus2.batch.azure.com.evil.example",
            403,
            "no_rule",
            ("deny", "no_rule", "a.westus2.batch.azure.com.evil.example".into()),
        ),
        ("data.mcr.microsoft.com", 403, "no_rule", ("deny", "no_rule", "data.mcr.microsoft.com".into())),
        ("a_b.westus2.batch.azure.com", 403, "no_rule", ("deny", "no_rule", "a_b.westus2.batch.azure.com".into())),
        (
            "a.westus2.batch.azure.com..",
            403,
            "invalid_host",
            ("deny", "invalid_host", raw("a.westus2.batch.azure.com..")),
        ),
        // 127.0.0.2, where the refused origin listens, in every spelling.
        ("127.0.0.2", 403, "no_rule", ("deny", "no_rule", "127.0.0.2".into())),
        ("[::ffff:127.0.0.2]", 403, "no_rule", ("deny", "no_rule", "127.0.0.2".into())),
        ("[::ffff:7f00:2]", 403, "no_rule", ("deny", "no_rule", "127.0.0.2".into())),
        ("2130706434", 403, "invalid_host", ("deny", "invalid_host", raw("2130706434"))),
        ("0x7f.2", 403, "invalid_host", ("deny", "invalid_host", raw("0x7f.2"))),
        ("127.2", 403, "invalid_host", ("deny", "invalid_host", raw("127.2"))),
        ("0177.0.0.2", 403, "invalid_host", ("deny", "invalid_host", raw("0177.0.0.2"))),
        // ::1 is loopback too, but not in `allow_internal = ["127.0.0.0/8"]`.
        ("[::1]", 403, "internal_address", ("deny", "internal_address", "[::1]".into())),
        // Zone ids are refused, whatever address they hang on.
        ("[fe80::1%25lo]", 403, "invalid_host", ("deny", "invalid_host", raw("[fe80::1%25lo]"))),
        ("[::ffff:127.0.0.2%25lo]", 403, "invalid_host", ("deny", "invalid_host", raw("[::ffff:127.0.0.2%25lo]"))),
        // Percent-escapes never reach the policy: hyper refuses the request line (its own 400,
        // without a reason header; the line says bad_request and names no host).
        ("a%2ewestus2.batch.azure.com", 400, "-", ("deny", "bad_request", "-".into())),
        ("a.westus2.batch.azure.com%00", 400, "-", ("deny", "bad_request", "-".into())),
    ];
    let mut labels = Vec::new();
    for (i, (host, status, reason, line)) in cases.iter().enumerate() {
        let before = proxy.audit().len();
        let label = format!("case {i}: {host}");
        let head = format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n");
        let (resp, ending) = connect_and_send(proxy.addr, &head, label.as_bytes()).await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{host}: {text}");
        assert_eq!(ending, Ending::Eof, "{host}");
        match *status {
            200 => {
                assert!(text.ends_with("\r\n\r\n"), "the origin answers nothing: {text}");
                labels.push(label);
            }
            // hyper's own 400: its reason header is not compared (see `Header::HyperWritten`).
            400 => {}
            _ => assert!(text.contains(&format!("x-egress-deny-reason: {reason}\r\n")), "{host}: {text}"),
        }
        let lines = proxy.audit_at_least(before + 1).await;
        let got = decision_triples(&lines[before..]);
        let want = (line.0.to_string(), line.1.to_string(), line.2.clone());
        assert_eq!(got.first(), Some(&want), "{host}");
    }
    // Every allowed case reached the allowed origin with its own bytes, and nothing else did.
    let mut got: Vec<String> =
        origin.received_at_least(labels.len()).await.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    got.sort();
    labels.sort();
    assert_eq!(got, labels);
    assert_eq!(origin.accepted(), labels.len());
    refused_origin.assert_untouched("refused names and addresses").await;
}

// === smuggling ===

/// One smuggling attempt: what is sent, and what must come of it.
struct Smuggle {
    name: &'static str,
    send: String,
    /// The status line of each answer the client gets, in order.
    answers: Vec<&'static str>,
    /// `X-Egress-Deny-Reason` of the last answer.
    reason: Header,
    /// The decision lines, as (decision, reason, host); a host of `None` is not compared (the
    /// redaction of userinfo in the audit log is issue 9's item 6, tested with its fix).
    lines: Vec<(&'static str, &'static str, Option<String>)>,
    /// Requests the good origin serves (always with `Host: good.test:PORT`).
    served: usize,
}

/// The `X-Egress-Deny-Reason` header a case expects on its last answer.
#[derive(Clone, Copy, Debug)]
enum Header {
    /// None: an answer from the origin.
    Absent,
    Reason(&'static str),
    /// Not compared: a 400 that hyper writes itself on the explicit listener, for framing it
    /// will not read (duplicate Content-Length, a Transfer-Encoding that does not end in
    /// chunked, obs-fold), carries no reason header; its audit line says `bad_request`.
    HyperWritten,
}

fn smuggle(
    name: &'static str,
    send: String,
    answers: &[&'static str],
    reason: Header,
    lines: &[(&'static str, &'static str, Option<&str>)],
    served: usize,
) -> Smuggle {
    let lines = lines.iter().map(|(d, r, h)| (*d, *r, h.map(str::to_string))).collect();
    Smuggle { name, send, answers: answers.to_vec(), reason, lines, served }
}

const OK: &str = "HTTP/1.1 200 OK";
const BAD: &str = "HTTP/1.1 400 Bad Request";
const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden";

/// Allows good.test (at 127.0.0.1) on `port`, refuses bad.test (pinned to 127.0.0.2) by a deny
/// rule; evil.test (also at 127.0.0.2) is named by no rule.
fn smuggling_rules(port: u16) -> String {
    format!(
        "[resolve.static]\n\"good.test\" = [\"127.0.0.1\"]\n\"bad.test\" = [\"127.0.0.2\"]\n\"evil.test\" = [\"127.0.0.2\"]\n\
         [[rule]]\nname = \"good\"\naction = \"allow\"\nhosts = [\"good.test\"]\nports = [{port}]\n\
         [[rule]]\nname = \"bad\"\naction = \"deny\"\nhosts = [\"bad.test\"]\nports = [{port}]\n"
    )
}

/// Checks one smuggling case's answer and audit lines; `served` is what the good origin has
/// served so far.
fn check_smuggle(c: &Smuggle, resp: &[u8], lines: &[Value], served: &[String], port: u16) {
    let text = String::from_utf8_lossy(resp);
    let statuses: Vec<&str> = text.match_indices("HTTP/1.1 ").map(|(i, _)| text[i..].lines().next().unwrap()).collect();
    assert_eq!(statuses, c.answers, "{}: {text}", c.name);
    let reason = text.rsplit("HTTP/1.1 ").next().unwrap().to_ascii_lowercase();
    let reason = reason.split("x-egress-deny-reason: ").nth(1).and_then(|r| r.split("\r\n").next());
    match c.reason {
        Header::Absent => assert_eq!(reason, None, "{}: {text}", c.name),
        Header::Reason(want) => assert_eq!(reason, Some(want), "{}: {text}", c.name),
        Header::HyperWritten => {}
    }
    let got = decision_triples(lines);
    assert_eq!(got.len(), c.lines.len(), "{}: {got:?}", c.name);
    for ((d, r, h), (wd, wr, wh)) in got.iter().zip(&c.lines) {
        assert_eq!((d.as_str(), r.as_str()), (*wd, *wr), "{}: {got:?}", c.name);
        if let Some(wh) = wh {
            assert_eq!(h, wh, "{}", c.name);
        }
    }
    let good = format!("good.test:{port}");
    assert!(served.iter().all(|h| *h == good), "{}: the origin served {served:?}", c.name);
    assert_eq!(served.len(), c.served, "{}: served {served:?}", c.name);
}

#[tokio::test]
async fn smuggling_through_the_explicit_listener_never_reaches_a_refused_host() {
    let origin = HostOrigin::start().await;
    let p = origin.addr.port();
    let refused_origin = CountingOrigin::on(bind_second(p).await);
    let proxy = TestProxy::start(&smuggling_rules(p)).await;
    let (good, bad) = (format!("http://good.test:{p}"), format!("http://bad.test:{p}"));
    let smug = format!("GET {bad}/s HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n");
    let g = Some("good.test");
    let b = Some("bad.test");
    let cases = vec![
        // hyper reads the chunked body (TE wins over CL) and closes after answering: the bytes
        // after it are never read as a request.
        smuggle(
            "CL.TE",
            format!(
                "POST {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smug}",
                5 + smug.len()
            ),
            &[OK],
            Header::Absent,
            &[("allow", "-", g)],
            1,
        ),
        // The smuggled request is the chunked body of a request to good.test: body bytes.
        smuggle(
            "TE.CL",
            format!(
                "POST {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smug}\r\n0\r\n\r\n",
                smug.len()
            ),
            &[OK],
            Header::Absent,
            &[("allow", "-", g)],
            1,
        ),
        smuggle(
            "duplicate Content-Length",
            format!("POST {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smug}", smug.len()),
            &[BAD],
            Header::HyperWritten,
            &[("deny", "bad_request", Some("-"))],
            0,
        ),
        smuggle(
            "Transfer-Encoding: chunked, identity",
            format!("POST {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smug}"),
            &[BAD],
            Header::HyperWritten,
            &[("deny", "bad_request", Some("-"))],
            0,
        ),
        smuggle(
            "obs-fold in Transfer-Encoding",
            format!("POST {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smug}"),
            &[BAD],
            Header::HyperWritten,
            &[("deny", "bad_request", Some("-"))],
            0,
        ),
        // Each request on a kept-alive connection is decided on its own.
        smuggle(
            "a refused request pipelined after an allowed one",
            format!("GET {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n{smug}"),
            &[OK, FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("allow", "-", g), ("deny", "denied_by_rule", b)],
            1,
        ),
        // A refusal closes the connection: what was pipelined after it is never served.
        smuggle(
            "a request pipelined after a refused one",
            format!("GET {bad}/ HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\nGET {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        smuggle(
            "a request to a host no rule names, pipelined after an allowed one",
            format!("GET {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\nGET http://evil.test:{p}/ HTTP/1.1\r\nHost: evil.test:{p}\r\n\r\n"),
            &[OK, FORBIDDEN],
            Header::Reason("no_rule"),
            &[("allow", "-", g), ("deny", "no_rule", Some("evil.test"))],
            1,
        ),
        // No `100 Continue` before the refusal: the body is never asked for.
        smuggle(
            "Expect: 100-continue to a refused host",
            format!("POST {bad}/ HTTP/1.1\r\nHost: bad.test:{p}\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        // Upgrade is hop-by-hop: the origin answers an ordinary request, and the bytes after it
        // are the next request, decided on its own, not a tunnel.
        smuggle(
            "Upgrade, then a smuggled request",
            format!("GET {good}/ HTTP/1.1\r\nHost: good.test:{p}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n{smug}"),
            &[OK, FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("allow", "-", g), ("deny", "denied_by_rule", b)],
            1,
        ),
        smuggle(
            "Upgrade to a refused host",
            format!("GET {bad}/ HTTP/1.1\r\nHost: bad.test:{p}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        smuggle(
            "absolute form naming the refused host, Host the allowed one",
            format!("GET {bad}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", Some(&format!("bad.test:{p}")))],
            0,
        ),
        smuggle(
            "absolute form naming the allowed host, Host the refused one",
            format!("GET {good}/ HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", Some(&format!("good.test:{p}")))],
            0,
        ),
        smuggle(
            "userinfo naming the allowed host in front of the refused one",
            format!("GET http://good.test@bad.test:{p}/ HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", None)],
            0,
        ),
        smuggle(
            "userinfo naming the refused host in front of the allowed one",
            format!("GET http://bad.test:{p}@good.test:{p}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", None)],
            0,
        ),
        smuggle(
            "userinfo in a CONNECT target",
            format!("CONNECT good.test@bad.test:{p} HTTP/1.1\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", None)],
            0,
        ),
    ];
    let mut served = 0;
    for c in &cases {
        let before = proxy.audit().len();
        let (resp, ending) = raw_exchange(proxy.addr, c.send.as_bytes(), WAIT).await;
        assert_eq!(ending, Ending::Eof, "{}", c.name);
        // Decision lines are written before the answer; close lines when the body is done.
        let lines = proxy.audit();
        let hosts = origin.hosts();
        check_smuggle(c, &resp, &lines[before..], &hosts[served..], p);
        served = hosts.len();
    }
    refused_origin.assert_untouched("bad.test and evil.test").await;
}

/// What a client gets back for `req` on the `plain` listener, redirected from `original_dst`.
async fn plain_exchange(t: &Transparent, original_dst: SocketAddr, req: &[u8]) -> Vec<u8> {
    let mut c = t.connect(Redirect::Plain, original_dst).await;
    c.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await.expect("answered and closed").unwrap();
    out
}

/// The `plain` cases: origin form, one request per connection. With `hyper_refusals`, only the
/// cases that the proxy's own head check lets through and hyper then refuses (see the ignored
/// test below).
fn plain_cases(p: u16, hyper_refusals: bool) -> Vec<Smuggle> {
    let smug = format!("GET /s HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n");
    let g = Some("good.test");
    let b = Some("bad.test");
    let ip = Some("127.0.0.1");
    let mut cases = vec![
        smuggle(
            "CL.TE",
            format!(
                "POST / HTTP/1.1\r\nHost: good.test:{p}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smug}",
                5 + smug.len()
            ),
            // Both framings at once: refused by the strict head check before any decision.
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        smuggle(
            "TE.CL",
            format!(
                "POST / HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smug}\r\n0\r\n\r\n",
                smug.len()
            ),
            // Both framings at once: refused by the strict head check before any decision.
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        // Refused by the proxy's own strict head check, before any decision on a name.
        smuggle(
            "obs-fold in Transfer-Encoding",
            format!("POST / HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smug}"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        // One request per connection: the second is never read.
        smuggle(
            "a refused request pipelined after an allowed one",
            format!("GET / HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n{smug}"),
            &[OK],
            Header::Absent,
            &[("allow", "-", g)],
            1,
        ),
        smuggle(
            "a request pipelined after a refused one",
            format!("GET / HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\nGET / HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        smuggle(
            "Expect: 100-continue to a refused host",
            format!("POST / HTTP/1.1\r\nHost: bad.test:{p}\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        smuggle(
            "a host no rule names (no address rule either)",
            format!("GET / HTTP/1.1\r\nHost: evil.test:{p}\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("no_rule"),
            &[("deny", "no_rule", Some("evil.test"))],
            0,
        ),
        smuggle(
            "Upgrade, then a smuggled request",
            format!("GET / HTTP/1.1\r\nHost: good.test:{p}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n{smug}"),
            &[OK],
            Header::Absent,
            &[("allow", "-", g)],
            1,
        ),
        smuggle(
            "Upgrade to a refused host",
            format!("GET / HTTP/1.1\r\nHost: bad.test:{p}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            &[FORBIDDEN],
            Header::Reason("denied_by_rule"),
            &[("deny", "denied_by_rule", b)],
            0,
        ),
        smuggle(
            "absolute form naming the refused host, Host the allowed one",
            format!("GET http://bad.test:{p}/ HTTP/1.1\r\nHost: good.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        smuggle(
            "absolute form naming the allowed host, Host the refused one",
            format!("GET http://good.test:{p}/ HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        smuggle(
            "userinfo naming the allowed host in front of the refused one",
            format!("GET http://good.test@bad.test:{p}/ HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        smuggle(
            "userinfo in the Host header",
            format!("GET / HTTP/1.1\r\nHost: good.test@bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
        smuggle(
            "CONNECT on the plain listener",
            format!("CONNECT bad.test:{p} HTTP/1.1\r\nHost: bad.test:{p}\r\n\r\n"),
            &[BAD],
            Header::Reason("bad_request"),
            &[("deny", "bad_request", ip)],
            0,
        ),
    ];
    if hyper_refusals {
        // Framing httparse alone accepts: refused by the strict head check, with a line and a
        // reason (once answered by hyper's bare 400 with neither).
        cases = vec![
            smuggle(
                "duplicate Content-Length",
                format!("POST / HTTP/1.1\r\nHost: good.test:{p}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smug}", smug.len()),
                &[BAD],
                Header::Reason("bad_request"),
                &[("deny", "bad_request", ip)],
                0,
            ),
            smuggle(
                "Transfer-Encoding: chunked, identity",
                format!("POST / HTTP/1.1\r\nHost: good.test:{p}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smug}"),
                &[BAD],
                Header::Reason("bad_request"),
                &[("deny", "bad_request", ip)],
                0,
            ),
        ];
    }
    cases
}

async fn run_plain_cases(hyper_refusals: bool) {
    let origin = HostOrigin::start().await;
    let p = origin.addr.port();
    let refused_origin = CountingOrigin::on(bind_second(p).await);
    let t = Transparent::new(&smuggling_rules(p));
    let mut served = 0;
    for c in plain_cases(p, hyper_refusals) {
        let before = t.audit().len();
        let resp = plain_exchange(&t, origin.addr, c.send.as_bytes()).await;
        let lines = t.audit();
        let hosts = origin.hosts();
        check_smuggle(&c, &resp, &lines[before..], &hosts[served..], p);
        served = hosts.len();
    }
    refused_origin.assert_untouched("bad.test and evil.test").await;
}

#[tokio::test]
async fn smuggling_through_the_plain_listener_never_reaches_a_refused_host() {
    run_plain_cases(false).await;
}

#[tokio::test]
async fn plain_requests_that_hyper_refuses_are_audited_as_bad_request() {
    run_plain_cases(true).await;
}

// === ClientHellos ===

/// curl's ClientHello for ml.azure.com (one record, 517 bytes).
const CURL_ML: &[u8] = include_bytes!("data/client_hello/curl_ml_azure_com.bin");

/// A padding extension (RFC 7685) of `n` bytes.
fn padding(n: usize) -> (u16, Vec<u8>) {
    (0x0015, vec![0; n])
}

/// How a hello is written: all at once, or a byte at a time with a pause between bytes.
#[derive(Clone, Copy, Debug)]
enum Pace {
    Whole,
    ByteByByte,
}

/// One ClientHello case, and what comes of it. A refused hello is audited as refused by the rule
/// that allowed the name (`azureml`) when it was read far enough to be decided on.
struct HelloCase {
    name: &'static str,
    bytes: Vec<u8>,
    pace: Pace,
    /// `None`: allowed, and the origin receives exactly `bytes`. Else the reason.
    refused: Option<&'static str>,
}

impl HelloCase {
    /// How the CONNECT listener ends a refused tunnel: cleanly, as it read the whole hello and
    /// sets no SO_LINGER; but a hello over 64 KiB is refused on its handshake header, and what
    /// is left unread turns the close into a reset.
    fn connect_ending(&self) -> std::io::ErrorKind {
        match self.bytes.len() > 64 * 1024 && self.refused.is_some() {
            true => std::io::ErrorKind::ConnectionReset,
            false => std::io::ErrorKind::UnexpectedEof,
        }
    }
}

fn hello_cases() -> Vec<HelloCase> {
    let ml = |extra: Vec<(u16, Vec<u8>)>| {
        let mut exts = vec![sni_ext(&[b"ml.azure.com"])];
        exts.extend(extra);
        synthetic(&exts)
    };
    let case = |name, bytes, pace, refused| HelloCase { name, bytes, pace, refused };
    let oversized = ml(vec![padding(40_000), (0xff99, vec![0; 30_000])]);
    assert!(oversized.len() > 64 * 1024 + 20, "{}", oversized.len());
    vec![
        case("curl's hello, whole", CURL_ML.to_vec(), Pace::Whole, None),
        case("curl's hello, a byte at a time", CURL_ML.to_vec(), Pace::ByteByByte, None),
        case("curl's hello across 4 records", refragment(CURL_ML, 160), Pace::Whole, None),
        case("curl's hello across 26 records, a byte at a time", refragment(CURL_ML, 20), Pace::ByteByByte, None),
        // More than 32 records: refused rather than reassembled at the client's pace.
        case("curl's hello across 73 records", refragment(CURL_ML, 7), Pace::Whole, Some("invalid_host")),
        // Just under the 64 KiB the proxy reads, in 4 records: allowed and replayed whole.
        case("a 60 KiB hello", ml(vec![padding(60_000)]), Pace::Whole, None),
        case("a hello over 64 KiB", oversized, Pace::Whole, Some("invalid_host")),
        case(
            "two names in one server_name",
            synthetic(&[sni_ext(&[b"ml.azure.com", b"evil.example.com"])]),
            Pace::Whole,
            Some("invalid_host"),
        ),
        case(
            "two server_name extensions",
            synthetic(&[sni_ext(&[b"ml.azure.com"]), sni_ext(&[b"evil.example.com"])]),
            Pace::Whole,
            Some("invalid_host"),
        ),
        case("an IP literal as server name", synthetic(&[sni_ext(&[b"127.0.0.1"])]), Pace::Whole, Some("invalid_host")),
        case("an IPv6 literal as server name", synthetic(&[sni_ext(&[b"::1"])]), Pace::Whole, Some("invalid_host")),
        case("ECH (the harness's hello)", hello_with_ech("ml.azure.com"), Pace::Whole, Some("ech_present")),
        case("ECH, draft 10 codepoint", ml(vec![(0xfe0a, vec![1, 2, 3])]), Pace::Whole, Some("ech_present")),
        case("ECH outer extensions", ml(vec![(0xfd00, vec![1, 2, 3])]), Pace::Whole, Some("ech_present")),
        case("ESNI", ml(vec![(0xffce, vec![1, 2, 3])]), Pace::ByteByByte, Some("ech_present")),
    ]
}

async fn send_paced(s: &mut TcpStream, bytes: &[u8], pace: Pace) {
    match pace {
        Pace::Whole => s.write_all(bytes).await.unwrap(),
        Pace::ByteByByte => {
            s.set_nodelay(true).unwrap();
            for b in bytes {
                s.write_all(std::slice::from_ref(b)).await.unwrap();
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    }
}

/// ml.azure.com on the origin's port, pinned to it.
fn hello_rules(port: u16) -> String {
    format!(
        "[resolve.static]\n\"ml.azure.com\" = [\"127.0.0.1\"]\n\
         [[rule]]\nname = \"azureml\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\nports = [{port}]\n"
    )
}

#[tokio::test]
async fn client_hellos_through_connect_are_replayed_whole_or_refused_before_a_byte_goes_upstream() {
    let origin = CountingOrigin::start().await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&hello_rules(port)).await;
    let cases = hello_cases();
    for (i, c) in cases.iter().enumerate() {
        let before = proxy.audit().len();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(format!("CONNECT ml.azure.com:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", c.name);
        send_paced(&mut s, &c.bytes, c.pace).await;
        if c.refused.is_none() {
            s.shutdown().await.unwrap();
        }
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect(c.name);
        let ending = read.map_or_else(|e| e.kind(), |_| std::io::ErrorKind::UnexpectedEof);
        assert_eq!((ending, rest.len()), (c.connect_ending(), 0), "{}: nothing comes back", c.name);
        // The upstream was dialled before the 200 (CONNECT answers once it is connected), so
        // every case opened one connection to the origin; a refused one carried no byte.
        let got = origin.received_at_least(i + 1).await;
        let want: &[u8] = if c.refused.is_none() { &c.bytes } else { b"" };
        assert!(got[i] == want, "{}: the origin got {} bytes, want {}", c.name, got[i].len(), want.len());
        let lines = proxy.audit_at_least(before + 1).await;
        let d = &lines[before];
        let want_line = match c.refused {
            None => ("allow", "-"),
            Some(reason) => ("deny", reason),
        };
        assert_eq!(
            (d["decision"].as_str().unwrap(), d["reason"].as_str().unwrap_or("-")),
            want_line,
            "{}: {d}",
            c.name
        );
        assert_eq!((d["host"].as_str(), d["rule"].as_str()), (Some("ml.azure.com"), Some("azureml")), "{}", c.name);
    }
    assert_eq!(origin.accepted(), cases.len());
}

#[tokio::test]
async fn client_hellos_on_the_tls_listener_are_replayed_whole_or_reset_before_anything_is_dialled() {
    let origin = CountingOrigin::start().await;
    let port = origin.addr.port();
    let t = Transparent::new(&hello_rules(port));
    let cases = hello_cases();
    let mut allowed = 0;
    for c in &cases {
        let before = t.audit().len();
        let mut s = t.connect(Redirect::Tls, origin.addr).await;
        send_paced(&mut s, &c.bytes, c.pace).await;
        if c.refused.is_none() {
            s.shutdown().await.unwrap();
        }
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect(c.name);
        let lines = t.audit_at_least(before + 1).await;
        let d = &lines[before];
        match c.refused {
            None => {
                allowed += 1;
                assert_eq!(read.map(|_| rest.len()).map_err(|e| e.kind()), Ok(0), "{}", c.name);
                let got = origin.received_at_least(allowed).await;
                assert!(got[allowed - 1] == c.bytes, "{}: the origin got {} bytes", c.name, got[allowed - 1].len());
                assert_eq!(
                    (d["decision"].as_str(), d["host"].as_str(), d["rule"].as_str()),
                    (Some("allow"), Some("ml.azure.com"), Some("azureml")),
                    "{}",
                    c.name
                );
            }
            Some(reason) => {
                assert_eq!(read.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset), "{}", c.name);
                assert!(rest.is_empty(), "{}", c.name);
                assert_eq!((d["decision"].as_str(), d["reason"].as_str()), (Some("deny"), Some(reason)), "{}", c.name);
                // A hello that cannot be read names nothing: the line names the original
                // destination. ECH is refused once the name is decided, by the rule that allowed it.
                let want = match reason {
                    "ech_present" => (Some("ml.azure.com"), Some("azureml")),
                    _ => (Some("127.0.0.1"), None),
                };
                assert_eq!((d["host"].as_str(), d["rule"].as_str()), want, "{}: {d}", c.name);
                assert_eq!(d["dst_addr"], Value::Null, "{}", c.name);
            }
        }
    }
    // A refused hello is refused before the dial: only the allowed ones reached the origin.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(origin.accepted(), allowed);
}

/// A method is a token the client chooses, up to its request head's size: the audit line shows
/// at most 32 bytes of it, as it shows at most 300 of a host, so that one request cannot make a
/// 30 KiB audit line, nor 4,096 queued lines 128 MiB. (Found in review.)
#[tokio::test]
async fn a_long_extension_method_is_cut_in_the_audit_line() {
    let proxy = TestProxy::start("").await;
    let method = "X".repeat(30 * 1024);
    let req = format!("{method} http://evil.example.com/ HTTP/1.1\r\nHost: evil.example.com\r\n\r\n");
    let (resp, _) = raw_exchange(proxy.addr, req.as_bytes(), WAIT).await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 403"), "{}", String::from_utf8_lossy(&resp));
    let lines = proxy.audit();
    let line = lines.iter().find(|l| l["event"] == "decision").expect("a decision line");
    assert_eq!(line["method"], "X".repeat(32));
    assert_eq!(line["decision"], "deny");
}

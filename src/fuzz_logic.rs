//! The invariants the fuzz targets check, kept in one place: the cargo-fuzz targets in `fuzz/` call
//! these functions under libFuzzer, and `tests/fuzz_corpus.rs` replays the committed corpus through
//! them and runs a bounded stable-Rust mutation fuzzer over them, so CI checks the same things
//! without a nightly toolchain.
//!
//! Each check takes arbitrary bytes and **panics** (with `assert!`) when an invariant fails: here a
//! panic is the finding, which is why this module, unlike the rest of the crate, asserts. It
//! returns a short label of what the input amounted to (`"pending"`, `"InvalidPort"`, …), which the
//! stable fuzzer uses as its only feedback: an input with a label not seen before is kept.
//!
//! Not part of the API: it exists for the fuzzers and their tests.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr};

use crate::config::{Action, Config, ConfigErrors, Origin, Protocol};
use crate::policy::service_tags::TagTable;
use crate::policy::{compile, Decision, DenyReason, Destination, Host, HostName, Pattern, Query};
use crate::proxy::head::{self as request_head, HeadError};
use crate::tls::{self, Parsed, MAX_HELLO_BYTES};

/// One fuzz target: its name (the directory of its corpus under `fuzz/corpus/`) and its check.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]) -> String,
}

/// Every target, by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: &[Target] = &[
    Target { name: "client_hello", check: client_hello },
    Target { name: "host", check: host },
    Target { name: "head", check: head },
    Target { name: "config", check: config },
    Target { name: "dns", check: dns },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

// === client_hello ===

/// The ClientHello reader (`tls::parse`):
/// - an `Ok` server name is a valid, normalised host name and not an IP literal;
/// - its answers over growing prefixes never go back: once a hello, the same hello whatever
///   follows; once refused, refused;
/// - it decides within `MAX_HELLO_BYTES`, whatever follows the input (the detector reads no more).
pub fn client_hello(data: &[u8]) -> String {
    let full = tls::parse(data);
    if let Ok(Parsed::Hello(hello)) = &full {
        if let Some(sni) = &hello.sni {
            assert_eq!(HostName::parse(sni.as_str()).as_ref(), Ok(sni), "an SNI re-parses to itself");
            assert_eq!(Host::parse(sni.as_str()), Ok(Host::Name(sni.clone())), "an SNI is never an IP literal");
        }
        assert!(hello.alpn.iter().all(|p| !p.is_empty()), "ALPN names are not empty: {:?}", hello.alpn);
    }
    check_prefixes(data, &[0x16, 0x03, 0x01, 0x00, 0x01, 0x00], tls::parse, |r| match r {
        Ok(Parsed::NeedMore) => Stage::Pending,
        Ok(Parsed::Hello(_)) => Stage::Done,
        Err(_) => Stage::Refused,
    });
    if data.len() < MAX_HELLO_BYTES {
        let mut padded = vec![0; MAX_HELLO_BYTES];
        padded[..data.len()].copy_from_slice(data); // data.len() < MAX_HELLO_BYTES
        assert_ne!(tls::parse(&padded), Ok(Parsed::NeedMore), "decided within MAX_HELLO_BYTES");
    }
    match full {
        Ok(Parsed::NeedMore) => "pending".into(),
        Ok(Parsed::Hello(h)) => format!("hello sni={} alpn={} ech={}", h.sni.is_some(), h.alpn.len(), h.ech),
        Err(e) => format!("{e:?}"),
    }
}

// === host ===

/// Host names and destinations, on the input as text:
/// - an `Ok` `HostName` re-parses to itself, is lower-case, has no trailing dot, labels of 1..=63
///   octets of `[a-z0-9_-]` with no hyphen at an edge, at most 253 octets, is the input up to case
///   and one trailing dot, and is what `Host::parse` reads too (never an IP address);
/// - case never changes the outcome of `HostName::parse`;
/// - an `Ok` `Host` or `Destination` displays as text that re-parses to the same value, whichever
///   of `parse_authority`, `parse_host_port` and `parse_loose` reads it, and its port is not 0;
/// - an authority with a port reads the same as a `Host` value; a `Host` value (no scheme) reads
///   the same as what an operator types (`parse_loose`).
pub fn host(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;

    let name = HostName::parse(s);
    if let Ok(n) = &name {
        check_name(s, n);
    }
    assert_eq!(HostName::parse(&s.to_ascii_uppercase()), name, "case never matters");
    assert_eq!(HostName::parse(&s.to_ascii_lowercase()), name, "case never matters");

    let host = Host::parse(s);
    if let Ok(h) = &host {
        assert_eq!(Host::parse(&h.to_string()).as_ref(), Ok(h), "a Host re-parses from its display");
        if let Host::Ip(IpAddr::V6(v6)) = h {
            assert_eq!(v6.to_ipv4_mapped(), None, "IPv4-mapped IPv6 is folded to IPv4");
        }
    }

    let authority = Destination::parse_authority(s);
    if let Ok(d) = &authority {
        check_destination(d);
        assert_eq!(Destination::parse_host_port(s, 1).as_ref(), Ok(d), "an authority reads as a Host value");
    }
    let host_port = Destination::parse_host_port(s, DEFAULT_PORT);
    if let Ok(d) = &host_port {
        check_destination(d);
        if !s.contains("://") {
            assert_eq!(
                Destination::parse_loose(s, DEFAULT_PORT).as_ref(),
                Ok(d),
                "a Host value reads the same where an operator types it"
            );
        }
    }
    let loose = Destination::parse_loose(s, DEFAULT_PORT);
    if let Ok(d) = &loose {
        check_destination(d);
    }
    format!("{} {} {} {} {}", label(&name), label(&host), label(&authority), label(&host_port), label(&loose))
}

fn check_name(input: &str, n: &HostName) {
    let s = n.as_str();
    assert_eq!(HostName::parse(s).as_ref(), Ok(n), "a HostName re-parses to itself");
    assert!(!s.is_empty() && s.len() <= 253 && !s.ends_with('.'), "{s:?}: length and trailing dot");
    for label in s.split('.') {
        assert!((1..=63).contains(&label.len()), "{s:?}: label {label:?}");
        assert!(!label.starts_with('-') && !label.ends_with('-'), "{s:?}: hyphen at an edge of {label:?}");
        assert!(
            label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
            "{s:?}: characters of {label:?}"
        );
    }
    assert!(s.eq_ignore_ascii_case(input.strip_suffix('.').unwrap_or(input)), "{s:?} is {input:?} up to case");
    assert!(s.parse::<IpAddr>().is_err() && s.parse::<Ipv4Addr>().is_err(), "{s:?} is not an IP address");
    assert_eq!(Host::parse(input), Ok(Host::Name(n.clone())), "Host::parse reads {input:?} as the same name");
}

fn check_destination(d: &Destination) {
    assert_ne!(d.port, 0, "{d:?}: port 0");
    let shown = d.to_string();
    assert_eq!(Destination::parse_authority(&shown).as_ref(), Ok(d), "{shown:?} re-parses as an authority");
    assert_eq!(Destination::parse_host_port(&shown, 1).as_ref(), Ok(d), "{shown:?} re-parses as a Host value");
    assert_eq!(Destination::parse_loose(&shown, 1).as_ref(), Ok(d), "{shown:?} re-parses as typed");
}

// === head ===

/// The request-head reader of the plain listener (`proxy::head::parse`):
/// - a complete head has `0 < len <= input.len()`, ends in CRLF CRLF, has no bare LF, no obs-fold
///   line and at most one Host field (counted here independently of httparse), and names a
///   destination exactly when it has a Host field or an absolute-form target;
/// - it completes at the byte that ends it: every shorter prefix needs more, and whatever follows
///   it (a body, the next request) does not change it;
/// - once refused, refused whatever follows;
/// - its destination re-parses from its display.
pub fn head(data: &[u8]) -> String {
    let full = request_head::parse(data);
    if let Ok(Some(h)) = &full {
        assert!(h.len > 0 && h.len <= data.len(), "len {} of {} bytes", h.len, data.len());
        let bytes = data.get(..h.len).unwrap_or(data);
        assert!(bytes.ends_with(b"\r\n\r\n"), "a head ends in CRLF CRLF: {:?}", String::from_utf8_lossy(bytes));
        assert_eq!(request_head::parse(bytes).as_ref(), Ok(&Some(h.clone())), "the head alone reads the same");
        let shorter = data.get(..h.len - 1).unwrap_or_default();
        assert_eq!(request_head::parse(shorter), Ok(None), "one byte short of the head needs more");
        check_head_lines(bytes, h.dest.is_some());
        if let Some(d) = &h.dest {
            check_destination(d);
        }
    }
    check_prefixes(data, b"\r\nHost: x.test\r\n\r\nGET / HTTP/1.1\r\n\r\n", request_head::parse, |r| match r {
        Ok(None) => Stage::Pending,
        Ok(Some(_)) => Stage::Done,
        Err(_) => Stage::Refused,
    });
    match full {
        Ok(None) => "pending".into(),
        Ok(Some(h)) => {
            let dest = h.dest.map_or("none", |d| if d.host.name().is_some() { "name" } else { "ip" });
            let form = match data.split(|&b| b == b' ').nth(1).and_then(|t| t.first()) {
                Some(b'/') => "origin",
                Some(b'*') => "asterisk",
                _ => "absolute",
            };
            format!("head dest={dest} form={form} more={}", h.len < data.len())
        }
        Err(HeadError::InvalidHost(e)) => format!("InvalidHost({e:?})"),
        Err(e) => format!("{e:?}"),
    }
}

/// Line-level facts of a complete head, read without httparse.
fn check_head_lines(bytes: &[u8], has_dest: bool) {
    let shown = String::from_utf8_lossy(bytes);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && bytes.get(i - 1) == Some(&b'\r'), "bare LF at {i}: {shown:?}");
            assert!(!matches!(bytes.get(i + 1), Some(b' ' | b'\t')), "obs-fold after {i}: {shown:?}");
        }
    }
    // Empty lines before the request line are skipped (RFC 9112 §2.2), as httparse does.
    let mut lines =
        bytes.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).skip_while(|l| l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let hosts = lines
        .filter(|l| {
            let name = l.split(|&b| b == b':').next().unwrap_or_default();
            l.contains(&b':') && name.trim_ascii().eq_ignore_ascii_case(b"host")
        })
        .count();
    assert!(hosts <= 1, "{hosts} Host fields: {shown:?}");
    let target = request_line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let absolute = !target.starts_with(b"/") && target != b"*";
    assert_eq!(has_dest, hosts == 1 || absolute, "a destination iff Host or absolute form: {shown:?}");
}

// === config ===

/// The config loader (`Config::from_str`) and compiler (`policy::compile`, against an empty tag
/// table), on the input as text:
/// - neither panics; every error names the file and a line and column inside the text (>= 1);
/// - a compiled policy has one rule per enabled rule of the file and lists every disabled one;
/// - deciding an exact host of a rule never allows through a deny or UDP rule, a rule that denies
///   a host on its port (with no address or client condition) always wins, and an allow rule's
///   host is allowed when the policy has no deny rule.
pub fn config(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let config = match Config::from_str(&text, Origin::File(FUZZ_FILE.into())) {
        Ok(c) => c,
        Err(errors) => {
            check_errors(&text, &errors);
            return format!("syntax {}", error_class(&errors));
        }
    };
    let compiled = match compile(&config, &TagTable::default()) {
        Ok(c) => c,
        Err(errors) => {
            check_errors(&text, &errors);
            return format!("compile {}", error_class(&errors));
        }
    };
    let policy = &compiled.policy;
    let enabled = config.rules.iter().filter(|r| r.enabled).count();
    assert_eq!(policy.rules().len(), enabled, "one compiled rule per enabled rule");
    assert_eq!(compiled.disabled.len(), config.rules.len() - enabled, "every disabled rule is listed");
    let no_deny = policy.rules().iter().all(|r| r.action == Action::Allow);
    let exact = policy.rules().iter().flat_map(|r| {
        r.patterns.iter().filter_map(move |p| match p {
            Pattern::Exact(n) => Some((r, n)),
            _ => None,
        })
    });
    for (rule, name) in exact.take(MAX_DECISIONS) {
        let Some(port) = rule.ports.iter().next().map(|p| *p.start()) else {
            panic!("rule {:?} has no port", rule.name);
        };
        let host = Host::Name(name.clone());
        let d = policy.decide(&Query::new(&host, port));
        let _ = policy.explain(&d);
        match d {
            Decision::Allow { rule: id } => {
                let by = policy.rule(id).map(|r| (r.action, r.protocol));
                assert_eq!(by, Some((Action::Allow, Protocol::Tcp)), "{name}:{port} allowed by {id:?}");
            }
            Decision::Deny { rule: Some(id), .. } => assert!(policy.rule(id).is_some(), "{id:?} is a rule"),
            Decision::Deny { rule: None, .. } => {}
        }
        let plain = rule.protocol == Protocol::Tcp && rule.ranges.is_empty() && rule.sources.is_empty();
        if plain && rule.action == Action::Deny {
            assert!(
                matches!(d, Decision::Deny { reason: DenyReason::DeniedByRule, rule: Some(_) }),
                "{name}:{port} is denied by rule {:?}: {d:?}",
                rule.name
            );
        }
        if plain && no_deny {
            assert!(d.is_allow(), "{name}:{port} is allowed by rule {:?}: {d:?}", rule.name);
        }
    }
    format!("ok rules={} warnings={}", policy.rules().len().min(4), compiled.warnings.len().min(4))
}

fn check_errors(text: &str, errors: &ConfigErrors) {
    assert!(!errors.0.is_empty(), "an error list is never empty");
    let lines = text.matches('\n').count() + 1;
    for e in &errors.0 {
        assert_eq!(e.file, FUZZ_FILE, "{e:?}");
        assert!((1..=lines).contains(&e.line), "line {} of {lines}: {e:?}", e.line);
        assert!(e.col >= 1, "{e:?}");
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("{FUZZ_FILE}:{}:{}: ", e.line, e.col)), "{shown:?}");
    }
}

/// A coarse, bounded label of the first error: the start of its message, up to the first quoted
/// or numeric part, and its field with indexes and quoted keys dropped and any name this file does
/// not know (an unknown key of the input) written `*`.
fn error_class(errors: &ConfigErrors) -> String {
    let Some(first) = errors.0.first() else { return String::new() };
    let msg: String = first.msg.chars().take_while(|c| !matches!(c, '`' | '"' | '\'' | '0'..='9')).take(40).collect();
    let mut field = String::new();
    let mut quoted = false;
    for c in first.field.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted || c.is_ascii_digit() || c == ' ' => {}
            _ => field.push(c),
        }
    }
    let field: Vec<&str> = field
        .split('.')
        .map(|segment| if FIELDS.contains(&segment.trim_end_matches("[]")) { segment } else { "*" })
        .collect();
    format!("{}: {msg}", field.join("."))
}

// === shared checks ===

/// What a streaming parser says about the bytes so far.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Stage {
    Pending,
    Done,
    Refused,
}

/// A streaming parser never goes back. Over growing prefixes of `data` and then of `data` with
/// `suffix` appended: once done, every longer input gives the same answer; once refused, every
/// longer input is refused (possibly for another reason: more bytes may fail an earlier check).
fn check_prefixes<R: PartialEq + Debug>(
    data: &[u8],
    suffix: &[u8],
    parse: impl Fn(&[u8]) -> R,
    stage: impl Fn(&R) -> Stage,
) {
    let extended = [data, suffix].concat();
    let ends = prefix_ends(data.len()).chain([extended.len()]);
    let mut before: Option<(usize, R)> = None;
    for end in ends {
        let now = parse(extended.get(..end).unwrap_or_default());
        if let Some((at, was)) = &before {
            match stage(was) {
                Stage::Pending => {}
                Stage::Done => assert_eq!(&now, was, "done at {at} bytes, then different at {end}"),
                Stage::Refused => {
                    assert_eq!(stage(&now), Stage::Refused, "refused at {at} bytes ({was:?}), then {now:?} at {end}")
                }
            }
        }
        before = Some((end, now));
    }
}

/// Prefix lengths `0..=n` to try, increasing: all of them for short inputs, else the first and last
/// `EDGE` and an even spread between, so that a check stays cheap on large inputs.
fn prefix_ends(n: usize) -> impl Iterator<Item = usize> {
    let step = if n <= ALL_PREFIXES { 1 } else { (n / SPREAD).max(1) };
    (0..=n).filter(move |&i| i < EDGE || n - i < EDGE || i % step == 0)
}

/// The name of a result's variant, without its payload.
fn label<T, E: Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

const DEFAULT_PORT: u16 = 8080;
const FUZZ_FILE: &str = "fuzz.toml";
/// The names of the config file, for `error_class`; one missing here only makes labels coarser.
const FIELDS: &[&str] = &[
    "",
    "regions",
    "storage_accounts",
    "listen",
    "http",
    "tls",
    "plain",
    "catch_all",
    "admin",
    "service_tags",
    "file",
    "url",
    "refresh",
    "ca_file",
    "rule",
    "name",
    "action",
    "enabled",
    "protocol",
    "hosts",
    "cidrs",
    "ports",
    "sources",
    "sni_check",
    "allow_ech",
    "safety",
    "allow_internal",
    "resolve",
    "static",
    "timeout",
    "audit",
    "path",
    "limits",
    "max_request_head_bytes",
    "request_head_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_client",
    "shutdown_grace",
    "workers",
    "nftables",
    "proxy_uid",
    "dns",
    "transparent",
    "original_dst_mismatch",
];
/// Exact hosts decided per compiled config, so that a large config stays cheap.
const MAX_DECISIONS: usize = 64;
const ALL_PREFIXES: usize = 512;
const EDGE: usize = 32;
const SPREAD: usize = 64;

// === dns ===

/// The DNS filter's query path before any policy (`dns::screen`), then the policy's name check
/// on what it yields:
/// - bytes too short for an id are dropped; every reply it makes parses, is a response, and
///   carries the query's id;
/// - a question's name, as the filter reads it, is ASCII, and when it is a valid host name the
///   policy's `name_could_be_allowed` answers without panicking, and allows only under the
///   fuzz policy's allow rule.
pub fn dns(data: &[u8]) -> String {
    use hickory_resolver::proto::op::{Message, MessageType};

    match crate::dns::screen(data) {
        crate::dns::Screened::Drop => "drop".into(),
        crate::dns::Screened::Reply(bytes) => {
            let m = Message::from_vec(&bytes).expect("a reply the filter makes parses");
            assert_eq!(m.message_type(), MessageType::Response);
            assert_eq!(Some(m.id().to_be_bytes().as_slice()), data.get(..2), "the reply carries the query's id");
            format!("reply {:?}", m.response_code())
        }
        crate::dns::Screened::Question { question, .. } => {
            let ascii = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            assert!(ascii.is_ascii(), "{ascii:?}");
            let Ok(name) = HostName::parse(&ascii) else {
                return format!("question {} invalid", question.query_type());
            };
            let policy = dns_policy();
            let decided = policy.name_could_be_allowed(&name, IpAddr::V4(Ipv4Addr::LOCALHOST));
            if decided.is_ok() {
                assert!(name.as_str().ends_with(".allowed.example"), "only the allow rule's names: {name}");
            }
            format!("question {} {}", question.query_type(), if decided.is_ok() { "allowed" } else { "refused" })
        }
    }
}

/// The policy the `dns` target decides names with: one allow rule on `*.allowed.example`, one deny
/// rule inside it.
fn dns_policy() -> &'static crate::policy::Policy {
    static POLICY: std::sync::OnceLock<crate::policy::Policy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let text = "[[rule]]\nname = \"allow\"\naction = \"allow\"\nhosts = [\"*.allowed.example\"]\n\
                    [[rule]]\nname = \"deny\"\naction = \"deny\"\nhosts = [\"no.allowed.example\"]\n";
        let config = Config::from_str(text, Origin::Embedded).unwrap_or_else(|e| panic!("the fuzz policy: {e}"));
        compile(&config, &TagTable::default()).unwrap_or_else(|e| panic!("the fuzz policy: {e}")).policy
    })
}

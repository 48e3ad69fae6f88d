//! Host names, IP literals and destinations, parsed once at the edge.
//!
//! A value of these types is valid by construction: later code never re-checks or re-normalises.
//! Nothing here resolves a name or touches the network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A normalised DNS host name: lower-case ASCII letters, digits, hyphens (and underscores, which only
/// exact rules can match), no trailing dot, labels of 1..=63 octets, at most 253 octets in all, and
/// never anything a URL parser would read as an IPv4 address.
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct HostName(Box<str>);

/// The host part of a destination.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub enum Host {
    Name(HostName),
    /// An IP literal; IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is already folded to IPv4.
    Ip(IpAddr),
}

/// A host and a port.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
}

/// Why a host or destination was refused. Every variant maps to the `invalid_host` decision.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum HostError {
    #[error("empty host name")]
    Empty,
    #[error("empty label")]
    EmptyLabel,
    #[error("label longer than 63 octets")]
    LabelTooLong,
    #[error("name longer than 253 octets")]
    NameTooLong,
    #[error("character not allowed in a host name (IDNs must be given in their xn-- form)")]
    InvalidCharacter,
    #[error("label starts or ends with a hyphen")]
    HyphenAtLabelEdge,
    #[error("looks like an IP address but is not a strict dotted quad")]
    AmbiguousNumeric,
    #[error("malformed IPv6 literal")]
    InvalidIpv6,
    #[error("IPv6 zone identifiers are not allowed")]
    ZoneId,
    #[error("malformed or missing port")]
    InvalidPort,
    #[error("userinfo is not allowed")]
    Userinfo,
    #[error("unsupported URL scheme")]
    UnsupportedScheme,
}

// === impl HostName ===

impl HostName {
    /// Parses and normalises a host name: ASCII lower-case, one trailing dot removed.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(HostError::Empty);
        }
        if trimmed.len() > MAX_NAME_LEN {
            return Err(HostError::NameTooLong);
        }
        for label in trimmed.split('.') {
            check_label(label)?;
        }
        if ends_in_number(trimmed) {
            return Err(HostError::AmbiguousNumeric);
        }
        Ok(Self(trimmed.to_ascii_lowercase().into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostName {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === impl Host ===

impl Host {
    /// Parses a host as it appears in an authority: a strict dotted quad, a bracketed IPv6 literal
    /// (a bare one is accepted too, since it cannot be mistaken for anything else), or a host name.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        if let Some(inner) = input.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(HostError::InvalidIpv6)?;
            return parse_ipv6(inner);
        }
        if input.contains(':') {
            return parse_ipv6(input);
        }
        if let Ok(v4) = Ipv4Addr::from_str(input) {
            // std rejects leading zeros, so `0177.0.0.1` never lands here.
            return Ok(Self::Ip(IpAddr::V4(v4)));
        }
        HostName::parse(input).map(Self::Name)
    }

    pub fn from_ip(ip: IpAddr) -> Self {
        Self::Ip(fold_mapped(ip))
    }

    pub fn name(&self) -> Option<&HostName> {
        match self {
            Self::Name(n) => Some(n),
            Self::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => n.fmt(f),
            Self::Ip(IpAddr::V4(v4)) => v4.fmt(f),
            Self::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
        }
    }
}

// === impl Destination ===

impl Destination {
    /// Parses `host:port` (authority form, as in CONNECT). The port is required.
    pub fn parse_authority(input: &str) -> Result<Self, HostError> {
        if input.contains('@') {
            return Err(HostError::Userinfo);
        }
        let (host, port) = split_host_port(input)?;
        let port = port.ok_or(HostError::InvalidPort)?;
        Ok(Self { host: Host::parse(host)?, port: parse_port(port)? })
    }

    /// Parses `host[:port]` as an HTTP `Host` header or request-target authority spells it
    /// (RFC 9110 §7.2): the port defaults to `default_port`; userinfo is refused.
    pub fn parse_host_port(input: &str, default_port: u16) -> Result<Self, HostError> {
        if input.contains('@') {
            return Err(HostError::Userinfo);
        }
        let (host, port) = split_host_port(input)?;
        let port = match port {
            Some(p) => parse_port(p)?,
            None => default_port,
        };
        Ok(Self { host: Host::parse(host)?, port })
    }

    /// Parses what an operator types: `host`, `host:port`, `ip`, `[v6]:port`, a bare IPv6 address,
    /// or an `http://` / `https://` URL. The port defaults to `default_port`, or the scheme's port.
    pub fn parse_loose(input: &str, default_port: u16) -> Result<Self, HostError> {
        let (rest, scheme_port) = if let Some((scheme, rest)) = input.split_once("://") {
            let port = match scheme.to_ascii_lowercase().as_str() {
                "http" => 80,
                "https" => 443,
                _ => return Err(HostError::UnsupportedScheme),
            };
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            (authority, Some(port))
        } else {
            (input, None)
        };
        if rest.contains('@') {
            return Err(HostError::Userinfo);
        }
        if rest.matches(':').count() > 1 && !rest.starts_with('[') {
            return Ok(Self { host: parse_ipv6(rest)?, port: scheme_port.unwrap_or(default_port) });
        }
        let (host, port) = split_host_port(rest)?;
        let port = match port {
            Some(p) => parse_port(p)?,
            None => scheme_port.unwrap_or(default_port),
        };
        Ok(Self { host: Host::parse(host)?, port })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

// === helpers ===

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`, so that every rule and protection sees one spelling.
pub fn fold_mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 @ IpAddr::V4(_) => v4,
    }
}

fn parse_ipv6(input: &str) -> Result<Host, HostError> {
    if input.contains('%') {
        return Err(HostError::ZoneId);
    }
    Ipv6Addr::from_str(input).map(|v6| Host::from_ip(IpAddr::V6(v6))).map_err(|_| HostError::InvalidIpv6)
}

/// Splits `host[:port]`, with IPv6 hosts in brackets. The returned host keeps its brackets.
fn split_host_port(input: &str) -> Result<(&str, Option<&str>), HostError> {
    if input.starts_with('[') {
        let close = input.find(']').ok_or(HostError::InvalidIpv6)?;
        let (host, rest) = input.split_at(close + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest.strip_prefix(':').map(|p| (host, Some(p))).ok_or(HostError::InvalidPort),
        };
    }
    Ok(match input.rsplit_once(':') {
        // An IPv6 literal beside a port is bracketed (RFC 3986 §3.2.2): reading `2001:db8::1:443`
        // as `[2001:db8::1]:443` would be a guess, and `2001:db8:::1` is no address at all.
        Some((host, _)) if host.contains(':') => return Err(HostError::InvalidIpv6),
        Some((host, port)) => (host, Some(port)),
        None => (input, None),
    })
}

fn parse_port(s: &str) -> Result<u16, HostError> {
    // Digits only: `u16::from_str` would also take a leading `+`.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::InvalidPort);
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostError::InvalidPort),
        Ok(p) => Ok(p),
    }
}

fn check_label(label: &str) -> Result<(), HostError> {
    if label.is_empty() {
        return Err(HostError::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(HostError::LabelTooLong);
    }
    if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(HostError::InvalidCharacter);
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(HostError::HyphenAtLabelEdge);
    }
    Ok(())
}

/// The WHATWG URL rule: a host whose last label is a decimal, octal or `0x` number is parsed as an
/// IPv4 address by browsers and many libraries (`2130706433`, `0x7f.1`, `127.1`). We refuse it
/// rather than guess which reading the client meant.
fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.strip_prefix("0x").or_else(|| last.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

const MAX_LABEL_LEN: usize = 63;
const MAX_NAME_LEN: usize = 253;

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<String, HostError> {
        HostName::parse(s).map(|n| n.to_string())
    }

    #[test]
    fn normalises_case_and_one_trailing_dot() {
        assert_eq!(name("ML.Azure.COM."), Ok("ml.azure.com".into()));
        assert_eq!(name("ml.azure.com.."), Err(HostError::EmptyLabel));
    }

    #[test]
    fn refuses_malformed_names_with_the_exact_reason() {
        let cases: &[(&str, HostError)] = &[
            ("", HostError::Empty),
            (".", HostError::Empty),
            ("a..b", HostError::EmptyLabel),
            (".a.com", HostError::EmptyLabel),
            (&"a".repeat(64), HostError::LabelTooLong),
            ("a%2e.com", HostError::InvalidCharacter),
            ("user@ml.azure.com", HostError::InvalidCharacter),
            ("bücher.de", HostError::InvalidCharacter),
            ("a b.com", HostError::InvalidCharacter),
            ("a\0.com", HostError::InvalidCharacter),
            ("-a.com", HostError::HyphenAtLabelEdge),
            ("a-.com", HostError::HyphenAtLabelEdge),
            ("2130706433", HostError::AmbiguousNumeric),
            ("0x7f.1", HostError::AmbiguousNumeric),
            ("0177.0.0.1", HostError::AmbiguousNumeric),
            ("127.1", HostError::AmbiguousNumeric),
            ("a.0x", HostError::AmbiguousNumeric),
        ];
        for (input, want) in cases {
            assert_eq!(name(input), Err(*want), "input {input:?}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        assert_eq!(name(&long), Err(HostError::NameTooLong));
    }

    #[test]
    fn accepts_idn_in_punycode_and_numeric_labels_before_the_last() {
        assert_eq!(name("xn--bcher-kva.de"), Ok("xn--bcher-kva.de".into()));
        assert_eq!(name("1.2.3.example"), Ok("1.2.3.example".into()));
        assert_eq!(name("_dmarc.example.com"), Ok("_dmarc.example.com".into()));
    }

    #[test]
    fn parses_ip_literals_strictly() {
        let v4 = |s: &str| Host::parse(s);
        assert_eq!(v4("10.0.0.5"), Ok(Host::Ip("10.0.0.5".parse().unwrap())));
        assert_eq!(v4("[::ffff:10.0.0.5]"), Ok(Host::Ip("10.0.0.5".parse().unwrap())));
        assert_eq!(v4("[2001:db8::1]"), Ok(Host::Ip("2001:db8::1".parse().unwrap())));
        assert_eq!(v4("[fe80::1%eth0]"), Err(HostError::ZoneId));
        assert_eq!(v4("[2001:db8::1"), Err(HostError::InvalidIpv6));
        assert_eq!(v4("010.0.0.5"), Err(HostError::AmbiguousNumeric));
        assert_eq!(v4("10.0.0.256"), Err(HostError::AmbiguousNumeric));
    }

    #[test]
    fn parses_authorities_and_loose_destinations() {
        let d = Destination::parse_authority("ML.azure.com:443").unwrap();
        assert_eq!(d.to_string(), "ml.azure.com:443");
        assert_eq!(Destination::parse_authority("ml.azure.com"), Err(HostError::InvalidPort));
        assert_eq!(Destination::parse_authority("ml.azure.com:0"), Err(HostError::InvalidPort));
        assert_eq!(Destination::parse_authority("ml.azure.com:+443"), Err(HostError::InvalidPort));
        assert_eq!(Destination::parse_authority("ml.azure.com:65536"), Err(HostError::InvalidPort));
        assert_eq!(Destination::parse_authority("u:p@ml.azure.com:443"), Err(HostError::Userinfo));
        assert_eq!(Destination::parse_authority("[::1]:8080").unwrap().to_string(), "[::1]:8080");
        assert_eq!(Destination::parse_authority("::1:8080"), Err(HostError::InvalidIpv6));
        assert_eq!(Destination::parse_host_port("2001:db8::1:443", 80), Err(HostError::InvalidIpv6));
        assert_eq!(Destination::parse_host_port("2001:db8:::1", 80), Err(HostError::InvalidIpv6));

        let loose = |s: &str| Destination::parse_loose(s, 443).map(|d| d.to_string());
        assert_eq!(loose("ml.azure.com"), Ok("ml.azure.com:443".into()));
        assert_eq!(loose("http://ml.azure.com/x?y"), Ok("ml.azure.com:80".into()));
        assert_eq!(loose("https://ml.azure.com:8443/"), Ok("ml.azure.com:8443".into()));
        assert_eq!(loose("2001:db8::1"), Ok("[2001:db8::1]:443".into()));
        assert_eq!(loose("ftp://x.com"), Err(HostError::UnsupportedScheme));
    }
}

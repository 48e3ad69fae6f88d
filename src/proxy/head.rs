//! A sans-IO reader of one HTTP/1 request head (RFC 9112), built on httparse, for the
//! transparent `plain` listener. It takes the bytes read so far and says "need more", "complete"
//! (with the head's length: what follows is a body or the next request, never a header line) or
//! "refused".
//!
//! Stricter than httparse alone: a bare LF line ending and obs-fold continuation lines are
//! refused (RFC 9112 §2.2, §5.2), as are two Host headers. An absolute-form target names the host
//! that is decided, and it must agree with Host (RFC 9112 §3.2.2).

use crate::policy::{Destination, HostError};

/// One complete request head.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Head {
    /// Bytes of the head, the empty line included.
    pub len: usize,
    /// The host and port the request is for: the absolute-form target's, else the Host header's
    /// (port 80 when it names none). `None` when the request names no host.
    pub dest: Option<Destination>,
}

/// Why a head is refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head")]
    Malformed,
    #[error("bare LF line ending")]
    BareLf,
    #[error("obsolete line folding")]
    ObsFold,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("more than one Host header")]
    DuplicateHost,
    /// Two Content-Length fields, both framings at once, or a transfer coding other than
    /// `chunked`: the framings that request smuggling lives on (RFC 9112 §6.1, §6.3).
    #[error("ambiguous message framing")]
    AmbiguousFraming,
    #[error("malformed Host header or request target")]
    MalformedHost,
    #[error("request target is not origin or absolute form")]
    UnsupportedTarget,
    #[error("Host header conflicts with the request target")]
    HostConflict,
    /// The host itself is not a valid name or address (the policy's `invalid_host`).
    #[error("invalid host: {0}")]
    InvalidHost(HostError),
}

/// Reads one request head from the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        // A header line that starts with white space is obs-fold (RFC 9112 §5.2).
        httparse::Error::HeaderName if has_obs_fold(buf) => HeadError::ObsFold,
        _ => HeadError::Malformed,
    })?;
    let len = match status {
        httparse::Status::Partial => {
            // Every byte so far belongs to the head: refuse a bare LF now, not at the timeout.
            return if has_bare_lf(buf) { Err(HeadError::BareLf) } else { Ok(None) };
        }
        httparse::Status::Complete(len) => len,
    };
    if has_bare_lf(buf.get(..len).unwrap_or_default()) {
        return Err(HeadError::BareLf);
    }
    let target = req.path.unwrap_or_default();
    let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    // A Host value is ASCII, and only HTTP's own whitespace (SP, HTAB) is trimmed off it: a value
    // that hyper's forward could not take as it is (a Unicode space) must not be decided at all.
    let host_header = hosts.next().map(|h| match std::str::from_utf8(h.value) {
        Ok(v) if v.is_ascii() => Ok(v),
        _ => Err(HeadError::MalformedHost),
    });
    if hosts.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    check_framing(req.headers)?;
    let from_header = host_header.transpose()?.map(|v| host_port(v.trim_matches([' ', '\t']))).transpose()?;
    let dest = match target_dest(target)? {
        Some(from_target) => {
            if from_header.as_ref().is_some_and(|h| *h != from_target) {
                return Err(HeadError::HostConflict);
            }
            Some(from_target)
        }
        None => from_header,
    };
    Ok(Some(Head { len, dest }))
}

/// One framing, stated once: at most one Content-Length, or one Transfer-Encoding that is exactly
/// `chunked`, never both.
fn check_framing(headers: &[httparse::Header<'_>]) -> Result<(), HeadError> {
    let lengths = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")).count();
    let mut codings = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    match (lengths, codings.next(), codings.next()) {
        (0 | 1, None, None) => Ok(()),
        (0, Some(te), None) if te.value.trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(HeadError::AmbiguousFraming),
    }
}

/// The host of an absolute-form target; `None` for origin form (`/path`) and `*`.
fn target_dest(target: &str) -> Result<Option<Destination>, HeadError> {
    if target.starts_with('/') || target == "*" {
        return Ok(None);
    }
    let rest = target
        .get(..HTTP.len())
        .filter(|scheme| scheme.eq_ignore_ascii_case(HTTP))
        .and_then(|_| target.get(HTTP.len()..))
        .ok_or(HeadError::UnsupportedTarget)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    host_port(authority).map(Some)
}

fn host_port(value: &str) -> Result<Destination, HeadError> {
    Destination::parse_host_port(value, DEFAULT_PORT).map_err(|e| match e {
        HostError::InvalidPort | HostError::Userinfo | HostError::Empty => HeadError::MalformedHost,
        other => HeadError::InvalidHost(other),
    })
}

/// A LF not preceded by CR.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head.get(i - 1) != Some(&b'\r')))
}

/// A line (after the request line) that starts with SP or HTAB.
fn has_obs_fold(buf: &[u8]) -> bool {
    buf.windows(3).any(|w| w[0] == b'\n' && (w[1] == b' ' || w[1] == b'\t') && w[2] != b'\n')
}

const HTTP: &str = "http://";
const DEFAULT_PORT: u16 = 80;
const MAX_HEADERS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Host, HostName};

    fn dest(name: &str, port: u16) -> Option<Destination> {
        Some(Destination { host: Host::Name(HostName::parse(name).unwrap()), port })
    }

    #[test]
    fn every_prefix_of_a_head_needs_more() {
        let head = b"GET /a HTTP/1.1\r\nHost: good.cdn.test\r\nAccept: */*\r\n\r\n";
        for end in 0..head.len() {
            assert_eq!(parse(&head[..end]), Ok(None), "prefix of {end} bytes");
        }
        let h = parse(head).unwrap().unwrap();
        assert_eq!((h.len, h.dest), (head.len(), dest("good.cdn.test", 80)));
    }

    #[test]
    fn body_bytes_after_the_head_are_not_read_as_header_lines() {
        let req =
            b"POST /u HTTP/1.1\r\nHost: good.cdn.test\r\nContent-Length: 26\r\n\r\nHost: bad.cdn.test\r\n\r\nxxxx";
        let h = parse(req).unwrap().unwrap();
        assert_eq!(h.dest, dest("good.cdn.test", 80));
        assert_eq!(&req[h.len..], b"Host: bad.cdn.test\r\n\r\nxxxx");
    }

    #[test]
    fn a_pipelined_second_request_starts_where_the_first_head_ends() {
        let two = b"GET / HTTP/1.1\r\nHost: good.cdn.test\r\n\r\nGET / HTTP/1.1\r\nHost: bad.cdn.test\r\n\r\n";
        let first = parse(two).unwrap().unwrap();
        assert_eq!(first.dest, dest("good.cdn.test", 80));
        let second = parse(&two[first.len..]).unwrap().unwrap();
        assert_eq!(second.dest, dest("bad.cdn.test", 80));
        assert_eq!(first.len + second.len, two.len());
    }

    #[test]
    fn refuses_bare_lf_line_endings() {
        assert_eq!(parse(b"GET /d HTTP/1.1\nHost: bad.cdn.test\r\n\r\n"), Err(HeadError::BareLf));
        assert_eq!(parse(b"GET /d HTTP/1.1\r\nHost: bad.cdn.test\n\r\n"), Err(HeadError::BareLf));
        assert_eq!(
            parse(b"GET /d HTTP/1.1\r\nHost: a.test\r\nX: y\n"),
            Err(HeadError::BareLf),
            "refused before the head ends"
        );
    }

    /// Only SP and HTAB are trimmed off a Host value, and a value that is not ASCII is malformed:
    /// `str::trim` once took a trailing no-break space off, so the name decided was not the Host
    /// that forwarding could send (found in review).
    #[test]
    fn a_host_with_unicode_whitespace_is_malformed() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: good.cdn.test\xC2\xA0\r\n\r\n"), Err(HeadError::MalformedHost));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: \xC2\xA0good.cdn.test\r\n\r\n"), Err(HeadError::MalformedHost));
        let h = parse(b"GET / HTTP/1.1\r\nHost: \t good.cdn.test \t\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.dest, dest("good.cdn.test", 80));
    }

    #[test]
    fn refuses_obs_fold() {
        let folded = b"GET / HTTP/1.1\r\nHost: good.cdn.test\r\nX-A: b\r\n c\r\n\r\n";
        assert_eq!(parse(folded), Err(HeadError::ObsFold));
        let folded_host = b"GET / HTTP/1.1\r\nX-A: b\r\n\tHost: bad.cdn.test\r\n\r\n";
        assert_eq!(parse(folded_host), Err(HeadError::ObsFold));
    }

    #[test]
    fn an_absolute_form_target_is_the_host_decided_and_must_agree_with_host() {
        let agree = b"GET http://good.cdn.test/x HTTP/1.1\r\nHost: good.cdn.test\r\n\r\n";
        assert_eq!(parse(agree).unwrap().unwrap().dest, dest("good.cdn.test", 80));
        let explicit_port = b"GET http://good.cdn.test:80/x HTTP/1.1\r\nHost: good.cdn.test\r\n\r\n";
        assert_eq!(parse(explicit_port).unwrap().unwrap().dest, dest("good.cdn.test", 80));
        let no_host = b"GET http://bad.cdn.test:8080/ HTTP/1.1\r\n\r\n";
        assert_eq!(parse(no_host).unwrap().unwrap().dest, dest("bad.cdn.test", 8080));
        let conflict = b"GET http://bad.cdn.test/ HTTP/1.1\r\nHost: good.cdn.test\r\n\r\n";
        assert_eq!(parse(conflict), Err(HeadError::HostConflict));
        let port_conflict = b"GET http://good.cdn.test:8080/ HTTP/1.1\r\nHost: good.cdn.test\r\n\r\n";
        assert_eq!(parse(port_conflict), Err(HeadError::HostConflict));
    }

    #[test]
    fn refuses_targets_a_plain_listener_cannot_decide() {
        let https = b"GET https://good.cdn.test/ HTTP/1.1\r\nHost: good.cdn.test\r\n\r\n";
        assert_eq!(parse(https), Err(HeadError::UnsupportedTarget));
        let connect = b"CONNECT good.cdn.test:443 HTTP/1.1\r\nHost: good.cdn.test:443\r\n\r\n";
        assert_eq!(parse(connect), Err(HeadError::UnsupportedTarget));
        let userinfo = b"GET http://good.cdn.test@bad.cdn.test/ HTTP/1.1\r\n\r\n";
        assert_eq!(parse(userinfo), Err(HeadError::MalformedHost));
    }

    #[test]
    fn refuses_every_ambiguous_framing() {
        let framed =
            |headers: &str| parse(format!("POST / HTTP/1.1\r\nHost: good.cdn.test\r\n{headers}\r\n").as_bytes());
        assert!(framed("Content-Length: 3\r\n").unwrap().is_some());
        assert!(framed("Transfer-Encoding: chunked\r\n").unwrap().is_some());
        assert!(framed("Transfer-Encoding: Chunked \r\n").unwrap().is_some());
        for bad in [
            "Content-Length: 3\r\nContent-Length: 3\r\n",
            "Content-Length: 0\r\nContent-Length: 43\r\n",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(framed(bad), Err(HeadError::AmbiguousFraming), "{bad:?}");
        }
    }

    #[test]
    fn host_header_rules() {
        let two = b"GET / HTTP/1.1\r\nHost: good.cdn.test\r\nhost: bad.cdn.test\r\n\r\n";
        assert_eq!(parse(two), Err(HeadError::DuplicateHost));
        let ip = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";
        let h = parse(ip).unwrap().unwrap();
        assert_eq!(h.dest, Some(Destination { host: Host::Ip([127, 0, 0, 1].into()), port: 8080 }));
        let bad_port = b"GET / HTTP/1.1\r\nHost: good.cdn.test:8o\r\n\r\n";
        assert_eq!(parse(bad_port), Err(HeadError::MalformedHost));
        let bad_name = b"GET / HTTP/1.1\r\nHost: bad_name!.test\r\n\r\n";
        assert!(matches!(parse(bad_name), Err(HeadError::InvalidHost(_))));
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(parse(none).unwrap().unwrap().dest, None);
    }
}

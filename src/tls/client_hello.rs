//! A sans-IO reader of the TLS ClientHello: bytes in, `NeedMore`, a `ClientHello` (server name,
//! ALPN, Encrypted Client Hello presence) or a named error out. No socket, no clock, no logging.
//!
//! rustls reads ClientHellos too (`rustls::server::Acceptor`), but it wants whole records and does
//! not say whether the hello carries ECH; this reader handles partial input (a hello split across
//! records and segments) and ECH, and is tested against rustls on the same inputs.
//!
//! Every length field is checked against its container before it is used (`Reader::sub`), in the
//! manner of rustls's codec: nothing here indexes blindly or panics, whatever the input.

use std::net::IpAddr;

use crate::policy::{HostError, HostName};

/// What the bytes read so far amount to.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Parsed {
    /// A prefix of a valid ClientHello: read more.
    NeedMore,
    Hello(ClientHello),
}

#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct ClientHello {
    /// The `server_name` host name (RFC 6066 §3), validated as a host name.
    pub sni: Option<HostName>,
    /// ALPN protocol names (RFC 7301), in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// The hello carries Encrypted Client Hello (or its ESNI predecessor): its real server name
    /// is hidden behind the outer one.
    pub ech: bool,
}

/// Why the bytes are not a ClientHello this proxy accepts.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake record")]
    NotHandshake,
    #[error("SSLv2-style hello")]
    Sslv2,
    #[error("unsupported record version")]
    RecordVersion,
    #[error("record longer than 2^14 bytes")]
    RecordOverflow,
    #[error("empty handshake record")]
    EmptyRecord,
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello larger than this proxy reads")]
    TooLarge,
    #[error("ClientHello split over too many records")]
    TooManyRecords,
    #[error("{0} overruns its container")]
    Overrun(&'static str),
    #[error("trailing bytes after {0}")]
    Trailing(&'static str),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("an extension appears twice")]
    DuplicateExtension,
    #[error("empty server_name")]
    EmptySni,
    #[error("more than one host_name in server_name")]
    MultipleSni,
    #[error("server_name is an IP address")]
    SniIpAddress,
    #[error("server_name is not a valid host name: {0}")]
    InvalidSni(HostError),
}

/// Reads what `input` holds: the first TLS records a client sent on a connection.
///
/// Cheap while incomplete: record headers are walked without copying, and the handshake is
/// assembled only once every byte of it has arrived, so a caller may call this after every read.
pub fn parse(input: &[u8]) -> Result<Parsed, HelloError> {
    let mut rest = input;
    let mut records = 0;
    let mut head = [0u8; 4]; // the handshake header, gathered across records
    let mut head_len = 0;
    let mut have = 0; // handshake bytes available so far
    loop {
        let Some(header) = rest.get(..RECORD_HEADER) else {
            check_partial_header(rest)?;
            return Ok(Parsed::NeedMore);
        };
        check_partial_header(header)?;
        // `header` is exactly RECORD_HEADER (5) bytes long: these indexes are in bounds.
        let (content_type, major, len) =
            (header[0], header[1], usize::from(u16::from_be_bytes([header[3], header[4]])));
        if content_type != CONTENT_HANDSHAKE {
            return Err(HelloError::NotHandshake);
        }
        if major != 0x03 {
            return Err(HelloError::RecordVersion);
        }
        if len > MAX_RECORD {
            return Err(HelloError::RecordOverflow);
        }
        if len == 0 {
            return Err(HelloError::EmptyRecord);
        }
        records += 1;
        if records > MAX_RECORDS {
            return Err(HelloError::TooManyRecords);
        }
        let body = rest.get(RECORD_HEADER..).unwrap_or_default();
        let fragment = body.get(..len).unwrap_or(body);
        for &b in fragment.iter().take(4 - head_len) {
            if let Some(slot) = head.get_mut(head_len) {
                *slot = b;
                head_len += 1;
            }
        }
        have += fragment.len();
        check_handshake_prefix(head.get(..head_len).unwrap_or_default())?;
        if head_len == 4 {
            let need = 4 + (u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize);
            if have >= need {
                let handshake = assemble(input, need);
                return complete_message(&handshake)
                    .map_or(Ok(Parsed::NeedMore), |m| parse_client_hello(m).map(Parsed::Hello));
            }
        }
        if fragment.len() < len {
            return Ok(Parsed::NeedMore);
        }
        rest = body.get(len..).unwrap_or_default();
    }
}

/// How many bytes of `input` the records of its first ClientHello take, once `parse` has found the
/// hello whole: what follows is the client's next bytes, not this hello's. `None` when the
/// hello's last record also carries bytes after the hello: no client does that, and a proxy that
/// let such bytes through with the hello would send the server a start of the next message that
/// it never checked.
pub fn hello_records_len(input: &[u8]) -> Option<usize> {
    let (mut at, mut handshake) = (0usize, Vec::with_capacity(4));
    let mut have = 0usize;
    loop {
        let header = input.get(at..at.checked_add(RECORD_HEADER)?)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let end = at.checked_add(RECORD_HEADER)?.checked_add(len)?;
        let fragment = input.get(at + RECORD_HEADER..end)?;
        handshake.extend(fragment.iter().take(4usize.saturating_sub(handshake.len())));
        have += len;
        at = end;
        if let [_, a, b, c] = handshake[..] {
            let need = 4 + (u32::from_be_bytes([0, a, b, c]) as usize);
            if have >= need {
                return (have == need).then_some(at);
            }
        }
    }
}

/// The first `need` handshake bytes of `input`, whose record headers `parse` has already checked./// The first `need` handshake bytes of `input`, whose record headers `parse` has already checked.
fn assemble(input: &[u8], need: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(need);
    let mut rest = input;
    while out.len() < need {
        let Some(header) = rest.get(..RECORD_HEADER) else { break };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let body = rest.get(RECORD_HEADER..).unwrap_or_default();
        let fragment = body.get(..len).unwrap_or(body);
        out.extend_from_slice(fragment.get(..need - out.len()).unwrap_or(fragment));
        rest = body.get(len..).unwrap_or_default();
    }
    out
}

/// The most bytes `parse` ever needs to decide: a larger hello is refused as `TooLarge`.
pub const MAX_HELLO_BYTES: usize = MAX_HANDSHAKE + 4 + (MAX_HANDSHAKE / MAX_RECORD + 2) * RECORD_HEADER;

fn check_partial_header(rest: &[u8]) -> Result<(), HelloError> {
    match rest.first() {
        None => Ok(()),
        // SSLv2 record headers set the top bit of the first byte (RFC 6101 appendix E.2).
        Some(b) if b & 0x80 != 0 => Err(HelloError::Sslv2),
        Some(&CONTENT_HANDSHAKE) => match rest.get(1) {
            Some(0x03) | None => Ok(()),
            Some(_) => Err(HelloError::RecordVersion),
        },
        Some(_) => Err(HelloError::NotHandshake),
    }
}

fn check_handshake_prefix(handshake: &[u8]) -> Result<(), HelloError> {
    match handshake.first() {
        Some(&HANDSHAKE_CLIENT_HELLO) | None => {}
        Some(_) => return Err(HelloError::NotClientHello),
    }
    if let Some(len) = handshake.get(1..4) {
        // `len` is exactly 3 bytes long.
        let len = u32::from_be_bytes([0, len[0], len[1], len[2]]) as usize;
        if len > MAX_HANDSHAKE {
            return Err(HelloError::TooLarge);
        }
    }
    Ok(())
}

/// The ClientHello body when the whole message has arrived. Bytes after it (a client may
/// pipeline nothing else before the server answers, but be lenient) are ignored here.
fn complete_message(handshake: &[u8]) -> Option<&[u8]> {
    let len = handshake.get(1..4)?;
    let len = u32::from_be_bytes([0, len[0], len[1], len[2]]) as usize;
    handshake.get(4..4 + len)
}

/// RFC 8446 §4.1.2 (and RFC 5246 §7.4.1.2 for TLS 1.2 clients).
fn parse_client_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader::new(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.u8_prefixed("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("legacy_session_id"));
    }
    let suites = r.u16_prefixed("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if r.u8_prefixed("legacy_compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("legacy_compression_methods"));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Ok(hello); // a hello without extensions (old clients) has no SNI
    }
    let mut extensions = Reader::new(r.u16_prefixed("extensions")?);
    r.finish("extensions")?;
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.u16_prefixed("extension")?;
        if seen.contains(&kind) {
            return Err(HelloError::DuplicateExtension);
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.sni = Some(server_name(data)?),
            EXT_ALPN => hello.alpn = alpn(data)?,
            kind if ECH_EXTENSIONS.contains(&kind) => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// RFC 6066 §3: a list of (name_type, name); exactly one host_name, not empty, not an IP literal.
fn server_name(data: &[u8]) -> Result<HostName, HelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.u16_prefixed("server_name_list")?);
    outer.finish("server_name_list")?;
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("name_type")?;
        let name = list.u16_prefixed("server_name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(HelloError::MultipleSni);
        }
        host = Some(name);
    }
    let name = host.ok_or(HelloError::EmptySni)?;
    if name.is_empty() {
        return Err(HelloError::EmptySni);
    }
    let text = std::str::from_utf8(name).map_err(|_| HelloError::InvalidSni(HostError::InvalidCharacter))?;
    let unbracketed = text.trim_start_matches('[').trim_end_matches(']');
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Err(HelloError::SniIpAddress);
    }
    // RFC 6066: "the hostname is represented ... without a trailing dot".
    if text.ends_with('.') {
        return Err(HelloError::InvalidSni(HostError::EmptyLabel));
    }
    HostName::parse(text).map_err(HelloError::InvalidSni)
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.u16_prefixed("alpn_protocol_list")?);
    outer.finish("alpn_protocol_list")?;
    let mut out = Vec::new();
    while !list.is_empty() {
        let proto = list.u8_prefixed("alpn_protocol")?;
        if proto.is_empty() {
            return Err(HelloError::Malformed("alpn_protocol"));
        }
        out.push(proto.to_vec());
    }
    if out.is_empty() {
        return Err(HelloError::Malformed("alpn_protocol_list"));
    }
    Ok(out)
}

/// A cursor over a byte slice whose reads never go past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        let (head, tail) = (self.buf.get(..n), self.buf.get(n..));
        match (head, tail) {
            (Some(h), Some(t)) => {
                self.buf = t;
                Ok(h)
            }
            _ => Err(HelloError::Overrun(what)),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        self.take(1, what).map(|b| b.first().copied().unwrap_or_default())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b.first().copied().unwrap_or_default(), b.get(1).copied().unwrap_or_default()]))
    }

    fn u8_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn u16_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn finish(&self, what: &'static str) -> Result<(), HelloError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(HelloError::Trailing(what))
        }
    }
}

const RECORD_HEADER: usize = 5;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;
/// Real clients send the hello in one or two records; a hello in tiny records only costs us work.
const MAX_RECORDS: usize = 32;
/// Real hellos are 0.5-2 KiB (post-quantum key shares included); 64 KiB is generous.
const MAX_HANDSHAKE: usize = 64 * 1024;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const NAME_TYPE_HOST_NAME: u8 = 0x00;
const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
/// Every extension codepoint that carries Encrypted Client Hello, in use or in drafts, or its
/// ESNI predecessor: a hello with any of them hides its real server name, so all are refused
/// alike unless a rule says `allow_ech`.
/// (0xff01 is renegotiation_info, RFC 5746, sent by nearly every client: not on this list.)
pub const ECH_EXTENSIONS: [u16; 10] = [
    0xfe0d, // encrypted_client_hello (RFC 9849; draft-ietf-tls-esni-13 and later)
    0xfe0c, // draft-ietf-tls-esni-12
    0xfe0b, // draft-ietf-tls-esni-11
    0xfe0a, // draft-ietf-tls-esni-10
    0xfe09, // draft-ietf-tls-esni-09
    0xfe08, // draft-ietf-tls-esni-08
    0xff02, // draft-ietf-tls-esni-07 encrypted_client_hello
    0xff03, // draft-ietf-tls-esni-07 ech_nonce
    0xfd00, // ech_outer_extensions (RFC 9849 §5.1): only an ECH hello carries it
    0xffce, // encrypted_server_name (ESNI, draft-ietf-tls-esni-01 to -06)
];

#[cfg(test)]
mod tests;

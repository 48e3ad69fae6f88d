//! The first bytes of a TLS server, read only to tell a HelloRetryRequest (RFC 8446 §4.1.4) from
//! anything else, and the client's second flight after one, read to find its second ClientHello.
//! Sans-IO, like the ClientHello reader.

/// What a server's first bytes are.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum First {
    NeedMore,
    /// A ServerHello whose random is the HelloRetryRequest value: the client sends a second hello.
    RetryRequest,
    /// Anything else: a ServerHello, an alert, or bytes this reader does not follow.
    Other,
}

/// Classifies a server's first bytes.
pub fn classify(buf: &[u8]) -> First {
    let Some(header) = buf.get(..RECORD_HEADER) else { return First::NeedMore };
    // `header` is exactly RECORD_HEADER (5) bytes long: these indexes are in bounds.
    let (content_type, len) = (header[0], usize::from(u16::from_be_bytes([header[3], header[4]])));
    if content_type != CONTENT_HANDSHAKE || len < SERVER_HELLO_PREFIX {
        return First::Other;
    }
    let body = buf.get(RECORD_HEADER..).unwrap_or_default();
    let Some(prefix) = body.get(..SERVER_HELLO_PREFIX) else { return First::NeedMore };
    // handshake type (1), length (3), legacy_version (2), random (32): in bounds of `prefix`.
    if prefix[0] != HANDSHAKE_SERVER_HELLO {
        return First::Other;
    }
    match prefix.get(6..SERVER_HELLO_PREFIX) {
        Some(random) if random == HELLO_RETRY_REQUEST_RANDOM => First::RetryRequest,
        _ => First::Other,
    }
}

/// Where the second ClientHello starts in a client's flight after a HelloRetryRequest: past the
/// change_cipher_spec record of middlebox compatibility mode (RFC 8446 §D.4) and any early data
/// sent before the retry. `None` while a record before it is incomplete.
pub fn second_hello_start(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let header = buf.get(at..at + RECORD_HEADER)?;
        // `header` is exactly RECORD_HEADER (5) bytes long: these indexes are in bounds.
        if header[0] != CONTENT_CHANGE_CIPHER_SPEC && header[0] != CONTENT_APPLICATION_DATA {
            return Some(at);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let end = at + RECORD_HEADER + len;
        buf.get(at..end)?;
        at = end;
    }
}

const RECORD_HEADER: usize = 5;
const CONTENT_CHANGE_CIPHER_SPEC: u8 = 0x14;
const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_APPLICATION_DATA: u8 = 0x17;
const HANDSHAKE_SERVER_HELLO: u8 = 0x02;
/// Handshake header (4), legacy_version (2) and random (32).
const SERVER_HELLO_PREFIX: usize = 38;
/// SHA-256 of "HelloRetryRequest" (RFC 8446 §4.1.3).
const HELLO_RETRY_REQUEST_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91, 0xc2, 0xa2, 0x11,
    0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A ServerHello record with `random`, and a few bytes of the rest.
    pub(crate) fn server_hello(random: [u8; 32]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&random);
        body.extend_from_slice(&[0, 0x13, 0x01, 0]);
        let mut hs = vec![HANDSHAKE_SERVER_HELLO, 0, 0, u8::try_from(body.len()).unwrap()];
        hs.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 0x03, 0x03];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tells_a_retry_request_from_a_server_hello_on_every_prefix() {
        let hrr = server_hello(HELLO_RETRY_REQUEST_RANDOM);
        let plain = server_hello([7; 32]);
        for end in 0..RECORD_HEADER + SERVER_HELLO_PREFIX {
            assert_eq!(classify(&hrr[..end]), First::NeedMore, "prefix of {end}");
            assert_eq!(classify(&plain[..end]), First::NeedMore, "prefix of {end}");
        }
        assert_eq!(classify(&hrr), First::RetryRequest);
        assert_eq!(classify(&plain), First::Other);
        assert_eq!(classify(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]), First::Other, "an alert");
        assert_eq!(classify(b"HTTP/1.1 400 Bad Request\r\n"), First::Other);
    }

    #[test]
    fn finds_the_second_hello_past_change_cipher_spec_and_early_data() {
        let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        let early = [0x17, 0x03, 0x03, 0x00, 0x02, 0xaa, 0xbb];
        let hello = [0x16, 0x03, 0x01, 0x00, 0x04];
        let flight = [&early[..], &ccs, &hello].concat();
        assert_eq!(second_hello_start(&flight), Some(early.len() + ccs.len()));
        assert_eq!(second_hello_start(&hello), Some(0));
        assert_eq!(second_hello_start(&ccs[..4]), None, "an incomplete record");
        assert_eq!(second_hello_start(&ccs), None, "nothing after it yet");
    }
}

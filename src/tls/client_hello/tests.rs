use std::sync::Arc;

use super::*;

const CURL_ML: &[u8] = include_bytes!("../../../tests/data/client_hello/curl_ml_azure_com.bin");
const CURL_H2_MCR: &[u8] = include_bytes!("../../../tests/data/client_hello/curl_h2_mcr.bin");

fn hello_of(input: &[u8]) -> ClientHello {
    match parse(input) {
        Ok(Parsed::Hello(h)) => h,
        other => panic!("not a hello: {other:?}"),
    }
}

/// A ClientHello from rustls's own client, for `name` and `alpn`.
fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// What rustls's server-side Acceptor reads from the same bytes: (server name, ALPN).
fn rustls_reads(bytes: &[u8]) -> Option<(Option<String>, Vec<Vec<u8>>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = bytes;
    while !input.is_empty() {
        if acceptor.read_tls(&mut input).is_err() {
            return None;
        }
    }
    let accepted = acceptor.accept().ok()??;
    let ch = accepted.client_hello();
    let alpn = ch.alpn().map(|a| a.map(|p| p.to_vec()).collect()).unwrap_or_default();
    Some((ch.server_name().map(str::to_string), alpn))
}

/// Re-frames the handshake bytes of `records` into records of at most `size` bytes.
fn refragment(records: &[u8], size: usize) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut rest = records;
    while rest.len() >= 5 {
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    let mut out = Vec::new();
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A synthetic ClientHello record carrying `extensions` (type, data).
fn synthetic(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x11; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut exts = Vec::new();
    for (kind, data) in extensions {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    }
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A server_name extension body with `names` as (name_type, name).
fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for (t, n) in names {
        list.push(*t);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (0x0000, data)
}

#[test]
fn reads_a_real_curl_hello() {
    let h = hello_of(CURL_ML);
    assert_eq!(h.sni.as_ref().map(|n| n.as_str()), Some("ml.azure.com"));
    assert_eq!(h.alpn, vec![b"http/1.1".to_vec()]);
    assert!(!h.ech);
    let h = hello_of(CURL_H2_MCR);
    assert_eq!(h.sni.as_ref().map(|n| n.as_str()), Some("mcr.microsoft.com"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
}

#[test]
fn every_prefix_of_a_real_hello_needs_more() {
    for end in 0..CURL_ML.len() {
        assert_eq!(parse(&CURL_ML[..end]), Ok(Parsed::NeedMore), "prefix of {end} bytes");
    }
}

#[test]
fn a_hello_split_across_many_records_reads_the_same() {
    assert_eq!(parse(&refragment(CURL_ML, 7)), Err(HelloError::TooManyRecords));
    for size in [20, 100, 300] {
        let split = refragment(CURL_ML, size);
        assert_eq!(hello_of(&split), hello_of(CURL_ML), "records of {size} bytes");
        for end in (0..split.len()).step_by(13) {
            assert_eq!(parse(&split[..end]), Ok(Parsed::NeedMore), "records of {size}, prefix {end}");
        }
    }
}

#[test]
fn agrees_with_rustls_on_the_same_inputs() {
    let cases: &[(&str, &[&[u8]])] = &[
        ("ml.azure.com", &[b"http/1.1"]),
        ("a.westus2.batch.azure.com", &[b"h2", b"http/1.1"]),
        ("xn--bcher-kva.example", &[]),
        ("x", &[b"acme-tls/1"]),
    ];
    let mut inputs: Vec<Vec<u8>> = cases.iter().map(|(n, a)| rustls_hello(n, a)).collect();
    inputs.push(CURL_ML.to_vec());
    inputs.push(CURL_H2_MCR.to_vec());
    inputs.push(refragment(CURL_ML, 50));
    for input in inputs {
        let ours = hello_of(&input);
        let theirs = rustls_reads(&input).expect("rustls accepts it");
        assert_eq!(ours.sni.map(|n| n.to_string()), theirs.0);
        assert_eq!(ours.alpn, theirs.1);
    }
}

#[test]
fn refuses_what_is_not_a_tls_hello() {
    assert_eq!(parse(&[0x80, 0x2e, 0x01, 0x03, 0x01]), Err(HelloError::Sslv2));
    assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotHandshake));
    assert_eq!(parse(&[0x17, 0x03, 0x03, 0x00, 0x10]), Err(HelloError::NotHandshake));
    assert_eq!(parse(&[0x16, 0x02]), Err(HelloError::RecordVersion));
    assert_eq!(parse(&[0x16, 0x03, 0x01, 0x40, 0x01]), Err(HelloError::RecordOverflow));
    assert_eq!(parse(&[0x16, 0x03, 0x01, 0x00, 0x00]), Err(HelloError::EmptyRecord));
    assert_eq!(parse(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]), Err(HelloError::NotClientHello));
    assert_eq!(parse(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x10, 0x00, 0x00]), Err(HelloError::TooLarge));
}

#[test]
fn refuses_bad_server_names() {
    type Names<'a> = &'a [(u8, &'a [u8])];
    let cases: &[(Names, HelloError)] = &[
        (&[(0, b"10.0.0.1")], HelloError::SniIpAddress),
        (&[(0, b"::1")], HelloError::SniIpAddress),
        (&[(0, b"")], HelloError::EmptySni),
        (&[], HelloError::EmptySni),
        (&[(0, b"a.com"), (0, b"b.com")], HelloError::MultipleSni),
        (&[(0, b"a\x00.com")], HelloError::InvalidSni(HostError::InvalidCharacter)),
        (&[(0, b"ml.azure.com.")], HelloError::InvalidSni(HostError::EmptyLabel)),
        (&[(0, b"0x7f.1")], HelloError::InvalidSni(HostError::AmbiguousNumeric)),
        (&[(0, b"b\xc3\xbccher.de")], HelloError::InvalidSni(HostError::InvalidCharacter)),
    ];
    for (names, want) in cases {
        assert_eq!(parse(&synthetic(&[sni_ext(names)])), Err(*want), "{names:?}");
    }
    let ok = hello_of(&synthetic(&[sni_ext(&[(1, b"other-type"), (0, b"ML.Azure.com")])]));
    assert_eq!(ok.sni.map(|n| n.to_string()), Some("ml.azure.com".into()));
}

#[test]
fn notices_ech_and_refuses_duplicate_extensions() {
    let h = hello_of(&synthetic(&[sni_ext(&[(0, b"public.example.com")]), (0xfe0d, vec![0, 1, 2])]));
    assert!(h.ech);
    assert_eq!(h.sni.map(|n| n.to_string()), Some("public.example.com".into()));
    let dup = synthetic(&[sni_ext(&[(0, b"a.com")]), sni_ext(&[(0, b"b.com")])]);
    assert_eq!(parse(&dup), Err(HelloError::DuplicateExtension));
    assert_eq!(parse(&synthetic(&[(0x0010, vec![0, 0])])), Err(HelloError::Malformed("alpn_protocol_list")));
}

#[test]
fn every_ech_codepoint_counts_as_ech_and_renegotiation_info_does_not() {
    for kind in super::ECH_EXTENSIONS {
        let h = hello_of(&synthetic(&[sni_ext(&[(0, b"public.example.com")]), (kind, vec![0, 1, 2])]));
        assert!(h.ech, "{kind:#06x}");
    }
    // renegotiation_info (RFC 5746), which nearly every client sends.
    let h = hello_of(&synthetic(&[sni_ext(&[(0, b"ml.azure.com")]), (0xff01, vec![0])]));
    assert!(!h.ech);
}

#[test]
fn every_shrunken_or_grown_byte_has_its_exact_outcome() {
    let base = synthetic(&[
        sni_ext(&[(0, b"ml.azure.com")]),
        (0x0010, vec![0, 9, 8, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1']),
    ]);
    // The layout `outcome_after_change` reasons about.
    assert_eq!(base.len(), 88);
    assert_eq!(&base[61..73], b"ml.azure.com");
    assert_eq!(&base[80..88], b"http/1.1");
    assert_eq!(parse(&base), hello(Some("ml.azure.com"), &[b"http/1.1"]));
    let mut changes = 0;
    for at in 0..base.len() {
        // b - 0x80 and b + 0x80 are the same byte, b ^ 0x80: three distinct changes per byte.
        for new in [base[at].wrapping_sub(1), base[at].wrapping_add(1), base[at] ^ 0x80] {
            let mut m = base.clone();
            m[at] = new;
            let want = outcome_after_change(&base, at, new);
            assert_eq!(parse(&m), want, "byte {at} changed from {:#04x} to {new:#04x}", base[at]);
            changes += 1;
        }
    }
    assert_eq!(changes, base.len() * 3);
}

/// `Ok(Parsed::Hello(_))` with this server name and ALPN list, and no ECH.
fn hello(sni: Option<&str>, alpn: &[&[u8]]) -> Result<Parsed, HelloError> {
    let sni = sni.map(|s| HostName::parse(s).unwrap());
    Ok(Parsed::Hello(ClientHello { sni, alpn: alpn.iter().map(|p| p.to_vec()).collect(), ech: false }))
}

/// What `parse` must say once byte `at` of the base hello in
/// `every_shrunken_or_grown_byte_has_its_exact_outcome` becomes `new`, reasoned field by field
/// from the parser. The base, by offset:
///
/// ```text
///  0 type 0x16 | 1..3 version 03 01 | 3..5 record length 83
///  5 type 0x01 | 6..9 handshake length 79
///  9..11 legacy_version | 11..43 random | 43 session id length 0 | 44..46 suites length 2
/// 46..48 suite | 48 compression length 1 | 49 method 0 | 50..52 extensions length 36
/// 52..54 type 0x0000 | 54..56 length 17 | 56..58 list length 15 | 58 name_type 0
/// 59..61 name length 12 | 61..73 "ml.azure.com"
/// 73..75 type 0x0010 | 75..77 length 11 | 77..79 list length 9 | 79 protocol length 8
/// 80..88 "http/1.1"
/// ```
///
/// Every length field is big-endian with a high byte of 0x00 or 0x01 and a low byte below 0x80,
/// so a change to its high byte grows it by at least 256, past every container here, and a
/// change to its low byte shrinks it by exactly one or grows it by 1 or 0x80.
fn outcome_after_change(base: &[u8], at: usize, new: u8) -> Result<Parsed, HelloError> {
    use HelloError::*;
    let mut m = base.to_vec();
    m[at] = new;
    let u16_at = |i: usize| usize::from(u16::from_be_bytes([m[i], m[i + 1]]));
    let unchanged = hello(Some("ml.azure.com"), &[b"http/1.1"]);
    match at {
        // The record header (RFC 8446 §5.1). A set top bit is how SSLv2 headers start.
        0 if new & 0x80 != 0 => Err(Sslv2),
        0 => Err(NotHandshake),
        1 => Err(RecordVersion),
        // legacy_record_version's minor byte "MUST be ignored for all purposes".
        2 => unchanged,
        3 | 4 => match u16_at(3) {
            len if len > MAX_RECORD => Err(RecordOverflow),
            // One short: the record ends before the hello's last byte, b'1', which is then read
            // as the content type of a next record.
            82 => Err(NotHandshake),
            // Longer than the bytes present: the handshake message inside is whole all the same,
            // and the parser decides as soon as it is, without waiting for the record's end.
            _ => unchanged,
        },
        5 => Err(NotClientHello),
        6..=8 => match usize::from(m[6]) << 16 | u16_at(7) {
            len if len > MAX_HANDSHAKE => Err(TooLarge),
            // One short: the message ends before the extensions do.
            78 => Err(Overrun("extensions")),
            // Longer: what is here is a prefix of a larger hello.
            _ => Ok(Parsed::NeedMore),
        },
        // legacy_version and random are not checked: the proxy reads names, not versions.
        9..=42 => unchanged,
        43 => match new {
            // One byte of session id swallows the suites' high length byte; the suites' length is
            // then 0x0213, longer than what is left.
            1 => Err(Overrun("cipher_suites")),
            _ => Err(Overrun("legacy_session_id")),
        },
        44 | 45 => match u16_at(44) {
            1 | 3 => Err(Malformed("cipher_suites")), // an odd length cannot hold 2-byte suites
            _ => Err(Overrun("cipher_suites")),
        },
        46 | 47 => unchanged, // which suites are offered is the origin's business
        48 => match new {
            0 => Err(Malformed("legacy_compression_methods")),
            // Two methods swallow the extensions' high length byte: their length is then 0x2400.
            2 => Err(Overrun("extensions")),
            _ => Err(Overrun("legacy_compression_methods")),
        },
        49 => unchanged, // compression methods are not checked
        50 | 51 => match u16_at(50) {
            35 => Err(Trailing("extensions")),
            _ => Err(Overrun("extensions")),
        },
        // Another type: an unknown extension, skipped, and the hello has no server name. None of
        // these six types is ALPN, ECH or ESNI.
        52 | 53 => hello(None, &[b"http/1.1"]),
        54 | 55 => match u16_at(54) {
            // One short: the extension ends inside the name list.
            16 => Err(Overrun("server_name_list")),
            // One long: a byte of the next extension's type follows the list inside this one.
            18 => Err(Trailing("server_name_list")),
            _ => Err(Overrun("extension")),
        },
        56 | 57 => match u16_at(56) {
            14 => Err(Trailing("server_name_list")),
            _ => Err(Overrun("server_name_list")),
        },
        // Not host_name: skipped (RFC 6066 §3), which leaves no host name at all.
        58 => Err(EmptySni),
        // Longer overruns the list. One short leaves the name's last byte, b'm', to be read as
        // the name_type of a next entry, whose length is missing: the same error.
        59 | 60 => Err(Overrun("server_name")),
        61..=72 => {
            // Letters stay lower-case letters or become one of / ` {; the dots become - or /.
            // A hyphen lands inside the name, never at a label's edge. A byte with its top bit
            // set is not UTF-8 among ASCII bytes.
            if new.is_ascii_lowercase() || new.is_ascii_digit() || new == b'-' {
                hello(Some(std::str::from_utf8(&m[61..73]).unwrap()), &[b"http/1.1"])
            } else {
                Err(InvalidSni(HostError::InvalidCharacter))
            }
        }
        // Another type: an unknown extension, skipped, and the hello has no ALPN.
        73 | 74 => hello(Some("ml.azure.com"), &[]),
        75 | 76 => match u16_at(75) {
            // One short: the extension ends inside the protocol list.
            10 => Err(Overrun("alpn_protocol_list")),
            _ => Err(Overrun("extension")),
        },
        77 | 78 => match u16_at(77) {
            8 => Err(Trailing("alpn_protocol_list")),
            _ => Err(Overrun("alpn_protocol_list")),
        },
        // One short leaves b'1' (49) as the length of a next protocol, longer than what is left.
        79 => Err(Overrun("alpn_protocol")),
        // Protocol names are opaque bytes (RFC 7301 §3.1): any byte is a different protocol.
        80..=87 => hello(Some("ml.azure.com"), &[&m[80..88]]),
        _ => unreachable!("byte {at} is past the base hello"),
    }
}

#[test]
fn replays_the_fuzz_corpus() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/client_hello");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(Parsed::Hello(h)) = parse(&bytes) {
            if let Some(sni) = h.sni {
                assert_eq!(HostName::parse(sni.as_str()), Ok(sni));
            }
        }
        n += 1;
    }
    assert!(n >= 2, "the corpus has seeds");
}

/// The records of the first hello end where the hello ends; bytes after them are not its, and a
/// record that carries the hello's end and more is refused.
#[test]
fn the_first_hello_takes_its_own_records_and_no_more() {
    let hello = |body: &[u8]| {
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO, 0, 0, body.len() as u8];
        hs.extend_from_slice(body);
        hs
    };
    let record = |frag: &[u8]| [&[CONTENT_HANDSHAKE, 3, 3, 0, frag.len() as u8][..], frag].concat();
    let hs = hello(&[7; 20]);
    let one = record(&hs);
    assert_eq!(hello_records_len(&one), Some(one.len()));
    let next = record(&hello(&[9; 5]));
    assert_eq!(hello_records_len(&[&one[..], &next].concat()), Some(one.len()), "the next record is not the hello's");
    let split = [record(&hs[..3]), record(&hs[3..10]), record(&hs[10..])].concat();
    assert_eq!(hello_records_len(&split), Some(split.len()), "split across records, its header too");
    let shared = record(&[&hs[..], &[0x16, 1, 2]].concat());
    assert_eq!(hello_records_len(&shared), None, "the hello's last record carries more");
    assert_eq!(hello_records_len(&one[..one.len() - 1]), None, "not whole");
    for real in [CURL_ML, CURL_H2_MCR, &rustls_hello("ml.azure.com", &[b"h2"])[..]] {
        assert_eq!(hello_records_len(real), Some(real.len()), "a real client's hello is its records");
    }
}

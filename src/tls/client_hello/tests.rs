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
fn every_shrunken_or_grown_length_field_is_an_error_never_a_panic() {
    let base = synthetic(&[
        sni_ext(&[(0, b"ml.azure.com")]),
        (0x0010, vec![0, 9, 8, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1']),
    ]);
    assert!(matches!(parse(&base), Ok(Parsed::Hello(_))));
    let mut outcomes = 0;
    for i in 0..base.len() {
        for delta in [1u8, 0x80] {
            for v in [base[i].wrapping_sub(delta), base[i].wrapping_add(delta)] {
                let mut m = base.clone();
                m[i] = v;
                let _ = parse(&m); // must return, never panic
                outcomes += 1;
            }
        }
    }
    assert_eq!(outcomes, base.len() * 4);
    // The inner length fields, each one shorter than its contents: a named error, not a hello.
    let hello_start = 5 + 4;
    let ext_len_at = hello_start + 2 + 32 + 1 + 4 + 2;
    for at in [ext_len_at + 1, ext_len_at + 5, ext_len_at + 7] {
        let mut m = base.clone();
        m[at] -= 1;
        assert!(parse(&m).is_err(), "length at {at} shrunk");
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

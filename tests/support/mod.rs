//! Test harness: an in-process proxy on 127.0.0.1:0 with its own config and audit file, a TLS
//! origin with an rcgen certificate, a plain HTTP origin, and a TCP echo server. Every socket is
//! on loopback; names reach the origins through `[resolve] static`.
#![allow(dead_code, clippy::disallowed_methods)]

pub mod dns;
pub mod origins;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use egress_proxy::load::load;
use egress_proxy::reload::{self, Reloader};
use egress_proxy::server::{self, Listeners};
use egress_proxy::state::State;

pub const TAGS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
pub const BIG: usize = 10 * 1024 * 1024;

/// A running proxy.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The config file, which tests may rewrite to trigger a reload.
    pub config: PathBuf,
    pub state: Arc<State>,
    pub audit_path: PathBuf,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
    /// The bearer token of the admin server's mutating endpoints (`[admin] token_file`).
    pub admin_token: String,
    /// The DNS filter's address (UDP and TCP), when started with `dns(true)`.
    pub dns_addr: Option<SocketAddr>,
}

/// How to start a [`TestProxy`]: `TestProxy::builder(rules).watch(false).start().await`.
pub struct TestProxyBuilder<'a> {
    rules: &'a str,
    watch: bool,
    admin_token: bool,
    dns: bool,
}

impl TestProxy {
    /// Starts a proxy on 127.0.0.1:0 with `rules` (TOML) appended to a base config that pins
    /// names, allows loopback and writes the audit log to a file. The file watcher runs, as in
    /// production; a test that counts reloads starts without it (see [`TestProxy::builder`]).
    pub async fn start(rules: &str) -> Self {
        Self::builder(rules).start().await
    }

    pub fn builder(rules: &str) -> TestProxyBuilder<'_> {
        TestProxyBuilder { rules, watch: true, admin_token: true, dns: false }
    }

    /// The audit lines so far. Lines are queued before the client is answered and written by the
    /// audit thread; this waits for what was queued before reading.
    pub fn audit(&self) -> Vec<Value> {
        assert!(self.state.audit.flush(Duration::from_secs(10)), "the audit queue did not drain");
        read_audit(&self.audit_path)
    }

    /// Waits (bounded) until the audit log holds at least `n` lines, and returns them.
    pub async fn audit_at_least(&self, n: usize) -> Vec<Value> {
        lines_at_least(|| self.audit(), n).await
    }

    pub fn reqwest(&self, ca_pem: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(format!("http://{}", self.addr)).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .use_rustls_tls()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }
}

impl TestProxyBuilder<'_> {
    /// Whether the file watcher runs (it does unless told otherwise). Without it the policy
    /// changes only through `POST /reload`, so a test can count reloads exactly.
    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on;
        self
    }

    /// Whether the config names an `[admin] token_file` (it does unless told otherwise).
    pub fn admin_token(mut self, on: bool) -> Self {
        self.admin_token = on;
        self
    }

    /// Serves the DNS filter too, on 127.0.0.1:0 (UDP and TCP).
    pub fn dns(mut self, on: bool) -> Self {
        self.dns = on;
        self
    }

    pub async fn start(self) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let admin_token = format!("test-token-{}", std::process::id());
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, format!("{admin_token}\n")).unwrap();
        let admin = match self.admin_token {
            true => format!("[admin]\ntoken_file = {:?}\n", token_file.display().to_string()),
            false => String::new(),
        };
        let text = format!(
            "[service_tags]\nfile = {TAGS:?}\n[audit]\npath = {:?}\n{admin}\
             [safety]\nallow_internal = [\"127.0.0.0/8\"]\n{}",
            audit_path.display().to_string(),
            self.rules
        );
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, text).unwrap();
        let mut loaded = load(Some(&config), &[]).unwrap_or_else(|e| panic!("test config: {e}"));
        let (files, digest) = (loaded.files.clone(), loaded.digest.clone());
        // Read at start, like `[listen]`: the DNS filter's settings, taken before the state is built.
        let dns_config = std::mem::take(&mut loaded.config.dns);
        let state = Arc::new(State::build(loaded).unwrap());
        let (dns, dns_addr) = match self.dns {
            false => (None, None),
            true => {
                let (udp, tcp) = egress_proxy::dns::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
                let addr = udp.local_addr().unwrap();
                let filter = Arc::new(egress_proxy::dns::DnsFilter::new(state.clone(), &dns_config));
                (Some(server::DnsListener { udp, tcp, filter }), Some(addr))
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let reloader = Arc::new(Reloader::new(Some(config.clone()), Vec::new(), state.clone(), files, digest));
        if self.watch {
            tokio::spawn(reload::watch(reloader.clone(), WATCH_EVERY, shutdown.clone()));
        }
        let listeners = Listeners { http: Some(listener), admin: Some(admin), dns, ..Listeners::default() };
        let done = tokio::spawn(server::run(listeners, state.clone(), Some(reloader), shutdown.clone()));
        TestProxy { addr, admin_addr, config, state, audit_path, shutdown, done, dir, admin_token, dns_addr }
    }
}

/// How often the harness's file watcher polls the config and tag files.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// The decision and close lines of an audit log; the chain's own `chain_start` lines are left
/// out (tests/audit.rs checks those).
/// Waits (bounded: 5 s) until `read` gives at least `n` audit lines, and returns them.
pub async fn lines_at_least(read: impl Fn() -> Vec<Value>, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let lines = read();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("audit log has fewer than {n} lines: {:#?}", read());
}

pub fn read_audit(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
        .filter(|l: &Value| l["event"] != "chain_start")
        .collect()
}

/// The deterministic 10 MB body the origins serve at `/big`.
pub fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8).collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An HTTPS origin on 127.0.0.1:0 whose certificate names `names`, signed by a test CA.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub ca_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsOrigin {
    pub async fn start(names: &[&str]) -> Self {
        let (ca_pem, acceptor) = tls_acceptor(names);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let big = Bytes::from(big_body());
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let big = big.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                    let svc = service_fn(move |req| origin_service(req, sni.clone(), big.clone()));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca_pem).unwrap();
        Self { addr, ca_pem, ca_path, _dir: dir }
    }
}

/// A plain HTTP origin on 127.0.0.1:0.
pub async fn http_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let big = Bytes::from(big_body());
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let big = big.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| origin_service(req, "plain".into(), big.clone()));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    addr
}

/// A TCP echo server on 127.0.0.1:0.
pub async fn echo_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `/` → `hello from SNI`; `/big` → the 10 MB body; `/slow` → the 10 MB body over about 1.5 s;
/// `/echo` → the SHA-256 of the request body and the request's header names.
async fn origin_service(req: Request<Incoming>, sni: String, big: Bytes) -> Result<Response<OriginBody>, Infallible> {
    let path = req.uri().path().to_string();
    let headers: Vec<String> = req.headers().keys().map(|k| k.as_str().to_string()).collect();
    let body: OriginBody = match path.as_str() {
        "/big" => Full::new(big).boxed(),
        "/slow" => Slow { rest: big, sleep: None }.boxed(),
        "/echo" => {
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let text = format!("{} {}\n{}", bytes.len(), sha256(&bytes), headers.join(","));
            Full::new(Bytes::from(text)).boxed()
        }
        _ => Full::new(Bytes::from(format!("hello from {sni}"))).boxed(),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
    resp.headers_mut().insert("x-origin", "yes".parse().unwrap());
    Ok(resp)
}

/// A body that yields 64 KiB chunks with a short pause between them.
struct Slow {
    rest: Bytes,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Slow {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(9))));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let n = self.rest.len().min(64 * 1024);
        let chunk = self.rest.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

fn certificates(
    names: &[&str],
) -> (String, rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "egress-proxy test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    (ca.pem(), leaf.der().clone(), key)
}

/// How the peer ended a [`raw_exchange`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Ending {
    /// A clean close (FIN) after the bytes read.
    Eof,
    /// A reset (RST): SO_LINGER 0, or a close with bytes left unread.
    Reset,
    /// Neither within the limit.
    Open,
}

/// Sends raw bytes to `addr` and reads until the peer closes or `limit` passes: what it sent,
/// and how it ended.
pub async fn raw_exchange(addr: SocketAddr, send: &[u8], limit: Duration) -> (Vec<u8>, Ending) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(send).await.unwrap();
    let mut out = Vec::new();
    let ending = match tokio::time::timeout(limit, s.read_to_end(&mut out)).await {
        Err(_) => Ending::Open,
        Ok(Ok(_)) => Ending::Eof,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ending::Reset,
        Ok(Err(e)) => panic!("reading from {addr}: {e}"),
    };
    (out, ending)
}

/// A TLS acceptor whose certificate names `names`, and the PEM of the test CA that signed it.
pub fn tls_acceptor(names: &[&str]) -> (String, tokio_rustls::TlsAcceptor) {
    let (ca_pem, cert, key) = certificates(names);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    (ca_pem, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// `GET /` over TLS on `stream`, sending `sni` and trusting only `ca_pem`; the whole response.
pub async fn https_get<S>(stream: S, sni: &str, ca_pem: &str) -> std::io::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

/// Sends `CONNECT target` to `proxy` from the loopback address `from`, and reads the response head
/// (each byte within 5 s): the head, and the stream, a tunnel when the head is a 200.
pub async fn connect_from(proxy: SocketAddr, from: &str, target: &str) -> (String, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

/// `GET path` on an admin server: the whole response, as text.
pub async fn admin_page(admin: SocketAddr, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let (resp, _) = raw_exchange(admin, req.as_bytes(), Duration::from_secs(5)).await;
    String::from_utf8_lossy(&resp).into_owned()
}

/// Opens a CONNECT tunnel through `proxy` and returns the stream after the 200 head.
pub async fn connect_tunnel(proxy: SocketAddr, host: &str, port: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A minimal ClientHello record for `sni`, with an encrypted_client_hello extension.
pub fn hello_with_ech(sni: &str) -> Vec<u8> {
    client_hello(sni, &[(0xfe0d, vec![0, 1, 2, 3])])
}

/// A minimal ClientHello for `sni`, with `extra` extensions after server_name.
pub fn client_hello(sni: &str, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let exts: Vec<(u16, Vec<u8>)> = std::iter::once(sni_ext(&[sni.as_bytes()])).chain(extra.iter().cloned()).collect();
    synthetic(&exts)
}

/// A ClientHello carrying `extensions` (type, data), its handshake framed in records of at most
/// 2^14 bytes.
pub fn synthetic(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
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
    frame(&hs, 1 << 14)
}

/// Re-frames the handshake bytes of `records` into records of at most `size` bytes.
pub fn refragment(records: &[u8], size: usize) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut rest = records;
    while rest.len() >= 5 {
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    frame(&handshake, size)
}

/// Handshake bytes in handshake records of at most `size` bytes each.
fn frame(handshake: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A server_name extension with `names`, each as a host_name.
pub fn sni_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for n in names {
        list.push(0); // host_name
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (0x0000, data)
}

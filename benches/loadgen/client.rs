//! One client's view of a path to the origin: direct, through a CONNECT proxy, or through an SNI
//! pass-through proxy; and HTTP/1.1 over the TLS connection at its end.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every single step (a connect, a handshake, a request) gives up after this long.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response head, and the most of a refusal's body, that is read.
const HEAD_MAX: usize = 16 * 1024;
const REFUSAL_BODY_MAX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TLS straight to the origin: the baseline.
    Direct,
    /// An explicit proxy: `CONNECT host:port`, then TLS inside the tunnel.
    Connect,
    /// A transparent SNI proxy: TLS straight to it; it forwards by the ClientHello's server name.
    Sni,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Connect => "connect",
            Mode::Sni => "sni",
        }
    }
}

/// How a refused request ended.
#[derive(Debug)]
pub enum Refusal {
    /// The proxy answered the CONNECT with this status (never 200).
    Status(u16),
    /// The proxy closed or reset the connection before a TLS ServerHello.
    Closed,
    /// The proxy sent a TLS alert.
    Alert(String),
}

impl Refusal {
    pub fn key(&self) -> String {
        match self {
            Refusal::Status(s) => s.to_string(),
            Refusal::Closed => "closed".into(),
            Refusal::Alert(a) => format!("alert {a}"),
        }
    }
}

/// Where the client dials and what it asks for.
pub struct Route {
    pub mode: Mode,
    /// The origin itself (direct) or the proxy.
    pub dial: SocketAddr,
    /// The allowed name (SNI, CONNECT authority, Host) and the origin's port.
    pub host: String,
    pub port: u16,
    /// A name that every proxy must refuse.
    pub deny_host: String,
    tls: TlsConnector,
}

pub fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| err(format!("{what}: timed out")))?
}

impl Route {
    /// Refuses any address off the loopback: this tool only ever loads this machine.
    pub fn new(mode: Mode, dial: SocketAddr, host: &str, port: u16, deny_host: &str, ca: &Path) -> io::Result<Self> {
        if !dial.ip().is_loopback() {
            return Err(err(format!("refusing {dial}: only loopback addresses are ever dialled")));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| err(format!("{}: {e}", ca.display())))? {
            let cert = cert.map_err(|e| err(format!("{}: {e}", ca.display())))?;
            roots.add(cert).map_err(|e| err(format!("{}: {e}", ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // A full handshake for every new tunnel, as a new client process would do.
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Route {
            mode,
            dial,
            host: host.to_string(),
            port,
            deny_host: deny_host.to_string(),
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    async fn tcp(&self) -> io::Result<TcpStream> {
        let s = step("tcp connect", TcpStream::connect(self.dial)).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Sends `CONNECT name:port` and reads the response head; what came after the head is left in `buf`.
    async fn connect_request(&self, s: &mut TcpStream, name: &str, buf: &mut Vec<u8>) -> io::Result<Head> {
        let req = format!("CONNECT {name}:{p} HTTP/1.1\r\nHost: {name}:{p}\r\n\r\n", p = self.port);
        step("CONNECT", async {
            s.write_all(req.as_bytes()).await?;
            read_head(s, buf).await
        })
        .await
    }

    fn server_name(name: &str) -> io::Result<ServerName<'static>> {
        ServerName::try_from(name.to_string()).map_err(|_| err(format!("bad server name {name}")))
    }

    /// A TLS connection to the origin (for the allowed name) by this path.
    pub async fn open(&self) -> io::Result<Conn> {
        let mut tcp = self.tcp().await?;
        if self.mode == Mode::Connect {
            let mut buf = Vec::new();
            let head = self.connect_request(&mut tcp, &self.host, &mut buf).await?;
            if head.status != 200 {
                return Err(err(format!("CONNECT answered {}", head.status)));
            }
            if buf.len() != head.len {
                return Err(err("bytes after the CONNECT response"));
            }
        }
        let tls = step("TLS handshake", self.tls.connect(Self::server_name(&self.host)?, tcp)).await?;
        Ok(Conn::new(tls, &self.host))
    }

    /// Asks for the denied name; a proxy that lets it through is an error (a leak), not a refusal.
    pub async fn refused(&self) -> io::Result<Refusal> {
        let mut tcp = self.tcp().await?;
        match self.mode {
            Mode::Direct => Err(err("the direct path refuses nothing")),
            Mode::Connect => {
                let mut buf = Vec::new();
                let head = self.connect_request(&mut tcp, &self.deny_host, &mut buf).await?;
                if head.status == 200 {
                    return Err(err(format!("LEAK: CONNECT {} answered 200", self.deny_host)));
                }
                // Read the refusal's body as a client would, then close.
                step("refusal body", drain_refusal(&mut tcp, &head, &mut buf)).await?;
                Ok(Refusal::Status(head.status))
            }
            Mode::Sni => {
                match step("TLS handshake", self.tls.connect(Self::server_name(&self.deny_host)?, tcp)).await {
                    Ok(_) => Err(err(format!("LEAK: a TLS handshake for {} succeeded", self.deny_host))),
                    Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                        // A certificate came back: something answered for the denied name (the origin's
                        // certificate does not name it). That is a leak too.
                        Some(rustls::Error::InvalidCertificate(c)) => {
                            Err(err(format!("LEAK: a certificate came back for {}: {c:?}", self.deny_host)))
                        }
                        Some(rustls::Error::AlertReceived(a)) => Ok(Refusal::Alert(format!("{a:?}"))),
                        Some(other) => Err(err(format!("TLS: {other}"))),
                        None if is_closed(&e) => Ok(Refusal::Closed),
                        None => Err(e),
                    },
                }
            }
        }
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A response head: status, its length in bytes, and the body's length when it says.
pub struct Head {
    pub status: u16,
    pub len: usize,
    pub content_length: Option<u64>,
    pub chunked: bool,
}

fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(|e| err(format!("response head: {e}")))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let mut content_length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().map_err(|_| err("bad content-length"))?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some(Head { status: resp.code.unwrap_or(0), len, content_length, chunked }))
}

/// Reads until a whole response head is in `buf` (which may then hold body bytes after it).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<Head> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse_head(buf)? {
            return Ok(head);
        }
        if buf.len() > HEAD_MAX {
            return Err(err("response head too large"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(err("closed before a response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads what is left of a refusal's body: by its length, to the end of a chunked body, or to EOF.
async fn drain_refusal(s: &mut TcpStream, head: &Head, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut have = buf.len() - head.len;
    let mut chunk = [0u8; 4096];
    loop {
        let done = match head.content_length {
            Some(n) => have as u64 >= n,
            None if head.chunked => buf.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done || have > REFUSAL_BODY_MAX {
            return Ok(());
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Ok(()),
            Ok(n) => {
                have += n;
                if head.chunked {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Err(e) if is_closed(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// A TLS connection to the origin that GETs, one request at a time, kept alive.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    host: String,
    buf: Vec<u8>,
}

impl Conn {
    fn new(tls: TlsStream<TcpStream>, host: &str) -> Self {
        Conn { tls, host: host.to_string(), buf: vec![0; 64 * 1024] }
    }

    /// GETs `path` and reads the whole body (which must be 200 with a length); adds the body bytes
    /// to `progress` as they arrive. Returns the body's length.
    pub async fn get(&mut self, path: &str, progress: Option<&AtomicU64>) -> io::Result<u64> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: egress-proxy-loadgen\r\n\r\n", self.host);
        self.tls.write_all(req.as_bytes()).await?;
        self.tls.flush().await?;
        let mut filled = 0;
        let head = loop {
            let n = self.tls.read(&mut self.buf[filled..HEAD_MAX]).await?;
            if n == 0 {
                return Err(err("closed before a response head"));
            }
            filled += n;
            if let Some(head) = parse_head(&self.buf[..filled])? {
                break head;
            }
            if filled == HEAD_MAX {
                return Err(err("response head too large"));
            }
        };
        if head.status != 200 {
            return Err(err(format!("GET {path} answered {}", head.status)));
        }
        let want = head.content_length.ok_or_else(|| err("response without a content-length"))?;
        let mut have = (filled - head.len) as u64;
        if let Some(p) = progress {
            p.fetch_add(have, Ordering::Relaxed);
        }
        while have < want {
            let room = (want - have).min(self.buf.len() as u64) as usize;
            let n = self.tls.read(&mut self.buf[..room]).await?;
            if n == 0 {
                return Err(err("closed in the body"));
            }
            have += n as u64;
            if let Some(p) = progress {
                p.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if have > want {
            return Err(err("more bytes than the content-length"));
        }
        Ok(want)
    }

    /// Like [`Conn::get`], bounded by [`STEP_TIMEOUT`].
    pub async fn get_timed(&mut self, path: &str, progress: Option<&AtomicU64>) -> io::Result<u64> {
        step("GET", self.get(path, progress)).await
    }
}

/// An error's text, short enough to count by.
pub fn short(e: &io::Error) -> String {
    e.to_string().chars().take(90).collect()
}

//! Origins that count and record what reaches them, and a harness for the transparent listeners,
//! for the hostile-input and fault suites (`tests/hostile.rs`, `tests/faults.rs`). Every socket
//! is on 127.0.0.1; nothing here dials anything but loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use egress_proxy::load::load;
use egress_proxy::proxy::transparent::{self, Redirect};
use egress_proxy::proxy::ConnCx;
use egress_proxy::state::State;

use super::read_audit;

/// A TCP origin that counts the connections it accepts and keeps every byte each one sent, until
/// the peer closes. It answers nothing.
pub struct CountingOrigin {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl CountingOrigin {
    /// Listens on 127.0.0.1:0.
    pub async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Counts on a listener the caller bound (another loopback address, a given port).
    pub fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (accepted.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
                    record.lock().unwrap().push(got);
                });
            }
        });
        Self { addr, accepted, received }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// What each finished connection sent, in the order they finished.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` connections have finished, and returns what they sent.
    pub async fn received_at_least(&self, n: usize) -> Vec<Vec<u8>> {
        for _ in 0..200 {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("fewer than {n} connections finished at {}: {} accepted", self.addr, self.accepted());
    }

    /// Asserts that no connection reached this origin: waits a little first, since a dial that
    /// completed before the proxy answered may not have been accepted yet.
    pub async fn assert_untouched(&self, what: &str) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(self.accepted(), 0, "{what}: a connection reached {}", self.addr);
    }
}

/// An HTTP origin that answers every request with `served HOST` and records the Host header of
/// every request it served (a local stand-in for a front end that serves a site per Host).
pub struct HostOrigin {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    hosts: Arc<Mutex<Vec<String>>>,
}

impl HostOrigin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (accepted.clone(), hosts.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        async move {
                            let host = req
                                .headers()
                                .get("host")
                                .map_or("-".into(), |h| String::from_utf8_lossy(h.as_bytes()).into_owned());
                            record.lock().unwrap().push(host.clone());
                            // Read the body whole, so that a request that carries one is served.
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "served {host}"
                            )))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        Self { addr, accepted, hosts }
    }

    /// Every Host this origin served, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The transparent listeners' handlers with a config of our own, the original destination handed
/// in as SO_ORIGINAL_DST would give it (no nftables, no namespaces).
pub struct Transparent {
    pub state: Arc<State>,
    pub audit_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Transparent {
    /// `config` is appended to an `[audit]` section and `[safety] allow_internal = 127.0.0.0/8`.
    pub fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let cfg = dir.path().join("p.toml");
        let text = format!(
            "[audit]\npath = {:?}\n[safety]\nallow_internal = [\"127.0.0.0/8\"]\n{config}",
            audit_path.display().to_string()
        );
        std::fs::write(&cfg, text).unwrap();
        let state = Arc::new(State::build(load(Some(&cfg), &[]).unwrap_or_else(|e| panic!("{e}"))).unwrap());
        Self { state, audit_path, _dir: dir }
    }

    /// A client connection served by `listener` as if redirected from `original_dst`.
    pub async fn connect(&self, listener: Redirect, original_dst: SocketAddr) -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, peer) = l.accept().await.unwrap();
        let cx =
            Arc::new(ConnCx::new(self.state.clone(), peer, TaskTracker::new(), CancellationToken::new(), Arc::new(())));
        tokio::spawn(transparent::serve(listener, server, original_dst, cx));
        client
    }

    pub fn audit(&self) -> Vec<Value> {
        assert!(self.state.audit.flush(Duration::from_secs(10)), "the audit queue did not drain");
        read_audit(&self.audit_path)
    }

    /// Waits (bounded) until the audit log holds at least `n` lines, and returns them.
    pub async fn audit_at_least(&self, n: usize) -> Vec<Value> {
        super::lines_at_least(|| self.audit(), n).await
    }
}

/// The decision lines of an audit log, as (decision, reason or "-", host).
pub fn decision_triples(lines: &[Value]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .filter(|l| l["event"] == "decision")
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or("-").to_string();
            (s("decision"), s("reason"), s("host"))
        })
        .collect()
}

//! Binds the listeners, accepts connections within the limits, and drains on shutdown.
//!
//! `run` takes bound listeners and a shutdown token, so tests bind 127.0.0.1:0 and pass them in.
//! On shutdown: stop accepting, let open connections and tunnels finish for the grace period,
//! then close what is left.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin;
use crate::audit::{Decided, Listener, Verdict};
use crate::cli::{load_or_report, ConfigArgs};
use crate::config::Config;
use crate::load::Loaded;
use crate::proxy::http::{handle, refusal_response, ConnCx};
use crate::proxy::{transparent, Limits, Refusal, State};
use crate::refresh::Refresher;
use crate::reload::{self, Reloader};

/// The bound listeners; each is optional.
#[derive(Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    pub plain: Option<TcpListener>,
    pub catch_all: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Builds the shared state for a loaded configuration.
pub fn state(loaded: Loaded) -> std::io::Result<State> {
    State::build(loaded)
}

/// `egress-proxy run`: load, bind, serve until SIGTERM or SIGINT, drain, exit 0.
pub fn main(args: ConfigArgs) -> ExitCode {
    init_tracing();
    let loaded = match load_or_report(&args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    for w in &loaded.compiled.warnings {
        tracing::warn!(rule = w.rule.as_deref().unwrap_or("-"), "{}", w.message);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let listen = &loaded.config.listen;
        if [listen.http, listen.tls, listen.plain, listen.catch_all].iter().all(Option::is_none) {
            tracing::error!("No listener is configured: set [listen] http (or tls, plain, catch_all)");
            return ExitCode::from(2);
        }
        let wanted = [
            ("http", listen.http),
            ("tls", listen.tls),
            ("plain", listen.plain),
            ("catch_all", listen.catch_all),
            ("admin", listen.admin),
        ];
        let origin = loaded.config.source.origin.to_string();
        let rules = loaded.compiled.policy.rules().len();
        let (files, digest) = (loaded.files.clone(), loaded.digest.clone());
        let state = match state(loaded) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "Cannot open the audit log");
                return ExitCode::from(1);
            }
        };
        let mut listeners = Listeners::default();
        let slots = [
            &mut listeners.http,
            &mut listeners.tls,
            &mut listeners.plain,
            &mut listeners.catch_all,
            &mut listeners.admin,
        ];
        for ((name, addr), slot) in wanted.into_iter().zip(slots) {
            let Some(addr) = addr else { continue };
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    let bound = l.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
                    tracing::info!(listener = name, addr = %bound, config = %origin, rules, "Listening");
                    *slot = Some(l);
                }
                Err(e) => {
                    tracing::error!(listener = name, addr = %addr, error = %e, "Cannot bind");
                    return ExitCode::from(1);
                }
            }
        }
        let shutdown = CancellationToken::new();
        let reloader = Arc::new(Reloader::new(args.config.clone(), args.regions.clone(), state.clone(), files, digest));
        tokio::spawn(signals(shutdown.clone()));
        tokio::spawn(reload::on_sighup(reloader.clone(), shutdown.clone()));
        tokio::spawn(reload::watch(reloader.clone(), WATCH_EVERY, shutdown.clone()));
        if let Some(path) = &args.config {
            let config = Config::load(path).ok();
            let refresher =
                config.map(|c| Refresher::from_config(&c, Some(path), &args.regions, state.clone(), reloader.clone()));
            match refresher {
                Some(Ok(Some(r))) => {
                    tokio::spawn(r.run(shutdown.clone()));
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "Cannot set up the service-tag refresh");
                    return ExitCode::from(2);
                }
                _ => {}
            }
        }
        run(listeners, state, Some(reloader), shutdown).await;
        tracing::info!("Stopped");
        ExitCode::SUCCESS
    })
}

/// Serves until `shutdown` is cancelled, then drains.
pub async fn run(
    listeners: Listeners,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let admission = Arc::new(Admission::new(&state.limits));
    let mut accepts = Vec::new();
    for (kind, listener) in
        [(Listener::Tls, listeners.tls), (Listener::Plain, listeners.plain), (Listener::CatchAll, listeners.catch_all)]
    {
        if let Some(l) = listener {
            let (state, tracker, stop, shutdown, admission) =
                (state.clone(), tracker.clone(), stop.clone(), shutdown.clone(), admission.clone());
            accepts.push(tokio::spawn(accept_redirected(kind, l, state, tracker, stop, shutdown, admission)));
        }
    }
    if let Some(l) = listeners.http {
        let (state, tracker, stop, shutdown, admission) =
            (state.clone(), tracker.clone(), stop.clone(), shutdown.clone(), admission.clone());
        accepts.push(tokio::spawn(accept_http(l, state, tracker, stop, shutdown, admission)));
    }
    if let Some(l) = listeners.admin {
        tokio::spawn(admin::serve(l, state.clone(), reloader, shutdown.clone()));
    }
    state.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    shutdown.cancelled().await;
    state.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    for a in accepts {
        let _ = a.await;
    }
    tracker.close();
    let grace = state.limits.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "Grace period over: closing open connections");
        stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
    }
}

async fn accept_http(
    listener: TcpListener,
    state: Arc<State>,
    tracker: TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
    admission: Arc<Admission>,
) {
    while let Some((stream, client)) = accept_next(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        match admission.admit(client.ip()) {
            Some(slot) => {
                let cx = Arc::new(ConnCx::new(state.clone(), client, tracker.clone(), stop.clone(), Arc::new(slot)));
                let span = tracing::info_span!("conn", client.addr = %client, listener = "http");
                tracker.spawn(serve_http(stream, cx, shutdown.clone()).instrument(span));
            }
            None => match admission.overflow.clone().try_acquire_owned() {
                Ok(permit) => {
                    tracker.spawn(reject(stream, client, state.clone(), permit));
                }
                Err(_) => drop(stream),
            },
        }
    }
}

/// The next connection, or `None` once `shutdown` is cancelled. Accept errors (EMFILE and
/// friends) back off instead of spinning.
pub(crate) async fn accept_next(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Accepts redirected connections for one transparent listener.
async fn accept_redirected(
    kind: Listener,
    listener: TcpListener,
    state: Arc<State>,
    tracker: TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
    admission: Arc<Admission>,
) {
    while let Some((stream, client)) = accept_next(&listener, &shutdown).await {
        let Some(slot) = admission.admit(client.ip()) else {
            record_connection_refusal(&state, client, kind, &Refusal::ConnectionLimit);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            continue;
        };
        let Some(original_dst) = original_dst(&stream) else {
            record_connection_refusal(&state, client, kind, &Refusal::NoOriginalDst);
            continue;
        };
        let cx = Arc::new(ConnCx::new(state.clone(), client, tracker.clone(), stop.clone(), Arc::new(slot)));
        let span =
            tracing::info_span!("conn", client.addr = %client, listener = kind.as_str(), dst.orig = %original_dst);
        tracker.spawn(transparent::serve(kind, stream, original_dst, cx).instrument(span));
    }
}

/// Where a redirected connection was going (SO_ORIGINAL_DST, IPv4 and IPv6).
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let addr = if local.is_ipv4() { sock.original_dst() } else { sock.original_dst_ipv6() };
    addr.ok()?.as_socket()
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .max_buf_size(limits.max_request_head_bytes)
        .half_close(false);
    b
}

async fn serve_http(stream: TcpStream, cx: Arc<ConnCx>, shutdown: CancellationToken) {
    let limits = cx.state.limits;
    let svc_cx = cx.clone();
    let svc = service_fn(move |req| handle(req, svc_cx.clone()));
    let conn = http1_builder(&limits).serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // hyper restarts the head timer when a kept-alive connection goes idle: a timeout after
        // a served request is an idle client going away, not a slow request head.
        let served = cx.requests.load(Ordering::Relaxed) > 0;
        let refusal = if e.is_timeout() && !served {
            Some(Refusal::HeadTimeout)
        } else if e.is_parse() || e.is_parse_too_large() {
            Some(Refusal::BadRequest("malformed request"))
        } else {
            None
        };
        match refusal {
            Some(r) => record_connection_refusal(&cx.state, cx.client, Listener::Http, &r),
            None => tracing::debug!(error = %e, "Connection ended with an error"),
        }
    }
}

/// Answers 503 to a client over a limit, then closes.
async fn reject(stream: TcpStream, client: SocketAddr, state: Arc<State>, _permit: OwnedSemaphorePermit) {
    record_connection_refusal(&state, client, Listener::Http, &Refusal::ConnectionLimit);
    let svc =
        service_fn(|_req| async { Ok::<_, std::convert::Infallible>(refusal_response(&Refusal::ConnectionLimit)) });
    let _ = http1_builder(&state.limits).keep_alive(false).serve_connection(TokioIo::new(stream), svc).await;
}

/// An audit line for a refusal that has no request to speak of: a slow or malformed head, a limit.
fn record_connection_refusal(state: &State, client: SocketAddr, listener: Listener, r: &Refusal) {
    state.audit.decided(&Decided {
        id: state.next_id(),
        client,
        listener,
        method: None,
        host: None,
        port: None,
        dst_addr: None,
        decision: Verdict::Deny,
        rule: None,
        reason: Some(r.reason()),
        original_dst: None,
        note: None,
    });
    tracing::info!(client.addr = %client, reason = r.reason(), "Connection refused");
}

/// Connection limits: overall and per client address.
struct Admission {
    total: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_client: usize,
    /// Bounds the tasks that answer 503, so that a flood cannot grow them without limit.
    overflow: Arc<Semaphore>,
}

/// A connection's place in the limits, given back on drop.
struct Slot {
    _total: OwnedSemaphorePermit,
    client: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    fn new(limits: &Limits) -> Self {
        Self {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_client: Arc::default(),
            max_per_client: limits.max_connections_per_client,
            overflow: Arc::new(Semaphore::new(OVERFLOW_ANSWERS)),
        }
    }

    fn admit(&self, client: IpAddr) -> Option<Slot> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut map = self.per_client.lock().ok()?;
        let n = map.entry(client).or_insert(0);
        if *n >= self.max_per_client {
            return None;
        }
        *n += 1;
        Some(Slot { _total: total, client, per_client: self.per_client.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.per_client.lock() {
            if let Some(n) = map.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.client);
                }
            }
        }
    }
}

const OVERFLOW_ANSWERS: usize = 64;
/// How often the config and service-tag files are checked for changes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("Cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    shutdown.cancel();
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_PROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

//! `egress-proxy run`: the wiring of a running proxy. The configuration is loaded once (by the
//! caller); this binds the listeners, installs the signal handlers, the reload triggers and the
//! service-tag refresh, and serves until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::budgets;
use crate::descriptors;
use crate::dns::{self, DnsFilter};
use crate::load::Loaded;
use crate::refresh::Refresher;
use crate::reload::{self, Reloader};
use crate::server::{self, DnsListener, Listeners};
use crate::state::State;

/// Runs the proxy on `loaded`, which came from `config` (or the embedded preset) with `regions`;
/// reloads read the same files again.
pub fn run(loaded: Loaded, config: Option<PathBuf>, regions: Vec<String>) -> ExitCode {
    init_tracing();
    for w in &loaded.compiled.warnings {
        tracing::warn!(rule = w.rule.as_deref().unwrap_or("-"), "{}", w.message);
    }
    let nofile = descriptors::raise_limit();
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    tracing::info!(
        soft_was = %show(nofile.soft_before),
        soft = %show(nofile.soft),
        hard = %show(nofile.hard),
        "File descriptor limit (RLIMIT_NOFILE): soft raised to hard"
    );
    if let Some(warning) = descriptors::check(&loaded.config.limits, server::ADMIN_CONNECTIONS, nofile.soft) {
        tracing::warn!("{warning}");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = &loaded.config.limits.workers {
        runtime.worker_threads(*workers.get_ref());
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(loaded, config, regions))
}

async fn serve(loaded: Loaded, config: Option<PathBuf>, regions: Vec<String>) -> ExitCode {
    // Installed first, before anything is bound or served: until a handler is in place, SIGHUP
    // would end the process and SIGTERM would skip the drain.
    let (Ok(term), Ok(int), Ok(hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("Cannot install the signal handlers");
        return ExitCode::from(1);
    };
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
    let mut listeners = Listeners::default();
    let slots =
        [&mut listeners.http, &mut listeners.tls, &mut listeners.plain, &mut listeners.catch_all, &mut listeners.admin];
    for ((name, addr), slot) in wanted.into_iter().zip(slots) {
        let Some(addr) = addr else { continue };
        match TcpListener::bind(addr).await.and_then(|l| server::nodelay_for_every_connection(&l).map(|()| l)) {
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
    let dns_sockets = match listen.dns {
        None => None,
        Some(addr) => match dns::bind(addr).await.and_then(|(udp, tcp)| {
            server::nodelay_for_every_connection(&tcp)?;
            Ok((udp, tcp))
        }) {
            Ok((udp, tcp)) => {
                let bound = udp.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
                tracing::info!(listener = "dns", addr = %bound, config = %origin, rules, "Listening (UDP and TCP)");
                Some((udp, tcp))
            }
            Err(e) => {
                tracing::error!(listener = "dns", addr = %addr, error = %e, "Cannot bind");
                return ExitCode::from(1);
            }
        },
    };
    let state = match State::new(&loaded.config) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "Cannot open the audit log");
            return ExitCode::from(1);
        }
    };
    listeners.dns = dns_sockets.map(|(udp, tcp)| DnsListener {
        udp,
        tcp,
        filter: Arc::new(DnsFilter::new(Arc::clone(&state), &loaded.config.dns)),
    });
    let shutdown = CancellationToken::new();
    let (files, digest) = (loaded.files.clone(), loaded.digest.clone());
    let reloader = Arc::new(Reloader::new(config.clone(), regions.clone(), state.clone(), files, digest));
    let refresher =
        match Refresher::from_config(&loaded.config, config.as_deref(), &regions, state.clone(), reloader.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot set up the service-tag refresh");
                return ExitCode::from(2);
            }
        };
    // The policy is in force before anything that may reload it starts.
    state.apply(loaded);
    if let Some(r) = refresher {
        tokio::spawn(r.run(shutdown.clone()));
    }
    tokio::spawn(signals(term, int, shutdown.clone()));
    tokio::spawn(reload::on_sighup(reloader.clone(), hup, shutdown.clone()));
    tokio::spawn(reload::watch(reloader.clone(), WATCH_EVERY, shutdown.clone()));
    tokio::spawn(prune_budgets(state.clone(), shutdown.clone()));
    server::run(listeners, state.clone(), Some(reloader), shutdown).await;
    // Lines still queued are written before the process ends (a stalled sink loses them).
    if !state.audit.flush(AUDIT_FLUSH_AT_EXIT) {
        tracing::error!("Audit lines still queued at exit could not be written");
    }
    tracing::info!("Stopped");
    ExitCode::SUCCESS
}

async fn signals(mut term: Signal, mut int: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    shutdown.cancel();
}

/// Forgets upload-budget windows that ran out, so that the map does not grow with every client.
async fn prune_budgets(state: Arc<State>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(budgets::PRUNE_EVERY) => state.budgets.prune(),
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_PROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// How often the config and service-tag files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// How long the audit queue may take to drain at exit.
const AUDIT_FLUSH_AT_EXIT: Duration = Duration::from_secs(5);

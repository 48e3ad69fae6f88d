//! Hot reload: SIGHUP, a change to the config or service-tag file, or `POST /reload` builds and
//! validates a whole new policy, then swaps it in. A broken file leaves the old policy in force,
//! is logged with file, line and field, and counts as a failed reload. Open tunnels keep going;
//! new connections see the new policy from the moment of the swap.
//!
//! Reload replaces the rules, `[safety]`, service tags and `[resolve] static`. Listeners, limits
//! and the audit path are read at start only (changing them needs a restart, and is logged).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors};
use crate::load::{load, Loaded};
use crate::policy::HostName;
use crate::proxy::State;

/// What `/policy` shows about the policy in force.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyInfo {
    pub hash: String,
    #[serde(serialize_with = "rfc3339")]
    pub loaded_at: SystemTime,
    pub source: String,
    pub service_tags_change_number: u64,
    pub disabled: Vec<String>,
    pub warnings: Vec<String>,
}

impl Default for PolicyInfo {
    fn default() -> Self {
        Self {
            hash: String::new(),
            loaded_at: SystemTime::UNIX_EPOCH,
            source: String::new(),
            service_tags_change_number: 0,
            disabled: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Reloads the policy from where it was first loaded.
pub struct Reloader {
    path: Option<PathBuf>,
    regions: Vec<String>,
    state: Arc<State>,
    /// The files of the policy in force and a digest of their contents, for the watcher.
    watched: Mutex<(Vec<PathBuf>, String)>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, regions: Vec<String>, state: Arc<State>, files: Vec<PathBuf>) -> Self {
        let digest = digest_files(&files);
        Self { path, regions, state, watched: Mutex::new((files, digest)) }
    }

    /// Builds the whole new policy, then swaps it in; on error the old one stays.
    pub fn reload(&self) -> Result<String, ConfigErrors> {
        let result = load(self.path.as_deref(), &self.regions);
        let metrics = &self.state.metrics;
        match result {
            Ok(loaded) => {
                let hash = loaded.hash.clone();
                warn_on_restart_only_changes(&self.state, &loaded.config);
                if let Ok(mut w) = self.watched.lock() {
                    *w = (loaded.files.clone(), digest_files(&loaded.files));
                }
                apply(&self.state, loaded);
                metrics.reloads.with_label_values(&["success"]).inc();
                tracing::info!(hash = %hash, "Policy reloaded");
                Ok(hash)
            }
            Err(errors) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                for e in &errors.0 {
                    tracing::error!(file = %e.file, line = e.line, field = %e.field, "Reload failed, the old policy stays in force: {}", e.msg);
                }
                Err(errors)
            }
        }
    }

    /// True when a watched file's contents changed since the last load.
    fn files_changed(&self) -> bool {
        self.watched.lock().map(|w| !w.0.is_empty() && digest_files(&w.0) != w.1).unwrap_or(false)
    }
}

/// Puts a loaded policy in force: the policy, the resolver's pins, `/policy` and the metrics.
pub fn apply(state: &State, loaded: Loaded) {
    let Loaded { config, compiled, tags, hash, tags_written, .. } = loaded;
    let metrics = &state.metrics;
    metrics.config_info.reset();
    metrics.config_info.with_label_values(&[&hash]).set(1);
    let now = SystemTime::now();
    metrics.last_reload_success.set(unix_seconds(now));
    metrics.tags_change_number.set(i64::try_from(tags.change_number()).unwrap_or(i64::MAX));
    metrics.tags_timestamp.set(tags_written.map_or(0.0, unix_seconds));
    state.resolver.set_pins(pins(&config));
    state.info.store(Arc::new(PolicyInfo {
        hash,
        loaded_at: now,
        source: config.source.origin.to_string(),
        service_tags_change_number: tags.change_number(),
        disabled: compiled.disabled,
        warnings: compiled
            .warnings
            .iter()
            .map(|w| format!("rule {}: {}", w.rule.as_deref().unwrap_or("-"), w.message))
            .collect(),
    }));
    state.policy.store(Arc::new(compiled.policy));
}

/// The `[resolve] static` pins, as the resolver wants them. Names were validated by `compile`.
pub fn pins(config: &Config) -> HashMap<HostName, Vec<IpAddr>> {
    config
        .resolve
        .static_hosts
        .iter()
        .filter_map(|(name, addrs)| HostName::parse(name).ok().map(|n| (n, addrs.get_ref().clone())))
        .collect()
}

/// Reloads on SIGHUP until `shutdown`.
pub async fn on_sighup(reloader: Arc<Reloader>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("Cannot install the SIGHUP handler");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let _ = reloader.reload();
            }
        }
    }
}

/// Polls the config and service-tag files and reloads when their contents change. Polling the
/// contents (not inotify) also catches Kubernetes ConfigMap updates, which swap a symlink.
pub async fn watch(reloader: Arc<Reloader>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if reloader.files_changed() {
            tracing::info!("Policy files changed: reloading");
            if reloader.reload().is_err() {
                // Remember the broken contents so that the same error is not logged every poll.
                if let Ok(mut w) = reloader.watched.lock() {
                    w.1 = digest_files(&w.0);
                }
            }
        }
    }
}

fn warn_on_restart_only_changes(state: &State, config: &Config) {
    let limits = crate::proxy::Limits::from(&config.limits);
    if format!("{limits:?}") != format!("{:?}", state.limits) {
        tracing::warn!("[limits] changed: the new values take effect at the next restart");
    }
}

fn digest_files(files: &[PathBuf]) -> String {
    let mut d = Sha256::new();
    for f in files {
        d.update(f.as_os_str().as_encoded_bytes());
        d.update(std::fs::read(f).unwrap_or_default());
    }
    d.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

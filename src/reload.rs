//! The reload triggers: SIGHUP, a change to the config or service-tag file, and `POST /reload`.
//! Each builds and validates a whole new policy, then hands it to `State::apply`. A broken file leaves the old policy in force,
//! is logged with file, line and field, and counts as a failed reload. Open tunnels keep going;
//! new connections see the new policy from the moment of the swap.
//!
//! Reload replaces the rules, `[safety]`, service tags and `[resolve] static`. Listeners, limits
//! and `[audit]` are read at start only (changing them needs a restart; limits are logged).
//! SIGHUP also reopens the audit file at its path, for logrotate.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ConfigErrors};
use crate::load::{digest_files, load};
use crate::state::{Limits, State};

/// Reloads the policy from where it was first loaded. Reloads are serialised: SIGHUP, the
/// watcher, `POST /reload` and the service-tag refresh never interleave. They run off the
/// runtime's worker threads and are coalesced (`request`), so that no number of reload requests
/// can stall the data path.
pub struct Reloader {
    /// The config file reloads read: the one the proxy started from, or the `[shadow]` candidate
    /// once it was promoted.
    path: Mutex<Option<PathBuf>>,
    regions: Vec<String>,
    state: Arc<State>,
    busy: Mutex<()>,
    watched: Mutex<Watched>,
    /// Reload requests made so far.
    requested: AtomicU64,
    /// The last reload run: how many requests it answers (those made before it started), and its
    /// result. Held while a reload runs, so that requests queue behind it.
    last: tokio::sync::Mutex<Option<(u64, Result<String, ConfigErrors>)>>,
}

/// Why `POST /shadow/promote` did not promote.
#[derive(Debug)]
pub enum Promotion {
    /// No `[shadow]` candidate is configured.
    NoShadow,
    /// The candidate does not load: the policy in force stays.
    Invalid(ConfigErrors),
}

/// The files of the last load attempt, a digest of what they held, and whether it failed.
struct Watched {
    files: Vec<PathBuf>,
    digest: String,
    failed_at: Option<Instant>,
}

impl Reloader {
    /// `digest` is `Loaded::digest` of the policy in force.
    pub fn new(
        path: Option<PathBuf>,
        regions: Vec<String>,
        state: Arc<State>,
        files: Vec<PathBuf>,
        digest: String,
    ) -> Self {
        let watched = Mutex::new(Watched { files, digest, failed_at: None });
        Self {
            path: Mutex::new(path),
            regions,
            state,
            busy: Mutex::new(()),
            watched,
            requested: AtomicU64::new(0),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Reloads off the runtime, coalesced: one reload at a time, and every request made while one
    /// runs is answered by the next run, which all of them share. A request is never answered by
    /// a run that started before it was made, so it always sees the files as they were then.
    pub async fn request(self: &Arc<Self>) -> Result<String, ConfigErrors> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut last = self.last.lock().await;
        if let Some((answered, result)) = &*last {
            if *answered >= ticket {
                return result.clone();
            }
        }
        let answered = self.requested.load(Ordering::SeqCst);
        let this = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || this.reload()).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "Reload task failed; the old policy stays in force");
            let msg = "the reload task failed; the old policy stays in force".to_string();
            Err(ConfigErrors(vec![ConfigError { file: String::new(), line: 0, col: 0, field: String::new(), msg }]))
        });
        *last = Some((answered, result.clone()));
        result
    }

    /// Builds the whole new policy, then swaps it in; on error the old one stays. Blocks: from
    /// the runtime, use `request`.
    pub fn reload(&self) -> Result<String, ConfigErrors> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let path = self.path.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        self.reload_from(path.as_deref())
    }

    /// `POST /shadow/promote`: loads the `[shadow]` candidate as a reload loads the config, with
    /// the same validation, and puts it in force in one swap; from then on reloads read the
    /// candidate's file. On error nothing changes. Until the next restart only: the proxy starts
    /// from its config file, so put the candidate there to keep it.
    pub async fn promote(self: &Arc<Self>) -> Result<String, Promotion> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.promote_now()).await.unwrap_or(Err(Promotion::NoShadow))
    }

    fn promote_now(&self) -> Result<String, Promotion> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let candidate = self.state.shadow.load().as_ref().map(|s| s.path.clone()).ok_or(Promotion::NoShadow)?;
        let hash = self.reload_from(Some(&candidate)).map_err(Promotion::Invalid)?;
        *self.path.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(candidate.clone());
        tracing::warn!(config = %candidate.display(), hash = %hash, "Shadow policy promoted: it is the policy in force until restart");
        Ok(hash)
    }

    fn reload_from(&self, path: Option<&std::path::Path>) -> Result<String, ConfigErrors> {
        let metrics = &self.state.metrics;
        match load(path, &self.regions) {
            Ok(loaded) => {
                let hash = loaded.hash.clone();
                warn_on_restart_only_changes(&self.state, &loaded.config);
                if let Ok(mut w) = self.watched.lock() {
                    // The digest of the bytes just loaded: a change made since is seen next poll.
                    *w = Watched { files: loaded.files.clone(), digest: loaded.digest.clone(), failed_at: None };
                }
                self.state.apply(loaded);
                metrics.reloads.with_label_values(&["success"]).inc();
                tracing::info!(hash = %hash, "Policy reloaded");
                Ok(hash)
            }
            Err(errors) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                for e in &errors.0 {
                    tracing::error!(file = %e.file, line = e.line, field = %e.field, "Reload failed, the old policy stays in force: {}", e.msg);
                }
                if let Ok(mut w) = self.watched.lock() {
                    // Not the same broken bytes again every poll; a retry now and then instead,
                    // in case what was missing (a tag file the new config names) appears.
                    w.digest = digest_files(&w.files);
                    w.failed_at = Some(Instant::now());
                }
                Err(errors)
            }
        }
    }

    /// True when a watched file changed since the last load, or a failed one is due a retry.
    /// Reads the files: call it off the runtime.
    fn due(&self) -> bool {
        let Ok(w) = self.watched.lock() else { return false };
        let retry = w.failed_at.is_some_and(|t| t.elapsed() >= RETRY_FAILED);
        retry || (!w.files.is_empty() && digest_files(&w.files) != w.digest)
    }
}

/// Reopens the audit log (for logrotate) and reloads on SIGHUP until `shutdown`.
/// `hup` is the SIGHUP stream, installed by the caller before it serves anything: a SIGHUP that
/// came before the handler would end the process.
pub async fn on_sighup(reloader: Arc<Reloader>, mut hup: tokio::signal::unix::Signal, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reopening the audit log and reloading");
                reloader.state.audit.reopen();
                let _ = reloader.request().await;
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
        let this = Arc::clone(&reloader);
        if tokio::task::spawn_blocking(move || this.due()).await.unwrap_or(false) {
            tracing::info!("Policy files changed: reloading");
            let _ = reloader.request().await;
        }
    }
}

fn warn_on_restart_only_changes(state: &State, config: &Config) {
    let limits = Limits::from(&config.limits);
    if limits != state.limits {
        tracing::warn!("[limits] changed: the new values take effect at the next restart");
    }
}

/// How often a failed reload is tried again while the files stay as they are.
const RETRY_FAILED: Duration = Duration::from_secs(30);

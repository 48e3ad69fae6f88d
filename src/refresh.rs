//! Keeps service tags current: fetches `[service_tags] url` every `refresh`, honours ETag,
//! validates the data (schema, every tag the policy names present and non-empty, a `changeNumber`
//! not older than the one in force, and the whole policy compiling against it), writes it
//! atomically over `[service_tags] file`, and reloads. A failed fetch keeps the last good file and
//! counts as a failure in `egress_proxy_service_tags_refreshes_total`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::load::compile_with_tags;
use crate::policy::service_tags::TagTable;
use crate::reload::Reloader;
use crate::state::State;

/// Fetches and installs service tags for one configuration.
pub struct Refresher {
    url: String,
    every: Duration,
    file: PathBuf,
    config_path: PathBuf,
    regions: Vec<String>,
    client: reqwest::Client,
    etag: Mutex<Option<String>>,
    state: Arc<State>,
    reloader: Arc<Reloader>,
}

/// What one fetch did.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// New data was validated, written and put in force.
    Updated { change_number: u64 },
    /// The server said 304 Not Modified.
    NotModified,
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("the server answered {0}")]
    Status(u16),
    #[error("invalid service tags: {0}")]
    Invalid(String),
    #[error("changeNumber {new} is older than the {current} in force")]
    Older { new: u64, current: u64 },
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("the policy does not reload with the new data: {0}")]
    Reload(String),
}

impl Refresher {
    /// `None` when the configuration names no URL (or was not loaded from a file).
    pub fn from_config(
        config: &Config,
        config_path: Option<&Path>,
        regions: &[String],
        state: Arc<State>,
        reloader: Arc<Reloader>,
    ) -> Result<Option<Self>, String> {
        let (Some(url), Some(file), Some(config_path)) =
            (&config.service_tags.url, &config.service_tags.file, config_path)
        else {
            return Ok(None);
        };
        let mut builder = reqwest::Client::builder().use_rustls_tls().timeout(FETCH_TIMEOUT).no_proxy();
        if let Some(ca) = &config.service_tags.ca_file {
            let path = config.relative_path(ca);
            let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        let file = config.relative_path(file.get_ref());
        let etag = std::fs::read_to_string(etag_path(&file)).ok().map(|s| s.trim().to_string());
        Ok(Some(Self {
            url: url.get_ref().clone(),
            every: config.service_tags.refresh.as_ref().map_or(DEFAULT_REFRESH, |s| s.get_ref().0),
            file,
            config_path: config_path.to_path_buf(),
            regions: regions.to_vec(),
            client,
            etag: Mutex::new(etag),
            state,
            reloader,
        }))
    }

    /// Fetches once, and installs the data when it is new and valid.
    pub async fn fetch_once(&self) -> Result<Outcome, RefreshError> {
        let result = self.fetch_and_install().await;
        let label = match &result {
            Ok(Outcome::Updated { .. }) => "success",
            Ok(Outcome::NotModified) => "not_modified",
            Err(_) => "failure",
        };
        self.state.metrics.tag_refreshes.with_label_values(&[label]).inc();
        match &result {
            Ok(o) => tracing::info!(url = %self.url, outcome = ?o, "Service tags refreshed"),
            Err(e) => {
                tracing::error!(url = %self.url, error = %e, "Service-tag refresh failed; the last good data stays in force")
            }
        }
        result
    }

    async fn fetch_and_install(&self) -> Result<Outcome, RefreshError> {
        let mut req = self.client.get(&self.url);
        if let Some(etag) = self.etag.lock().ok().and_then(|e| e.clone()) {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let resp = req.send().await.map_err(|e| RefreshError::Fetch(e.to_string()))?;
        match resp.status().as_u16() {
            304 => return Ok(Outcome::NotModified),
            200 => {}
            other => return Err(RefreshError::Status(other)),
        }
        let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = read_capped(resp).await?;

        let tags = TagTable::parse(&body).map_err(|e| RefreshError::Invalid(e.to_string()))?;
        let current = self.state.info.load().service_tags_change_number;
        if tags.change_number() < current {
            return Err(RefreshError::Older { new: tags.change_number(), current });
        }
        let policy = self.state.policy.load();
        for (tag, _) in policy.rules().iter().flat_map(|r| r.tags.iter()) {
            if tags.get(tag).is_none_or(|(_, prefixes)| prefixes.is_empty()) {
                return Err(RefreshError::Invalid(format!("tag {tag} is missing or empty")));
            }
        }
        compile_with_tags(&self.config_path, &self.regions, &tags).map_err(|e| RefreshError::Invalid(e.to_string()))?;

        write_atomically(&self.file, body.as_bytes())?;
        if let Some(etag) = etag {
            let _ = write_atomically(&etag_path(&self.file), etag.as_bytes());
            if let Ok(mut e) = self.etag.lock() {
                *e = Some(etag);
            }
        }
        self.reloader.request().await.map_err(|e| RefreshError::Reload(e.to_string()))?;
        Ok(Outcome::Updated { change_number: tags.change_number() })
    }

    /// Fetches every `refresh` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let _ = self.fetch_once().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }
}

/// The response body, refused past MAX_TAGS_BYTES without reading more: a download that does not
/// end must not take the proxy's memory.
async fn read_capped(mut resp: reqwest::Response) -> Result<String, RefreshError> {
    let too_big = || RefreshError::Invalid(format!("the download is larger than {MAX_TAGS_BYTES} bytes"));
    if resp.content_length().is_some_and(|n| n > MAX_TAGS_BYTES as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| RefreshError::Fetch(e.to_string()))? {
        if body.len() + chunk.len() > MAX_TAGS_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| RefreshError::Invalid("the download is not UTF-8".into()))
}

/// The most a service-tag download may be: the whole public file is about 4 MB.
const MAX_TAGS_BYTES: usize = 32 * 1024 * 1024;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`, so a
/// reader sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RefreshError> {
    use std::io::Write;
    let err = |error| RefreshError::Write { path: path.display().to_string(), error };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn etag_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".etag");
    file.with_file_name(name)
}

const DEFAULT_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

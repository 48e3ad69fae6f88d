//! Builds a policy from a config file (or the embedded preset) and the service-tag file it names.
//!
//! The one path from files to a `Policy`, used at start-up, by `check` and `validate`, and by reload.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::config::{Config, ConfigErrors, Origin};
use crate::policy::service_tags::TagTable;
use crate::policy::{compile, Compiled};

/// A configuration with its compiled policy.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub compiled: Compiled,
    pub tags: TagTable,
    /// SHA-256 of the config text and the service-tag text, hex.
    pub hash: String,
    /// When the service-tag data was written: the file's mtime, or the embedded data's date.
    pub tags_written: Option<SystemTime>,
    /// The files this policy was built from, for the reload watcher.
    pub files: Vec<PathBuf>,
    /// `digest_files` of exactly the bytes this policy was built from.
    pub digest: String,
    /// The digest of each file in `files`, in order: `digest` combines them.
    file_digests: Vec<[u8; 32]>,
    /// `[shadow] config`: the candidate policy, compiled, and where it came from.
    pub shadow: Option<Shadow>,
}

/// A candidate policy, evaluated beside the one in force and never enforced.
#[derive(Debug)]
pub struct Shadow {
    pub policy: crate::policy::Policy,
    /// The candidate's config file: what `POST /shadow/promote` loads.
    pub path: PathBuf,
    pub hash: String,
}

/// Loads `path` (or the embedded preset), overrides `regions` when `regions` is not empty, and
/// compiles the policy, and the `[shadow]` candidate it names. Every error names its file, line
/// and field; an error in the candidate fails the load like one in the config.
pub fn load(path: Option<&Path>, regions: &[String]) -> Result<Loaded, ConfigErrors> {
    let mut loaded = load_one(path, regions)?;
    let Some(candidate) = loaded.config.shadow.config.as_ref() else { return Ok(loaded) };
    let candidate_path = loaded.config.relative_path(candidate.get_ref());
    // The candidate's own `[shadow]`, if it has one, is not followed: one level only.
    let c = load_one(Some(&candidate_path), regions)?;
    loaded.files.extend(c.files);
    loaded.file_digests.extend(c.file_digests);
    loaded.digest = combine(&loaded.file_digests);
    loaded.shadow = Some(Shadow { policy: c.compiled.policy, path: candidate_path, hash: c.hash });
    Ok(loaded)
}

fn load_one(path: Option<&Path>, regions: &[String]) -> Result<Loaded, ConfigErrors> {
    let config = read_config(path, regions)?;
    let tags_text = config.service_tags_text()?;
    let tags = match &tags_text {
        Some(text) => TagTable::parse(text).map_err(|e| {
            let span = config.service_tags.file.as_ref().map_or(0..0, |f| f.span());
            ConfigErrors(vec![config.source.error(span, "service_tags.file".into(), e.to_string())])
        })?,
        None => TagTable::default(),
    };
    let compiled = compile(&config, &tags)?;

    let mut digest = Sha256::new();
    digest.update(config.source.text.as_bytes());
    digest.update([0]);
    digest.update(regions.join(",").as_bytes());
    digest.update([0]);
    digest.update(tags_text.as_deref().unwrap_or_default().as_bytes());
    let hash = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();

    let tag_path = config.service_tags.file.as_ref().map(|f| config.relative_path(f.get_ref()));
    let (files, tags_written, file_digests) = match (&config.source.origin, tag_path) {
        (Origin::Embedded, _) => (Vec::new(), tags_text.is_some().then(embedded_tags_written), Vec::new()),
        (Origin::File(cfg), tag_path) => {
            let written = tag_path.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            let mut files = vec![cfg.clone()];
            let mut digests = vec![file_digest(cfg, config.source.text.as_bytes())];
            if let (Some(p), Some(t)) = (&tag_path, &tags_text) {
                files.push(p.clone());
                digests.push(file_digest(p, t.as_bytes()));
            }
            (files, written, digests)
        }
    };
    let digest = if file_digests.is_empty() { String::new() } else { combine(&file_digests) };
    Ok(Loaded { config, compiled, tags, hash, tags_written, files, digest, file_digests, shadow: None })
}

/// ServiceTags_Public_20251020.json, the source of the embedded tag data: 2025-10-20T00:00:00Z.
fn embedded_tags_written() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_918_400)
}

/// Compiles the configuration at `path` against a given tag table, as a check: used to validate
/// fetched service tags before they replace the file.
pub fn compile_with_tags(path: &Path, regions: &[String], tags: &TagTable) -> Result<Compiled, ConfigErrors> {
    let config = read_config(Some(path), regions)?;
    let compiled = compile(&config, tags)?;
    // A `[shadow]` candidate that reads the same service-tag file must compile against the new
    // data too: else the reload that follows the refresh fails, and so would the next start.
    if let Some(candidate) = config.shadow.config.as_ref() {
        let tag_file = |c: &Config| c.service_tags.file.as_ref().map(|f| c.relative_path(f.get_ref()));
        let candidate = read_config(Some(&config.relative_path(candidate.get_ref())), regions)?;
        if tag_file(&candidate) == tag_file(&config) {
            compile(&candidate, tags)?;
        }
    }
    Ok(compiled)
}

/// Reads `path` (or the embedded preset), with `regions`, when not empty, replacing the file's.
fn read_config(path: Option<&Path>, regions: &[String]) -> Result<Config, ConfigErrors> {
    let mut config = match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded()?,
    };
    if !regions.is_empty() {
        config.regions = regions.iter().map(|r| Spanned::new(0..0, r.clone())).collect();
    }
    Ok(config)
}

/// A digest of files by path and contents, as read now from disk; equal to `Loaded::digest` while
/// the files hold the bytes the policy was built from.
pub fn digest_files(files: &[PathBuf]) -> String {
    let digests: Vec<[u8; 32]> = files.iter().map(|f| file_digest(f, &std::fs::read(f).unwrap_or_default())).collect();
    combine(&digests)
}

/// One file's digest, by path and contents.
fn file_digest(path: &Path, bytes: &[u8]) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(path.as_os_str().as_encoded_bytes());
    d.update([0]);
    d.update((bytes.len() as u64).to_be_bytes());
    d.update(bytes);
    d.finalize().into()
}

/// The digests of several files, in order, as one.
fn combine(digests: &[[u8; 32]]) -> String {
    let mut d = Sha256::new();
    for one in digests {
        d.update(one);
    }
    d.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

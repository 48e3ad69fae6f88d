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
}

/// Loads `path` (or the embedded preset), overrides `regions` when `regions` is not empty, and
/// compiles the policy. Every error names its file, line and field.
pub fn load(path: Option<&Path>, regions: &[String]) -> Result<Loaded, ConfigErrors> {
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
    let (files, tags_written, digest) = match (&config.source.origin, tag_path) {
        (Origin::Embedded, _) => (Vec::new(), tags_text.is_some().then(embedded_tags_written), String::new()),
        (Origin::File(cfg), tag_path) => {
            let written = tag_path.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            let mut read = vec![(cfg.clone(), config.source.text.as_bytes().to_vec())];
            if let (Some(p), Some(t)) = (&tag_path, &tags_text) {
                read.push((p.clone(), t.as_bytes().to_vec()));
            }
            let digest = digest_pairs(read.iter().map(|(p, b)| (p.as_path(), b.as_slice())));
            (read.into_iter().map(|(p, _)| p).collect(), written, digest)
        }
    };
    Ok(Loaded { config, compiled, tags, hash, tags_written, files, digest })
}

/// ServiceTags_Public_20251020.json, the source of the embedded tag data: 2025-10-20T00:00:00Z.
fn embedded_tags_written() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_918_400)
}

/// Compiles the configuration at `path` against a given tag table, as a check: used to validate
/// fetched service tags before they replace the file.
pub fn compile_with_tags(path: &Path, regions: &[String], tags: &TagTable) -> Result<Compiled, ConfigErrors> {
    compile(&read_config(Some(path), regions)?, tags)
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
    let read: Vec<(&Path, Vec<u8>)> =
        files.iter().map(|f| (f.as_path(), std::fs::read(f).unwrap_or_default())).collect();
    digest_pairs(read.iter().map(|(p, b)| (*p, b.as_slice())))
}

fn digest_pairs<'a>(pairs: impl Iterator<Item = (&'a Path, &'a [u8])>) -> String {
    let mut d = Sha256::new();
    for (path, bytes) in pairs {
        d.update(path.as_os_str().as_encoded_bytes());
        d.update([0]);
        d.update((bytes.len() as u64).to_be_bytes());
        d.update(bytes);
    }
    d.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

//! Builds a policy from a config file (or the embedded preset) and the service-tag file it names.
//!
//! The one path from files to a `Policy`, used at start-up, by `check` and `validate`, and by reload.

use std::path::Path;

use toml::Spanned;

use crate::config::{Config, ConfigErrors};
use crate::policy::{compile, Compiled};
use crate::service_tags::TagTable;

/// A configuration with its compiled policy.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub compiled: Compiled,
    pub tags: TagTable,
}

/// Loads `path` (or the embedded preset), overrides `regions` when `regions` is not empty, and
/// compiles the policy. Every error names its file, line and field.
pub fn load(path: Option<&Path>, regions: &[String]) -> Result<Loaded, ConfigErrors> {
    let mut config = match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded()?,
    };
    if !regions.is_empty() {
        config.regions = regions
            .iter()
            .map(|r| Spanned::new(0..0, r.clone()))
            .collect();
    }
    let tags = match config.service_tags_text()? {
        Some(text) => TagTable::parse(&text).map_err(|e| {
            let span = config.service_tags.file.as_ref().map_or(0..0, |f| f.span());
            ConfigErrors(vec![config.source.error(
                span,
                "service_tags.file".into(),
                e.to_string(),
            )])
        })?,
        None => TagTable::default(),
    };
    let compiled = compile(&config, &tags)?;
    Ok(Loaded {
        config,
        compiled,
        tags,
    })
}

//! What every connection shares: the policy in force, the resolver, the audit log, the metrics
//! and the limits. `State::apply` is the one writer of the policy in force; start-up and every
//! reload trigger (`reload.rs`) go through it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use crate::audit::Audit;
use crate::budgets::Budgets;
use crate::config::{self, Config};
use crate::descriptors::Shortage;
use crate::load::{Loaded, Shadow};
use crate::metrics::Metrics;
use crate::policy::{HostName, Policy};
use crate::proxy::tunnel::pipes::Pipes;
use crate::resolve::Resolver;

/// Everything a connection needs, shared by all of them.
pub struct State {
    /// The policy in force. Written only by `apply`; read once per decision with `load_full`.
    pub policy: ArcSwap<Policy>,
    /// `[shadow]`: the candidate policy evaluated beside it, never enforced. Written by `apply`.
    pub shadow: ArcSwapOption<Shadow>,
    /// What `/policy` shows about the policy in force.
    pub info: ArcSwap<PolicyInfo>,
    pub resolver: Resolver,
    pub audit: Audit,
    pub metrics: Metrics,
    /// Read at start only: changing `[limits]` needs a restart.
    pub limits: Limits,
    /// `[transparent] original_dst_mismatch`.
    pub mismatch: config::Mismatch,
    /// `[transparent.steered]`: read at start.
    pub steered: config::Steered,
    /// `[admin] token_file`, resolved against the config's directory.
    pub admin_token_file: Option<PathBuf>,
    /// The splice pipes every tunnel borrows from while bytes flow.
    pub pipes: Pipes,
    /// What each client has sent up through each rule with an `upload_budget`. Outlives reloads.
    pub budgets: Budgets,
    /// When the proxy last ran out of descriptors.
    pub shortage: Shortage,
    /// Every configured listener is bound and accepting.
    pub ready: AtomicBool,
    next_id: AtomicU64,
}

/// Runtime limits and timeouts, from `[limits]`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    pub max_request_head_bytes: usize,
    pub request_head_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub max_pipes: usize,
    pub shutdown_grace: Duration,
}

/// What `/policy` shows about the policy in force.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyInfo {
    pub hash: String,
    #[serde(serialize_with = "crate::time::rfc3339")]
    pub loaded_at: SystemTime,
    pub source: String,
    pub service_tags_change_number: u64,
    pub disabled: Vec<String>,
    pub warnings: Vec<String>,
    /// `enforce`, or `report` when the whole policy only reports (`[policy] mode`).
    pub mode: &'static str,
    /// Rules in report mode: what they would refuse is let through as `would_deny`.
    pub report_only_rules: Vec<String>,
    /// `[shadow] config`: the candidate evaluated beside the policy in force, and its hash.
    pub shadow: Option<String>,
}

// === impl State ===

impl State {
    /// The shared state for `config`, with an empty policy (which refuses everything) in force
    /// until `apply` puts one in. Opens the audit log.
    pub fn new(config: &Config) -> std::io::Result<Self> {
        let metrics = Metrics::new();
        let upstream = config.resolve.upstream.iter().map(|s| s.0).collect();
        let resolver = Resolver::new(HashMap::new(), upstream, config.resolve.timeout.get_ref().0, &metrics);
        let audit_path = match config.audit.path.as_deref().unwrap_or("-") {
            "-" => "-".to_string(),
            p => config.relative_path(p).display().to_string(),
        };
        let audit = Audit::open(&audit_path, config.audit.on_stall, metrics.clone())?;
        Ok(Self {
            policy: ArcSwap::from_pointee(Policy::empty()),
            shadow: ArcSwapOption::empty(),
            info: ArcSwap::from_pointee(PolicyInfo::default()),
            resolver,
            audit,
            pipes: Pipes::new(*config.limits.max_pipes.get_ref(), &metrics),
            budgets: Budgets::default(),
            shortage: Shortage::new(metrics.descriptor_shortages.clone()),
            metrics,
            limits: Limits::from(&config.limits),
            mismatch: config.transparent.original_dst_mismatch,
            steered: config.transparent.steered,
            admin_token_file: config.admin.token_file.as_ref().map(|f| config.relative_path(f.get_ref())),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        })
    }

    /// `new`, then `apply`: the state for a loaded configuration with its policy in force.
    pub fn build(loaded: Loaded) -> std::io::Result<Self> {
        let state = Self::new(&loaded.config)?;
        state.apply(loaded);
        Ok(state)
    }

    /// Puts a loaded policy in force: the resolver's pins, `/policy`, the metrics, and last the
    /// policy itself, so that a connection that sees the new policy also sees its pins.
    pub fn apply(&self, loaded: Loaded) {
        let Loaded { config, compiled, tags, hash, tags_written, shadow, .. } = loaded;
        let metrics = &self.metrics;
        metrics.config_info.reset();
        metrics.config_info.with_label_values(&[&hash]).set(1);
        let now = SystemTime::now();
        metrics.last_reload_success.set(unix_seconds(now));
        metrics.tags_change_number.set(i64::try_from(tags.change_number()).unwrap_or(i64::MAX));
        metrics.tags_timestamp.set(tags_written.map_or(0.0, unix_seconds));
        self.resolver.set_pins(pins(&config));
        let policy = &compiled.policy;
        let report_only_rules: Vec<String> =
            policy.rules().iter().filter(|r| r.report).map(|r| r.name.to_string()).collect();
        if policy.is_report_only() {
            tracing::warn!(
                "REPORT MODE: [policy] mode = \"report\": nothing is refused but the built-in protections; \
                 what would be refused is let through and audited as would_deny"
            );
        } else if !report_only_rules.is_empty() {
            tracing::warn!(rules = %report_only_rules.join(", "), "REPORT MODE for some rules: what they would refuse is let through and audited as would_deny");
        }
        let mode = if policy.is_report_only() { "report" } else { "enforce" };
        let shadow_info = shadow.as_ref().map(|s| format!("{} (sha256 {})", s.path.display(), s.hash));
        self.info.store(Arc::new(PolicyInfo {
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
            mode,
            report_only_rules,
            shadow: shadow_info,
        }));
        if let Some(shadow) = &shadow {
            tracing::info!(candidate = %shadow.path.display(), hash = %shadow.hash, "Shadow policy evaluated beside the one in force");
        }
        // The candidate first: a connection that sees the new policy also sees its shadow.
        self.shadow.store(shadow.map(Arc::new));
        self.policy.store(Arc::new(compiled.policy));
    }

    /// A fresh id for one decision, shared by its decision and close lines.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Serving, and not short of descriptors of late.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shortage.recent()
    }
}

// === impl Limits ===

impl From<&config::Limits> for Limits {
    fn from(l: &config::Limits) -> Self {
        Self {
            max_request_head_bytes: *l.max_request_head_bytes.get_ref(),
            request_head_timeout: l.request_head_timeout.get_ref().0,
            connect_timeout: l.connect_timeout.get_ref().0,
            idle_timeout: l.idle_timeout.get_ref().0,
            max_connections: *l.max_connections.get_ref(),
            max_connections_per_client: *l.max_connections_per_client.get_ref(),
            max_pipes: *l.max_pipes.get_ref(),
            shutdown_grace: l.shutdown_grace.get_ref().0,
        }
    }
}

// === impl PolicyInfo ===

impl Default for PolicyInfo {
    fn default() -> Self {
        Self {
            hash: String::new(),
            loaded_at: SystemTime::UNIX_EPOCH,
            source: String::new(),
            service_tags_change_number: 0,
            disabled: Vec::new(),
            warnings: Vec::new(),
            mode: "enforce",
            report_only_rules: Vec::new(),
            shadow: None,
        }
    }
}

/// The `[resolve] static` pins, as the resolver wants them. Names were validated by `compile`.
fn pins(config: &Config) -> HashMap<HostName, Vec<IpAddr>> {
    config
        .resolve
        .static_hosts
        .iter()
        .filter_map(|(name, addrs)| HostName::parse(name).ok().map(|n| (n, addrs.get_ref().clone())))
        .collect()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

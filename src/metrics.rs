//! The metrics catalogue, over an owned `prometheus::Registry` (never a static, so each test
//! scrapes its own instance). Labels come from enums and rule names, never from host names.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `egress_proxy_decisions_total` | counter | `listener`, `decision` (allow/deny/fail), `rule`, `reason` |
//! | `egress_proxy_bytes_total` | counter | `listener`, `direction` (up/down) |
//! | `egress_proxy_open_tunnels` | gauge | `listener` |
//! | `egress_proxy_upstream_connect_duration_seconds` | histogram | `listener` |
//! | `egress_proxy_tunnel_duration_seconds` | histogram | `listener` |
//! | `egress_proxy_dns_lookups_total`, `egress_proxy_dns_failures_total` | counter | |
//! | `egress_proxy_config_reloads_total` | counter | `result` (success/failure) |
//! | `egress_proxy_config_last_reload_success_timestamp_seconds` | gauge | |
//! | `egress_proxy_config_info` | gauge (1) | `hash` |
//! | `egress_proxy_service_tags_change_number` | gauge | |
//! | `egress_proxy_service_tags_file_timestamp_seconds` | gauge | |
//! | `egress_proxy_service_tags_refreshes_total` | counter | `result` (success/not_modified/failure) |
//! | `egress_proxy_audit_lines_total`, `egress_proxy_audit_lines_lost_total` | counter | |
//! | `egress_proxy_splice_pipes_in_use` | gauge | |
//! | `egress_proxy_splice_pipe_fallbacks_total` | counter | |
//! | `egress_proxy_descriptor_shortages_total` | counter | `at` (accept/dial) |
//! | `egress_proxy_upload_limits_total` | counter | `rule`, `limit` (upload_limit/upload_budget) |
//! | `egress_proxy_shadow_differences_total` | counter | `difference` (shadow_would_allow/shadow_would_deny) |
//! | `egress_proxy_dns_queries_total` | counter | `decision` (allow/deny), `type`, `reason` |
//! | `egress_proxy_dns_upstream_duration_seconds` | histogram | |
//! | `egress_proxy_dns_tunnel_alarms_total` | counter | |
//! | `egress_proxy_dns_alarm_untracked_total` | counter | |
//! | `egress_proxy_dns_cache_total` | counter | `result` (hit/miss): the resolver's answers, from its cache or not |

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    pub bytes: IntCounterVec,
    pub open_tunnels: IntGaugeVec,
    pub connect_duration: HistogramVec,
    pub tunnel_duration: HistogramVec,
    pub dns_lookups: IntCounter,
    pub dns_failures: IntCounter,
    pub reloads: IntCounterVec,
    pub last_reload_success: Gauge,
    pub config_info: IntGaugeVec,
    pub tags_change_number: IntGauge,
    pub tags_timestamp: Gauge,
    pub tag_refreshes: IntCounterVec,
    pub audit_lines: IntCounter,
    pub audit_lost: IntCounter,
    pub pipes_in_use: IntGauge,
    pub pipe_fallbacks: IntCounter,
    pub descriptor_shortages: IntCounterVec,
    pub upload_limits: IntCounterVec,
    pub shadow_differences: IntCounterVec,
    pub dns_queries: IntCounterVec,
    pub dns_upstream: prometheus::Histogram,
    pub dns_alarms: IntCounter,
    pub dns_alarm_untracked: IntCounter,
    pub dns_cache: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| invalid(name, e));
            register(&registry, m)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            register(&registry, HistogramVec::new(opts, &["listener"]).unwrap_or_else(|e| invalid(name, e)))
        };
        let counter = |name: &str, help: &str| {
            register(&registry, IntCounter::new(name, help).unwrap_or_else(|e| invalid(name, e)))
        };
        Self {
            decisions: counter_vec(
                "egress_proxy_decisions_total",
                "Decisions by listener, outcome, rule and reason.",
                &["listener", "decision", "rule", "reason"],
            ),
            bytes: counter_vec(
                "egress_proxy_bytes_total",
                "Bytes carried, up (client to destination) and down.",
                &["listener", "direction"],
            ),
            open_tunnels: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("egress_proxy_open_tunnels", "Allowed connections now open."),
                    &["listener"],
                )
                .unwrap_or_else(|e| invalid("egress_proxy_open_tunnels", e)),
            ),
            connect_duration: histogram(
                "egress_proxy_upstream_connect_duration_seconds",
                "Time to connect to the upstream.",
                vec![0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            tunnel_duration: histogram(
                "egress_proxy_tunnel_duration_seconds",
                "Lifetime of allowed connections.",
                vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0],
            ),
            dns_lookups: counter("egress_proxy_dns_lookups_total", "Name lookups, pinned or through DNS."),
            dns_failures: counter("egress_proxy_dns_failures_total", "Name lookups that found no address."),
            reloads: counter_vec("egress_proxy_config_reloads_total", "Policy reloads by result.", &["result"]),
            last_reload_success: register(
                &registry,
                Gauge::new(
                    "egress_proxy_config_last_reload_success_timestamp_seconds",
                    "When the policy in force was loaded.",
                )
                .unwrap_or_else(|e| invalid("last_reload", e)),
            ),
            config_info: register(
                &registry,
                IntGaugeVec::new(Opts::new("egress_proxy_config_info", "The policy in force, by hash."), &["hash"])
                    .unwrap_or_else(|e| invalid("config_info", e)),
            ),
            tags_change_number: register(
                &registry,
                IntGauge::new(
                    "egress_proxy_service_tags_change_number",
                    "changeNumber of the service-tag data in force.",
                )
                .unwrap_or_else(|e| invalid("tags_change_number", e)),
            ),
            tags_timestamp: register(
                &registry,
                Gauge::new(
                    "egress_proxy_service_tags_file_timestamp_seconds",
                    "When the service-tag data in force was written.",
                )
                .unwrap_or_else(|e| invalid("tags_timestamp", e)),
            ),
            tag_refreshes: counter_vec(
                "egress_proxy_service_tags_refreshes_total",
                "Service-tag fetches by result.",
                &["result"],
            ),
            audit_lines: counter("egress_proxy_audit_lines_total", "Audit lines written."),
            audit_lost: counter("egress_proxy_audit_lines_lost_total", "Audit lines that could not be written."),
            pipes_in_use: register(
                &registry,
                IntGauge::new("egress_proxy_splice_pipes_in_use", "Splice pipes held by tunnels moving bytes.")
                    .unwrap_or_else(|e| invalid("pipes_in_use", e)),
            ),
            pipe_fallbacks: counter(
                "egress_proxy_splice_pipe_fallbacks_total",
                "Bursts copied through a buffer because no splice pipe was free ([limits] max_pipes).",
            ),
            dns_queries: counter_vec(
                "egress_proxy_dns_queries_total",
                "Questions to the DNS filter by decision, record type and reason.",
                &["decision", "type", "reason"],
            ),
            dns_upstream: register(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "egress_proxy_dns_upstream_duration_seconds",
                        "Time to answer an allowed DNS question (the resolver's cache, or the upstream).",
                    )
                    .buckets(vec![0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                )
                .unwrap_or_else(|e| invalid("dns_upstream", e)),
            ),
            dns_cache: counter_vec(
                "egress_proxy_dns_cache_total",
                "DNS answers the resolver gave from its cache (hit) or asked upstream for (miss).",
                &["result"],
            ),
            dns_alarms: counter(
                "egress_proxy_dns_tunnel_alarms_total",
                "DNS tunnelling alarms: a client asking for many unique long names under one suffix.",
            ),
            dns_alarm_untracked: counter(
                "egress_proxy_dns_alarm_untracked_total",
                "Long DNS names the tunnelling alarm could not watch: its table of (client, suffix) windows was full.",
            ),
            shadow_differences: counter_vec(
                "egress_proxy_shadow_differences_total",
                "Decisions where the [shadow] candidate policy differs from the policy in force.",
                &["difference"],
            ),
            upload_limits: counter_vec(
                "egress_proxy_upload_limits_total",
                "Tunnels cut at max_upload_bytes (upload_limit) and clients that went past their upload_budget.",
                &["rule", "limit"],
            ),
            descriptor_shortages: counter_vec(
                "egress_proxy_descriptor_shortages_total",
                "Accepts and upstream connects that failed for want of a file descriptor or socket memory.",
                &["at"],
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    // Names are constants of this file and unique, so registration cannot fail.
    let _ = registry.register(Box::new(m.clone()));
    m
}

/// Metric names and labels are constants of this file; an invalid one is a bug caught by the tests.
fn invalid<T>(name: &str, e: prometheus::Error) -> T {
    panic!("metric {name}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_and_rendered() {
        let m = Metrics::new();
        m.decisions.with_label_values(&["http", "deny", "", "no_rule"]).inc();
        m.bytes.with_label_values(&["http", "up"]).inc_by(3);
        m.open_tunnels.with_label_values(&["http"]).set(0);
        m.connect_duration.with_label_values(&["http"]).observe(0.001);
        m.tunnel_duration.with_label_values(&["http"]).observe(1.0);
        m.reloads.with_label_values(&["success"]).inc();
        m.config_info.with_label_values(&["abc"]).set(1);
        let text = m.render();
        for name in [
            "egress_proxy_decisions_total{decision=\"deny\",listener=\"http\",reason=\"no_rule\",rule=\"\"} 1",
            "egress_proxy_bytes_total{direction=\"up\",listener=\"http\"} 3",
            "egress_proxy_open_tunnels{listener=\"http\"} 0",
            "egress_proxy_upstream_connect_duration_seconds_count{listener=\"http\"} 1",
            "egress_proxy_tunnel_duration_seconds_sum{listener=\"http\"} 1",
            "egress_proxy_dns_lookups_total 0",
            "egress_proxy_dns_failures_total 0",
            "egress_proxy_config_reloads_total{result=\"success\"} 1",
            "egress_proxy_config_last_reload_success_timestamp_seconds 0",
            "egress_proxy_config_info{hash=\"abc\"} 1",
            "egress_proxy_service_tags_change_number 0",
            "egress_proxy_service_tags_file_timestamp_seconds 0",
            "egress_proxy_audit_lines_total 0",
            "egress_proxy_audit_lines_lost_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}

//! The only code that knows the configuration file format (TOML).
//!
//! Parsing is strict: unknown fields are errors, and every error names the file, line, column and
//! field (the path the deserializer was at; a TOML syntax error, found before any field is read,
//! has none). Values that are checked after parsing (patterns, ranges, durations, limits) keep
//! their spans, so the policy compiler can point at them too. `Config::from_str` takes text;
//! `Config::load` reads a file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The Azure ML preset, compiled into the binary as the default policy.
pub const EMBEDDED_CONFIG: &str = include_str!("../config/azureml.toml");
/// The service-tag data the preset needs, so that the default runs with no files at all.
pub const EMBEDDED_TAGS: &str = include_str!("../config/servicetags-azureml.json");
const EMBEDDED_TAGS_NAME: &str = "servicetags-azureml.json";

/// A parsed configuration file. Fields are public so that the policy compiler can destructure it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub regions: Vec<Spanned<String>>,
    #[serde(default)]
    pub storage_accounts: Vec<Spanned<String>>,
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub service_tags: ServiceTags,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub safety: SafetyConfig,
    #[serde(default)]
    pub resolve: ResolveConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub nftables: NftablesConfig,
    #[serde(default)]
    pub transparent: TransparentConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(skip)]
    pub source: Source,
}

/// `[dns]`: the DNS filter served on `[listen] dns`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// How a refused query is answered: `refused` (default) or `nxdomain`.
    #[serde(default)]
    pub refuse_with: RefuseWith,
    /// Suffixes a CNAME chain of an allowed answer may pass through besides allowed names
    /// (`azurefd.net`, `trafficmanager.net`): every other target cuts the answer (`cname_escape`).
    #[serde(default)]
    pub follow_cnames: Vec<Spanned<String>>,
    /// Longest name answered, in bytes, dots included.
    #[serde(default = "dns_max_name")]
    pub max_name_length: usize,
    /// Longest label answered.
    #[serde(default = "dns_max_label")]
    pub max_label_length: usize,
    /// Queries one client may ask per second (a burst of this many, refilled at this rate).
    #[serde(default = "dns_rate")]
    pub rate_per_client: u32,
    /// The tunnelling alarm: a client that asks for this many distinct names of at least
    /// `min_length` bytes under one suffix within `window`.
    #[serde(default)]
    pub tunnel_alarm: TunnelAlarm,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum RefuseWith {
    #[default]
    Refused,
    Nxdomain,
}

#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TunnelAlarm {
    #[serde(default = "alarm_names")]
    pub unique_names: usize,
    #[serde(default = "alarm_length")]
    pub min_length: usize,
    #[serde(default = "alarm_window")]
    pub window: Seconds,
}

impl Default for TunnelAlarm {
    fn default() -> Self {
        Self { unique_names: alarm_names(), min_length: alarm_length(), window: alarm_window() }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            refuse_with: RefuseWith::default(),
            follow_cnames: Vec::new(),
            max_name_length: dns_max_name(),
            max_label_length: dns_max_label(),
            rate_per_client: dns_rate(),
            tunnel_alarm: TunnelAlarm::default(),
        }
    }
}

fn dns_max_name() -> usize {
    253
}
fn dns_max_label() -> usize {
    63
}
fn dns_rate() -> u32 {
    200
}
fn alarm_names() -> usize {
    50
}
fn alarm_length() -> usize {
    40
}
fn alarm_window() -> Seconds {
    Seconds(Duration::from_secs(60))
}

/// `[shadow]`: a candidate policy evaluated beside the one in force, never enforced.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate's config file, relative to this one.
    pub config: Option<Spanned<String>>,
}

/// `[policy]`: how the policy as a whole is applied.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `enforce` (the default) or `report`: let through what would be refused, and audit it as
    /// `would_deny`. Built-in protections are enforced either way.
    #[serde(default)]
    pub mode: Mode,
}

/// Whether refusals are enforced or only reported.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Report,
}

/// Settings of the admin server (`[listen] admin`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding the bearer token that mutating endpoints (`POST /reload`) require. Without
    /// it they are refused: anyone who reaches the admin address could otherwise make the proxy
    /// reload at will. Read at each request, so the token can be rotated without a restart.
    pub token_file: Option<Spanned<String>>,
}

/// Settings of the transparent listeners (`[listen] tls`, `plain`, `catch_all`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// What to do when a redirected connection's original destination is not among the addresses
    /// its server name resolves to: `log` (audit it, and dial the name's own address) or `deny`.
    #[serde(default)]
    pub original_dst_mismatch: Mismatch,
    /// Which server names an address rule lets through, for every rule that does not say.
    #[serde(default)]
    pub names: Names,
    /// Connections that reach a transparent listener without being redirected (DNS-steered: the
    /// allowed names resolve to the proxy itself): the port their server name is dialled on, per
    /// listener. Unset: such a connection is refused (`no_original_destination`).
    #[serde(default)]
    pub steered: Steered,
}

/// `[transparent.steered]`: `tls = 443`, `plain = 80`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Steered {
    pub tls: Option<u16>,
    pub plain: Option<u16>,
}

/// Which server names (TLS SNI, HTTP Host, a CONNECT tunnel's SNI) an address rule lets through.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Names {
    /// Any name, or none: the address decides (on a multi-tenant range, anyone's name passes).
    #[default]
    Any,
    /// Only a connection without a name: a name must be allowed by a host rule of its own.
    Listed,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Mismatch {
    /// CDN answers rotate; a strict check refuses good connections (a known Squid complaint).
    #[default]
    Log,
    Deny,
}

/// Settings for `egress-proxy nft`, which renders the policy's packet-filter layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    /// The proxy's own user id, exempt from redirection in the sidecar shape.
    #[serde(default = "proxy_uid")]
    pub proxy_uid: u32,
    /// DNS resolvers the nodes may query over UDP/TCP 53.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

impl Default for NftablesConfig {
    fn default() -> Self {
        Self { proxy_uid: proxy_uid(), dns: Vec::new() }
    }
}

fn proxy_uid() -> u32 {
    65_532
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub plain: Option<SocketAddr>,
    pub catch_all: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The DNS filter, on UDP and TCP at the same address (see `[dns]`).
    pub dns: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceTags {
    /// Path of a `ServiceTags_Public_*.json` file, relative to the config file.
    pub file: Option<Spanned<String>>,
    /// Where to fetch fresh Service Tags JSON from (HTTPS); written to `file` when it validates.
    pub url: Option<Spanned<String>>,
    /// How often to fetch `url` (default 24h).
    pub refresh: Option<Spanned<Seconds>>,
    /// Extra PEM trust anchors for `url`, relative to the config file (for private mirrors).
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Spanned<String>,
    pub action: Action,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub service_tags: Vec<Spanned<String>>,
    /// Defaults to `[443]`.
    pub ports: Option<Vec<PortRange>>,
    #[serde(default)]
    pub sources: Vec<Spanned<String>>,
    /// Inside CONNECT tunnels, refuse a TLS server name that differs from the CONNECT host
    /// (domain fronting). On by default.
    #[serde(default = "yes")]
    pub sni_check: bool,
    /// Let through ClientHellos that carry Encrypted Client Hello (the outer name is then all
    /// the proxy sees). Off by default.
    #[serde(default)]
    pub allow_ech: bool,
    /// A tunnel must begin with a TLS ClientHello; anything else is refused as `not_tls`. On by
    /// default; `false` for SSH over CONNECT and the like.
    #[serde(default = "yes")]
    pub tls_only: bool,
    /// `listed`: a connection that carries a server name passes this (address) rule only if a
    /// host rule allows the name. Default: `[transparent] names`.
    #[serde(default)]
    pub names: Option<Names>,
    /// Bytes a client may send up one tunnel (or forwarded request) allowed by this rule; past
    /// them the tunnel is closed (`upload_limit`).
    #[serde(default)]
    pub max_upload_bytes: Option<Spanned<u64>>,
    /// Bytes one client address may send up, in all, through this rule per window; past them its
    /// new connections under the rule are refused (`upload_budget`) until the window frees.
    #[serde(default)]
    pub upload_budget: Option<Spanned<UploadBudget>>,
    /// `report`: what this rule would refuse is let through and audited as `would_deny`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// DNS record types the DNS filter answers for this rule's names beyond A, AAAA, CNAME,
    /// HTTPS and SVCB (`["TXT"]`).
    #[serde(default)]
    pub dns_types: Vec<Spanned<String>>,
}

/// `upload_budget = { bytes = 1073741824, per = "1h" }`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UploadBudget {
    pub bytes: u64,
    pub per: Seconds,
}

#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Action {
    /// The name the file gives it, as `validate` and `/policy` show it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl Protocol {
    /// The name the file gives it, as `validate` and `/policy` show it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A port (`443`) or an inclusive range (`"8000-8100"`); port 0 is refused. Shown as written.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.start(), self.0.end()) {
            (a, b) if a == b => write!(f, "{a}"),
            (a, b) => write!(f, "{a}-{b}"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyConfig {
    #[serde(default)]
    pub allow_internal: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveConfig {
    /// Host name → addresses, consulted before DNS.
    #[serde(default, rename = "static")]
    pub static_hosts: BTreeMap<String, Spanned<Vec<IpAddr>>>,
    /// Upper bound on one DNS lookup.
    #[serde(default = "dns_timeout")]
    pub timeout: Spanned<Seconds>,
    /// The resolvers to ask, in order (`"168.63.129.16"`, `"[fd00::53]:5353"`), over UDP and TCP;
    /// empty: the system's (`/etc/resolv.conf`). Read at start.
    #[serde(default)]
    pub upstream: Vec<DnsServer>,
}

/// A resolver's address: an IP, with port 53 unless one is written.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DnsServer(pub SocketAddr);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file to append to, or `-` for standard output (the default).
    pub path: Option<String>,
    /// What to do while the audit sink is not taking lines and the queue is full.
    #[serde(default)]
    pub on_stall: OnStall,
}

/// `[audit] on_stall`: what the proxy does while audit lines cannot be written.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum OnStall {
    /// Fail closed: refuse new connections (`audit_unavailable`, 503) until the log catches up.
    #[default]
    Refuse,
    /// Keep serving, and count the lines lost.
    Count,
}

/// Limits and timeouts; every one has a default an operator would pick. Each keeps its place in
/// the file (`0..0` when not written), so that the policy compiler can point at a bad value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request head (request line and headers) the explicit listener reads.
    #[serde(default = "max_request_head_bytes")]
    pub max_request_head_bytes: Spanned<usize>,
    /// A client that has not sent a whole request head by then is dropped (slowloris).
    #[serde(default = "request_head_timeout")]
    pub request_head_timeout: Spanned<Seconds>,
    #[serde(default = "connect_timeout")]
    pub connect_timeout: Spanned<Seconds>,
    /// A tunnel with no bytes either way for this long is closed.
    #[serde(default = "idle_timeout")]
    pub idle_timeout: Spanned<Seconds>,
    #[serde(default = "max_connections")]
    pub max_connections: Spanned<usize>,
    #[serde(default = "max_connections_per_client")]
    pub max_connections_per_client: Spanned<usize>,
    /// Splice pipes kept for tunnels that are moving bytes (HAProxy's `maxpipes`). An idle tunnel
    /// holds none; when all are in use, a tunnel copies through a small buffer instead.
    #[serde(default = "max_pipes")]
    pub max_pipes: Spanned<usize>,
    /// On SIGTERM, how long open tunnels may run before they are closed.
    #[serde(default = "shutdown_grace")]
    pub shutdown_grace: Spanned<Seconds>,
    /// Threads that serve connections, so at most this many cores (HAProxy's `nbthread`, nginx's
    /// `worker_processes`). Unset: one for each CPU the process may run on.
    #[serde(default)]
    pub workers: Option<Spanned<usize>>,
}

/// A duration written the way operators write them: `"10s"`, `"1m 30s"`, `"250ms"`.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Seconds(pub Duration);

/// Where a configuration came from, and its text, for error positions.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub origin: Origin,
    pub text: Arc<str>,
}

#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum Origin {
    #[default]
    Embedded,
    File(PathBuf),
}

/// One configuration error, located in its file.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub field: String,
    pub msg: String,
}

/// Every error found in one configuration, in file order.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

// === impl Config ===

impl Config {
    /// The embedded Azure ML preset.
    pub fn embedded() -> Result<Self, ConfigErrors> {
        Self::from_str(EMBEDDED_CONFIG, Origin::Embedded)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let origin = Origin::File(path.to_path_buf());
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![ConfigError::whole_file(&origin, format!("cannot read: {e}"))]))?;
        Self::from_str(&text, origin)
    }

    /// Parses configuration text; `origin` is used in error messages and to find relative files.
    pub fn from_str(text: &str, origin: Origin) -> Result<Self, ConfigErrors> {
        let source = Source { origin, text: text.into() };
        match serde_path_to_error::deserialize::<_, Config>(toml::Deserializer::new(text)) {
            Ok(mut config) => {
                config.source = source;
                Ok(config)
            }
            Err(e) => {
                let field = field_path(e.path());
                let e = e.into_inner();
                let span = e.span().unwrap_or(0..0);
                Err(ConfigErrors(vec![source.error(span, field, e.message().trim().to_string())]))
            }
        }
    }

    /// The text of the service-tag file this configuration names, or `None` when it names none.
    pub fn service_tags_text(&self) -> Result<Option<Cow<'static, str>>, ConfigErrors> {
        let Some(file) = &self.service_tags.file else {
            return Ok(None);
        };
        match &self.source.origin {
            Origin::Embedded if file.get_ref() == EMBEDDED_TAGS_NAME => Ok(Some(Cow::Borrowed(EMBEDDED_TAGS))),
            _ => {
                let path = self.relative_path(file.get_ref());
                std::fs::read_to_string(&path).map(|t| Some(Cow::Owned(t))).map_err(|e| {
                    let msg = format!("cannot read {}: {e}", path.display());
                    ConfigErrors(vec![self.source.error(file.span(), "service_tags.file".into(), msg)])
                })
            }
        }
    }

    /// A path written in the config, taken relative to the config file's directory.
    pub fn relative_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match &self.source.origin {
            Origin::File(cfg) if path.is_relative() => cfg.parent().unwrap_or(Path::new(".")).join(path),
            _ => path.to_path_buf(),
        }
    }
}

// === impl Source ===

impl Source {
    /// An error located at `span` in this source.
    pub fn error(&self, span: Range<usize>, field: String, msg: String) -> ConfigError {
        let (line, col) = line_col(&self.text, span.start);
        ConfigError { file: self.origin.to_string(), line, col, field, msg }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => f.write_str("<embedded config/azureml.toml>"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

// === impl ConfigError ===

impl ConfigError {
    fn whole_file(origin: &Origin, msg: String) -> Self {
        Self { file: origin.to_string(), line: 0, col: 0, field: String::new(), msg }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.field.is_empty()) {
            (0, _) => write!(f, "{}: {}", self.file, self.msg),
            (_, true) => write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.msg),
            (_, false) => write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.col, self.field, self.msg),
        }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === serde helpers ===

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (1-65535) or a range such as \"8000-8100\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                let p = port(v).ok_or_else(|| E::custom(format!("port {v} is outside 1-65535")))?;
                Ok(PortRange(p..=p))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                let bad = || E::custom(format!("{v:?} is not a port range such as \"8000-8100\""));
                let (a, b) = v.split_once('-').ok_or_else(bad)?;
                let a = a.trim().parse::<i64>().ok().and_then(port).ok_or_else(bad)?;
                let b = b.trim().parse::<i64>().ok().and_then(port).ok_or_else(bad)?;
                if a > b {
                    return Err(bad());
                }
                Ok(PortRange(a..=b))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Seconds)
            .map_err(|e| de::Error::custom(format!("{s:?} is not a duration such as \"10s\": {e}")))
    }
}

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>()
            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map(DnsServer)
            .map_err(|_| {
                de::Error::custom(format!("{s:?} is not a resolver address such as \"10.0.0.2\" or \"[fd00::53]:53\""))
            })
    }
}

fn port(v: i64) -> Option<u16> {
    u16::try_from(v).ok().filter(|&p| p != 0)
}

fn yes() -> bool {
    true
}

/// A default: the value with no place in the file (it is not written there).
fn unwritten<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

fn secs(s: u64) -> Spanned<Seconds> {
    unwritten(Seconds(Duration::from_secs(s)))
}

fn dns_timeout() -> Spanned<Seconds> {
    secs(5)
}
fn max_request_head_bytes() -> Spanned<usize> {
    unwritten(32 * 1024)
}
fn request_head_timeout() -> Spanned<Seconds> {
    secs(10)
}
fn connect_timeout() -> Spanned<Seconds> {
    secs(10)
}
fn idle_timeout() -> Spanned<Seconds> {
    secs(600)
}
fn max_connections() -> Spanned<usize> {
    unwritten(4096)
}
fn max_connections_per_client() -> Spanned<usize> {
    unwritten(1024)
}
fn max_pipes() -> Spanned<usize> {
    unwritten(512)
}
fn shutdown_grace() -> Spanned<Seconds> {
    secs(30)
}

impl Default for ResolveConfig {
    fn default() -> Self {
        Self { static_hosts: BTreeMap::new(), timeout: dns_timeout(), upstream: Vec::new() }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_head_bytes: max_request_head_bytes(),
            request_head_timeout: request_head_timeout(),
            connect_timeout: connect_timeout(),
            idle_timeout: idle_timeout(),
            max_connections: max_connections(),
            max_connections_per_client: max_connections_per_client(),
            max_pipes: max_pipes(),
            shutdown_grace: shutdown_grace(),
            workers: None,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The field a deserialization error is about, from the path the deserializer was at, in the form
/// the compile step uses too: keys joined with `.`, quoted when they are not bare TOML keys
/// (`resolve.static."ml.azure.com"`), and the index of a table in an array of tables
/// (`rule[2].ports`). A trailing index (an element of a list of values, or a table that misses a
/// field) is left out: the error names the field, its position shows the element. Empty for a
/// syntax error, found before any field is read.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    let mut index = None;
    for segment in path {
        match segment {
            // How `toml::Spanned` carries a value through serde: not a key of the file.
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if let Some(i) = index.take() {
                    let _ = write!(field, "[{i}]");
                }
                if !field.is_empty() {
                    field.push('.');
                }
                let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
                if bare {
                    field.push_str(key);
                } else {
                    let _ = write!(field, "{key:?}");
                }
            }
            Segment::Seq { index: i } => index = Some(*i),
            Segment::Unknown => {}
        }
    }
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        Config::from_str(text, Origin::File("p.toml".into())).unwrap_err().0.remove(0)
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let e = err("regions = [\"westus2\"]\n\n[[rule]]\nname = \"a\"\naction = \"allow\"\nhost = [\"x.com\"]\n");
        assert_eq!((e.file.as_str(), e.line, e.field.as_str()), ("p.toml", 6, "rule[0].host"));
        assert!(e.msg.contains("unknown field `host`"), "{}", e.msg);
        assert_eq!(e.to_string().split(':').take(2).collect::<Vec<_>>(), ["p.toml", "6"]);
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = err("[[rule]]\nname = \"a\"\naction = \"allow\"\n\n[[rule]]\nname = \"b\"\naction = \"alow\"\n");
        assert_eq!((e.line, e.field.as_str()), (7, "rule[1].action"));
        let e = err("[[rule]]\nname = \"a\"\naction = \"allow\"\nports = [443, 70000]\n");
        assert_eq!((e.line, e.field.as_str()), (4, "rule[0].ports"));
        assert!(e.msg.contains("70000"), "{}", e.msg);
        let e = err("[listen]\nhttp = \"127.0.0.1\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "listen.http"));
        let e = err("[limits]\nconnect_timeout = \"ten\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "limits.connect_timeout"));
        let e = err("[[rule]]\nname = \"a\"\n");
        assert!(e.msg.contains("missing field `action`"), "{}", e.msg);
        let e = err("[resolve]\nupstream = [\"10.0.0.2\", \"dns.example\"]\n");
        assert_eq!((e.line, e.field.as_str()), (2, "resolve.upstream"));
        assert!(e.msg.contains("\"dns.example\" is not a resolver address"), "{}", e.msg);
    }

    #[test]
    fn resolvers_are_written_with_or_without_a_port() {
        let text = "[resolve]\nupstream = [\"168.63.129.16\", \"127.0.0.1:5353\", \"[fd00::53]:53\"]\n";
        let config = Config::from_str(text, Origin::File("p.toml".into())).unwrap();
        let got: Vec<String> = config.resolve.upstream.iter().map(|s| s.0.to_string()).collect();
        assert_eq!(got, ["168.63.129.16:53", "127.0.0.1:5353", "[fd00::53]:53"]);
    }

    #[test]
    fn field_paths_come_from_the_deserializer_however_the_file_is_written() {
        let e = err("rule = [{ name = \"a\", action = \"allow\", ports = [0] }]\n");
        assert_eq!((e.line, e.field.as_str()), (1, "rule[0].ports"));
        let e = err("limits.connect_timeout = \"x\"\n");
        assert_eq!((e.line, e.field.as_str()), (1, "limits.connect_timeout"));
        let e = err("[resolve.static]\n\"ML.azure.com\" = [\"127.0.0.1\", \"x\"]\nfoo = [\"y\"]\n");
        assert_eq!((e.line, e.field.as_str()), (2, "resolve.static.\"ML.azure.com\""));
        let e = err("[resolve.static]\nfoo = [\"y\"]\n");
        assert_eq!((e.line, e.field.as_str()), (2, "resolve.static.foo"));
        let e = err("[[rule]]\nname = \"a\"\n");
        assert_eq!((e.line, e.field.as_str()), (1, "rule"));
        let e = err("[limitz]\n");
        assert_eq!((e.line, e.field.as_str()), (1, "limitz"));
        // A syntax error comes before any field is read.
        let e = err("[limits]\nconnect_timeout = ten\n");
        assert_eq!((e.line, e.field.as_str()), (2, ""));
        assert_eq!(e.to_string().lines().next(), Some("p.toml:2:19: invalid string"));
    }

    #[test]
    fn port_ranges_parse_and_refuse_zero() {
        let c =
            Config::from_str("[[rule]]\nname=\"a\"\naction=\"allow\"\nports=[443, \"8000-8100\"]\n", Origin::Embedded)
                .unwrap();
        assert_eq!(c.rules[0].ports, Some(vec![PortRange(443..=443), PortRange(8000..=8100)]));
        assert!(err("[[rule]]\nname=\"a\"\naction=\"allow\"\nports=[0]\n").msg.contains("port 0"));
        assert!(err("[[rule]]\nname=\"a\"\naction=\"allow\"\nports=[\"9-1\"]\n").msg.contains("\"9-1\""));
    }

    #[test]
    fn actions_and_protocols_are_shown_as_the_file_spells_them() {
        use serde::de::IntoDeserializer;
        for a in [Action::Allow, Action::Deny] {
            let back: Result<Action, de::value::Error> = Action::deserialize(a.as_str().into_deserializer());
            assert_eq!(back, Ok(a));
        }
        for p in [Protocol::Tcp, Protocol::Udp] {
            let back: Result<Protocol, de::value::Error> = Protocol::deserialize(p.as_str().into_deserializer());
            assert_eq!(back, Ok(p));
        }
    }

    #[test]
    fn audit_on_stall_is_refuse_unless_the_file_says_count() {
        let on_stall = |text: &str| Config::from_str(text, Origin::Embedded).unwrap().audit.on_stall;
        assert_eq!(on_stall(""), OnStall::Refuse);
        assert_eq!(on_stall("[audit]\non_stall = \"count\"\n"), OnStall::Count);
        assert_eq!(on_stall("[audit]\non_stall = \"refuse\"\n"), OnStall::Refuse);
        let e = err("[audit]\npath = \"-\"\non_stall = \"drop\"\n");
        assert_eq!((e.line, e.field.as_str()), (3, "audit.on_stall"));
    }

    #[test]
    fn the_embedded_preset_parses() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.regions.iter().map(|r| r.get_ref().as_str()).collect::<Vec<_>>(), ["westus2"]);
        assert!(c.service_tags_text().unwrap().is_some());
    }
}

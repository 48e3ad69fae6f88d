//! Configuration → `Policy`: expands `<region>` and `<storage_account>`, looks up service tags,
//! parses patterns and ranges, and indexes everything. Errors keep their place in the file; all of
//! them are reported, not just the first.

use std::collections::HashSet;

use ipnet::IpNet;

use super::decision::RuleId;
use super::host::HostName;
use super::names::{NameIndex, Pattern};
use super::nets::RangeIndex;
use super::safety::Safety;
use super::service_tags::TagTable;
use super::{Policy, PortSet, Rule, UploadBudget};
use crate::config::{Action, Config, ConfigError, ConfigErrors, Mode, Names, PortRange, RuleConfig, Seconds, Source};

/// A policy and what the operator should know about it.
#[derive(Debug)]
pub struct Compiled {
    pub policy: Policy,
    /// Names of rules switched off with `enabled = false`.
    pub disabled: Vec<String>,
    pub warnings: Vec<Warning>,
}

/// Something that is allowed but risky, or likely not what the operator meant.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Warning {
    pub rule: Option<String>,
    pub message: String,
}

/// Compiles a configuration against a service-tag table.
pub fn compile(config: &Config, tags: &TagTable) -> Result<Compiled, ConfigErrors> {
    let Config {
        regions,
        storage_accounts,
        listen: _,
        service_tags,
        rules,
        safety,
        resolve,
        audit: _,
        limits,
        nftables: _,
        transparent,
        admin: _,
        policy: policy_config,
        shadow: _,
        dns: _,
        source,
    } = config;
    let mut cx = Cx { source, tags, names: transparent.names, errors: Vec::new(), warnings: Vec::new() };

    // Not policy, but checked here so that every error in the file is reported at once.
    if let Some(url) = &service_tags.url {
        if !url.get_ref().starts_with("https://") {
            cx.error(url.span(), "service_tags.url", "must be an https:// URL".into());
        }
        if service_tags.file.is_none() {
            cx.error(
                url.span(),
                "service_tags.url",
                "needs service_tags.file, where the fetched data is written".into(),
            );
        }
    }
    for (name, addrs) in &resolve.static_hosts {
        match HostName::parse(name) {
            Ok(n) if n.as_str() == name => {}
            Ok(n) => cx.error(
                addrs.span(),
                &format!("resolve.static.{name:?}"),
                format!("not in normalised form; write it as {:?}", n.as_str()),
            ),
            Err(e) => cx.error(addrs.span(), &format!("resolve.static.{name:?}"), e.to_string()),
        }
    }
    let head = &limits.max_request_head_bytes;
    if !(MIN_HEAD_BYTES..=MAX_HEAD_BYTES).contains(head.get_ref()) {
        cx.error(
            head.span(),
            "limits.max_request_head_bytes",
            format!("must be between {MIN_HEAD_BYTES} and {MAX_HEAD_BYTES}"),
        );
    }
    let durations = [
        ("limits.request_head_timeout", &limits.request_head_timeout),
        ("limits.connect_timeout", &limits.connect_timeout),
        ("limits.idle_timeout", &limits.idle_timeout),
        ("limits.shutdown_grace", &limits.shutdown_grace),
        ("resolve.timeout", &resolve.timeout),
    ];
    for (field, d) in durations.into_iter().chain(service_tags.refresh.as_ref().map(|r| ("service_tags.refresh", r))) {
        let Seconds(duration) = *d.get_ref();
        if duration.is_zero() || duration > MAX_DURATION {
            cx.error(d.span(), field, "must be more than zero and at most 30 days".into());
        }
    }
    // The first of the two that is zero; the error names them both, as before.
    if let Some(zero) =
        [&limits.max_connections, &limits.max_connections_per_client].into_iter().find(|n| *n.get_ref() == 0)
    {
        cx.error(zero.span(), "limits", "max_connections and max_connections_per_client must be at least 1".into());
    }
    if let Some(workers) = limits.workers.as_ref().filter(|w| !(1..=MAX_WORKERS).contains(w.get_ref())) {
        cx.error(workers.span(), "limits.workers", format!("must be from 1 to {MAX_WORKERS}"));
    }

    let regions: Vec<String> = regions
        .iter()
        .filter_map(|r| {
            let ok = !r.get_ref().is_empty() && r.get_ref().bytes().all(|b| b.is_ascii_alphanumeric());
            if !ok {
                cx.error(r.span(), "regions", format!("{:?} is not a region name such as \"westus2\"", r.get_ref()));
            }
            ok.then(|| r.get_ref().clone())
        })
        .collect();
    let accounts: Vec<String> = storage_accounts
        .iter()
        .filter_map(|a| {
            let s = a.get_ref();
            // Azure storage account names: 3-24 lower-case letters and digits.
            let ok = (3..=24).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !ok {
                cx.error(
                    a.span(),
                    "storage_accounts",
                    format!("{s:?} is not a storage account name (3-24 lower-case letters and digits)"),
                );
            }
            ok.then(|| s.clone())
        })
        .collect();
    let allow_internal: Vec<IpNet> =
        safety.allow_internal.iter().filter_map(|n| cx.net(n, "safety.allow_internal".into())).collect();

    let mut compiled = Vec::new();
    let mut disabled = Vec::new();
    let mut seen = HashSet::new();
    for (i, rc) in rules.iter().enumerate() {
        let name = rc.name.get_ref();
        let label = format!("rule[{i}] {name:?}");
        let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            cx.error(rc.name.span(), &format!("{label}.name"), "use letters, digits, '-', '_' and '.'".into());
        }
        if !seen.insert(name.clone()) {
            cx.error(rc.name.span(), &format!("{label}.name"), "another rule has this name".into());
        }
        if !rc.enabled {
            disabled.push(name.clone());
            // A disabled rule is still checked, so that switching it on cannot break the file.
            let _ = cx.rule(rc, &label, &regions, &accounts);
            continue;
        }
        if let Some(rule) = cx.rule(rc, &label, &regions, &accounts) {
            compiled.push(rule);
        }
    }
    if !cx.errors.is_empty() {
        return Err(ConfigErrors(cx.errors));
    }

    let names =
        NameIndex::build(compiled.iter().enumerate().flat_map(|(i, r)| {
            r.patterns.iter().map(move |p| (p.clone(), RuleId(u32::try_from(i).unwrap_or(u32::MAX))))
        }));
    let names = match names {
        Ok(n) => n,
        Err(e) => return Err(ConfigErrors(vec![source.error(0..0, "rule.hosts".into(), e.to_string())])),
    };
    let nets = RangeIndex::build(
        compiled
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.ranges.iter().map(move |n| (*n, RuleId(u32::try_from(i).unwrap_or(u32::MAX))))),
    );
    let mut warnings = cx.warnings;
    warnings.extend(compiled.iter().flat_map(lint));
    let report = policy_config.mode == Mode::Report;
    let policy = Policy { rules: compiled, names, nets, safety: Safety::new(allow_internal), report };
    Ok(Compiled { policy, disabled, warnings })
}

/// Compile context: the source for error positions, the tags, and what was found.
struct Cx<'a> {
    source: &'a Source,
    tags: &'a TagTable,
    /// `[transparent] names`, for rules that do not say.
    names: Names,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
}

impl Cx<'_> {
    fn error(&mut self, span: std::ops::Range<usize>, field: &str, msg: String) {
        self.errors.push(self.source.error(span, field.to_string(), msg));
    }

    fn net(&mut self, s: &toml::Spanned<String>, field: String) -> Option<IpNet> {
        match s.get_ref().parse::<IpNet>() {
            // Every address is decided in its IPv4 form (`fold_mapped`): a range written as
            // IPv4-mapped IPv6 would never match one.
            Ok(IpNet::V6(v6)) if v6.prefix_len() >= 96 && v6.network().to_ipv4_mapped().is_some() => {
                let v4 = v6.network().to_ipv4_mapped().map(|a| format!("{a}/{}", v6.prefix_len() - 96));
                self.error(
                    s.span(),
                    &field,
                    format!("an IPv4-mapped range matches nothing here; write it as \"{}\"", v4.unwrap_or_default()),
                );
                None
            }
            Ok(net) if net.trunc() == net => Some(net),
            Ok(net) => {
                self.error(s.span(), &field, format!("host bits are set; write it as \"{}\"", net.trunc()));
                None
            }
            Err(_) => {
                self.error(s.span(), &field, format!("{:?} is not a CIDR range such as \"20.42.0.0/16\"", s.get_ref()));
                None
            }
        }
    }

    fn rule(&mut self, rc: &RuleConfig, label: &str, regions: &[String], accounts: &[String]) -> Option<Rule> {
        let RuleConfig {
            name,
            action,
            enabled: _,
            protocol,
            hosts,
            cidrs,
            service_tags,
            ports,
            sources,
            sni_check,
            allow_ech,
            tls_only,
            names,
            max_upload_bytes,
            upload_budget,
            mode,
            dns_types,
        } = rc;
        let mut extra_dns_types = Vec::new();
        for (i, t) in dns_types.iter().enumerate() {
            let text = t.get_ref().to_ascii_uppercase();
            match text.as_str() {
                "A" | "AAAA" | "CNAME" | "HTTPS" | "SVCB" | "TXT" | "MX" | "SRV" | "CAA" | "NS" | "SOA" | "PTR" => {
                    extra_dns_types.push(text.into_boxed_str())
                }
                _ => self.error(
                    t.span(),
                    &format!("{label}.dns_types[{i}]"),
                    format!("{:?} is not a record type the DNS filter answers (A, AAAA, CNAME, HTTPS, SVCB, TXT, MX, SRV, CAA, NS, SOA, PTR)", t.get_ref()),
                ),
            }
        }
        let before = self.errors.len();
        if let Some(max) = max_upload_bytes.as_ref().filter(|m| *m.get_ref() == 0) {
            let why = "0 would close every tunnel at its first byte: leave it out for no limit";
            self.error(max.span(), &format!("{label}.max_upload_bytes"), why.into());
        }
        if let Some(b) = upload_budget.as_ref().filter(|b| b.get_ref().bytes == 0 || b.get_ref().per.0.is_zero()) {
            let why = format!("bytes and per must both be more than 0 (got {:?})", b.get_ref());
            self.error(b.span(), &format!("{label}.upload_budget"), why);
        }

        let mut patterns = Vec::new();
        let mut storage_open = false;
        for (i, h) in hosts.iter().enumerate() {
            let field = format!("{label}.hosts[{i}]");
            let Some(expanded) = self.expand(h, &field, regions, accounts, |r| r.to_ascii_lowercase()) else {
                continue;
            };
            if expanded.is_empty() && h.get_ref().contains(STORAGE_ACCOUNT) {
                storage_open = true;
            }
            for text in expanded {
                match Pattern::parse(&text) {
                    Ok(p) => patterns.push(p),
                    Err(e) => self.error(h.span(), &field, format!("{text:?}: {e}")),
                }
            }
        }

        let mut ranges = Vec::new();
        let mut tag_names = Vec::new();
        for (i, t) in service_tags.iter().enumerate() {
            let field = format!("{label}.service_tags[{i}]");
            let Some(expanded) = self.expand(t, &field, regions, accounts, str::to_string) else {
                continue;
            };
            for tag in expanded {
                match self.tags.get(&tag) {
                    Some((spelled, prefixes)) => {
                        tag_names.push((spelled.to_string(), prefixes.len()));
                        ranges.extend_from_slice(prefixes);
                    }
                    None => self.error(
                        t.span(),
                        &field,
                        format!(
                            "service tag {tag:?} is not in the service-tag file (changeNumber {})",
                            self.tags.change_number()
                        ),
                    ),
                }
            }
        }
        let mut cidr_nets = Vec::new();
        for (i, c) in cidrs.iter().enumerate() {
            if let Some(net) = self.net(c, format!("{label}.cidrs[{i}]")) {
                cidr_nets.push(net);
            }
        }
        ranges.extend_from_slice(&cidr_nets);
        let source_nets: Vec<IpNet> =
            sources.iter().enumerate().filter_map(|(i, s)| self.net(s, format!("{label}.sources[{i}]"))).collect();
        let ports = PortSet::new(ports.clone().unwrap_or_else(|| vec![PortRange(443..=443)]));

        if hosts.is_empty() && cidrs.is_empty() && service_tags.is_empty() {
            self.error(
                name.span(),
                &format!("{label}.name"),
                "the rule names no destination: give hosts, cidrs or service_tags".into(),
            );
        }
        // Hosts with service tags (or cidrs) are a name at an address: with no address left (a tag
        // that lists no prefixes, a placeholder with nothing to expand to), the rule would be
        // hosts alone, at any address.
        if !patterns.is_empty() && ranges.is_empty() && !(service_tags.is_empty() && cidrs.is_empty()) {
            let span = service_tags.first().map_or_else(|| name.span(), toml::Spanned::span);
            self.error(
                span,
                &format!("{label}.service_tags"),
                "the rule's service tags list no address ranges: with hosts, it would allow them at any address".into(),
            );
        }
        if ports.is_none() {
            self.error(
                name.span(),
                &format!("{label}.ports"),
                "an empty port list matches nothing; leave it out for [443]".into(),
            );
        }
        let ports = match ports {
            Some(ports) if self.errors.len() == before => ports,
            _ => return None,
        };
        if storage_open && rc.enabled {
            let message = if patterns.is_empty() && !ranges.is_empty() {
                "storage_accounts is empty: storage is open to any account in the region behind the rule's service tags (set storage_accounts to the workspace's accounts)"
            } else {
                "storage_accounts is empty: the rule's <storage_account> hosts match nothing"
            };
            self.warnings.push(Warning { rule: Some(name.get_ref().clone()), message: message.into() });
        }
        Some(Rule {
            name: name.get_ref().as_str().into(),
            action: *action,
            protocol: *protocol,
            ports,
            sources: source_nets.into_boxed_slice(),
            patterns,
            tags: tag_names,
            cidrs: cidr_nets,
            ranges,
            sni_check: *sni_check,
            allow_ech: *allow_ech,
            tls_only: *tls_only,
            names_listed: names.unwrap_or(self.names) == Names::Listed,
            max_upload: max_upload_bytes.as_ref().map(|m| *m.get_ref()),
            upload_budget: upload_budget
                .as_ref()
                .map(|b| UploadBudget { bytes: b.get_ref().bytes, per: b.get_ref().per.0 }),
            report: *mode == Some(Mode::Report),
            dns_types: extra_dns_types,
        })
    }

    /// Expands `<region>` (spelled by `spell`) and `<storage_account>` in one entry. `None` after
    /// an error; an empty list when a placeholder has nothing to expand to.
    fn expand(
        &mut self,
        entry: &toml::Spanned<String>,
        field: &str,
        regions: &[String],
        accounts: &[String],
        spell: impl Fn(&str) -> String,
    ) -> Option<Vec<String>> {
        let text = entry.get_ref();
        let mut out = vec![text.clone()];
        if text.contains(REGION) {
            if regions.is_empty() {
                self.error(entry.span(), field, format!("{text:?} uses {REGION} but `regions` is empty"));
                return None;
            }
            out = regions.iter().map(|r| text.replace(REGION, &spell(r))).collect();
        }
        if text.contains(STORAGE_ACCOUNT) {
            out = out.iter().flat_map(|t| accounts.iter().map(move |a| t.replace(STORAGE_ACCOUNT, a))).collect();
        }
        if out.iter().any(|t| t.contains(['<', '>'])) {
            self.error(
                entry.span(),
                field,
                format!("{text:?}: unknown placeholder (only {REGION} and {STORAGE_ACCOUNT})"),
            );
            return None;
        }
        Some(out)
    }
}

/// Flags rules that let traffic reach places anyone can write to.
fn lint(rule: &Rule) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |message: String| out.push(Warning { rule: Some(rule.name.to_string()), message });
    if rule.action == Action::Deny {
        return out;
    }
    for p in &rule.patterns {
        let suffix = match p {
            Pattern::Exact(_) => continue,
            Pattern::Suffix(s) => s.as_str(),
            Pattern::Glob(g) => g
                .rsplit_once(['*', '?'])
                .map_or("", |(_, s)| s)
                .trim_start_matches(|c| c != '.')
                .trim_start_matches('.'),
        };
        if let Some((shared, risk)) =
            SHARED_WRITABLE.iter().find(|(s, _)| suffix == *s || suffix.ends_with(&format!(".{s}")))
        {
            warn(format!("{p} reaches {shared}: {risk}"));
        } else if psl::suffix_str(suffix) == Some(suffix) {
            warn(format!("{p} is a wildcard on the public suffix {suffix}: anyone can register a name under it"));
        }
    }
    for (tag, _) in &rule.tags {
        let lower = tag.to_ascii_lowercase();
        if lower == "azurefrontdoor.frontend" {
            warn(format!("service tag {tag} is every customer's Front Door endpoint: an exfiltration path"));
        }
        let multi_tenant = lower == "azurefrontdoor.frontend"
            || lower == "storage"
            || lower.starts_with("storage.")
            || lower == "azurecloud"
            || lower.starts_with("azurecloud.");
        if multi_tenant && rule.patterns.is_empty() && !rule.names_listed {
            warn(format!(
                "service tag {tag} is shared by every tenant, and this address rule lets any server name through toward it: set names = \"listed\""
            ));
        }
        if (lower == "storage" || lower.starts_with("storage.")) && rule.patterns.is_empty() {
            warn(format!("service tag {tag} is every storage account in its region, anyone's included: restrict it with hosts (storage_accounts)"));
        } else if lower == "azurecloud" || lower.starts_with("azurecloud.") {
            warn(format!("service tag {tag} is all of Azure, anyone's tenant included"));
        }
    }
    out
}

/// Longer durations are mistakes, and would overflow deadline arithmetic.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 60 * 60);
/// `[limits] workers`: more threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;
/// hyper refuses a read buffer under 8 KiB; over 1 MiB a request head is an attack.
const MIN_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEAD_BYTES: usize = 1024 * 1024;
const REGION: &str = "<region>";
const STORAGE_ACCOUNT: &str = "<storage_account>";

/// Suffixes under which anyone can create a name that serves their own content.
const SHARED_WRITABLE: &[(&str, &str)] = &[
    ("core.windows.net", "any Azure customer's storage account can be written to"),
    ("azurefd.net", "any Azure customer's Front Door endpoint"),
    ("azureedge.net", "any Azure customer's CDN endpoint"),
    ("azurewebsites.net", "any Azure customer's web app"),
    ("cloudapp.azure.com", "any Azure customer's virtual machine"),
    ("trafficmanager.net", "any Azure customer's Traffic Manager profile"),
    ("servicebus.windows.net", "any Azure customer's Service Bus or Event Hubs namespace"),
    ("amazonaws.com", "any AWS customer's bucket or endpoint"),
    ("cloudfront.net", "any AWS customer's CDN distribution"),
    ("googleapis.com", "any Google Cloud customer's bucket or endpoint"),
    ("githubusercontent.com", "any GitHub user's content"),
];

//! Learning mode (`egress-proxy learn`): audit lines in, a draft policy out.
//!
//! Run the proxy with a loose policy for a while and its audit log says what the workloads reach;
//! the draft turns that into rules to review before the policy is enforced. It allows each host
//! name the log saw, on the port it was seen on, whether the proxy allowed or refused it then,
//! and nothing else: one `learned-PORT` rule per port. Names are listed exactly, and collapsed
//! into `*.suffix` only where at least three share a suffix that one party owns (`collapse`):
//! never a public suffix, never a hosting suffix where anyone can have a name. IP destinations are
//! listed in a comment, not drafted: an address rule needs `cidrs` or `service_tags` that a human
//! chooses.
//!
//! Before the draft is returned it is compiled the way `validate` compiles a file, so it always
//! loads unchanged, and `validate`'s warnings about places anyone can write to come with it.
//!
//! Pure: takes lines, returns text. Reading the files is `cli`'s job; checking the hash chain is
//! `audit verify`'s.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::Deserialize;

use crate::audit::Verdict;
use crate::config::{Config, ConfigErrors, Origin};
use crate::policy::service_tags::TagTable;
use crate::policy::{compile, Host};

/// What the audit lines said about each destination, line by line.
#[derive(Debug, Default)]
pub struct Learner {
    /// Port → host name (normalised) → what was seen.
    names: BTreeMap<u16, BTreeMap<String, Seen>>,
    /// IP destinations: listed in a comment of the draft, never drafted as rules.
    addrs: BTreeMap<SocketAddr, Seen>,
    lines: u64,
    skipped: Skipped,
}

/// One entry of a drafted rule's `hosts`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Entry<'a> {
    /// A name, exactly.
    Name(&'a str),
    /// `*.suffix`, and the names it stands for (at least `MIN_NAMES`).
    Wildcard { suffix: &'a str, names: Vec<&'a str> },
}

/// Lines that taught nothing, by why.
#[derive(Debug, Default)]
struct Skipped {
    /// Not JSON, or JSON without the fields of an audit line (`event`; for a decision `ts` and
    /// `decision`).
    unreadable: u64,
    /// `close`, `chain_start`, or an event this version does not know.
    other_events: u64,
    /// A decision with no host or no port: refused before a destination was read.
    no_destination: u64,
    /// A decision whose host is neither a valid name nor an IP literal (`bad_request` targets).
    invalid_host: u64,
}

/// Decisions about one destination (or a group of them): how many, which way, and when.
#[derive(Clone, Debug)]
struct Seen {
    allowed: u64,
    denied: u64,
    failed: u64,
    /// Reasons of the refusals and failures, with their counts.
    reasons: BTreeMap<String, u64>,
    first: SystemTime,
    last: SystemTime,
}

/// The shape of an audit line, as far as learning needs it; other fields are ignored.
#[derive(Deserialize)]
struct Line {
    event: String,
    ts: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    decision: Option<String>,
    reason: Option<String>,
}

// === impl Learner ===

impl Learner {
    /// Takes one audit line, without its newline. A line that teaches nothing is counted, by why.
    pub fn line(&mut self, line: &[u8]) {
        self.lines += 1;
        let Ok(l) = serde_json::from_slice::<Line>(line) else {
            self.skipped.unreadable += 1;
            return;
        };
        if l.event != "decision" {
            self.skipped.other_events += 1;
            return;
        }
        let verdict = l.decision.as_deref().and_then(verdict);
        let at = l.ts.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
        let (Some(verdict), Some(at)) = (verdict, at) else {
            self.skipped.unreadable += 1;
            return;
        };
        // Port 0 cannot be named in a rule; the proxy never dials it.
        let (Some(host), Some(port)) = (l.host.as_deref(), l.port.filter(|p| *p != 0)) else {
            self.skipped.no_destination += 1;
            return;
        };
        let seen = match Host::parse(host) {
            Ok(Host::Name(name)) => {
                self.names.entry(port).or_default().entry(name.to_string()).or_insert_with(|| Seen::new(at))
            }
            Ok(Host::Ip(ip)) => self.addrs.entry(SocketAddr::new(ip, port)).or_insert_with(|| Seen::new(at)),
            Err(_) => {
                self.skipped.invalid_host += 1;
                return;
            }
        };
        seen.record(verdict, l.reason.as_deref(), at);
    }

    /// The draft policy, as configuration text that loads unchanged: comments on what was seen,
    /// one rule per port, and `validate`'s warnings at the end. An error here is a bug in the
    /// drafting, never in the log.
    pub fn draft(&self) -> Result<String, ConfigErrors> {
        let mut out = String::new();
        self.header(&mut out);
        self.addresses(&mut out);
        for (port, names) in &self.names {
            rule(&mut out, *port, names);
        }
        let config = Config::from_str(&out, Origin::File(DRAFT_ORIGIN.into()))?;
        let compiled = compile(&config, &TagTable::default())?;
        // Writing to a String cannot fail: the `fmt::Result`s in this module are all Ok.
        let _ = writeln!(out);
        if compiled.warnings.is_empty() {
            let _ = writeln!(out, "# validate: no warnings");
        }
        for w in &compiled.warnings {
            let _ = writeln!(out, "# warning: rule {}: {}", w.rule.as_deref().unwrap_or("-"), w.message);
        }
        Ok(out)
    }

    fn header(&self, out: &mut String) {
        let learned: u64 = self.names.values().flat_map(|n| n.values()).map(Seen::total).sum();
        let _ = writeln!(
            out,
            "# Draft policy from `egress-proxy learn`: review it before it is enforced.\n\
             #\n\
             # It allows each host name the audit log saw, on the port it was seen on, whether the\n\
             # proxy allowed or refused it then, from any client (add `sources` to narrow that).\n\
             # Names are exact, or `*.suffix` where at least {MIN_NAMES} names share a suffix that one\n\
             # party owns (never a public suffix or a shared hosting suffix). The checks on what a\n\
             # tunnel carries stay on: a name refused as sni_mismatch, not_tls or ech_present is\n\
             # refused again. Counts: allowed; denied (refused by the proxy, reasons in brackets);\n\
             # failed (allowed, but the name did not resolve or the upstream failed).\n\
             #"
        );
        let Skipped { unreadable, other_events, no_destination, invalid_host } = self.skipped;
        let ips: u64 = self.addrs.values().map(Seen::total).sum();
        let skipped: Vec<String> = [
            (unreadable, format!("{unreadable} not JSON or not an audit line")),
            (other_events, format!("{other_events} other events (close, chain_start)")),
            (no_destination, format!("{} with no host or port", plural(no_destination, "decision"))),
            (invalid_host, format!("{} whose host is not a valid name", plural(invalid_host, "decision"))),
            (ips, format!("{} for IP destinations (below)", plural(ips, "decision"))),
        ]
        .into_iter()
        .filter_map(|(n, what)| (n > 0).then_some(what))
        .collect();
        let skipped = if skipped.is_empty() { "none".to_string() } else { skipped.join(", ") };
        let (lines, learned) = (plural(self.lines, "line"), plural(learned, "decision"));
        let _ = writeln!(out, "# Read {lines}: {learned} learned; skipped: {skipped}.");
    }

    fn addresses(&self, out: &mut String) {
        if self.addrs.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "#\n# IP destinations, not drafted ({}): an address rule needs cidrs or service_tags that a\n\
             # human chooses (`egress-proxy service-tags` lists them).",
            self.addrs.len()
        );
        for (addr, seen) in self.addrs.iter().take(MAX_LISTED) {
            let _ = writeln!(out, "#   {addr}: {seen}");
        }
        if let n @ 1.. = self.addrs.len().saturating_sub(MAX_LISTED) {
            let _ = writeln!(out, "#   ... and {n} more");
        }
    }
}

// === impl Entry ===

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Wildcard { suffix, .. } => write!(f, "*.{suffix}"),
        }
    }
}

// === impl Seen ===

impl Seen {
    fn new(at: SystemTime) -> Self {
        Self { allowed: 0, denied: 0, failed: 0, reasons: BTreeMap::new(), first: at, last: at }
    }

    fn record(&mut self, verdict: Verdict, reason: Option<&str>, at: SystemTime) {
        match verdict {
            Verdict::Allow => self.allowed += 1,
            // Report mode let it through; enforcement would refuse it: counted with the refusals.
            Verdict::Deny | Verdict::WouldDeny => self.denied += 1,
            Verdict::Fail => self.failed += 1,
        }
        if let (Verdict::Deny | Verdict::WouldDeny | Verdict::Fail, Some(reason)) = (verdict, reason) {
            *self.reasons.entry(reason.to_string()).or_default() += 1;
        }
        self.first = self.first.min(at);
        self.last = self.last.max(at);
    }

    fn merge(&mut self, other: &Self) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.failed += other.failed;
        for (reason, n) in &other.reasons {
            *self.reasons.entry(reason.clone()).or_default() += n;
        }
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }

    fn total(&self) -> u64 {
        self.allowed + self.denied + self.failed
    }

    /// Everything in `all`, added up; `None` when it is empty.
    fn sum<'a>(mut all: impl Iterator<Item = &'a Self>) -> Option<Self> {
        let mut sum = all.next()?.clone();
        all.for_each(|s| sum.merge(s));
        Some(sum)
    }
}

/// `12 seen: 10 allowed, 2 denied [no_rule 2]; first 2025-10-20T08:15:30.123Z, last ...`
impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} seen: {} allowed, {} denied", self.total(), self.allowed, self.denied)?;
        if self.failed > 0 {
            write!(f, ", {} failed", self.failed)?;
        }
        if !self.reasons.is_empty() {
            let reasons: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            write!(f, " [{}]", reasons.join(", "))?;
        }
        // The same spelling as the audit lines' own `ts` (`crate::time`).
        let (first, last) = (humantime::format_rfc3339_millis(self.first), humantime::format_rfc3339_millis(self.last));
        write!(f, "; first {first}, last {last}")
    }
}

// === drafting ===

/// Writes the rule for one port: every name seen on it, collapsed where it may be, each entry
/// under a comment saying what it stands for and what was seen.
fn rule(out: &mut String, port: u16, names: &BTreeMap<String, Seen>) {
    let entries = collapse(names.keys().map(String::as_str));
    if let Some(all) = Seen::sum(names.values()) {
        let _ =
            writeln!(out, "\n# port {port}: {}; {all}", plural(u64::try_from(names.len()).unwrap_or(u64::MAX), "name"));
    }
    let _ = writeln!(out, "[[rule]]\nname = \"learned-{port}\"\naction = \"allow\"\nhosts = [");
    for entry in &entries {
        let covered: &[&str] = match entry {
            Entry::Name(name) => {
                if let Some((suffix, who)) = shared_under(name) {
                    let _ = writeln!(out, "  # {name} is under {suffix} ({who}): keep it only if it is yours");
                }
                std::slice::from_ref(name)
            }
            Entry::Wildcard { names: under, .. } => {
                let shown: Vec<&str> = under.iter().take(MAX_LISTED).copied().collect();
                let more = match under.len().saturating_sub(MAX_LISTED) {
                    0 => String::new(),
                    n => format!(" and {n} more"),
                };
                let _ = writeln!(out, "  # stands for {} names: {}{more}", under.len(), shown.join(", "));
                under
            }
        };
        if let Some(seen) = Seen::sum(covered.iter().filter_map(|n| names.get(*n))) {
            let _ = writeln!(out, "  # {seen}");
        }
        // Names are lower-case letters, digits, '-', '_' and '.' (`HostName`): nothing to escape.
        let _ = writeln!(out, "  \"{entry}\",");
    }
    let _ = writeln!(out, "]\nports = [{port}]");
}

/// The entries of a `hosts` list for `names`, sorted: each name exactly, except where at least
/// `MIN_NAMES` of them share a suffix that `is_collapsible` allows, which become `*.suffix`.
/// Suffixes are tried deepest first, so a wildcard is as narrow as it can be, and a name counts
/// for one wildcard only: `*.x.a.b.c` for three names under `x.a.b.c` leaves two more under
/// `a.b.c` exact rather than widening to `*.a.b.c`.
pub fn collapse<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Entry<'a>> {
    let names: BTreeSet<&str> = names.into_iter().collect();
    let mut under: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for &name in &names {
        for (dot, _) in name.match_indices('.') {
            let (Some(front), Some(suffix)) = (name.get(..dot), name.get(dot + 1..)) else {
                break;
            };
            // A wildcard never covers an underscore (`policy::names`): such a name stays exact.
            if front.contains('_') {
                break;
            }
            if is_collapsible(suffix) {
                under.entry(suffix).or_default().push(name);
            }
        }
    }
    let mut suffixes: Vec<&str> = under.keys().copied().collect();
    suffixes.sort_by_key(|s| (Reverse(s.split('.').count()), *s));
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    let mut entries = Vec::new();
    for suffix in suffixes {
        let free: Vec<&str> = under.get(suffix).into_iter().flatten().copied().filter(|n| !taken.contains(n)).collect();
        if free.len() >= MIN_NAMES {
            taken.extend(&free);
            entries.push(Entry::Wildcard { suffix, names: free });
        }
    }
    entries.extend(names.difference(&taken).copied().map(Entry::Name));
    entries.sort_by_cached_key(Entry::to_string);
    entries
}

/// True when `*.suffix` may stand for names seen under `suffix`: the suffix is not on the
/// built-in list of shared suffixes nor under one, not a public suffix, and at least
/// `MIN_LABELS_BELOW_OWNER` labels deep below its registrable domain (`westus2.batch.azure.com`
/// under `azure.com`; not `batch.azure.com`, where another team of the same owner may serve
/// anything).
pub fn is_collapsible(suffix: &str) -> bool {
    if SHARED.iter().any(|(s, _)| is_at_or_under(suffix, s)) {
        return false;
    }
    // `None` for a public suffix (`com`, `co.uk`, `github.io`): no one owns it.
    let Some(owner) = psl::domain_str(suffix) else {
        return false;
    };
    labels(suffix) >= labels(owner) + MIN_LABELS_BELOW_OWNER
}

/// The shared suffix `name` is under, and who can have a name there: the built-in list first,
/// then the private section of the Public Suffix List (`github.io`, `herokuapp.com`).
fn shared_under(name: &str) -> Option<(&str, &'static str)> {
    if let Some((s, who)) = SHARED.iter().find(|(s, _)| name != *s && is_at_or_under(name, s)) {
        return Some((s, who));
    }
    let suffix = psl::suffix(name.as_bytes())?;
    let text = std::str::from_utf8(suffix.as_bytes()).ok()?;
    (suffix.typ() == Some(psl::Type::Private) && text != name)
        .then_some((text, "a suffix where the Public Suffix List says anyone can register a name"))
}

/// True when `name` is `suffix` or a name under it (`a.suffix`; never `evilsuffix`).
fn is_at_or_under(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix).is_some_and(|front| front.is_empty() || front.ends_with('.'))
}

fn labels(name: &str) -> usize {
    name.split('.').count()
}

/// `1 line`, `2 lines`.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The audit `decision` value → its verdict, by the names `audit` writes.
fn verdict(s: &str) -> Option<Verdict> {
    [Verdict::Allow, Verdict::Deny, Verdict::Fail, Verdict::WouldDeny].into_iter().find(|v| v.as_str() == s)
}

/// How many names a `*.suffix` must stand for: fewer is not a pattern, just names.
const MIN_NAMES: usize = 3;
/// How deep below its registrable domain a collapsed suffix must be (see `is_collapsible`).
const MIN_LABELS_BELOW_OWNER: usize = 2;
/// Names under a wildcard, and IP destinations, listed in comments before "and N more".
const MAX_LISTED: usize = 20;
/// The origin named if the draft failed to compile (a bug): it has no file yet.
const DRAFT_ORIGIN: &str = "<draft>";

/// Suffixes under which anyone (any customer of a cloud or hosting service) can have a name that
/// serves their own content, so that a wildcard anywhere under them reaches strangers: learning
/// never collapses at or below them, and flags exact names under them for review. Public
/// suffixes (`com`, `co.uk`) and the Public Suffix List's private section (`github.io`,
/// `azurewebsites.net`) are caught by `psl` as well; this list adds what that list lacks (most of
/// Azure's) and, unlike it, rules out every depth: a tenant's name can sit several labels down
/// (`acct.z13.web.core.windows.net`, `reg.westus2.data.azurecr.io`).
///
/// Conservative on purpose: an entry too many only leaves names exact, a longer draft; an entry
/// missing can let a wildcard reach a stranger's endpoint. It holds every suffix `validate` warns
/// about (`policy::compile`), so a learned wildcard never draws its warning.
const SHARED: &[(&str, &str)] = &[
    // Azure
    ("core.windows.net", "any Azure customer's storage account"),
    ("servicebus.windows.net", "any Azure customer's Service Bus or Event Hubs namespace"),
    ("database.windows.net", "any Azure customer's SQL server"),
    ("redis.cache.windows.net", "any Azure customer's cache"),
    ("search.windows.net", "any Azure customer's search service"),
    ("azurewebsites.net", "any Azure customer's web app"),
    ("cloudapp.azure.com", "any Azure customer's virtual machine"),
    ("cloudapp.net", "any Azure customer's cloud service"),
    ("azurefd.net", "any Azure customer's Front Door endpoint"),
    ("azureedge.net", "any Azure customer's CDN endpoint"),
    ("trafficmanager.net", "any Azure customer's Traffic Manager profile"),
    ("azurecr.io", "any Azure customer's container registry"),
    ("vault.azure.net", "any Azure customer's key vault"),
    ("documents.azure.com", "any Azure customer's Cosmos DB account"),
    ("cognitiveservices.azure.com", "any Azure customer's AI services resource"),
    ("openai.azure.com", "any Azure customer's OpenAI resource"),
    ("azure-api.net", "any Azure customer's API Management service"),
    ("azure-devices.net", "any Azure customer's IoT hub"),
    ("azurestaticapps.net", "any Azure customer's static web app"),
    ("azurecontainer.io", "any Azure customer's container instance"),
    ("azurecontainerapps.io", "any Azure customer's container app"),
    ("azuredatabricks.net", "any Azure customer's Databricks workspace"),
    // AWS, Google Cloud
    ("amazonaws.com", "any AWS customer's bucket or endpoint"),
    ("cloudfront.net", "any AWS customer's CDN distribution"),
    ("on.aws", "any AWS customer's Lambda function URL"),
    ("googleapis.com", "any Google Cloud customer's bucket or endpoint"),
    ("appspot.com", "any Google Cloud customer's App Engine app"),
    ("run.app", "any Google Cloud customer's Cloud Run service"),
    ("cloudfunctions.net", "any Google Cloud customer's function"),
    ("web.app", "any Firebase customer's site"),
    ("firebaseapp.com", "any Firebase customer's site"),
    // Code and site hosting, tunnels
    ("github.io", "any GitHub user's site"),
    ("githubusercontent.com", "any GitHub user's content"),
    ("herokuapp.com", "any Heroku customer's app"),
    ("netlify.app", "any Netlify customer's site"),
    ("vercel.app", "any Vercel customer's site"),
    ("pages.dev", "any Cloudflare Pages site"),
    ("workers.dev", "any Cloudflare Worker"),
    ("ngrok.io", "anyone's ngrok tunnel"),
    ("ngrok-free.app", "anyone's ngrok tunnel"),
];

#[cfg(test)]
mod tests;

//! The command line: `run` (the default), `check`, `validate`, `service-tags`, `nft`,
//! `audit verify` and `learn`. All printing lives here.
//!
//! Exit codes: 0 success (every destination allowed, for `check`; the chain intact, for `audit
//! verify`); 1 a destination denied, a broken audit chain, or a runtime failure; 2 a
//! configuration error or an unreadable file.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::audit::chain::ChainCheck;
use crate::descriptors;
use crate::learn::Learner;
use crate::load::{load, Loaded};
use crate::policy::service_tags::TagTable;
use crate::policy::{Decision, Destination, Host, Policy, Query};
use crate::server;

#[derive(Debug, Parser)]
#[command(name = "egress-proxy", version, about = "A default-deny egress proxy: lets out only what the policy allows")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(ConfigArgs),
    /// Say whether destinations would be allowed, and by which rule or for what reason.
    Check(CheckArgs),
    /// Check the configuration, print the expanded policy and warn about risky rules.
    Validate(ConfigArgs),
    /// List the tags of a Service Tags file, or the prefixes of the named tags.
    ServiceTags(ServiceTagsArgs),
    /// Render the policy's nftables ruleset (TCP redirects, UDP rules, DNS, drops) to stdout.
    Nft(NftArgs),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Draft a policy from audit logs: every host name they saw, one rule per port, to review.
    Learn(LearnArgs),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit log files and report the first broken link.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The files of one log, oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct LearnArgs {
    /// Audit log files (`--audit a.jsonl b.jsonl` or `--audit a.jsonl --audit b.jsonl`).
    #[arg(long = "audit", required = true, num_args = 1.., value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct NftArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// `gateway` (a subnet routes through this machine) or `sidecar` (on the node itself).
    #[arg(long, value_enum)]
    shape: crate::nft::Shape,
}

#[derive(Debug, Args)]
struct ServiceTagsArgs {
    /// A `ServiceTags_Public_*.json`; without it, the data embedded with the preset.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Tag names (any case); without them, every tag with its prefix count.
    #[arg(value_name = "TAG")]
    tags: Vec<String>,
}

#[derive(Clone, Debug, Args)]
struct ConfigArgs {
    /// Policy file; without it the embedded Azure ML preset is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Region for `<region>` (repeatable); overrides `regions` in the file.
    #[arg(long = "region", value_name = "NAME")]
    regions: Vec<String>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The client address to decide for (rules with `sources`).
    #[arg(long, value_name = "IP")]
    source: Option<IpAddr>,
    /// One JSON object a line.
    #[arg(long)]
    json: bool,
    /// `host[:port]`, `ip[:port]`, `[v6]:port` or a URL; the port defaults to 443.
    #[arg(required = true, value_name = "DEST")]
    dests: Vec<String>,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        None => run_proxy(cli.run),
        Some(Command::Run(args)) => run_proxy(args),
        Some(Command::Check(args)) => check(args),
        Some(Command::Validate(args)) => validate(args),
        Some(Command::ServiceTags(args)) => service_tags(args),
        Some(Command::Nft(args)) => match load_or_report(&args.config) {
            Ok(l) => {
                print!("{}", crate::nft::render(&l.compiled.policy, &l.config, args.shape));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Audit(AuditCommand::Verify(args))) => audit_verify(args),
        Some(Command::Learn(args)) => learn(args),
    }
}

/// `run`: loads the configuration once, then hands it to the proxy.
fn run_proxy(args: ConfigArgs) -> ExitCode {
    match load_or_report(&args) {
        Ok(loaded) => crate::app::run(loaded, args.config, args.regions),
        Err(code) => code,
    }
}

/// Loads the policy, or prints every configuration error and returns exit code 2.
fn load_or_report(args: &ConfigArgs) -> Result<Loaded, ExitCode> {
    load(args.config.as_deref(), &args.regions).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn check(args: CheckArgs) -> ExitCode {
    let loaded = match load_or_report(&args.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let policy = &loaded.compiled.policy;
    let mut all_allowed = true;
    let mut out = std::io::stdout().lock();
    for dest in &args.dests {
        let (shown, decision, addr) = match Destination::parse_loose(dest, 443) {
            Ok(d) => {
                let (decision, addr) = decide_with_pins(policy, &loaded, &d, args.source);
                (d.to_string(), decision, addr)
            }
            Err(_) => (dest.clone(), Decision::deny(crate::policy::DenyReason::InvalidHost), None),
        };
        all_allowed &= decision.is_allow();
        // What the proxy does with it: a refusal the policy only reports is let through.
        let verdict = match decision {
            Decision::Allow { .. } => "allow",
            Decision::Deny { reason, rule } if policy.reports(reason, rule) => "would_deny",
            Decision::Deny { .. } => "deny",
        };
        let line = if args.json {
            let (rule, reason) = match decision {
                Decision::Allow { rule } => (Some(policy.rule_name(rule)), None),
                Decision::Deny { reason, rule } => (rule.map(|r| policy.rule_name(r)), Some(reason.as_str())),
            };
            serde_json::json!({
                "dest": shown,
                "decision": verdict,
                "rule": rule,
                "reason": reason,
                "addr": addr.map(|a| a.to_string()),
            })
            .to_string()
        } else {
            let at = addr.map(|a| format!(" addr={a}")).unwrap_or_default();
            format!("{verdict:<5} {shown} {}{at}", policy.explain(&decision))
        };
        let _ = writeln!(out, "{line}");
    }
    if all_allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Decides a destination as the proxy would before resolving it, then, for a name pinned in
/// `[resolve] static`, on each pinned address, as the proxy dials them: allowed if one passes
/// (that address's decision), else refused as the first address was.
fn decide_with_pins(
    policy: &Policy,
    loaded: &Loaded,
    d: &Destination,
    source: Option<IpAddr>,
) -> (Decision, Option<IpAddr>) {
    let mut q = Query::new(&d.host, d.port);
    if let Some(s) = source {
        q = q.from(s);
    }
    let first = policy.decide(&q);
    let Host::Name(name) = &d.host else {
        return (first, None);
    };
    if !first.is_allow() {
        return (first, None);
    }
    let pins = loaded.config.resolve.static_hosts.get(name.as_str());
    let mut refused = None;
    for ip in pins.map(|p| p.get_ref().as_slice()).unwrap_or_default() {
        match policy.check_addr(name, *ip, d.port, source) {
            allowed @ Decision::Allow { .. } => return (allowed, None),
            denied => {
                refused.get_or_insert((denied, Some(*ip)));
            }
        }
    }
    refused.unwrap_or((first, None))
}

fn validate(args: ConfigArgs) -> ExitCode {
    let loaded = match load_or_report(&args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let Loaded { config, compiled, tags, .. } = &loaded;
    let policy = &compiled.policy;
    let mut out = std::io::stdout().lock();
    let ranges: usize = policy.rules().iter().map(|r| r.ranges.len()).sum();
    let _ = writeln!(
        out,
        "{}: {} rules enabled, {} disabled; {} address ranges in {} segments; service tags changeNumber {} ({} tags)",
        config.source.origin,
        policy.rules().len(),
        compiled.disabled.len(),
        ranges,
        policy.segment_count(),
        tags.change_number(),
        tags.len(),
    );
    for r in policy.rules() {
        let mut parts = Vec::new();
        if !r.patterns.is_empty() {
            parts.push(format!("hosts {}", r.patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")));
        }
        if !r.tags.is_empty() {
            parts.push(format!(
                "service_tags {}",
                r.tags.iter().map(|(t, n)| format!("{t} ({n} prefixes)")).collect::<Vec<_>>().join(", ")
            ));
        }
        if !r.cidrs.is_empty() {
            parts.push(format!("cidrs {}", r.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")));
        }
        if !r.sources.is_empty() {
            parts.push(format!("sources {}", r.sources.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")));
        }
        let (action, proto) = (r.action.as_str(), r.protocol.as_str());
        let _ = writeln!(out, "rule {} {action} {proto} ports {}: {}", r.name, r.ports, parts.join("; "));
    }
    if !compiled.disabled.is_empty() {
        let _ = writeln!(out, "disabled: {}", compiled.disabled.join(", "));
    }
    for w in &compiled.warnings {
        let _ = writeln!(out, "warning: rule {}: {}", w.rule.as_deref().unwrap_or("-"), w.message);
    }
    // `run` raises the soft limit to the hard one, so the hard limit is what the limits must fit.
    if let Some(w) = descriptors::check(&config.limits, server::ADMIN_CONNECTIONS, descriptors::hard_limit()) {
        let _ = writeln!(out, "warning: limits: {w}");
    }
    ExitCode::SUCCESS
}

/// `audit verify`: every line of every file, in order, must link to the one before it; the first
/// that does not is printed as `FILE:LINE: broken link: why`.
fn audit_verify(args: VerifyArgs) -> ExitCode {
    let mut check = ChainCheck::new();
    let mut out = std::io::stdout().lock();
    let read = each_line(&args.files, |path, n, line| {
        check.check(line).map_err(|broken| {
            let _ = writeln!(out, "{}:{n}: broken link: {broken}", path.display());
            ExitCode::from(1)
        })
    });
    if let Err(code) = read {
        return code;
    }
    if check.lines() == 0 {
        let _ = writeln!(out, "no audit lines: a log begins with a chain_start line");
        return ExitCode::from(1);
    }
    let files = match args.files.len() {
        1 => "1 file".to_string(),
        n => format!("{n} files"),
    };
    let _ = writeln!(out, "intact: {} lines in {files}", check.lines());
    ExitCode::SUCCESS
}

/// `learn`: reads every line of every file, then prints the draft; nothing is printed when a file
/// cannot be read, so a half-read log never yields a draft that looks whole.
fn learn(args: LearnArgs) -> ExitCode {
    let mut learner = Learner::default();
    let read = each_line(&args.files, |_, _, line| {
        learner.line(line);
        Ok(())
    });
    if let Err(code) = read {
        return code;
    }
    match learner.draft() {
        Ok(draft) => {
            let _ = std::io::stdout().lock().write_all(draft.as_bytes());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("the draft does not load, a bug in `learn`:\n{errors}");
            ExitCode::from(1)
        }
    }
}

/// Calls `f` with every line of every file in order (path, 1-based line number, bytes without the
/// newline), stopping at its first `Err`. A file or line that cannot be read is reported on stderr
/// as `FILE[:LINE]: cannot read: why`, and ends the walk with exit code 2.
fn each_line(
    files: &[PathBuf],
    mut f: impl FnMut(&Path, usize, &[u8]) -> Result<(), ExitCode>,
) -> Result<(), ExitCode> {
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| {
            eprintln!("{}: cannot read: {e}", path.display());
            ExitCode::from(2)
        })?;
        for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|e| {
                eprintln!("{}:{}: cannot read: {e}", path.display(), n + 1);
                ExitCode::from(2)
            })?;
            f(path, n + 1, &line)?;
        }
    }
    Ok(())
}

fn service_tags(args: ServiceTagsArgs) -> ExitCode {
    let text = match &args.file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => crate::config::EMBEDDED_TAGS.to_string(),
    };
    let tags = match TagTable::parse(&text) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", args.file.as_deref().map_or("<embedded>".into(), |p| p.display().to_string()));
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    if args.tags.is_empty() {
        let _ = writeln!(out, "changeNumber {} ({}), {} tags", tags.change_number(), tags.cloud(), tags.len());
        for (name, prefixes) in tags.iter() {
            let _ = writeln!(out, "{name} {}", prefixes.len());
        }
        return ExitCode::SUCCESS;
    }
    let mut code = ExitCode::SUCCESS;
    for wanted in &args.tags {
        match tags.get(wanted) {
            Some((name, prefixes)) => {
                for p in prefixes {
                    let _ = writeln!(out, "{name} {p}");
                }
            }
            None => {
                eprintln!("no service tag {wanted:?} (changeNumber {})", tags.change_number());
                code = ExitCode::from(1);
            }
        }
    }
    code
}

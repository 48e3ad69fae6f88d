//! Collapsing, grouping by port, what is skipped, and that every draft loads and allows what was seen.

use super::*;
use crate::policy::{Destination, Pattern, Policy, Query};

/// One decision line in the shape `audit` writes.
fn decision(ts: &str, host: &str, port: u16, verdict: &str, reason: Option<&str>) -> String {
    serde_json::json!({
        "ts": ts, "event": "decision", "id": 1, "client": "10.0.0.4:50312", "listener": "http",
        "method": "CONNECT", "host": host, "port": port, "dst_addr": null, "decision": verdict,
        "rule": null, "reason": reason, "prev": "0".repeat(64),
    })
    .to_string()
}

fn allow(host: &str, port: u16) -> String {
    decision("2025-10-20T08:15:30.123Z", host, port, "allow", None)
}

fn learn(lines: &[String]) -> Learner {
    let mut l = Learner::default();
    lines.iter().for_each(|line| l.line(line.as_bytes()));
    l
}

fn compiled(draft: &str) -> Policy {
    let config = Config::from_str(draft, Origin::File("draft.toml".into())).unwrap();
    compile(&config, &TagTable::default()).unwrap().policy
}

fn allows(p: &Policy, dest: &str) -> bool {
    let d = Destination::parse_loose(dest, 443).unwrap();
    p.decide(&Query::new(&d.host, d.port)).is_allow()
}

fn patterns(names: &[&str]) -> Vec<String> {
    collapse(names.iter().copied()).iter().map(Entry::to_string).collect()
}

#[test]
fn three_names_under_a_deep_enough_suffix_collapse_and_two_do_not() {
    let three = ["a.westus2.batch.azure.com", "b.westus2.batch.azure.com", "c.westus2.batch.azure.com"];
    assert_eq!(patterns(&three), ["*.westus2.batch.azure.com"]);
    assert_eq!(
        collapse(three),
        [Entry::Wildcard { suffix: "westus2.batch.azure.com", names: three.to_vec() }],
        "the wildcard says which names it stands for"
    );
    assert_eq!(patterns(&three[..2]), ["a.westus2.batch.azure.com", "b.westus2.batch.azure.com"]);
}

#[test]
fn never_collapses_to_the_registrable_domain_or_one_label_below_it() {
    assert_eq!(patterns(&["a.azure.com", "b.azure.com", "c.azure.com"]), ["a.azure.com", "b.azure.com", "c.azure.com"]);
    assert_eq!(
        patterns(&["a.batch.azure.com", "b.batch.azure.com", "c.batch.azure.com"]),
        ["a.batch.azure.com", "b.batch.azure.com", "c.batch.azure.com"]
    );
    assert_eq!(patterns(&["a.example.co.uk", "b.example.co.uk", "c.example.co.uk"]).len(), 3);
    assert!(patterns(&["a.b.c.example.co.uk", "d.b.c.example.co.uk", "e.b.c.example.co.uk"])
        .contains(&"*.b.c.example.co.uk".to_string()));
}

#[test]
fn never_collapses_at_or_under_a_public_or_shared_suffix() {
    for suffix in ["com", "net", "org", "co.uk", "github.io", "blob.core.windows.net", "s3.amazonaws.com"] {
        assert!(!is_collapsible(suffix), "{suffix}");
    }
    for (shared, _) in SHARED {
        // Deep enough to collapse anywhere else: three labels over the shared suffix.
        for depth in ["", "x.", "x.y.", "x.y.z."] {
            let under = format!("{depth}{shared}");
            let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|n| format!("{n}.{under}")).collect();
            let got = patterns(&names.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(got.iter().all(|p| !p.starts_with('*')), "{under}: {got:?}");
        }
    }
    let accounts = ["acct1.blob.core.windows.net", "acct2.blob.core.windows.net", "acct3.blob.core.windows.net"];
    assert_eq!(patterns(&accounts), accounts, "never *.blob.core.windows.net");
    let registries = ["r1.westus2.data.azurecr.io", "r2.westus2.data.azurecr.io", "r3.westus2.data.azurecr.io"];
    assert_eq!(patterns(&registries), registries, "a tenant's name can sit deep under a shared suffix");
    assert!(is_collapsible("x.evilcore.windows.net"), "a suffix is matched by whole labels");
}

#[test]
fn the_deepest_suffix_wins_and_a_name_counts_once() {
    let names = [
        "a.x.westus2.batch.azure.com",
        "b.x.westus2.batch.azure.com",
        "c.x.westus2.batch.azure.com",
        "d.westus2.batch.azure.com",
        "e.westus2.batch.azure.com",
        "westus2.batch.azure.com",
    ];
    assert_eq!(
        patterns(&names),
        [
            "*.x.westus2.batch.azure.com",
            "d.westus2.batch.azure.com",
            "e.westus2.batch.azure.com",
            "westus2.batch.azure.com",
        ],
        "the suffix itself is not covered by its wildcard, so it stays listed"
    );
}

#[test]
fn a_name_with_an_underscore_in_front_of_the_suffix_stays_exact() {
    let names = [
        "a.westus2.batch.azure.com",
        "b.westus2.batch.azure.com",
        "c_1.westus2.batch.azure.com",
        "x.c_1.westus2.batch.azure.com",
    ];
    assert_eq!(patterns(&names), names, "two names a wildcard could cover are not three");
    let suffix = Pattern::parse("*.westus2.batch.azure.com").unwrap();
    assert!(!suffix.matches(&"c_1.westus2.batch.azure.com".parse().unwrap()), "why: the matcher agrees");
}

#[test]
fn one_rule_per_port_with_exactly_the_names_seen_on_it() {
    let l = learn(&[
        allow("ml.azure.com", 443),
        allow("a.westus2.batch.azure.com", 443),
        decision("2025-10-20T09:00:00.000Z", "b.westus2.batch.azure.com", 443, "deny", Some("no_rule")),
        decision("2025-10-20T07:00:00.000Z", "c.westus2.batch.azure.com", 443, "fail", Some("resolve_failed")),
        allow("example.com", 80),
        decision("2025-10-20T08:15:31.000Z", "git.example.com", 22, "deny", Some("port_not_allowed")),
    ]);
    let draft = l.draft().unwrap();
    let p = compiled(&draft);
    let rules: Vec<String> = p.rules().iter().map(|r| format!("{} {} {}", r.name, r.ports, r.patterns.len())).collect();
    assert_eq!(rules, ["learned-22 22 1", "learned-80 80 1", "learned-443 443 2"], "{draft}");
    for seen in ["ml.azure.com", "a.westus2.batch.azure.com", "example.com:80", "git.example.com:22"] {
        assert!(allows(&p, seen), "{seen}\n{draft}");
    }
    for unseen in ["ml.azure.com:80", "example.com", "git.example.com", "other.azure.com", "westus2.batch.azure.com"] {
        assert!(!allows(&p, unseen), "{unseen}\n{draft}");
    }
    assert!(draft.contains(
        "  # stands for 3 names: a.westus2.batch.azure.com, b.westus2.batch.azure.com, c.westus2.batch.azure.com\n  \
         # 3 seen: 1 allowed, 1 denied, 1 failed [no_rule 1, resolve_failed 1]; \
         first 2025-10-20T07:00:00.000Z, last 2025-10-20T09:00:00.000Z\n  \"*.westus2.batch.azure.com\",\n"
    ), "{draft}");
    assert!(draft.contains("\n# port 443: 4 names; 4 seen: 2 allowed, 1 denied, 1 failed"), "{draft}");
    assert!(draft.contains("hosts = [\n  # 1 seen: 1 allowed, 0 denied; first 2025-10-20T08:15:30.123Z, last 2025-10-20T08:15:30.123Z\n  \"example.com\",\n]\nports = [80]\n"), "{draft}");
    assert!(draft.ends_with("\n# validate: no warnings\n"), "{draft}");
}

#[test]
fn ip_destinations_are_listed_but_not_drafted() {
    let l = learn(&[allow("20.1.2.3", 443), allow("2001:db8::1", 443), allow("[2001:db8::1]", 443)]);
    let draft = l.draft().unwrap();
    assert!(compiled(&draft).rules().is_empty(), "{draft}");
    assert!(draft.contains("# IP destinations, not drafted (2):"), "{draft}");
    assert!(draft.contains("\n#   20.1.2.3:443: 1 seen: 1 allowed, 0 denied;"), "{draft}");
    assert!(draft.contains("\n#   [2001:db8::1]:443: 2 seen: 2 allowed, 0 denied;"), "{draft}");
    assert!(draft.contains("skipped: 3 decisions for IP destinations (below)."), "{draft}");
}

#[test]
fn lines_that_teach_nothing_are_counted_by_why() {
    let l = learn(&[
        "not json".into(),
        r#"{"ts":"2025-10-20T08:15:30.123Z","event":"chain_start","prev":"00"}"#.into(),
        r#"{"ts":"2025-10-20T08:15:30.123Z","event":"close","id":1,"host":"ml.azure.com","port":443}"#.into(),
        r#"{"ts":"yesterday","event":"decision","host":"ml.azure.com","port":443,"decision":"allow"}"#.into(),
        r#"{"ts":"2025-10-20T08:15:30.123Z","event":"decision","host":"a.com","port":443,"decision":"maybe"}"#.into(),
        r#"{"ts":"2025-10-20T08:15:30.123Z","event":"decision","host":"/x","port":null,"decision":"deny"}"#.into(),
        decision("2025-10-20T08:15:30.123Z", "[redacted]@evil.example.com", 443, "deny", Some("bad_request")),
        allow("ml.azure.com", 0),
        allow("ML.Azure.com.", 443),
    ]);
    let draft = l.draft().unwrap();
    assert!(
        draft.contains(
            "# Read 9 lines: 1 decision learned; skipped: 3 not JSON or not an audit line, \
             2 other events (close, chain_start), 2 decisions with no host or port, \
             1 decision whose host is not a valid name.\n"
        ),
        "{draft}"
    );
    assert!(draft.contains("  \"ml.azure.com\",\n"), "names are learned normalised: {draft}");
}

#[test]
fn an_empty_log_drafts_a_policy_that_loads_and_allows_nothing() {
    let draft = Learner::default().draft().unwrap();
    assert!(compiled(&draft).rules().is_empty());
    assert!(draft.contains("# Read 0 lines: 0 decisions learned; skipped: none.\n"), "{draft}");
}

#[test]
fn exact_names_under_a_shared_suffix_are_flagged_for_review() {
    let draft = learn(&[allow("acct1.blob.core.windows.net", 443), allow("me.github.io", 443)]).draft().unwrap();
    assert!(draft.contains("  # acct1.blob.core.windows.net is under core.windows.net (any Azure customer's storage account): keep it only if it is yours\n"), "{draft}");
    assert!(draft.contains("  # me.github.io is under github.io (any GitHub user's site)"), "{draft}");
    assert_eq!(shared_under("foo.compute.herokuapp.com").map(|(s, _)| s), Some("herokuapp.com"));
    assert_eq!(shared_under("myapp.pythonanywhere.com").map(|(s, _)| s), Some("pythonanywhere.com"), "from psl");
    assert_eq!(shared_under("ml.azure.com"), None);
    assert_eq!(shared_under("core.windows.net"), None, "the suffix itself is the platform's");
}

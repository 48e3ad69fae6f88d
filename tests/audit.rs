//! The audit log as an auditor reads it: the hash chain across restarts and rotations, and
//! `egress-proxy audit verify` on intact and tampered files.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use egress_proxy::audit::{Audit, Decided, Listener, Verdict};
use egress_proxy::config::OnStall;
use egress_proxy::metrics::Metrics;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn refusal(id: u64) -> Decided<'static> {
    Decided {
        id,
        client: "127.0.0.1:5000".parse().unwrap(),
        listener: Listener::Http,
        method: Some("CONNECT"),
        host: Some("evil.example.com"),
        port: Some(443),
        dst_addr: None,
        decision: Verdict::Deny,
        rule: None,
        reason: Some("no_rule"),
        original_dst: None,
        note: None,
        sni: None,
    }
}

/// Opens the log at `path` as the proxy does at start, and records refusals `ids`.
fn run_once(path: &Path, ids: std::ops::Range<u64>) {
    let audit = Audit::open(path.to_str().unwrap(), OnStall::Refuse, Metrics::new()).unwrap();
    for id in ids {
        audit.decided(&refusal(id));
    }
    assert!(audit.flush(Duration::from_secs(10)));
}

/// `audit verify FILES`: exit code and stdout.
fn verify(files: &[&Path]) -> (i32, String) {
    let out = Command::new(BIN).args(["audit", "verify"]).args(files).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(String::from).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

const MISMATCH: &str =
    "broken link: \"prev\" is not the hash of the line before it: a line was deleted, edited or moved here";

#[test]
fn a_restart_continues_the_chain_in_the_same_file_and_the_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    run_once(&log, 0..3);
    run_once(&log, 3..6);
    let l = lines(&log);
    assert_eq!(l.len(), 8);
    let events: Vec<String> =
        l.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].to_string()).collect();
    assert_eq!(events.iter().filter(|e| *e == "\"chain_start\"").count(), 2);
    assert_eq!((events[0].as_str(), events[4].as_str()), ("\"chain_start\"", "\"chain_start\""));
    assert!(l[0].ends_with(&format!("\"prev\":\"{}\"}}", "0".repeat(64))), "a new file starts from zeros");
    let after_restart = egress_proxy::audit::chain::hex(&egress_proxy::audit::chain::digest(l[3].as_bytes()));
    assert!(l[4].ends_with(&format!("\"prev\":\"{after_restart}\"}}")), "the restart links to the last line");
    assert_eq!(verify(&[&log]), (0, "intact: 8 lines in 1 file\n".into()));
}

#[test]
fn verify_reports_a_deleted_edited_or_swapped_line_at_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    run_once(&log, 0..6);
    let intact = lines(&log);
    assert_eq!(intact.len(), 7, "a chain_start and six decisions");
    let at = |n: usize| format!("{}:{n}: {MISMATCH}\n", log.display());

    let mut deleted = intact.clone();
    deleted.remove(3);
    write_lines(&log, &deleted);
    assert_eq!(verify(&[&log]), (1, at(4)), "the line after the gap");

    let mut edited = intact.clone();
    edited[2] = edited[2].replace("evil.example.com", "good.example.com");
    write_lines(&log, &edited);
    assert_eq!(verify(&[&log]), (1, at(4)), "the line after the edited one");

    let mut swapped = intact.clone();
    swapped.swap(4, 5);
    write_lines(&log, &swapped);
    assert_eq!(verify(&[&log]), (1, at(5)));

    write_lines(&log, &intact[1..]);
    let (code, out) = verify(&[&log]);
    assert_eq!((code, out.as_str()), (1, format!("{}:1: broken link: the log does not begin with a chain_start line: lines before this one are missing\n", log.display()).as_str()));

    let mut cut = intact.clone();
    cut[6].truncate(20);
    write_lines(&log, &cut);
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 1);
    assert!(out.starts_with(&format!("{}:7: broken link: not an audit line", log.display())), "{out}");

    write_lines(&log, &intact);
    assert_eq!(verify(&[&log]), (0, "intact: 7 lines in 1 file\n".into()));
}

#[test]
fn verify_exits_2_on_a_file_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    run_once(&log, 0..1);
    let missing = dir.path().join("missing.jsonl");
    let out = Command::new(BIN).args(["audit", "verify"]).arg(&log).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with(&format!("{}: cannot read: ", missing.display())));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    assert_eq!(verify(&[&empty]).0, 1, "an empty log has lost its chain_start");
}

#[test]
fn reopen_after_a_rename_writes_to_a_new_file_that_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[audit]\npath = \"audit.jsonl\"\n").unwrap();
    let state = egress_proxy::state::State::build(egress_proxy::load::load(Some(&cfg), &[]).unwrap()).unwrap();
    let (log, rotated) = (dir.path().join("audit.jsonl"), dir.path().join("audit.jsonl.1"));
    state.audit.decided(&refusal(1));
    assert!(state.audit.flush(Duration::from_secs(10)));

    // logrotate: rename, then SIGHUP. A line recorded in between still goes to the open file.
    std::fs::rename(&log, &rotated).unwrap();
    state.audit.decided(&refusal(2));
    state.audit.reopen();
    state.audit.decided(&refusal(3));
    assert!(state.audit.flush(Duration::from_secs(10)));
    let (old, new) = (lines(&rotated), lines(&log));
    let event =
        |l: &String| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].as_str().unwrap().to_string();
    assert_eq!(old.iter().map(event).collect::<Vec<_>>(), ["chain_start", "decision", "decision"]);
    assert_eq!(new.iter().map(event).collect::<Vec<_>>(), ["chain_start", "decision"], "{new:#?}");
    let last_old = egress_proxy::audit::chain::hex(&egress_proxy::audit::chain::digest(old[2].as_bytes()));
    assert!(new[0].ends_with(&format!("\"prev\":\"{last_old}\"}}")), "the new file links to the old one");
    assert!(new[1].contains("\"id\":3"));
    assert_eq!(verify(&[&rotated, &log]), (0, "intact: 5 lines in 2 files\n".into()));
    assert_eq!(verify(&[&log]), (0, "intact: 2 lines in 1 file\n".into()), "each file verifies alone");
    assert_eq!(verify(&[&log, &rotated]), (1, format!("{}:1: {MISMATCH}\n", rotated.display())), "wrong order");

    // A reopen without a rotation goes on in the same file.
    state.audit.reopen();
    state.audit.decided(&refusal(4));
    assert!(state.audit.flush(Duration::from_secs(10)));
    assert_eq!(
        lines(&log).iter().map(event).collect::<Vec<_>>(),
        ["chain_start", "decision", "chain_start", "decision"]
    );
    assert_eq!(verify(&[&rotated, &log]), (0, "intact: 7 lines in 2 files\n".into()));
}

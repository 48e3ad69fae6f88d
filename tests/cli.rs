//! The command line: `check` and `validate` output and exit codes, and `run` as a real process
//! that reloads on SIGHUP and drains and exits 0 on SIGTERM.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_prints_one_line_per_destination_and_exits_1_when_any_is_denied() {
    let (code, out, _) = run(&[
        "check",
        "ml.azure.com",
        "https://x.westus2.batch.azure.com/path",
        "evil.example.com",
        "ml.azure.com:80",
        "169.254.169.254",
        "0x7f.1",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "allow ml.azure.com:443 rule=azureml",
            "allow x.westus2.batch.azure.com:443 rule=azure-batch",
            "deny  evil.example.com:443 reason=no_rule",
            "deny  ml.azure.com:80 reason=port_not_allowed rule=azureml",
            "deny  169.254.169.254:443 reason=internal_address",
            "deny  0x7f.1 reason=invalid_host",
        ]
    );
    let (code, out, _) = run(&["check", "mcr.microsoft.com", "ml.azure.com"]);
    assert_eq!((code, out.lines().count()), (0, 2));
}

#[test]
fn check_json_and_region_override() {
    let (code, out, _) =
        run(&["check", "--json", "--region", "eastus", "x.eastus.batch.azure.com", "x.westus2.batch.azure.com"]);
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[0]["rule"], "azure-batch");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["reason"], "no_rule");
}

#[test]
fn check_uses_source_and_static_pins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        "[resolve.static]\n\"api.example.com\" = [\"10.1.2.3\"]\n\
         [[rule]]\nname = \"team\"\naction = \"allow\"\nhosts = [\"api.example.com\", \"docs.example.com\"]\nsources = [\"192.168.10.0/24\"]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, _) =
        run(&["check", "--config", c, "--source", "192.168.10.7", "docs.example.com", "api.example.com"]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        "allow docs.example.com:443 rule=team\ndeny  api.example.com:443 reason=internal_address addr=10.1.2.3\n"
    );
    let (_, out, _) = run(&["check", "--config", c, "--source", "192.168.11.7", "docs.example.com"]);
    assert_eq!(out, "deny  docs.example.com:443 reason=source_not_allowed rule=team\n");
}

/// `check` says what the proxy does (found in review): a name pinned to one internal and one
/// public address is allowed, as the proxy dials the address that passes; a refusal the policy
/// only reports is `would_deny`, which the proxy lets through (and which exits 1).
#[test]
fn check_agrees_with_the_proxy_on_mixed_pins_and_report_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        "[resolve.static]\n\"api.example.com\" = [\"10.0.0.5\", \"203.0.113.7\"]\n\"int.example.com\" = [\"10.0.0.6\"]\n\
         [[rule]]\nname = \"api\"\naction = \"allow\"\nhosts = [\"api.example.com\", \"int.example.com\"]\n\
         [[rule]]\nname = \"trial\"\naction = \"allow\"\nhosts = [\"www.example.com\"]\nports = [443]\nmode = \"report\"\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, _) = run(&["check", "--config", c, "api.example.com", "int.example.com", "www.example.com:8443"]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        "allow api.example.com:443 rule=api\n\
         deny  int.example.com:443 reason=internal_address addr=10.0.0.6\n\
         would_deny www.example.com:8443 reason=port_not_allowed rule=trial\n"
    );
}

#[test]
fn config_errors_exit_2_and_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "regions = [\"westus2\"]\n\n[[rule]]\nname = \"a\"\naction = \"allow\"\nhosts = [\"ok.example.com\"]\nportz = [443]\n").unwrap();
    for sub in ["check", "validate", "run"] {
        let mut args = vec![sub, "--config", cfg.to_str().unwrap()];
        if sub == "check" {
            args.push("ok.example.com");
        }
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{sub}");
        assert!(err.contains(&format!("{}:7:1: rule[0].portz: unknown field `portz`", cfg.display())), "{sub}: {err}");
    }
    let (code, _, err) = run(&["validate", "--config", "/nonexistent/egress.toml"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("/nonexistent/egress.toml: cannot read"), "{err}");
}

#[test]
fn validate_prints_the_expanded_policy_and_warns_about_open_storage() {
    let (code, out, _) = run(&["validate", "--region", "WestUS2", "--region", "francecentral"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("<embedded config/azureml.toml>: 9 rules enabled, 6 disabled;"), "{out}");
    assert!(out.contains("rule azure-batch allow tcp ports 443: hosts *.westus2.batch.azure.com, *.francecentral.batch.azure.com, *.westus2.service.batch.azure.com, *.francecentral.service.batch.azure.com\n"), "{out}");
    assert!(
        out.contains(
            "service_tags BatchNodeManagement.WestUS2 (13 prefixes), BatchNodeManagement.FranceCentral (9 prefixes)"
        ),
        "{out}"
    );
    assert!(out.contains("warning: rule storage: storage_accounts is empty"), "{out}");
    assert!(!out.contains("AzureFrontDoor.Frontend"), "{out}");
    assert!(
        out.contains("warning: rule storage: service tag Storage.WestUS2 is shared by every tenant, and this address rule lets any server name through toward it: set names = \"listed\"\n"),
        "{out}"
    );
}

#[test]
fn validate_warns_about_address_rules_on_shared_tags_unless_names_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let tags = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
    let rule = "[[rule]]\nname = \"blob\"\naction = \"allow\"\nservice_tags = [\"Storage.WestUS2\"]\n";
    for (extra, warned) in [("", true), ("names = \"listed\"\n", false)] {
        let cfg = dir.path().join("p.toml");
        std::fs::write(&cfg, format!("[service_tags]\nfile = {tags:?}\n{rule}{extra}")).unwrap();
        let (code, out, _) = run(&["validate", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.contains("set names = \"listed\""), warned, "{extra:?}: {out}");
    }
}

/// A recorded audit log, in the proxy's own line format, from a loose policy (rule `open`): what the
/// workloads reached, allowed and refused, with the lines that teach nothing mixed in.
const RECORDED_LOG: &str = r#"{"ts":"2025-10-20T08:00:00.000Z","event":"chain_start","prev":"0000000000000000000000000000000000000000000000000000000000000000"}
{"ts":"2025-10-20T08:15:30.123Z","event":"decision","id":1,"client":"10.0.0.4:50312","listener":"http","method":"CONNECT","host":"ml.azure.com","port":443,"dst_addr":"20.38.1.2:443","decision":"allow","rule":"open","reason":null,"prev":"PREV"}
{"ts":"2025-10-20T08:15:31.500Z","event":"close","id":1,"client":"10.0.0.4:50312","listener":"http","host":"ml.azure.com","port":443,"dst_addr":"20.38.1.2:443","rule":"open","bytes_up":517,"bytes_down":4096,"duration_ms":1377,"prev":"PREV"}
{"ts":"2025-10-20T08:16:00.000Z","event":"decision","id":2,"client":"10.0.0.4:50313","listener":"http","method":"CONNECT","host":"a.westus2.batch.azure.com","port":443,"dst_addr":"20.42.5.6:443","decision":"allow","rule":"open","reason":null,"prev":"PREV"}
{"ts":"2025-10-20T08:16:01.000Z","event":"decision","id":3,"client":"10.0.0.4:50314","listener":"http","method":"CONNECT","host":"b.westus2.batch.azure.com","port":443,"dst_addr":null,"decision":"deny","rule":null,"reason":"no_rule","prev":"PREV"}
{"ts":"2025-10-20T08:16:02.000Z","event":"decision","id":4,"client":"10.0.0.5:40000","listener":"tls","host":"c.westus2.batch.azure.com","port":443,"dst_addr":"20.42.5.7:443","decision":"allow","rule":"open","reason":null,"original_dst":"20.42.5.7:443","prev":"PREV"}
{"ts":"2025-10-20T08:17:00.000Z","event":"decision","id":5,"client":"10.0.0.4:50315","listener":"http","method":"CONNECT","host":"acct1.blob.core.windows.net","port":443,"dst_addr":"20.60.1.1:443","decision":"allow","rule":"open","reason":null,"prev":"PREV"}
{"ts":"2025-10-20T08:17:01.000Z","event":"decision","id":6,"client":"10.0.0.4:50316","listener":"http","method":"CONNECT","host":"acct2.blob.core.windows.net","port":443,"dst_addr":"20.60.1.2:443","decision":"allow","rule":"open","reason":null,"prev":"PREV"}
{"ts":"2025-10-20T08:17:02.000Z","event":"decision","id":7,"client":"10.0.0.4:50317","listener":"http","method":"CONNECT","host":"acct3.blob.core.windows.net","port":443,"dst_addr":null,"decision":"deny","rule":null,"reason":"no_rule","prev":"PREV"}
{"ts":"2025-10-20T08:18:00.000Z","event":"decision","id":8,"client":"10.0.0.4:50318","listener":"http","method":"GET","host":"example.com","port":80,"dst_addr":"93.184.215.14:80","decision":"allow","rule":"open","reason":null,"prev":"PREV"}
{"ts":"2025-10-20T08:19:00.000Z","event":"decision","id":9,"client":"10.0.0.4:50319","listener":"http","method":"CONNECT","host":"git.example.com","port":22,"dst_addr":null,"decision":"deny","rule":"open","reason":"port_not_allowed","prev":"PREV"}
{"ts":"2025-10-20T08:20:00.000Z","event":"decision","id":10,"client":"10.0.0.4:50320","listener":"http","method":"CONNECT","host":"20.1.2.3","port":443,"dst_addr":null,"decision":"deny","rule":null,"reason":"no_rule","prev":"PREV"}
{"ts":"2025-10-20T08:21:00.000Z","event":"decision","id":11,"client":"10.0.0.4:50321","listener":"http","method":"CONNECT","host":"pypi.org","port":443,"dst_addr":null,"decision":"fail","rule":"open","reason":"resolve_failed","prev":"PREV"}
{"ts":"2025-10-20T08:22:00.000Z","event":"decision","id":12,"client":"10.0.0.4:50322","listener":"http","method":"GET","host":"/index.html","port":null,"dst_addr":null,"decision":"deny","rule":null,"reason":"bad_request","prev":"PREV"}
not a line the proxy wrote
"#;

#[test]
fn learn_drafts_a_policy_that_loads_and_allows_exactly_what_the_log_saw() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    std::fs::write(&log, RECORDED_LOG.replace("PREV", &"5e".repeat(32))).unwrap();
    let (code, draft, err) = run(&["learn", "--audit", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(draft.contains("\n  \"*.westus2.batch.azure.com\",\n"), "three names under one owner's suffix: {draft}");
    for account in ["acct1", "acct2", "acct3"] {
        assert!(draft.contains(&format!("\n  \"{account}.blob.core.windows.net\",\n")), "never a wildcard: {draft}");
    }
    assert!(draft.contains("\n#   20.1.2.3:443: 1 seen: 0 allowed, 1 denied [no_rule 1];"), "{draft}");
    assert!(
        draft.contains("# Read 15 lines: 10 decisions learned; skipped: 1 not JSON or not an audit line, 2 other events (close, chain_start), 1 decision with no host or port, 1 decision for IP destinations (below).\n"),
        "{draft}"
    );

    let cfg = dir.path().join("draft.toml");
    std::fs::write(&cfg, &draft).unwrap();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = run(&["validate", "--config", cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": 3 rules enabled, 0 disabled;"), "{out}");
    assert!(!out.contains("warning: rule"), "{out}");

    let seen = [
        "ml.azure.com:443",
        "a.westus2.batch.azure.com:443",
        "b.westus2.batch.azure.com:443",
        "c.westus2.batch.azure.com:443",
        "acct1.blob.core.windows.net:443",
        "acct2.blob.core.windows.net:443",
        "acct3.blob.core.windows.net:443",
        "example.com:80",
        "git.example.com:22",
        "pypi.org:443",
    ];
    let (code, out, _) = run(&[&["check", "--config", cfg][..], &seen[..]].concat());
    assert_eq!(code, 0, "{out}");
    let rules: Vec<String> = out.lines().map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).collect();
    let want: Vec<String> =
        seen.iter().map(|d| format!("allow {d} rule=learned-{}", d.rsplit(':').next().unwrap())).collect();
    assert_eq!(rules, want, "{out}");

    // (A sibling under the learned wildcard, x.westus2.batch.azure.com, is allowed: that is what
    // collapsing means. Under a shared suffix nothing is collapsed, so its sibling is not.)
    let unseen = [
        "ml.azure.com:80",
        "example.com:443",
        "git.example.com:443",
        "other.azure.com:443",
        "westus2.batch.azure.com:443",
        "a.eastus.batch.azure.com:443",
        "acct4.blob.core.windows.net:443",
        "blob.core.windows.net:443",
        "files.pythonhosted.org:443",
        "20.1.2.3:443",
    ];
    let (code, out, _) = run(&[&["check", "--config", cfg][..], &unseen[..]].concat());
    assert_eq!(code, 1, "{out}");
    let verdicts: Vec<&str> = out.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    assert_eq!(verdicts, ["deny"; 10], "{out}");
}

#[test]
fn learn_needs_a_readable_file_and_names_the_one_it_cannot_read() {
    let (code, out, err) = run(&["learn", "--audit", "/nonexistent/audit.jsonl"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.starts_with("/nonexistent/audit.jsonl: cannot read"), "{err}");
    let (code, _, err) = run(&["learn"]);
    assert_eq!(code, 2, "--audit is required: {err}");
    assert!(err.contains("--audit <FILE>"), "{err}");
}

#[test]
fn run_serves_reloads_on_sighup_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    let tags = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
    std::fs::write(
        &cfg,
        format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[service_tags]\nfile = {tags:?}\n[audit]\npath = \"audit.jsonl\"\n[[rule]]\nname = \"a\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\n"),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (mut addr, mut admin) = (None, None);
    let mut line = String::new();
    while (addr.is_none() || admin.is_none()) && stderr.read_line(&mut line).unwrap() > 0 {
        let bound = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next()).map(|a| a.to_string());
        if line.contains("listener=\"http\"") {
            addr = bound;
        } else if line.contains("listener=\"admin\"") {
            admin = bound;
        }
        line.clear();
    }
    let addr = addr.expect("the proxy logs its bound address");
    let admin = admin.expect("the proxy logs its admin address");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // The line was queued before the answer; the audit thread writes it a moment later.
    let started = Instant::now();
    loop {
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default();
        if audit.contains("\"reason\":\"no_rule\"") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the audit path is relative to the config file: {audit}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGHUP reloads even files that have not changed, which the file watcher (every 2 s) never
    // does: with the files as they are, one SIGHUP is exactly one reload, and only SIGHUP can
    // have made it.
    assert_eq!(successful_reloads(&admin), 0);
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    while successful_reloads(&admin) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(successful_reloads(&admin), 1);

    // SIGHUP reads the files again: a rule added to the file shows in /policy. (The watcher may
    // apply this change too, before or after the signal, so the count is not checked here.)
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}[[rule]]\nname = \"added\"\naction = \"allow\"\nhosts = [\"mcr.microsoft.com\"]\n"),
    )
    .unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    while !http_get(&admin, "/policy").contains("\"added\"") {
        assert!(started.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child if the test fails before it exits, so that no proxy outlives its test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `egress_proxy_config_reloads_total{result="success"}` from `/metrics` (absent until the first).
fn successful_reloads(admin: &str) -> u64 {
    let metrics = http_get(admin, "/metrics");
    let prefix = "egress_proxy_config_reloads_total{result=\"success\"} ";
    metrics.lines().find_map(|l| l.strip_prefix(prefix)).map_or(0, |n| n.trim().parse().unwrap())
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn service_tags_lists_tags_and_prefixes() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
    let (code, out, _) = run(&["service-tags", "--file", file]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "changeNumber 374 (Public), 23 tags");
    assert!(lines.contains(&"Storage.WestUS2 52"), "{out}");
    let (code, out, _) = run(&["service-tags", "--file", file, "storage.francecentral"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 17);
    assert!(out.lines().all(|l| l.starts_with("Storage.FranceCentral ")));
    let (code, _, err) = run(&["service-tags", "--file", file, "NoSuchTag"]);
    assert_eq!(code, 1);
    assert!(err.contains("no service tag \"NoSuchTag\""));
}

/// A `run` process on 127.0.0.1:0 with `config` (TOML), its stderr read into `stderr` as it
/// comes, so that only the pipes a test leaves alone can stall.
struct Running {
    child: KillOnDrop,
    addr: String,
    admin: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Running {
    fn start(config: &str, stdout: Stdio) -> Self {
        Self::start_with_nofile(config, stdout, None)
    }

    /// `start`, with the process's descriptor limit (soft and hard) set to `nofile` first.
    fn start_with_nofile(config: &str, stdout: Stdio, nofile: Option<u32>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p.toml");
        let tags = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[service_tags]\nfile = {tags:?}\n{config}"
            ),
        )
        .unwrap();
        let mut command = match nofile {
            // The shell's `ulimit -n` sets both limits, and then becomes the proxy.
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(stdout)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut addr, mut admin) = (None, None);
        let mut early = String::new();
        while addr.is_none() || admin.is_none() {
            let line = lines.next().expect("the proxy logs its bound addresses").unwrap();
            early.push_str(&line);
            early.push('\n');
            let bound = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next()).map(String::from);
            if line.contains("listener=\"http\"") {
                addr = bound;
            } else if line.contains("listener=\"admin\"") {
                admin = bound;
            }
        }
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(early));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Self { child: KillOnDrop(child), addr: addr.unwrap(), admin: admin.unwrap(), stderr, dir }
    }

    /// The status line and deny reason of one request, which must be answered within 10 s.
    fn ask(&self, req: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap_or_else(|e| panic!("the proxy did not answer {req:?}: {e}"));
        let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{resp:?}"));
        let reason = resp.lines().find_map(|l| l.strip_prefix("x-egress-deny-reason: ")).unwrap_or_default();
        (status, reason.to_string())
    }

    fn metric(&self, name: &str) -> f64 {
        let metrics = http_get(&self.admin, "/metrics");
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }
}

/// Makes the stdout pipe of a child as small as the kernel allows (one page), so that it fills
/// after a few lines.
fn shrink(stdout: &std::process::ChildStdout) {
    rustix::pipe::fcntl_setpipe_size(stdout, 4096).unwrap();
}

/// Enough refusals to fill a one-page pipe and the audit queue, with room to spare.
const TO_FILL: usize = egress_proxy::audit::QUEUE_LINES + 1_000;

#[test]
fn a_stalled_audit_stdout_refuses_new_connections_with_503_and_the_proxy_keeps_answering() {
    let mut proxy = Running::start("[audit]\npath = \"-\"\n", Stdio::piped());
    let mut stdout = proxy.child.0.stdout.take().unwrap();
    shrink(&stdout);
    let denied = "CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n";
    let mut answered = 0;
    let refused = loop {
        assert!(answered < TO_FILL, "no audit_unavailable after {answered} refusals with nobody reading the log");
        match proxy.ask(denied) {
            (403, reason) if reason == "no_rule" => answered += 1,
            other => break other,
        }
    };
    assert_eq!(refused, (503, "audit_unavailable".to_string()), "after {answered} lines");
    assert!(answered >= egress_proxy::audit::QUEUE_LINES, "the queue holds {answered} lines before it refuses");
    assert_eq!(proxy.ask(denied), (503, "audit_unavailable".into()), "still stalled: still refused");
    assert!(http_get(&proxy.admin, "/healthz").starts_with("HTTP/1.1 200"), "the admin server answers");
    let lost = proxy.metric("egress_proxy_audit_lines_lost_total");
    assert!(lost >= 2.0, "the refusals' own lines are lost: {lost}");
    let started = Instant::now();
    while !proxy.stderr.lock().unwrap().contains("Audit lines lost") {
        assert!(started.elapsed() < Duration::from_secs(10), "no report on stderr");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Someone reads the log again: the queue drains, and connections are decided again.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
    let started = Instant::now();
    while proxy.ask(denied) != (403, "no_rule".into()) {
        assert!(started.elapsed() < Duration::from_secs(20), "the proxy still refuses after the log drained");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").args(["-TERM", &proxy.child.0.id().to_string()]).status();
    let log = String::from_utf8(reader.join().unwrap()).unwrap();
    let reasons: Vec<&str> = log.lines().filter_map(|l| l.split("\"reason\":\"").nth(1)?.split('"').next()).collect();
    assert_eq!(reasons.iter().filter(|r| **r == "no_rule").count(), answered + 1, "every answered refusal was logged");
}

#[test]
fn with_on_stall_count_a_stalled_audit_stdout_keeps_serving_and_counts_the_lines_lost() {
    let mut proxy = Running::start("[audit]\npath = \"-\"\non_stall = \"count\"\n", Stdio::piped());
    let stdout = proxy.child.0.stdout.take().unwrap();
    shrink(&stdout);
    for _ in 0..TO_FILL {
        assert_eq!(proxy.ask("CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n"), (403, "no_rule".into()));
    }
    assert!(http_get(&proxy.admin, "/healthz").starts_with("HTTP/1.1 200"));
    let lost = proxy.metric("egress_proxy_audit_lines_lost_total");
    assert!(lost >= 900.0, "{lost} lines counted as lost");
    drop(stdout);
}

#[test]
fn sighup_reopens_the_audit_file_so_logrotate_can_rename_it() {
    let proxy = Running::start("[audit]\npath = \"audit.jsonl\"\n", Stdio::null());
    let (log, rotated) = (proxy.dir.path().join("audit.jsonl"), proxy.dir.path().join("audit.jsonl.1"));
    let denied = "CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n";
    let wait_for = |path: &std::path::Path, lines: usize| {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= lines {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} has fewer than {lines} lines: {text}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(proxy.ask(denied), (403, "no_rule".into()));
    wait_for(&log, 2);
    std::fs::rename(&log, &rotated).unwrap();
    assert!(Command::new("kill").args(["-HUP", &proxy.child.0.id().to_string()]).status().unwrap().success());
    let new = wait_for(&log, 1);
    assert!(new.starts_with("{\"ts\":") && new.contains("\"event\":\"chain_start\""), "{new}");
    assert_eq!(proxy.ask(denied), (403, "no_rule".into()));
    let new = wait_for(&log, 2);
    assert!(new.lines().nth(1).unwrap().contains("\"reason\":\"no_rule\""), "{new}");
    assert_eq!(std::fs::read_to_string(&rotated).unwrap().lines().count(), 2, "the old file got nothing more");
    let out = Command::new(BIN).args(["audit", "verify"]).arg(&rotated).arg(&log).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "intact: 4 lines in 2 files\n");
}

/// Sends a CONNECT on a new connection and reads the response head (up to 3 s): the status and
/// deny reason, and the stream, kept open by the caller while it wants the tunnel.
fn connect_via(proxy: &str, target: &str) -> (u16, String, std::net::TcpStream) {
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return (0, String::new(), s),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let reason = head.lines().find_map(|l| l.strip_prefix("x-egress-deny-reason: ")).unwrap_or_default();
    (status, reason.to_string(), s)
}

#[test]
fn out_of_descriptors_refuses_with_local_resources_backs_off_reports_not_ready_and_recovers() {
    // An origin that accepts and holds every connection.
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = origin.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in origin.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(s);
        }
    });
    let config = format!(
        "[audit]\npath = \"audit.jsonl\"\n[safety]\nallow_internal = [\"127.0.0.0/8\"]\n\
         [limits]\nrequest_head_timeout = \"60s\"\n\
         [[rule]]\nname = \"origin\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\nports = [{port}]\ntls_only = false\n"
    );
    let proxy = Running::start_with_nofile(&config, Stdio::null(), Some(64));
    let target = format!("127.0.0.1:{port}");
    let warned = |p: &Running| p.stderr.lock().unwrap().matches("Out of file descriptors").count();
    let started_warning = proxy.stderr.lock().unwrap().contains("need up to");
    assert!(started_warning, "the start-up check says the limits do not fit 64 descriptors");

    // Tunnels until the proxy has no descriptor left for an upstream socket.
    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() < 64, "64 descriptors cannot hold {} tunnels", open.len());
        match connect_via(&proxy.addr, &target) {
            (200, _, s) => open.push(s),
            other => break (other.0, other.1),
        }
    };
    let log = proxy.stderr.lock().unwrap().clone()
        + &std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap_or_default();
    assert_eq!(refused, (503, "local_resources".to_string()), "after {} tunnels: {log}", open.len());
    assert!(open.len() >= 10, "only {} tunnels held", open.len());

    // Clients that connect and say nothing take the last descriptors: accepts now fail.
    let mut silent: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&proxy.addr).unwrap()).collect();
    let readyz = http_get(&proxy.admin, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503"), "not ready while short of descriptors: {readyz}");
    std::thread::sleep(Duration::from_secs(3));
    assert!((1..=2).contains(&warned(&proxy)), "a few warnings, not one per failure: {}", warned(&proxy));

    // Everything closes: the proxy recovers by itself.
    open.clear();
    silent.clear();
    held.lock().unwrap().clear();
    let started = Instant::now();
    while !http_get(&proxy.admin, "/readyz").starts_with("HTTP/1.1 200") {
        assert!(started.elapsed() < Duration::from_secs(15), "not ready again after the connections closed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _, _tunnel) = connect_via(&proxy.addr, &target);
    assert_eq!(status, 200, "tunnels open again");
    let metrics = http_get(&proxy.admin, "/metrics");
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("egress_proxy_descriptor_shortages_total{at=\"dial\"}") >= 1.0, "{metrics}");
    let accepts = value("egress_proxy_descriptor_shortages_total{at=\"accept\"}");
    assert!((1.0..100.0).contains(&accepts), "accepts backed off rather than spun: {accepts} failures");
    let local = value("egress_proxy_decisions_total{decision=\"deny\",listener=\"http\",reason=\"local_resources\"");
    assert!(local >= 1.0, "the refusal is counted with its reason: {metrics}");
    let audit = std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"reason\":\"local_resources\""), "and audited");
}

//! The load client of `benches/side-by-side.sh`: egress-proxy beside other proxies, on loopback.
//!
//! A client reaches a TLS origin on 127.0.0.1 by one of three paths (`--mode`): `direct` (the
//! baseline), `connect` (an explicit proxy: CONNECT, then TLS inside) or `sni` (a transparent
//! proxy that forwards by the ClientHello's server name). Each test prints one JSON line:
//!
//! - `rate`: new tunnels per second, each TCP + CONNECT or SNI + a full TLS handshake + one GET
//! - `deny`: refusals per second for the denied name (a 403, or a closed connection in SNI mode)
//! - `bulk`: MB/s of the large file over `--conns` kept-alive tunnels
//! - `karps`: small GETs per second over `--conns` kept-alive tunnels
//! - `latency`: a new tunnel's setup time, then each GET's time on one kept-alive tunnel, unloaded
//! - `idle`: the proxy's resident memory with `--conns` idle tunnels open
//! - `rss`: the proxy's resident memory now
//!
//! With `--pid`, the proxy's CPU time (its whole process tree) over the test goes in the record.
//! Every loop stops at `--count` and at the end of its window, whichever comes first; every step
//! times out; only loopback addresses are dialled. `certs` writes the origin's certificates,
//! `table` the markdown tables (medians across runs) and `plot` an SVG.
#![allow(clippy::disallowed_methods)] // the client dials the origin or the proxy itself, by design

mod certs;
mod client;
mod procfs;
mod report;
mod svg;
mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use client::{Mode, Route};
use workloads::Load;

const USAGE: &str = "usage: loadgen rate|deny|bulk|karps|latency|idle|rss|certs|table|plot ... \
                     (`loadgen help`; run by benches/side-by-side.sh)";

#[derive(Parser)]
#[command(name = "loadgen", bin_name = "loadgen", about = "Load client of benches/side-by-side.sh (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// New tunnels per second (TCP + CONNECT/SNI + TLS handshake + one GET each).
    Rate(LoadArgs),
    /// Refusals per second for the denied name.
    Deny(LoadArgs),
    /// MB/s of `--path` over `--conns` kept-alive tunnels.
    Bulk(LoadArgs),
    /// Small GETs per second over `--conns` kept-alive tunnels.
    Karps(LoadArgs),
    /// Unloaded setup time of a new tunnel, and per-GET time on one kept-alive tunnel.
    Latency(LoadArgs),
    /// The proxy's RSS with `--conns` idle tunnels open (needs `--pid`).
    Idle(LoadArgs),
    /// The proxy's RSS now.
    Rss {
        #[arg(long)]
        target: String,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 1)]
        run: u32,
    },
    /// Write ca.pem, origin.pem and origin.key (for `localhost`) into DIR.
    Certs { dir: PathBuf },
    /// Markdown tables of the results (medians across runs).
    Table {
        /// Targets whose names start with this are ours; the others, but `direct`, are peers.
        #[arg(long, default_value = "egress-proxy")]
        ours: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// An SVG bar chart of the results.
    Plot {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "egress-proxy side by side")]
        title: String,
        #[arg(long, default_value = "egress-proxy")]
        ours: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct LoadArgs {
    /// The name the record carries (`direct`, `squid`, `egress-proxy` ...).
    #[arg(long)]
    target: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// What the client dials: the origin (direct) or the proxy. Loopback only.
    #[arg(long)]
    dial: SocketAddr,
    /// The CA that signed the origin's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// The allowed name, and the origin's port (CONNECT's authority).
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 18443)]
    port: u16,
    /// A name every proxy must refuse.
    #[arg(long, default_value = "blocked.example")]
    deny_host: String,
    #[arg(long, default_value = "/small")]
    path: String,
    /// Concurrent clients, tunnels or idle tunnels.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// At most this many operations (tunnels, refusals, GETs).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// The measuring window (and, for `idle`, the time allowed to open the tunnels), seconds.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// The proxy's process, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// `idle`: how long the tunnels stay open after the memory is read, seconds.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// The run number, carried into the record.
    #[arg(long, default_value_t = 1)]
    run: u32,
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 600.0))
}

fn main() -> ExitCode {
    // `cargo bench` runs every bench target with `--bench`: this one is a tool, not a benchmark.
    let first = std::env::args().nth(1);
    if first.as_deref().is_none_or(|a| a == "--bench") {
        eprintln!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let (test, args) = match cli.command {
        Command::Certs { dir } => {
            return match certs::write(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            };
        }
        Command::Table { ours, files } => {
            return match report::Results::load(&files, &ours) {
                Ok(r) => {
                    print!("{}", report::tables(&r));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        Command::Plot { out, title, ours, files } => {
            let written = report::Results::load(&files, &ours).and_then(|r| {
                std::fs::write(&out, svg::plot(&r, &title)).map_err(|e| format!("{}: {e}", out.display()))
            });
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            };
        }
        Command::Rss { target, pid, run } => {
            let rss = procfs::rss_kib(pid);
            println!("{}", serde_json::json!({"target": target, "test": "rss", "run": run, "rss_kib": rss}));
            return ExitCode::SUCCESS;
        }
        Command::Rate(a) => ("rate", a),
        Command::Deny(a) => ("deny", a),
        Command::Bulk(a) => ("bulk", a),
        Command::Karps(a) => ("karps", a),
        Command::Latency(a) => ("latency", a),
        Command::Idle(a) => ("idle", a),
    };
    let route = match Route::new(args.mode, args.dial, &args.host, args.port, &args.deny_host, &args.ca) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    if test == "deny" && args.mode == Mode::Direct {
        return fail("deny needs a proxy (--mode connect or sni)");
    }
    let load = Arc::new(Load {
        route,
        target: args.target,
        run: args.run,
        path: args.path,
        conns: args.conns.max(1),
        count: args.count,
        window: seconds(args.secs),
        pid: args.pid,
        hold: seconds(args.hold),
    });
    // Latency runs on one thread, so that a reply wakes the waiting task directly; the load tests
    // on two (this machine's cores; the proxy and the origin share them).
    let runtime = if test == "latency" {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(&e.to_string()),
    };
    let record = runtime.block_on(async move {
        match test {
            "rate" => workloads::rate(load, false).await,
            "deny" => workloads::rate(load, true).await,
            "bulk" => workloads::bulk(load).await,
            "karps" => workloads::karps(load).await,
            "latency" => workloads::latency(load).await,
            _ => workloads::idle(load).await,
        }
    });
    println!("{record}");
    eprintln!("{}", summary(&record));
    // Idle or aborted connections are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("loadgen: {msg}");
    ExitCode::from(2)
}

/// One line for a person watching the run.
fn summary(v: &serde_json::Value) -> String {
    let keys =
        ["per_sec", "mb_per_sec", "p50_us", "p99_us", "setup_p50_us", "kib_per_tunnel", "opened", "cpu_s", "err"];
    let mut s = format!("  {:<18} {:<8}", v["target"].as_str().unwrap_or("?"), v["test"].as_str().unwrap_or("?"));
    for k in keys {
        if let Some(n) = v[k].as_u64() {
            s.push_str(&format!(" {k}={n}"));
        } else if let Some(x) = v[k].as_f64() {
            s.push_str(&format!(" {k}={}", report::num(x)));
        }
    }
    if v["err"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!(" errors={}", v["errors"]));
    }
    s
}

//! egress-proxy: a default-deny forward proxy that lets out only what a policy allows, and says why.
//!
//! # Layout
//! - `policy`: the pure decision engine (hosts, patterns, ranges, built-in protections); no I/O.
//! - `tls`: sans-IO ClientHello reader (server name, ALPN, ECH); no I/O.
//! - `service_tags`: Azure Service Tags JSON → tag table; no I/O.
//! - `load`: config file + service-tag file → compiled policy; the one path used at start and reload.
//! - `config`: the only code that knows the TOML format; errors name file, line and field.
//! - `resolve`: `[resolve] static` pins, then DNS (hickory); returns every address.
//! - `proxy`: decide → resolve → check each address → `Permit` → `dial`; CONNECT, forwarding, tunnels.
//! - `server`: listeners, connection limits, graceful drain; `run` for the binary and for tests.
//! - `audit`: one JSON line per decision and per closed connection.
//! - `reload`: SIGHUP, file watch and `POST /reload` build a whole new policy, then swap it in.
//! - `refresh`: fetches Service Tags over HTTPS (ETag), validates, writes atomically, reloads.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/policy`, `/denied`, `POST /reload`.
//! - `nft`: the policy's packet-filter layer rendered as an nftables ruleset (gateway or sidecar).
//! - `metrics`: the Prometheus catalogue over an owned registry; moved by audit events.
//! - `denied`: bounded top-K of refused destinations for `/denied`.
//! - `time`: the one way times are written (RFC 3339, milliseconds) in audit lines and JSON.
//! - `cli`: the command line (`run`, `check`, `validate`); all printing lives here.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod denied;
pub mod load;
pub mod metrics;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod reload;
pub mod resolve;
pub mod server;
pub mod service_tags;
pub mod time;
pub mod tls;

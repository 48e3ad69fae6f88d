//! egress-proxy: a default-deny forward proxy that lets out only what a policy allows, and says why.
//!
//! # The path of a connection
//!
//! Every listener takes the same path, in `proxy/`:
//!
//! ```text
//! server   accept, within the connection limits (overall, per client)
//! detect   read a bounded prefix: the request head (hyper on the explicit listener, httparse on
//!          `plain`) or the ClientHello (`tls`), until a sans-IO parser says complete or refused
//! authorize  decide → resolve → check every address → Permit (only authorize.rs can build one)
//! dial     the only outbound connect; it takes a &Permit and times the connect
//! check    the tunnel's first bytes: a ClientHello, its SNI against the name decided, ECH
//! tunnel   splice (or copy) both ways, every byte through the connection's Meter
//! close    the CloseRecord writes the close line and the byte metrics
//! ```
//!
//! One `proxy::conn::Conn` per connection (per request on the explicit listener) writes each of
//! its audit lines and moves its metrics; no listener writes its own.
//!
//! # Layout
//! - `policy`: the pure decision engine (hosts, patterns, ranges, built-in protections); no I/O.
//! - `tls`: sans-IO ClientHello reader (server name, ALPN, ECH); no I/O.
//! - `policy::service_tags` (also `service_tags`): Azure Service Tags JSON → tag table; no I/O.
//! - `config`: the only code that knows the TOML format; errors name file, line and field.
//! - `load`: config file + service-tag file → compiled policy; the one path used at start and reload.
//! - `state`: what every connection shares; `State::apply` is the one writer of the policy in force.
//!   It owns the tunnels' splice-pipe pool (`proxy::tunnel::pipes`, a leaf that imports nothing
//!   of the proxy).
//! - `budgets`: each client's `upload_budget` window per rule, counted by the tunnels, asked by
//!   `authorize`; keyed by rule name so that a reload keeps the count.
//! - `dns`: the DNS filter on `[listen] dns`: answers only for names the policy could allow,
//!   through the proxy's own resolver and cache; audits and counts every question.
//! - `descriptors`: the descriptor limit raised and checked at start; the shortage record that
//!   refuses with `local_resources`, backs off accepts and makes `/readyz` not ready.
//! - `resolve`: `[resolve] static` pins, then DNS (hickory); returns every address.
//! - `proxy`: the path above: `detect`, `authorize`, `dial`, `conn`, `tunnel`, and the listeners
//!   that use them (`http` with `connect` and `forward`; `transparent`).
//! - `server`: takes bound listeners, accepts within the limits, drains on
//!   shutdown; the admin endpoints are served in the same tracker.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/policy`, `/denied`, `POST /reload`.
//! - `audit`: one JSON line per decision and per closed connection; moves the metrics with it;
//!   a bounded queue to one writer thread, so a stalled sink never holds up a connection; each
//!   line carries the hash of the one before (`audit::chain`).
//! - `metrics`: the Prometheus catalogue over an owned registry.
//! - `denied`: bounded top-K of refused destinations for `/denied`.
//! - `time`: the one way times are written (RFC 3339, milliseconds) in audit lines and JSON.
//! - `reload`: the reload triggers (SIGHUP, file watch, `POST /reload`); each ends in `State::apply`.
//! - `refresh`: fetches Service Tags over HTTPS (ETag), validates, writes atomically, reloads.
//! - `nft`: the policy's packet-filter layer rendered as an nftables ruleset (gateway or sidecar).
//! - `learn`: audit lines → a draft policy of what the log saw (`egress-proxy learn`); no I/O.
//! - `app`: the `run` command's wiring: bind, signals, reload triggers, refresh, `server::run`.
//! - `cli`: the command line (`run`, `check`, `validate`, `service-tags`, `nft`, `audit verify`,
//!   `learn`); all printing.
//! - `fuzz_logic` (hidden): the invariants the fuzz targets and `tests/fuzz_corpus.rs` check.
//!
//! Imports run one way: `cli` → `app` → `server` → `admin`/`proxy` → `state` → `policy`.

pub mod admin;
pub mod admission;
pub mod app;
pub mod audit;
pub mod budgets;
pub mod cli;
pub mod config;
pub mod denied;
pub mod descriptors;
pub mod dns;
#[doc(hidden)]
pub mod fuzz_logic;
pub mod learn;
pub mod load;
pub mod metrics;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod reload;
pub mod resolve;
pub mod server;
pub mod state;
pub mod time;
pub mod tls;

/// Kept at the crate root for users of the library: the tag table is the policy's input.
pub use policy::service_tags;

//! egress-proxy: a default-deny forward proxy that lets out only what a policy allows, and says why.
//!
//! # Layout
//! - `policy`: the pure decision engine (hosts, patterns, ranges, built-in protections); no I/O.
//! - `service_tags`: Azure Service Tags JSON → tag table; no I/O.
//! - `config`: the only code that knows the TOML format; errors name file, line and field.
//! - `cli`: the command line (`run`, `check`, `validate`); all printing lives here.

pub mod cli;
pub mod config;
pub mod policy;
pub mod service_tags;

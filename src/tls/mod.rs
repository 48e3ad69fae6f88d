//! TLS, read without decrypting: the ClientHello's server name, ALPN and ECH presence.
//! This directory never sees a socket.

pub mod client_hello;
pub mod server_hello;

pub use client_hello::{hello_records_len, parse, ClientHello, HelloError, Parsed, ECH_EXTENSIONS, MAX_HELLO_BYTES};

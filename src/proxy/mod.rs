//! The path of one connection, the same for every listener:
//!
//! accept (`server`) → detect (`detect`: a request head or a ClientHello, bounded, sans-IO
//! parsers) → authorize (`authorize`: decide → resolve → check every address → `Permit`) →
//! dial (`dial`: the only way out, and it takes a `Permit`) → check the tunnel's first bytes
//! (`detect::check_hello`) → tunnel (`tunnel`: splice or copy, every byte through the `Meter`) →
//! close. One `conn::Conn` per connection writes its every audit line and metric.
//!
//! - `http`: the explicit listener's hyper service; `connect` (CONNECT tunnels) and `forward`
//!   (absolute-form requests) serve what it validated.
//! - `transparent`: the `tls`, `plain` and `catch_all` listeners for redirected connections.
//! - `refusal`: every way to refuse, with its status and stable reason name.

pub mod authorize;
pub mod body;
pub mod conn;
pub mod connect;
pub mod detect;
pub mod dial;
pub mod forward;
pub mod head;
pub mod http;
pub mod prefixed;
pub mod refusal;
pub mod retry;
pub mod transparent;
pub mod tunnel;

pub use conn::ConnCx;
pub use refusal::Refusal;

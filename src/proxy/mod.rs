//! The path of one connection, the same for every listener:
//!
//! accept (`server`) → detect (`detect`: a request head or a ClientHello, bounded, sans-IO
//! parsers) → authorize (`authorize`: decide → resolve → check every address → `Permit`) →
//! dial (`dial`: the only way out, and it takes a `Permit`) → check the tunnel's first bytes
//! (`detect::check_hello`, then `retry::follow_retry`) → tunnel (`tunnel`: splice or copy,
//! every byte through the `Meter`) → close. One `conn::Conn` per connection writes its every
//! audit line and metric.
//!
//! - `http`: the explicit listener's hyper service; `connect` (CONNECT tunnels) and `forward`
//!   (absolute-form requests, and the `plain` listener's one request) serve what it validated.
//! - `transparent`: the `tls`, `plain` and `catch_all` listeners for redirected connections.
//! - `head`: the strict, sans-IO HTTP/1 request-head reader `detect` drives for `plain`.
//! - `retry`: follows a HelloRetryRequest to the second ClientHello, and checks it too.
//! - `prefixed`: replays bytes a detector read, as the start of the stream, to hyper.
//! - `read`: one read from a socket that clears its readiness when the read drained it.
//! - `refusal`: every way to refuse, with its status and stable reason name; `body`: the boxed
//!   response body.

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
pub mod read;
pub mod refusal;
pub mod retry;
pub mod transparent;
pub mod tunnel;

pub use conn::ConnCx;
pub use refusal::Refusal;

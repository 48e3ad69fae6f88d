//! `cargo fuzz run head`: the plain listener's request-head reader completes exactly at the end of
//! a head with no bare LF, obs-fold or second Host, never goes back over growing input, and names a
//! destination that re-parses (`egress_proxy::fuzz_logic::head`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egress_proxy::fuzz_logic::head(data);
});

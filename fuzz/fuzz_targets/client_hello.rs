//! `cargo fuzz run client_hello`: the ClientHello reader never panics, an `Ok` server name is a
//! valid, normalised host name, its answers over growing prefixes never go back, and it decides
//! within `MAX_HELLO_BYTES` (the checks are in `egress_proxy::fuzz_logic::client_hello`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egress_proxy::fuzz_logic::client_hello(data);
});

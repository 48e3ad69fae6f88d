//! `cargo fuzz run dns`: the DNS filter's query path before any I/O (`dns::screen`) and the
//! policy's name check on what it yields (`egress_proxy::fuzz_logic::dns`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egress_proxy::fuzz_logic::dns(data);
});

//! `cargo fuzz run config`: the config loader and compiler never panic, locate every error on a line
//! of the text, and compile what the file says (`egress_proxy::fuzz_logic::config`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egress_proxy::fuzz_logic::config(data);
});

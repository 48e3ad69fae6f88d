//! `cargo fuzz run host`: host names and destinations (`HostName::parse`, `Host::parse`,
//! `Destination::parse_authority`, `parse_host_port`, `parse_loose`) re-parse to themselves from
//! their display and agree with one another (`egress_proxy::fuzz_logic::host`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egress_proxy::fuzz_logic::host(data);
});

//! `cargo fuzz run client_hello`: the ClientHello reader never panics, and a server name it
//! returns is always a valid, normalised host name.
#![no_main]

use egress_proxy::policy::HostName;
use egress_proxy::tls::{parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Hello(hello)) = parse(data) {
        if let Some(sni) = hello.sni {
            assert_eq!(HostName::parse(sni.as_str()).as_ref(), Ok(&sni));
        }
    }
});

//! The transparent gateway across real network namespaces (tests/netns/gateway.sh): nftables
//! redirects, SO_ORIGINAL_DST, SNI decisions, mismatches, the catch-all and UDP. Needs root (CI
//! runs as root); without it the test fails with a message saying so, it never passes silently.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

#[test]
fn gateway_shape_across_network_namespaces() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test creates network namespaces and nftables rules: run it as root (CI does)"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/gateway.sh");
    let out = Command::new("bash").arg(script).arg(BIN).output().expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("netns gateway: 10 passed, 0 failed"), "{stdout}");
}

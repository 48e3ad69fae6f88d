//! The transparent gateway across real network namespaces (tests/netns/gateway.sh): nftables
//! redirects, SO_ORIGINAL_DST (IPv4 and IPv6), SNI decisions, mismatches, the catch-all and UDP. Needs root, so
//! it is ignored by a plain `cargo test`; CI runs it as root with `cargo test -- --include-ignored`.
//! Included without root, it fails with a message saying so: it never passes silently.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// Runs one namespace script and checks its summary line.
fn run_netns(script: &str, summary: &str) {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test creates network namespaces and nftables rules: run it as root (CI does)"
    );
    let path = format!("{}/tests/netns/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash").arg(path).arg(BIN).output().expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(summary), "{stdout}");
}

// One test, so that the two scripts never run at once.
#[test]
#[ignore = "needs root, ip netns and nft: run as root with `cargo test -- --include-ignored` (CI does)"]
fn gateway_and_sidecar_shapes_across_network_namespaces() {
    run_netns("gateway.sh", "netns gateway: 22 passed, 0 failed");
    run_netns("sidecar.sh", "netns sidecar: 11 passed, 0 failed");
}

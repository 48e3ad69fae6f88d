//! The committed nftables rulesets are exactly what `egress-proxy nft` renders from the preset,
//! and `nft -c` accepts them (which needs root: nft reads the kernel's ruleset over netlink
//! even to check a file, and an unprivileged user gets "Operation not permitted").

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");
const SHAPES: [&str; 2] = ["gateway", "sidecar"];

fn committed(shape: &str) -> String {
    format!("{}/deploy/nftables/{shape}.nft", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_rulesets_equal_the_rendered_ones() {
    for shape in SHAPES {
        let out = Command::new(BIN).args(["nft", "--shape", shape]).output().unwrap();
        assert!(out.status.success());
        let path = committed(shape);
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == String::from_utf8_lossy(&out.stdout),
            "{path} is stale: run `egress-proxy nft --shape {shape} > {path}`"
        );
    }
}

#[test]
#[ignore = "needs root and the nft binary: run as root with `cargo test -- --include-ignored` (CI does)"]
fn nft_accepts_the_committed_rulesets() {
    for shape in SHAPES {
        let path = committed(shape);
        let check = Command::new("nft")
            .args(["-c", "-f", &path])
            .output()
            .unwrap_or_else(|e| panic!("the nft binary is needed for this test (.ci/run installs nftables): {e}"));
        assert!(check.status.success(), "nft -c rejects {path}: {}", String::from_utf8_lossy(&check.stderr));
    }
}

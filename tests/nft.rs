//! The committed nftables rulesets are exactly what `egress-proxy nft` renders from the preset,
//! and `nft -c` accepts them.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

#[test]
fn committed_rulesets_equal_the_rendered_ones_and_nft_accepts_them() {
    for shape in ["gateway", "sidecar"] {
        let out = Command::new(BIN).args(["nft", "--shape", shape]).output().unwrap();
        assert!(out.status.success());
        let path = format!("{}/deploy/nftables/{shape}.nft", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == String::from_utf8_lossy(&out.stdout),
            "{path} is stale: run `egress-proxy nft --shape {shape} > {path}`"
        );
        let check = Command::new("nft")
            .args(["-c", "-f", &path])
            .output()
            .unwrap_or_else(|e| panic!("the nft binary is needed for this test (.ci/run installs nftables): {e}"));
        assert!(check.status.success(), "nft -c rejects {path}: {}", String::from_utf8_lossy(&check.stderr));
    }
}

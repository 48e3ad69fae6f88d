# Shared by the namespace tests. The caller sets PREFIX (namespace name prefix), NAMESPACES (the
# names after the prefix; one is "origin"), BIN and BIG_BYTES, then sources this file. It gives:
#   ns NAME CMD...     run CMD in namespace PREFIX-NAME
#   check NAME CMD...  count and print one check
#   origin ARGS...     start tests/netns/origin.py in the origin namespace, stopped at exit
#   ready ADDR         wait until the HTTPS origin at ADDR answers a real request
#   audit_has TEXT     the audit log contains TEXT (within 2 s: the audit thread writes a line
#                      a moment after it is queued)
# and creates the namespaces (loopback up), a self-signed certificate for ml.azure.com and
# evil.example.com ($work/cert.pem, key.pem), and $work/big of BIG_BYTES random bytes.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
chmod 755 "$work"
pids=()
passed=0
failed=0
ns() { local n="$1"; shift; ip netns exec "$PREFIX-$n" "$@"; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in $NAMESPACES; do ip netns del "$PREFIX-$n" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
check() {
  local name="$1"; shift
  if "$@"; then echo "ok     $name"; passed=$((passed + 1)); else echo "FAILED $name"; failed=$((failed + 1)); fi
}
# `ip netns exec` (not the `ns` function) in the background, so that $! is the process itself.
origin() { ip netns exec "$PREFIX-origin" python3 "$here/origin.py" "$@" >/dev/null 2>&1 & pids+=($!); }
ready() {
  for _ in $(seq 200); do
    ns origin curl -sk --max-time 1 "https://$1/" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "origin $1 did not start"; return 1
}
audit_has() {
  for _ in $(seq 40); do grep -q "$1" "$work/audit.jsonl" && return 0; sleep 0.05; done
  return 1
}

for n in $NAMESPACES; do
  ip netns del "$PREFIX-$n" 2>/dev/null || true
  ip netns add "$PREFIX-$n"
  ns "$n" ip link set lo up
done
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=egress-proxy-test \
  -addext "subjectAltName=DNS:ml.azure.com,DNS:evil.example.com" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
head -c "$BIG_BYTES" /dev/urandom > "$work/big"

#!/usr/bin/env bash
# benches/side-by-side.sh: egress-proxy beside other proxies, on loopback only.
#
# Starts a TLS origin (nginx) on 127.0.0.1:18443, then measures one target at a time: the direct
# path (no proxy), the peers (squid and tinyproxy as CONNECT proxies; haproxy, nginx stream and
# sniproxy as TLS pass-through by server name, from the templates in benches/peers/) and
# egress-proxy with benches/anchors.toml, through CONNECT (127.0.0.1:3128) and through its
# transparent tls listener (127.0.0.1:3443). Every proxy allows only `localhost` and must refuse
# `blocked.example`. The client is benches/loadgen (its doc says what each test measures).
#
# Writes the records to target/side-by-side/, the section of BENCHMARKS.md between the
# side-by-side markers, and benches/side-by-side.svg. A run takes about 4 minutes; --runs 3
# about 12; every client call is bounded, and every process started here is stopped at the end.
#
# Usage: benches/side-by-side.sh [--install] [--runs N] [--peers LIST] [--quick] [--idle N] [--no-docs]
#   --install     apt-get install the peers first (squid tinyproxy haproxy nginx
#                 libnginx-mod-stream sniproxy), then go on
#   --runs N      N passes over every target, interleaved; the tables give medians (default 1)
#   --peers LIST  comma list of squid,tinyproxy,haproxy,nginx,sniproxy (default: all);
#                 `none` measures egress-proxy and the direct path only
#   --quick       halve the measuring windows
#   --idle N      idle tunnels for the memory figure (default 1000; needs ulimit -n >= 2N + 1024)
#   --no-docs     leave BENCHMARKS.md and benches/side-by-side.svg as they are
#   --netns       measure in a network namespace of its own (unshare -n, root), whose loopback has
#                 none of the host's listeners: for when a port used here is taken on the host
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS_DIR="$ROOT/benches/peers"
OUT="$ROOT/target/side-by-side"
DIR="$OUT/work"  # certificates, content, rendered configs, logs
COMMAND="benches/side-by-side.sh${*:+ $*}"
ARGS=("$@")

ORIGIN_PORT=18443 # benches/anchors.toml steers unredirected TLS to this port
ALL_PEERS="squid,tinyproxy,haproxy,nginx,sniproxy"
declare -A PORT=([squid]=13128 [tinyproxy]=18888 [haproxy]=14443 [nginx]=15443 [sniproxy]=16443
  [egress-proxy]=3128 [egress-proxy-sni]=3443)
declare -A MODE=([squid]=connect [tinyproxy]=connect [haproxy]=sni [nginx]=sni [sniproxy]=sni
  [egress-proxy]=connect [egress-proxy-sni]=sni)
LARGE_MIB=64

# Windows (s), concurrency and counts. Every loadgen call stops at its count or its window.
W_LAT=2 W_RATE=4 W_BULK=3 W_KA=3 W_DENY=2 IDLE_OPEN=20 IDLE_HOLD=1
C_RATE=64 C_BULK=32 C_KA=32 C_DENY=64
N_LAT=50000 N_RATE=200000 N_BULK=100000 N_KA=2000000 N_DENY=400000
CALL_LIMIT=90 # seconds; a hard stop for any single loadgen call

runs=1 peers=$ALL_PEERS install=0 docs=1 idle=1000 netns=0
usage() { sed -n '2,/^set -uo/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install=1; shift ;;
    --runs) runs="$2"; shift 2 ;;
    --peers) peers="$2"; shift 2 ;;
    --quick) W_LAT=1 W_RATE=2 W_BULK=1.5 W_KA=1.5 W_DENY=1 IDLE_HOLD=0.5; shift ;;
    --idle) idle="$2"; shift 2 ;;
    --no-docs) docs=0; shift ;;
    --netns) netns=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[ "$peers" = all ] && peers=$ALL_PEERS
[ "$peers" = none ] && peers=""
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "--runs wants a positive number" >&2; exit 2; }
[[ "$idle" =~ ^[0-9]+$ ]] || { echo "--idle wants a number" >&2; exit 2; }
for p in ${peers//,/ }; do
  [ -n "${PORT[$p]:-}" ] && [ "$p" != egress-proxy ] && [ "$p" != egress-proxy-sni ] ||
    { echo "unknown peer $p (known: $ALL_PEERS)" >&2; exit 2; }
done

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

INSIDE_NETNS=${SIDE_BY_SIDE_NETNS:-0}
if [ "$install" = 1 ] && [ "$INSIDE_NETNS" = 0 ]; then
  say "installing the peers (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq &&
    apt-get install -y -qq --no-install-recommends squid tinyproxy haproxy nginx libnginx-mod-stream sniproxy \
      iproute2 procps util-linux >/dev/null ||
    { echo "apt-get failed" >&2; exit 1; }
fi
for tool in nginx ss taskset timeout; do
  command -v "$tool" >/dev/null || { echo "missing $tool (try --install)" >&2; exit 1; }
done

# ------------------------------------------------------------------ build
# The executables' paths come from cargo itself, so CARGO_TARGET_DIR is honoured.
executable() { grep '"reason":"compiler-artifact"' | grep "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4; }
cd "$ROOT" || exit 1
say "building egress-proxy (cargo build --release) and the load client (cargo bench --no-run)"
EP=$(cargo build --release --bin egress-proxy --message-format=json | executable egress-proxy)
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json | executable loadgen)
[ -x "$EP" ] && [ -x "$LOADGEN" ] || { echo "build failed" >&2; exit 1; }

if [ "$netns" = 1 ] && [ "$INSIDE_NETNS" = 0 ]; then
  # Installed and built above (the namespace has no network); the same command again, inside.
  command -v unshare >/dev/null && command -v ip >/dev/null || { echo "--netns needs unshare and ip" >&2; exit 1; }
  say "entering a network namespace of its own"
  exec unshare --net -- env SIDE_BY_SIDE_NETNS=1 CARGO_NET_OFFLINE=true \
    bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "${ARGS[@]}"
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
[ "$NOFILE" -ge $((2 * idle + 1024)) ] || { echo "--idle $idle needs ulimit -n >= $((2 * idle + 1024)), have $NOFILE" >&2; exit 1; }
MAXCONN=$((NOFILE / 2 - 100)) # a proxied connection holds two descriptors

# ------------------------------------------------------------------ files
mkdir -p "$DIR/www" "$DIR/logs" "$DIR/run" "$DIR/tmp"
# The peers drop root (squid to proxy, tinyproxy to its user, nginx's workers to nobody).
chmod 1777 "$DIR/logs" "$DIR/run" "$DIR/tmp"
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS="$OUT/results-$STAMP.jsonl"
[ -s "$DIR/ca.pem" ] && [ -s "$DIR/origin.key" ] || "$LOADGEN" certs "$DIR" || exit 1
if [ "$(stat -c %s "$DIR/www/large" 2>/dev/null)" != $((LARGE_MIB * 1048576)) ]; then
  head -c $((LARGE_MIB * 1048576)) /dev/urandom >"$DIR/www/large"
fi
chmod 644 "$DIR/www/large" "$DIR/origin.pem" "$DIR/ca.pem"
printf '^localhost$\n' >"$DIR/tinyproxy-allow.txt"
render() { # template -> $DIR/name, with its port
  sed -e "s|@DIR@|$DIR|g" -e "s|@PORT@|${2:-0}|g" -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" -e "s|@NOFILE@|$NOFILE|g" \
    -e "s|@MAXCONN@|$MAXCONN|g" -e "s|@LARGE_MIB@|$LARGE_MIB|g" "$PEERS_DIR/$1.in" >"$DIR/$1"
}

# ------------------------------------------------------------------ processes
STARTED=()
# A running child of this script: its parent is this shell and it is not a zombie (so never a
# recycled pid, nor anyone else's process).
mine() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086 # the fields, split on purpose
  set -- $s
  [ "$2" = "$$" ] && [ "$1" != Z ]
}
stop() {
  local pid=$1 i
  mine "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 50; i++)); do mine "$pid" || break; sleep 0.1; done
  mine "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do stop "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
start() { # log command... -> BG (pid)
  local log=$1
  shift
  "$@" >"$log" 2>&1 </dev/null &
  BG=$!
  STARTED+=("$BG")
}
listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
await_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do listening "$1" && return 0; sleep 0.1; done
  return 1
}
tree() { # pid -> it and its descendants
  local all=("$1") i=0 kid
  while [ "$i" -lt "${#all[@]}" ]; do
    for kid in $(ps -o pid= --ppid "${all[$i]}" 2>/dev/null); do all+=("$kid"); done
    i=$((i + 1))
  done
  echo "${all[@]}"
}
pin() { # cpus pid... : every thread of every process in their trees
  local cpus=$1 p t
  shift
  for p in "$@"; do
    for t in $(tree "$p"); do taskset -a -p -c "$cpus" "$t" >/dev/null 2>&1; done
  done
}
ALL_CPUS="0-$(($(nproc) - 1))"
# Noise: CPU ticks the whole machine spent (user, nice, system) against those of this script and
# every process it started and reaped (its children's times count once they have been waited for).
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4; exit}' /proc/stat; }
own_ticks() {
  local s
  s=$(cat "/proc/$$/stat")
  s=${s##*) }
  # shellcheck disable=SC2086 # the fields, split on purpose
  set -- $s
  echo $((${12} + ${13} + ${14} + ${15}))
}

# ------------------------------------------------------------------ versions, machine
pkg() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null; }
version_of() {
  case "$1" in
    squid) squid -v 2>/dev/null | head -1 | sed 's/.*Version //' ;;
    tinyproxy) tinyproxy -v 2>/dev/null | awk '{print $2}' ;;
    haproxy) haproxy -v 2>/dev/null | head -1 | awk '{print $3}' ;;
    nginx) nginx -v 2>&1 | sed 's|.*nginx/||' ;;
    sniproxy) sniproxy -V 2>&1 | head -1 | awk '{print $2}' ;;
  esac
}
REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock benches/anchors.toml 2>/dev/null)" ] &&
  REV="$REV with uncommitted changes"
VERSIONS="egress-proxy $REV ($("$EP" --version | awk '{print $2}'), release build)"
for p in ${peers//,/ }; do
  v=$(version_of "$p")
  VERSIONS="$VERSIONS; $p ${v:-not installed}${v:+ (Debian $(pkg "$p"))}"
done
[[ ",$peers," == *,nginx,* ]] || VERSIONS="$VERSIONS; nginx $(version_of nginx) (the origin)"
MACHINE="$(nproc) cores ($(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)), \
$(awk '/MemTotal/{printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r)"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "versions: $VERSIONS" >"$OUT/about-$STAMP.txt"
echo "machine: $MACHINE; load average before: $LOAD_BEFORE" >>"$OUT/about-$STAMP.txt"
say "$VERSIONS"

# ------------------------------------------------------------------ measuring
NOT_MEASURED=()
lg() { # test args... -> one record appended to the results
  local test=$1
  shift
  timeout -k 5 "$CALL_LIMIT" "$LOADGEN" "$test" "$@" >>"$RESULTS" ||
    echo "   (loadgen $test exited $?)" >&2
}
measure() { # target mode dial-address [pid]
  local target=$1 mode=$2 dial=$3 pid=${4:-}
  local common=(--target "$target" --mode "$mode" --dial "$dial" --ca "$DIR/ca.pem" --port "$ORIGIN_PORT" --run "$pass")
  [ -n "$pid" ] && common+=(--pid "$pid")
  say "pass $pass/$runs: $target ($mode, $dial)"
  # Per-request latency with every process of the path on CPU 0: the path's own cost, without
  # the wake-ups across cores that would otherwise dominate it on a small VM.
  pin 0 "$ORIGIN_PID" ${pid:+"$pid"}
  timeout -k 5 "$CALL_LIMIT" taskset -c 0 "$LOADGEN" latency "${common[@]}" --secs "$W_LAT" --count "$N_LAT" >>"$RESULTS" ||
    echo "   (loadgen latency exited $?)" >&2
  pin "$ALL_CPUS" "$ORIGIN_PID" ${pid:+"$pid"}
  if [ -n "$pid" ] && [ "$idle" -gt 0 ]; then
    lg idle "${common[@]}" --conns "$idle" --secs "$IDLE_OPEN" --hold "$IDLE_HOLD"
    sleep 0.5
  fi
  lg rate "${common[@]}" --conns "$C_RATE" --count "$N_RATE" --secs "$W_RATE"
  lg bulk "${common[@]}" --path /large --conns 1 --count "$N_BULK" --secs "$W_BULK"
  lg bulk "${common[@]}" --path /large --conns "$C_BULK" --count "$N_BULK" --secs "$W_BULK"
  lg karps "${common[@]}" --conns "$C_KA" --count "$N_KA" --secs "$W_KA"
  [ "$mode" != direct ] && lg deny "${common[@]}" --conns "$C_DENY" --count "$N_DENY" --secs "$W_DENY"
  [ -n "$pid" ] && timeout 10 "$LOADGEN" rss --target "$target" --pid "$pid" --run "$pass" >>"$RESULTS"
  sleep 0.5
}
start_target() { # name -> BG, or 1 when it cannot start
  local name=$1 port=${PORT[$1]}
  if listening "$port"; then
    echo "   port $port is taken by a process this script did not start: $name not measured" >&2
    return 1
  fi
  case "$name" in
    squid)
      command -v squid >/dev/null || return 1
      render squid.conf "$port"
      start "$DIR/logs/squid.out" squid -N -f "$DIR/squid.conf" ;;
    tinyproxy)
      command -v tinyproxy >/dev/null || return 1
      render tinyproxy.conf "$port"
      start "$DIR/logs/tinyproxy.out" tinyproxy -d -c "$DIR/tinyproxy.conf" ;;
    haproxy)
      command -v haproxy >/dev/null || return 1
      render haproxy.cfg "$port"
      start "$DIR/logs/haproxy.out" haproxy -db -f "$DIR/haproxy.cfg" ;;
    nginx)
      [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || return 1
      render nginx-stream.conf "$port"
      start "$DIR/logs/nginx-stream.out" nginx -p "$DIR" -e "$DIR/logs/nginx-stream-error.log" -c "$DIR/nginx-stream.conf" ;;
    sniproxy)
      command -v sniproxy >/dev/null || return 1
      render sniproxy.conf "$port"
      start "$DIR/logs/sniproxy.out" sniproxy -f -c "$DIR/sniproxy.conf" ;;
    egress-proxy | egress-proxy-sni)
      # One process per mode, so that each starts fresh (its idle-memory figure too).
      for p in "${PORT[egress-proxy]}" "${PORT[egress-proxy-sni]}" 9901; do
        listening "$p" && { echo "   port $p is taken: $name not measured" >&2; return 1; }
      done
      # Its audit log (the path benches/anchors.toml names) grows by about 1 GB a full run:
      # each start begins a new one.
      rm -f /tmp/egress-proxy-bench-audit.jsonl
      start "$DIR/logs/$name.out" "$EP" run --config "$ROOT/benches/anchors.toml" ;;
  esac
  await_port "$port" 15 || {
    echo "   $name did not start; see $DIR/logs/$name*" >&2
    stop "$BG"
    return 1
  }
  sleep 0.3
}

# ------------------------------------------------------------------ the run
listening "$ORIGIN_PORT" && { echo "port $ORIGIN_PORT is in use" >&2; exit 1; }
render origin-nginx.conf
start "$DIR/logs/origin.out" nginx -p "$DIR" -e "$DIR/logs/origin-error.log" -c "$DIR/origin-nginx.conf"
ORIGIN_PID=$BG
await_port "$ORIGIN_PORT" 10 || { echo "the origin did not start:" >&2; cat "$DIR/logs/origin"* >&2; exit 1; }
: >"$RESULTS"
T0=$(date +%s)
MACHINE0=$(machine_ticks) OWN0=$(own_ticks)
IFS=, read -ra targets <<<"$peers"
targets+=(egress-proxy egress-proxy-sni)
for ((pass = 1; pass <= runs; pass++)); do
  measure direct direct "127.0.0.1:$ORIGIN_PORT"
  # Each pass starts one target further along, so that no target always comes first.
  n=${#targets[@]}
  for ((k = 0; k < n; k++)); do
    name=${targets[$(((k + pass - 1) % n))]}
    if start_target "$name"; then
      pid=$BG
      measure "$name" "${MODE[$name]}" "127.0.0.1:${PORT[$name]}" "$pid"
      stop "$pid"
    else
      [[ " ${NOT_MEASURED[*]} " == *" $name "* ]] || NOT_MEASURED+=("$name")
    fi
  done
done
stop "$ORIGIN_PID"
ELAPSED=$(($(date +%s) - T0))
OTHERS=$(awk -v m=$(($(machine_ticks) - MACHINE0)) -v o=$(($(own_ticks) - OWN0)) -v hz="$(getconf CLK_TCK)" \
  -v cap="$((ELAPSED * $(nproc)))" 'BEGIN { x = (m - o) / hz; if (x < 0) x = 0; printf "%.0f", 100 * x / (cap > 0 ? cap : 1) }')
say "measured in $ELAPSED s; other processes used about $OTHERS % of the machine meanwhile; records: $RESULTS"
echo "measured in $ELAPSED s; other processes used about $OTHERS % of the machine's CPU meanwhile" >>"$OUT/about-$STAMP.txt"

TABLES=$("$LOADGEN" table "$RESULTS") || exit 1
echo "$TABLES"
[ "$docs" = 1 ] || exit 0

# ------------------------------------------------------------------ BENCHMARKS.md and the plot
DATE=$(date -u +%Y-%m-%d)
"$LOADGEN" plot --out "$ROOT/benches/side-by-side.svg" \
  --title "egress-proxy side by side: $DATE, $(nproc) cores, loopback, $runs run(s)" "$RESULTS" || exit 1
SECTION="$OUT/section-$STAMP.md"
{
  echo "<!-- side-by-side:begin -->"
  echo "## Side by side: \`benches/side-by-side.sh\`"
  echo
  echo "Written by \`$COMMAND\` on $DATE (measuring took $ELAPSED s); every run rewrites this section."
  echo "\`benches/side-by-side.sh --install\` once installs the peers; \`benches/side-by-side.sh --runs 3\` gives medians of three interleaved runs."
  echo
  echo "- Machine: $MACHINE. The client, the origin and the proxy share the cores; everything is on 127.0.0.1$(
    [ "$netns" = 1 ] && echo ", in a network namespace of the run's own (\`--netns\`)")."
  echo "  Load average before the run: $LOAD_BEFORE; processes other than this benchmark's used about $OTHERS % of the machine's CPU during it$([ "$OTHERS" -ge 10 ] && echo ": the figures are disturbed")."
  echo "- Versions: $VERSIONS."
  [ "${#NOT_MEASURED[@]}" -gt 0 ] && echo "- Not measured (not installed, or did not start): ${NOT_MEASURED[*]}."
  echo "- Each proxy allows only \`localhost\` (the origin, nginx with TLS on 127.0.0.1:$ORIGIN_PORT) and refuses \`blocked.example\`:"
  echo "  squid and tinyproxy as CONNECT proxies, haproxy, nginx (stream) and sniproxy as TLS pass-through by server name"
  echo "  (\`benches/peers/\`), egress-proxy with \`benches/anchors.toml\` through CONNECT (\`egress-proxy\`) and through its"
  echo "  transparent tls listener (\`egress-proxy-sni\`); in both modes it also reads and checks the ClientHello and writes"
  echo "  hash-chained audit lines to a file."
  echo "- New tunnels: $C_RATE clients, each tunnel a TCP connection, CONNECT or SNI, a full TLS handshake and one small GET."
  echo "  Setup: one such tunnel at a time. Bulk: a $LARGE_MIB MiB file, GET after GET, MB = 10^6 bytes. Kept-alive: small GETs on"
  echo "  $C_KA tunnels. Added µs: a small GET on one kept-alive tunnel, everything pinned to one core, against the direct path."
  echo "  Idle: resident memory of the proxy's processes with $idle idle tunnels open. Refusals: $C_DENY clients asking for the"
  echo "  denied name (a 403, or a closed connection in SNI mode). CPU: the proxy's user + system time, all its processes,"
  echo "  during each test."
  echo
  echo "$TABLES"
  echo
  echo "![egress-proxy side by side](benches/side-by-side.svg)"
  echo
  echo "The records are in \`target/side-by-side/results-*.jsonl\`; \`loadgen table FILE...\` (the binary \`cargo bench --bench loadgen --no-run\` builds) prints these tables from any of them."
  echo "<!-- side-by-side:end -->"
} >"$SECTION"
DOC="$ROOT/BENCHMARKS.md"
[ -e "$DOC" ] || printf '# Benchmarks\n' >"$DOC"
if grep -q '^<!-- side-by-side:begin -->' "$DOC" && grep -q '^<!-- side-by-side:end -->' "$DOC"; then
  awk -v section="$SECTION" '
    /^<!-- side-by-side:begin -->/ { while ((getline line < section) > 0) print line; skipping = 1; next }
    /^<!-- side-by-side:end -->/ && skipping { skipping = 0; next }
    !skipping { print }' "$DOC" >"$DOC.new"
else
  # First time: before the first second-level heading, or at the end.
  awk -v section="$SECTION" '
    /^## / && !done { while ((getline line < section) > 0) print line; print ""; done = 1 }
    { print }
    END { if (!done) { print ""; while ((getline line < section) > 0) print line } }' "$DOC" >"$DOC.new"
fi
mv "$DOC.new" "$DOC"
say "rewrote the side-by-side section of BENCHMARKS.md and benches/side-by-side.svg"

#!/usr/bin/env bash
# Validates everything under deploy/: run as root on Debian bookworm (CI does: `bash deploy/check.sh`).
#
# Installs what it needs when it is missing (Debian: systemd, prometheus for promtool, python3,
# python3-venv; PyPI: kubernetes-validate in a virtualenv under ~/.cache), then checks:
#   systemd      systemd-analyze verify and an offline `systemd-analyze security` score of both units
#   kubernetes   every manifest against the Kubernetes schemas (kubernetes-validate, strict), plus the
#                cross-references and security settings schemas cannot see (deploy/check.py); the
#                kustomize build too, where kubectl is installed
#   policies     the Kubernetes policies with `egress-proxy validate`, where a built binary exists
#   prometheus   promtool check config, check rules, and the alert unit tests (promtool test rules)
#   grafana      the dashboard's JSON and structure, and every metric, label and label value used by
#                the dashboard and the alerts against the product's documented metrics
#   container    a structural lint of the Dockerfile (no Docker engine or hadolint here)
# Every section runs; the script exits 1 if any check failed.
#
# Environment: EGRESS_PROXY_BIN=path/to/egress-proxy to validate the policies with a given binary
# (default: the newer of target/release and target/debug, else egress-proxy on PATH); this script
# never builds it, so run it after the build to get that section.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$here"
start=$SECONDS

# kubernetes-validate bundles the Kubernetes schemas it validates against; pinned so that a new
# release cannot change the verdict under us. Bump deliberately.
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
VENV="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/egress-proxy-deploy-check/venv"

say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }

# --- install ---------------------------------------------------------------------------------------

section "install"
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
apt_updated=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing from Debian: ${missing[*]}"
  # Note: the prometheus package also brings a Prometheus server unit; only promtool is used here.
  apt_install "${missing[@]}" ca-certificates
fi
if ! command -v promtool >/dev/null 2>&1; then
  say "FAIL: promtool is unavailable (Debian package prometheus): cannot check the Prometheus files"
  exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "FAIL: python3 >= 3.11 is needed (tomllib): $(python3 --version 2>&1)"
  exit 1
fi
if ! "$VENV/bin/python" -c 'import kubernetes_validate.version as v, yaml; import sys; sys.exit(v.__version__ != sys.argv[1])' \
    "${KUBERNETES_VALIDATE#*==}" >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    say "installing from Debian: python3-venv"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  say "installing from PyPI: $KUBERNETES_VALIDATE (into $VENV)"
  "$VENV/bin/pip" install --disable-pip-version-check -q "$KUBERNETES_VALIDATE"
fi
PY="$VENV/bin/python"
say "systemd-analyze: $(systemd-analyze --version | head -1)"
say "promtool:        $(promtool --version 2>&1 | head -1)"
say "python:          $("$PY" --version), $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -1)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/egress-proxy-deploy-check.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# --- the sections ---------------------------------------------------------------------------------

check_systemd() {
  # systemd-analyze verify insists that every Exec*= program exists. The proxy and nft are not
  # installed on a CI machine, so the units are verified inside a throwaway root ($tmp/root) that
  # holds copies of the units, the system's unit directory (for the targets they refer to), real
  # copies of the programs that exist here and two-line stub scripts standing in for
  # /usr/local/bin/egress-proxy and /usr/sbin/nft only. Nothing is placed outside $tmp, and the unit
  # files are checked as shipped.
  local root="$tmp/root" unit exe
  mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/bin"
  [ -e "$root/bin" ] || ln -s usr/bin "$root/bin"
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  cp systemd/egress-proxy.service systemd/egress-proxy-nftables.service "$root/etc/systemd/system/"
  for exe in $(sed -nE 's/^Exec[A-Za-z]*=[-@:+!]*([^ ]+).*/\1/p' systemd/*.service | sort -u); do
    case "$exe" in
      /usr/local/bin/egress-proxy | /usr/sbin/nft)
        mkdir -p "$root$(dirname "$exe")"
        printf '#!/bin/sh\nexit 0\n' >"$root$exe"
        chmod 0755 "$root$exe"
        say "  stub  $exe (exists only in the throwaway root)"
        ;;
      *)
        [ -x "$exe" ] || { say "  FAIL  $exe, used by a unit, is not on this machine"; return 1; }
        mkdir -p "$root$(dirname "$(readlink -f "$exe")")"
        cp -L "$exe" "$root$(readlink -f "$exe")"
        ;;
    esac
  done
  # --man=no: the units name man pages, and CI machines carry no man pages. verify exits 0 on
  # unknown keys and unparsable values (it only logs them), so any output at all is a failure.
  local verify
  if ! verify="$(systemd-analyze verify --man=no --root="$root" egress-proxy.service egress-proxy-nftables.service 2>&1)" \
      || [ -n "$verify" ]; then
    printf '%s\n' "$verify"
    say "  FAIL  systemd-analyze verify"
    return 1
  fi
  say "  ok    systemd-analyze verify: egress-proxy.service, egress-proxy-nftables.service (no warnings)"
  # Exposure scores (0 = locked down, 10 = unprotected). The proxy has no capability at all; the
  # nftables unit keeps CAP_NET_ADMIN and the host network, which is what it is for.
  for unit in egress-proxy.service:1.5 egress-proxy-nftables.service:2.5; do
    local name="${unit%:*}" limit="${unit#*:}" out
    if ! out="$(systemd-analyze security --offline=yes --root="$root" --threshold="${limit/./}" "$name" 2>&1)"; then
      printf '%s\n' "$out" | grep -E '✗|Overall' || true
      say "  FAIL  $name: exposure above $limit"
      return 1
    fi
    say "  ok    $name: $(printf '%s\n' "$out" | grep -o 'Overall exposure level.*' | sed 's/ *[^ ]*$//'), limit $limit"
  done
  # What the brief for these units requires, so that a later edit cannot quietly drop it.
  local want
  for want in "Type=exec" "Restart=on-failure" "ExecReload=/bin/kill -HUP \$MAINPID" "TimeoutStopSec=40s" \
      "DynamicUser=yes" "CapabilityBoundingSet=" "NoNewPrivileges=yes" "ProtectSystem=strict" \
      "ProtectHome=yes" "PrivateTmp=yes" "PrivateDevices=yes" "ProtectKernelTunables=yes" \
      "ProtectKernelModules=yes" "ProtectKernelLogs=yes" "ProtectControlGroups=yes" \
      "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK" "RestrictNamespaces=yes" \
      "LockPersonality=yes" "MemoryDenyWriteExecute=yes" "SystemCallFilter=@system-service" \
      "SystemCallArchitectures=native" "LimitNOFILE=65536" \
      "ExecStart=/usr/local/bin/egress-proxy run --config /etc/egress-proxy/policy.toml"; do
    grep -qxF -- "$want" systemd/egress-proxy.service || { say "  FAIL  egress-proxy.service lacks: $want"; return 1; }
  done
  for want in "Type=oneshot" "ExecStart=/usr/sbin/nft -f /etc/egress-proxy/gateway.nft" \
      "CapabilityBoundingSet=CAP_NET_ADMIN" "Before=network-pre.target egress-proxy.service shutdown.target"; do
    grep -qxF -- "$want" systemd/egress-proxy-nftables.service || { say "  FAIL  egress-proxy-nftables.service lacks: $want"; return 1; }
  done
  if grep -v '^#' systemd/egress-proxy.service | grep -q 'CAP_NET_ADMIN'; then
    say "  FAIL  egress-proxy.service grants CAP_NET_ADMIN"
    return 1
  fi
  say "  ok    units carry the required settings; only the nftables unit has CAP_NET_ADMIN"
}

check_kubernetes() {
  # kubernetes-validate has no schema for CustomResourceDefinitions such as the Prometheus
  # Operator's PodMonitor: check.py accepts a missing schema for that kind only, and checks it
  # structurally instead (fields, selector, port, jobLabel) against the pods it must scrape.
  local rendered=()
  if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize kubernetes >"$tmp/kustomize.yaml"
    kubectl kustomize kubernetes/workload-namespace >/dev/null
    say "  ok    kubectl kustomize builds kubernetes/ and kubernetes/workload-namespace/"
    rendered=("$tmp/kustomize.yaml")
  else
    say "  skip  kustomize build: kubectl is not installed (check.py emulates the build instead)"
  fi
  # The validator must reject what it should: a Deployment with an unknown field.
  cat >"$tmp/bad.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec: {containers: [{name: c, image: "i:1", readOnlyRootFilesytem: true}]}
EOF
  if "$VENV/bin/kubernetes-validate" --strict --quiet "$tmp/bad.yaml" >/dev/null 2>&1; then
    say "  FAIL  kubernetes-validate --strict accepted a misspelt field"
    return 1
  fi
  say "  ok    kubernetes-validate --strict rejects a misspelt field (self-test)"
  "$PY" check.py kubernetes kubernetes "${rendered[@]}"
}

check_policies() {
  local bin="${EGRESS_PROXY_BIN:-}" p
  if [ -z "$bin" ]; then
    # The newer of this checkout's builds (it matches the source), else an installed one.
    for p in "$repo/target/release/egress-proxy" "$repo/target/debug/egress-proxy"; do
      if [ -x "$p" ] && { [ -z "$bin" ] || [ "$p" -nt "$bin" ]; }; then bin="$p"; fi
    done
    [ -n "$bin" ] || bin="$(command -v egress-proxy 2>/dev/null || true)"
  fi
  if [ -z "$bin" ]; then
    say "  skip  no egress-proxy binary (set EGRESS_PROXY_BIN or build it): the policies' TOML was parsed by check.py only"
    return 0
  fi
  say "  using $bin ($(date -r "$bin" '+built %Y-%m-%d %H:%M'))"
  for p in gateway-policy node-policy; do
    mkdir -p "$tmp/$p"
    cp "kubernetes/$p.toml" "$tmp/$p/policy.toml"
    # The service-tag ConfigMap is created by the operator; the trimmed file the preset uses stands in.
    cp "$repo/config/servicetags-azureml.json" "$tmp/$p/servicetags.json"
    if ! "$bin" validate --config "$tmp/$p/policy.toml" >"$tmp/$p/out" 2>&1; then
      cat "$tmp/$p/out"
      say "  FAIL  egress-proxy validate kubernetes/$p.toml"
      return 1
    fi
    say "  ok    egress-proxy validate kubernetes/$p.toml"
  done
}

check_prometheus() {
  promtool check config prometheus/prometheus.yml
  promtool check rules prometheus/alerts.yml
  (cd prometheus && promtool test rules alerts_test.yml)
  local alert
  for alert in EgressProxyDown EgressProxyDenialsSpike EgressProxyConfigReloadFailing \
      EgressProxyServiceTagsStale EgressProxyAuditLinesLost; do
    grep -q "alert: $alert\$" prometheus/alerts.yml || { say "  FAIL  alerts.yml lacks $alert"; return 1; }
    grep -q "alertname: $alert\$" prometheus/alerts_test.yml || { say "  FAIL  alerts_test.yml does not test $alert"; return 1; }
  done
  say "  ok    every required alert exists and is unit-tested"
}

check_grafana() {
  "$PY" check.py grafana grafana/egress-proxy.json
  "$PY" check.py promql grafana/egress-proxy.json prometheus/alerts.yml
}

check_container() {
  "$PY" check.py dockerfile container/Dockerfile
}

check_readme() {
  local f missing=0
  for f in check.sh systemd/egress-proxy.service systemd/egress-proxy-nftables.service \
      kubernetes/kustomization.yaml kubernetes/workload-namespace container/Dockerfile \
      prometheus/prometheus.yml prometheus/alerts.yml grafana/egress-proxy.json; do
    grep -qF "$f" README.md || { say "  FAIL  README.md does not mention $f"; missing=1; }
  done
  [ "$missing" = 0 ] && say "  ok    README.md covers every part of deploy/"
  return "$missing"
}

# Each section runs in a subshell with errexit on, so that a failing command ends the section (and
# not the script): every section reports, then the script exits 1 if any failed.
failed=()
run() {
  local name="$1" t0=$SECONDS rc
  section "$name"
  set +e
  (set -euo pipefail; "check_$name")
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    say "-- $name: FAILED ($((SECONDS - t0))s)"
  else
    say "-- $name: passed ($((SECONDS - t0))s)"
  fi
}

run systemd
run kubernetes
run policies
run prometheus
run grafana
run container
run readme

section "result"
if [ "${#failed[@]}" -gt 0 ]; then
  say "deploy/check.sh: FAILED: ${failed[*]} ($((SECONDS - start))s)"
  exit 1
fi
say "deploy/check.sh: all sections passed ($((SECONDS - start))s)"

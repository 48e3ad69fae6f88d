#!/usr/bin/env python3
"""Checks of deploy/ that need a program rather than a one-line command; deploy/check.sh runs it.

    check.py kubernetes DIR [RENDERED.yaml]   the manifests, rendered as kustomize would, against the
                                              Kubernetes schemas (kubernetes-validate) plus the
                                              cross-references and security settings schemas miss
    check.py promql FILE...                   metric names, labels and label values in the PromQL of
                                              alert rule files (.yml) and Grafana dashboards (.json)
    check.py grafana FILE                     the dashboard's structure, and that it covers the brief
    check.py dockerfile FILE                  a structural lint of the Dockerfile

Needs PyYAML and kubernetes-validate (check.sh installs them in a virtualenv). Prints one line per
check; exits 1 on any failure.
"""

import json
import os
import re
import sys
import tomllib

import yaml

FAILED = []


def ok(msg):
    print(f"  ok    {msg}")


def fail(msg):
    print(f"  FAIL  {msg}")
    FAILED.append(msg)


def check(cond, msg):
    (ok if cond else fail)(msg)
    return cond


# --- the metrics the proxy exports (the product's documented list) --------------------------------

# name -> (type, labels, {label: allowed values})
METRICS = {
    "egress_proxy_decisions_total": ("counter", {"listener", "decision", "rule", "reason"},
                                     {"decision": {"allow", "deny", "fail"}}),
    "egress_proxy_bytes_total": ("counter", {"listener", "direction"}, {"direction": {"up", "down"}}),
    "egress_proxy_open_tunnels": ("gauge", {"listener"}, {}),
    "egress_proxy_upstream_connect_duration_seconds": ("histogram", {"listener"}, {}),
    "egress_proxy_tunnel_duration_seconds": ("histogram", {"listener"}, {}),
    "egress_proxy_dns_lookups_total": ("counter", set(), {}),
    "egress_proxy_dns_failures_total": ("counter", set(), {}),
    "egress_proxy_config_reloads_total": ("counter", {"result"}, {"result": {"success", "failure"}}),
    "egress_proxy_config_last_reload_success_timestamp_seconds": ("gauge", set(), {}),
    "egress_proxy_config_info": ("gauge", {"hash"}, {}),
    "egress_proxy_service_tags_change_number": ("gauge", set(), {}),
    "egress_proxy_service_tags_file_timestamp_seconds": ("gauge", set(), {}),
    "egress_proxy_service_tags_refreshes_total": ("counter", {"result"},
                                                  {"result": {"success", "failure", "not_modified"}}),
    "egress_proxy_audit_lines_total": ("counter", set(), {}),
    "egress_proxy_audit_lines_lost_total": ("counter", set(), {}),
}
# Labels that scraping adds (prometheus.yml, the PodMonitor's jobLabel, podTargetLabels, relabelings).
TARGET_LABELS = {"job", "instance", "component", "app_kubernetes_io_component", "namespace", "pod",
                 "container", "node", "endpoint"}
# Other series the rules and the dashboard may use.
OTHER_SERIES = {"up": set()}
# Reason values the product documents (decisions_total{reason}); others are allowed in the product,
# but a dashboard or rule filtering on a misspelt one would silently match nothing.
REASONS = {"no_rule", "denied_by_rule", "internal_address", "port_not_allowed", "source_not_allowed",
           "address_not_allowed", "invalid_host", "bad_request", "request_head_timeout",
           "connection_limit", "resolve_failed", "upstream_unreachable", "upstream_protocol_error",
           "upstream_timeout", ""}
METRICS["egress_proxy_decisions_total"][2]["reason"] = REASONS

NAME_RE = re.compile(r"\b(egress_proxy_[a-zA-Z0-9_]*)")
SELECTOR_RE = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
LABEL_VALUES_RE = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)?[^,()]*(?:\{[^}]*\})?\s*,?\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")


def base_metric(name):
    """The documented metric a series name belongs to, or None."""
    if name in METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if METRICS.get(base, ("",))[0] == "histogram":
                return base
    return None


def series_labels(name):
    base = base_metric(name)
    if base:
        labels = set(METRICS[base][1])
        if name.endswith("_bucket"):
            labels.add("le")
        return labels, METRICS[base][2]
    return OTHER_SERIES.get(name, set()), {}


def check_expr(where, expr, used):
    """Checks one PromQL expression; adds the documented metrics it uses to `used`."""
    problems = []
    for name in NAME_RE.findall(expr):
        base = base_metric(name)
        if base is None:
            problems.append(f"unknown metric {name}")
        else:
            used.add(base)
            if METRICS[base][0] == "histogram" and name == base:
                problems.append(f"{name} is a histogram: use {name}_bucket, _sum or _count")
    all_labels = set().union(*(m[1] for m in METRICS.values())) | TARGET_LABELS | {"le"}
    for name, body in SELECTOR_RE.findall(expr):
        if name in ("by", "without", "on", "ignoring", "group_left", "group_right"):
            continue
        if not (name.startswith("egress_proxy_") or name in OTHER_SERIES):
            problems.append(f"unexpected series {name}")
            continue
        labels, values = series_labels(name)
        pos = 0
        body = body.strip()
        while pos < len(body):
            m = MATCHER_RE.match(body, pos)
            if not m:
                problems.append(f"cannot read matchers {{{body}}}")
                break
            pos = m.end()
            label, op, value = m.groups()
            if label not in labels and label not in TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            if label in values and "$" not in value:
                alts = value.split("|") if op in ("=~", "!~") else [value]
                if op in ("=~", "!~") and re.search(r"[.*+?()\[\]{}^\\]", value):
                    continue  # a real regex: not checked
                for alt in alts:
                    if alt not in values[label]:
                        problems.append(f"{name}{{{label}}} is never {alt!r} (one of {sorted(values[label])})")
    for _, group in GROUPING_RE.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in all_labels:
                problems.append(f"grouping by unknown label {label}")
    for name, label in LABEL_VALUES_RE.findall(expr):
        labels, _ = series_labels(name) if name else (all_labels, {})
        if label not in labels and label not in TARGET_LABELS:
            problems.append(f"label_values: {name} has no label {label}")
    if "histogram_quantile" in expr:
        for m in re.finditer(r"histogram_quantile\(", expr):
            rest = expr[m.end():]
            if "_bucket" not in rest or not re.search(r"\bby\s*\([^)]*\ble\b", rest):
                problems.append("histogram_quantile needs a _bucket series aggregated by (le)")
    for p in problems:
        fail(f"{where}: {p}")
    return not problems


def promql_exprs_yaml(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            yield rule.get("alert") or rule.get("record"), rule["expr"]


def promql_exprs_grafana(dash):
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                yield f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            yield f"variable {v['name']}", q


def cmd_promql(paths):
    for path in paths:
        used = set()
        n = 0
        if path.endswith(".json"):
            with open(path) as f:
                exprs = list(promql_exprs_grafana(json.load(f)))
        else:
            exprs = list(promql_exprs_yaml(path))
        bad = 0
        for where, expr in exprs:
            n += 1
            bad += not check_expr(f"{path}: {where}", expr, used)
        check(n > 0 and bad == 0,
              f"{path}: {n} expressions use only documented metrics, labels and label values "
              f"({len(used)} metrics: {', '.join(sorted(m.removeprefix('egress_proxy_') for m in used))})")


# --- Grafana ----------------------------------------------------------------------------------------

def cmd_grafana(path):
    with open(path) as f:
        try:
            dash = json.load(f)
        except json.JSONDecodeError as e:
            fail(f"{path}: not JSON: {e}")
            return
    ok(f"{path}: valid JSON")
    check(dash.get("uid") and dash.get("title") and isinstance(dash.get("schemaVersion"), int),
          f"{path}: has uid, title and schemaVersion")
    flat = []

    def walk(ps):
        for p in ps:
            flat.append(p)
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    ids = [p.get("id") for p in flat]
    check(len(ids) == len(set(ids)) and None not in ids, f"{path}: {len(flat)} panels with unique ids")
    check(all("gridPos" in p for p in flat), f"{path}: every panel has a gridPos")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    bad_ds = [p.get("title") for p in flat if p.get("type") != "row"
              and (p.get("datasource") or {}).get("uid") != "${datasource}"]
    check("datasource" in variables and not bad_ds,
          f"{path}: every panel queries the $datasource variable" + (f" (not: {bad_ds})" if bad_ds else ""))
    refs = set(re.findall(r"\$(\w+)", json.dumps(dash)))
    refs -= {"__rate_interval", "__range", "__interval", "__all", "value", "labels"}
    check(refs <= variables, f"{path}: every $variable used is defined ({sorted(refs)})")
    exprs = " ".join(e for _, e in promql_exprs_grafana(dash))
    wanted = {
        "decisions by decision": r"by \([^)]*\bdecision\b[^)]*\)\s*\(rate\(egress_proxy_decisions_total",
        "decisions by reason": r"by \([^)]*\breason\b[^)]*\)\s*\(rate\(egress_proxy_decisions_total",
        "decisions by rule": r"by \([^)]*\brule\b[^)]*\)\s*\(increase\(egress_proxy_decisions_total",
        "bytes rate": r"rate\(egress_proxy_bytes_total",
        "open tunnels": r"egress_proxy_open_tunnels",
        "connect latency p50": r"histogram_quantile\(0\.5, [^;]*?egress_proxy_upstream_connect_duration_seconds_bucket",
        "connect latency p99": r"histogram_quantile\(0\.99, [^;]*?egress_proxy_upstream_connect_duration_seconds_bucket",
        "reloads": r"egress_proxy_config_reloads_total",
        "service-tag age": r"time\(\) - \w*\(?egress_proxy_service_tags_file_timestamp_seconds",
        "audit lines lost": r"egress_proxy_audit_lines_lost_total",
    }
    missing = [k for k, rx in wanted.items() if not re.search(rx, exprs)]
    check(not missing, f"{path}: has panels for {', '.join(wanted)}" + (f" (missing: {missing})" if missing else ""))


# --- Dockerfile ----------------------------------------------------------------------------------

def cmd_dockerfile(path):
    with open(path) as f:
        text = f.read()
    # Instructions, with line continuations joined and comments dropped.
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    stages = []  # [(from-line, [instructions])]
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append((rest.strip(), []))
        elif stages:
            stages[-1][1].append((word.upper(), rest.strip()))
    check(len(stages) >= 2, f"{path}: multi-stage ({len(stages)} stages)")
    names = []
    for frm, _ in stages:
        parts = frm.split()
        image = [p for p in parts if not p.startswith("--")][0]
        alias = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else None
        if image not in names:
            tag = image.split("@")[0].rsplit("/", 1)[-1]
            check(":" in tag and not tag.endswith(":latest") or "@sha256:" in image,
                  f"{path}: FROM {image} names a tag that is not latest")
        names.append(alias)
    first = stages[0][0].split()
    check(first[0] == "rust:1-bookworm" and first[-2:] == ["AS", "builder"], f"{path}: first stage is rust:1-bookworm AS builder")
    builder_runs = " ".join(r for i, r in stages[0][1] if i == "RUN")
    check(re.search(r"cargo build --release --locked\b", builder_runs) is not None,
          f"{path}: builder runs cargo build --release --locked")
    final_from, final = stages[-1]
    final_image = final_from.split()[0]
    check(final_image in ("gcr.io/distroless/cc-debian12:nonroot", "debian:bookworm-slim"),
          f"{path}: runtime image is distroless cc-debian12:nonroot or debian:bookworm-slim ({final_image})")
    users = [r for i, r in final if i == "USER"]
    check(bool(users) and users[-1].split(":")[0] not in ("root", "0"),
          f"{path}: runtime stage runs as a non-root USER ({users[-1] if users else 'none'})")
    check(any(i == "COPY" and "--from=builder" in r and r.endswith("/usr/local/bin/egress-proxy") for i, r in final),
          f"{path}: runtime copies the binary from the builder to /usr/local/bin/egress-proxy")
    exposed = set(" ".join(r for i, r in final if i == "EXPOSE").split())
    check({"3128", "9901"} <= exposed, f"{path}: EXPOSE 3128 9901")

    def exec_form(instr):
        vals = [r for i, r in final if i == instr]
        try:
            return json.loads(vals[-1]) if vals else None
        except json.JSONDecodeError:
            return "shell form"
    check(exec_form("ENTRYPOINT") == ["/usr/local/bin/egress-proxy"], f"{path}: ENTRYPOINT [\"/usr/local/bin/egress-proxy\"]")
    check(exec_form("CMD") == ["run"], f"{path}: CMD [\"run\"]")
    ignore = os.path.join(os.path.dirname(path), os.path.basename(path) + ".dockerignore")
    if check(os.path.exists(ignore), f"{path}: has {os.path.basename(ignore)}"):
        with open(ignore) as f:
            entries = {line.strip().strip("/") for line in f if line.strip() and not line.startswith("#")}
        check({"target", ".git"} <= entries, f"{ignore}: keeps target/ and .git out of the build context")


# --- Kubernetes -------------------------------------------------------------------------------------

PROXY_UID = 65532
POLICY_DIR = "/etc/egress-proxy"
EXTERNAL_CONFIGMAPS = {"egress-proxy-service-tags"}  # created outside the kustomization (README)
NFT_COMMAND = "egress-proxy nft --shape sidecar --config /etc/egress-proxy/policy.toml | nft -f -"
# PodMonitor (monitoring.coreos.com/v1) fields, from the Prometheus Operator's API reference. No
# schema for this CRD ships with kubernetes-validate, so this is a structural check only.
PODMONITOR_SPEC = {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector",
                   "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
                   "labelValueLengthLimit", "attachMetadata", "keepDroppedTargets", "scrapeProtocols",
                   "scrapeClass", "bodySizeLimit", "selectorMechanism", "fallbackScrapeProtocol"}
PODMONITOR_ENDPOINT = {"port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
                       "scrapeTimeout", "honorLabels", "honorTimestamps", "trackTimestampsStaleness",
                       "metricRelabelings", "relabelings", "proxyUrl", "followRedirects",
                       "enableHttp2", "filterRunning", "basicAuth", "oauth2", "authorization",
                       "bearerTokenSecret", "tlsConfig", "noProxy", "proxyFromEnvironment",
                       "proxyConnectHeader"}


def load_kustomization(d):
    path = os.path.join(d, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    check(k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and k.get("kind") == "Kustomization",
          f"{path}: a kustomize.config.k8s.io/v1beta1 Kustomization")
    resources = k.get("resources", [])
    files = {r for r in resources if not os.path.isdir(os.path.join(d, r))}
    missing = [r for r in resources if not os.path.exists(os.path.join(d, r))]
    check(not missing, f"{path}: every listed resource exists" + (f" (missing: {missing})" if missing else ""))
    on_disk = {f for f in os.listdir(d) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"}
    unlisted = sorted(on_disk - files)
    check(not unlisted, f"{path}: lists every manifest in {d}" + (f" (unlisted: {unlisted})" if unlisted else ""))
    docs = []
    for r in resources:
        with open(os.path.join(d, r)) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((r, doc))
    for gen in k.get("configMapGenerator", []):
        data = {}
        for spec in gen.get("files", []):
            key, _, src = spec.partition("=") if "=" in spec else (os.path.basename(spec), "", spec)
            src_path = os.path.join(d, src)
            if check(os.path.exists(src_path), f"{path}: configMapGenerator {gen['name']}: {src} exists"):
                with open(src_path) as f:
                    data[key] = f.read()
        opts = gen.get("options", {})
        check(opts.get("disableNameSuffixHash") is True,
              f"{path}: configMapGenerator {gen['name']} keeps its name (disableNameSuffixHash), so edits hot-reload")
        docs.append((f"configMapGenerator {gen['name']}", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": opts.get("labels", {})}, "data": data}))
    ns = k.get("namespace")
    for _, doc in docs:
        if ns and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = ns
    return k, docs


def schema_validate(docs, versions, allowed_unknown):
    import kubernetes_validate
    for src, doc in docs:
        name = f"{src}: {doc['kind']}/{doc['metadata']['name']}"
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if doc["kind"] in allowed_unknown:
                    ok(f"{name}: no Kubernetes schema for this CRD (checked structurally)")
                else:
                    fail(f"{name}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {v}")
                break
            except kubernetes_validate.ValidationError as e:
                fail(f"{name}: Kubernetes {v}: {'.'.join(map(str, e.path))}: {e.message}")
                break
        else:
            ok(f"{name}: valid (strict) against Kubernetes {', '.join(versions)}")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def duration_seconds(text):
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        total += float(num) * units[unit]
    return total


def check_workloads(docs, versions_label):
    by_kind = {}
    for src, d in docs:
        by_kind.setdefault(d["kind"], []).append((src, d))
    configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    workloads = by_kind.get("Deployment", []) + by_kind.get("DaemonSet", [])
    pods = []  # (name, namespace, labels, podspec)
    for src, w in workloads:
        kind, name = w["kind"], w["metadata"]["name"]
        tag = f"{kind}/{name}"
        spec = w["spec"]
        tmpl = spec["template"]
        labels = tmpl["metadata"].get("labels", {})
        pod = tmpl["spec"]
        pods.append((tag, w["metadata"].get("namespace"), labels, pod))
        check(matches(spec["selector"].get("matchLabels"), labels), f"{tag}: selector matches the pod template's labels")
        if kind == "Deployment":
            check(spec.get("replicas") == 2, f"{tag}: 2 replicas")
        check(pod.get("hostNetwork", False) == (kind == "DaemonSet"),
              f"{tag}: hostNetwork only for the node agent (DaemonSet)")
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == PROXY_UID,
              f"{tag}: pod runs as non-root UID {PROXY_UID} (the UID the sidecar ruleset exempts)")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{tag}: pod seccompProfile RuntimeDefault")
        check(pod.get("automountServiceAccountToken") is False, f"{tag}: no service-account token mounted")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            init = c in pod.get("initContainers", [])
            ctag = f"{tag} {'init' if init else ''}container {c['name']}".replace("  ", " ")
            sc = c.get("securityContext", {})
            caps = sc.get("capabilities", {})
            check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
                  and caps.get("drop") == ["ALL"] and not sc.get("privileged", False)
                  and sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault",
                  f"{ctag}: readOnlyRootFilesystem, no privilege escalation, drops ALL, seccomp RuntimeDefault")
            res = c.get("resources", {})
            check(all(k in res.get(x, {}) for x in ("requests", "limits") for k in ("cpu", "memory")),
                  f"{ctag}: cpu and memory requests and limits")
            image = c["image"]
            check(":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{ctag}: image {image} has a tag, not latest")
            is_nft = init and "nft" in " ".join(c.get("command", []) + c.get("args", []))
            if is_nft:
                check(caps.get("add") == ["NET_ADMIN"], f"{ctag}: adds NET_ADMIN and nothing else")
                check(NFT_COMMAND in " ".join(c.get("command", [])), f"{ctag}: runs `{NFT_COMMAND}`")
                check("pipefail" in " ".join(c.get("command", [])), f"{ctag}: a failing render fails the pipe (pipefail)")
            else:
                check(not caps.get("add"), f"{ctag}: adds no capability")
                check(sc.get("runAsNonRoot", True) is not False and sc.get("runAsUser", PROXY_UID) == PROXY_UID,
                      f"{ctag}: does not override the pod's non-root user")
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == POLICY_DIR]
            if not check(len(mounts) == 1 and "subPath" not in mounts[0] and mounts[0].get("readOnly") is True,
                         f"{ctag}: mounts the policy directory {POLICY_DIR} read-only, without subPath (so updates arrive)"):
                continue
            vol = volumes.get(mounts[0]["name"], {})
            sources = ([{"configMap": vol["configMap"]}] if "configMap" in vol
                       else vol.get("projected", {}).get("sources", []))
            files = {}
            for s in sources:
                cm = s.get("configMap")
                if not cm:
                    fail(f"{ctag}: policy volume source {s} is not a ConfigMap")
                    continue
                if cm["name"] in EXTERNAL_CONFIGMAPS:
                    for it in cm.get("items", []):
                        files[it["path"]] = None
                    continue
                if not check(cm["name"] in configmaps, f"{ctag}: ConfigMap {cm['name']} is in the kustomization"):
                    continue
                data = configmaps[cm["name"]]["data"]
                for it in cm.get("items", [{"key": k, "path": k} for k in data]):
                    if check(it["key"] in data, f"{ctag}: ConfigMap {cm['name']} has key {it['key']}"):
                        files[it["path"]] = data[it["key"]]
            if not check(files.get("policy.toml"), f"{ctag}: {POLICY_DIR}/policy.toml comes from a ConfigMap"):
                continue
            policy = tomllib.loads(files["policy.toml"])
            tags_file = policy.get("service_tags", {}).get("file")
            if tags_file:
                check(tags_file in files, f"{ctag}: the policy's service-tag file {tags_file} is in the same volume")
            if init:
                continue
            check(c.get("args") == ["run", "--config", f"{POLICY_DIR}/policy.toml"],
                  f"{ctag}: runs `egress-proxy run --config {POLICY_DIR}/policy.toml`")
            listen = policy.get("listen", {})
            ports = {p["containerPort"]: p for p in c.get("ports", [])}
            named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for key, addr in listen.items():
                host, _, port = addr.rpartition(":")
                port = int(port)
                check(port in ports, f"{ctag}: [listen] {key} = {addr!r} is a declared container port")
                if kind == "Deployment":
                    check(host == "0.0.0.0", f"{ctag}: gateway listener {key} binds 0.0.0.0")
                elif key != "admin":
                    check(host == "127.0.0.1", f"{ctag}: node-agent listener {key} binds loopback only")
                if pod.get("hostNetwork"):
                    check(ports.get(port, {}).get("hostPort") == port, f"{ctag}: hostPort {port} = containerPort")
            admin = listen.get("admin", "127.0.0.1:9901")
            check(named.get("admin") == int(admin.rpartition(":")[2]) and admin.startswith("0.0.0.0:"),
                  f"{ctag}: port 'admin' is [listen] admin ({admin}), reachable by the kubelet and Prometheus")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                check(get.get("path") == path and get.get("port") == "admin", f"{ctag}: {probe} GET {path} on the admin port")
            grace = duration_seconds(policy.get("limits", {}).get("shutdown_grace", "30s"))
            tgps = pod.get("terminationGracePeriodSeconds", 30)
            check(tgps > grace, f"{ctag}: terminationGracePeriodSeconds {tgps} > shutdown_grace {grace:g}s")
    if not check(len(by_kind.get("Deployment", [])) == 1 and len(by_kind.get("DaemonSet", [])) == 1,
                 "one gateway Deployment and one node-agent DaemonSet"):
        return pods
    gateway = [p for p in pods if p[0].startswith("Deployment/")][0]
    for _, svc in by_kind.get("Service", []):
        tag = f"Service/{svc['metadata']['name']}"
        sel = svc["spec"]["selector"]
        check(matches(sel, gateway[2]), f"{tag}: selects the gateway pods")
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(ports.get("http", {}).get("port") == 3128 and ports.get("admin", {}).get("port") == 9901,
              f"{tag}: ports http 3128 and admin 9901")
        cports = {p.get("name") for c in gateway[3]["containers"] for p in c.get("ports", [])}
        check(all(p.get("targetPort") in cports for p in ports.values()), f"{tag}: every targetPort is a named port of the gateway")
    for _, pdb in by_kind.get("PodDisruptionBudget", []):
        check(matches(pdb["spec"]["selector"]["matchLabels"], gateway[2]), f"PodDisruptionBudget/{pdb['metadata']['name']}: selects the gateway pods")
    for _, np in by_kind.get("NetworkPolicy", []):
        tag = f"NetworkPolicy/{np['metadata']['name']}"
        check(matches(np["spec"]["podSelector"].get("matchLabels"), gateway[2]), f"{tag}: applies to the gateway pods")
        ports = {p["port"] for r in np["spec"].get("ingress", []) for p in r.get("ports", [])}
        cports = {p["containerPort"] for c in gateway[3]["containers"] for p in c.get("ports", [])}
        check(ports and ports <= cports, f"{tag}: admits only the gateway's own ports {sorted(ports)}")
    for _, pm in by_kind.get("PodMonitor", []):
        tag = f"PodMonitor/{pm['metadata']['name']}"
        check(pm["apiVersion"] == "monitoring.coreos.com/v1", f"{tag}: apiVersion monitoring.coreos.com/v1")
        spec = pm.get("spec", {})
        unknown = set(spec) - PODMONITOR_SPEC
        check(not unknown, f"{tag}: spec has only PodMonitor fields" + (f" (unknown: {sorted(unknown)})" if unknown else ""))
        selected = [p for p in pods if matches(spec.get("selector", {}).get("matchLabels"), p[2])
                    and p[1] == pm["metadata"].get("namespace")]
        check(len(selected) == len(pods), f"{tag}: selects the gateway and node-agent pods ({len(selected)} of {len(pods)})")
        check(all(spec.get("jobLabel") in p[2] and p[2][spec["jobLabel"]] == "egress-proxy" for p in selected),
              f"{tag}: jobLabel {spec.get('jobLabel')} gives job=\"egress-proxy\" (what the alerts and dashboard select)")
        check(all(all(l in p[2] for l in spec.get("podTargetLabels", [])) for p in selected), f"{tag}: podTargetLabels are pod labels")
        for ep in spec.get("podMetricsEndpoints", []):
            unknown = set(ep) - PODMONITOR_ENDPOINT
            check(not unknown, f"{tag}: endpoint has only PodMetricsEndpoint fields" + (f" (unknown: {sorted(unknown)})" if unknown else ""))
            port_ok = all(any(p.get("name") == ep.get("port") for c in pod[3]["containers"] for p in c.get("ports", []))
                          for pod in selected)
            check(port_ok and ep.get("path", "/metrics") == "/metrics",
                  f"{tag}: scrapes /metrics on port '{ep.get('port')}', which every selected pod declares")
            for key in ("interval", "scrapeTimeout"):
                if key in ep:
                    check(re.fullmatch(r"(\d+(ms|s|m|h))+", ep[key]) is not None, f"{tag}: {key} {ep[key]} is a duration")
    return pods


def check_workload_namespace(docs, gateway_pod, proxy_namespace):
    nps = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    if not check(len(nps) == 1, "workload-namespace: one NetworkPolicy"):
        return
    np = nps[0]
    tag = f"NetworkPolicy/{np['metadata']['name']}"
    spec = np["spec"]
    check(spec.get("podSelector") == {} and spec.get("policyTypes") == ["Egress"],
          f"{tag}: restricts the egress of every pod in its namespace")
    rules = spec.get("egress", [])
    gw, dns, other = [], [], []
    for r in rules:
        for peer in r.get("to", []):
            nsel = peer.get("namespaceSelector", {}).get("matchLabels", {})
            psel = peer.get("podSelector", {}).get("matchLabels", {})
            if "ipBlock" in peer:
                other.append(peer)
            elif nsel.get("kubernetes.io/metadata.name") == proxy_namespace and matches(psel, gateway_pod[2]) and psel:
                gw.append(r)
            elif nsel.get("kubernetes.io/metadata.name") == "kube-system" and psel == {"k8s-app": "kube-dns"}:
                dns.append(r)
            else:
                other.append(peer)
        if not r.get("to"):
            other.append("a rule without `to` (everywhere)")
    check(not other, f"{tag}: no destination but the gateway and kube-dns" + (f" (also: {other})" if other else ""))
    gw_ports = {(p.get("protocol", "TCP"), p["port"]) for r in gw for p in r.get("ports", [])}
    check(gw_ports == {("TCP", 3128)}, f"{tag}: the gateway pods in namespace {proxy_namespace}, on TCP 3128 only")
    dns_ports = {(p.get("protocol", "TCP"), p["port"]) for r in dns for p in r.get("ports", [])}
    check(dns_ports == {("UDP", 53), ("TCP", 53)}, f"{tag}: kube-dns on UDP and TCP 53 only")


def cmd_kubernetes(d, rendered=None):
    import kubernetes_validate.utils as kvu
    versions = ["1.29.0", kvu.latest_version()]
    k, docs = load_kustomization(d)
    check(k.get("namespace") == "egress-proxy", f"{d}/kustomization.yaml: namespace egress-proxy")
    kinds = sorted({doc["kind"] for _, doc in docs})
    print(f"  ..    {d}: {len(docs)} resources ({', '.join(kinds)})")
    schema_validate(docs, versions, allowed_unknown={"PodMonitor"})
    pods = check_workloads(docs, versions)
    gateway = [p for p in pods if p[0].startswith("Deployment/")]
    wl = os.path.join(d, "workload-namespace")
    if check(os.path.isdir(wl), f"{wl}: exists"):
        _, wdocs = load_kustomization(wl)
        schema_validate(wdocs, versions, allowed_unknown=set())
        if gateway:
            check_workload_namespace(wdocs, gateway[0], k.get("namespace"))
    if rendered:
        with open(rendered) as f:
            rdocs = [("kustomize build", x) for x in yaml.safe_load_all(f) if x]
        key = lambda x: (x["kind"], x["metadata"]["name"], x["metadata"].get("namespace"))
        ours = sorted(map(key, (x for _, x in docs)), key=str)
        theirs = sorted(map(key, (x for _, x in rdocs)), key=str)
        check(ours == theirs, "kustomize build renders the same resources this check emulated"
              + ("" if ours == theirs else f" (kustomize: {theirs}, emulated: {ours})"))
        schema_validate(rdocs, versions, allowed_unknown={"PodMonitor"})


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "kubernetes":
        cmd_kubernetes(*args)
    elif cmd == "promql":
        cmd_promql(args)
    elif cmd == "grafana":
        cmd_grafana(args[0])
    elif cmd == "dockerfile":
        cmd_dockerfile(args[0])
    else:
        print(__doc__)
        return 2
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

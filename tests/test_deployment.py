"""Deployment files (SPEC §10) stay consistent with the proxy: pure parsing, no Docker.

Dockerfile and .dockerignore, the Kubernetes manifests (their embedded flipback.yaml goes
through the same validator as ``flipback check``), the Prometheus alert rules and the
Grafana dashboard (only SPEC §9 metric names).
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.admin import is_loopback
from proxy.config.model import ProxyConfig
from proxy.config.parser import load_config, parse_config
from proxy.errors import ConfigError
from proxy.server import split_listen

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "config" / "kubernetes"
K8S_FILES = ("gateway.yaml", "sidecar.yaml")
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "flipback.json"

# SPEC §9: each name with its type and labels. Counters are named with their `_total`; a
# histogram is exposed as `_bucket`, `_sum` and `_count`. SPEC does not say whether the
# shadow latency delta is a gauge or a histogram, so both forms pass for it.
SPEC_METRICS: dict[str, tuple[str, set[str]]] = {
    "flipback_requests_total": ("counter", {"route", "upstream", "role", "outcome"}),
    "flipback_request_duration_seconds": ("histogram", {"route", "upstream", "role"}),
    "flipback_upstream_ttfb_seconds": ("histogram", {"route", "upstream", "role"}),
    "flipback_in_flight": ("gauge", {"route", "upstream"}),
    "flipback_canary_weight": ("gauge", {"route"}),
    "flipback_route_state": ("gauge", {"route", "state"}),
    "flipback_rollbacks_total": ("counter", {"route", "reason"}),
    "flipback_shadow_total": ("counter", {"route", "outcome"}),
    "flipback_shadow_mismatch_total": ("counter", {"route", "kind", "primary"}),
    "flipback_config_reloads_total": ("counter", {"result"}),
    "flipback_sticky_sessions": ("gauge", {"route"}),
    "flipback_shadow_latency_delta_seconds": ("gauge or histogram", {"route"}),
    "flipback_config_info": ("gauge", {"sha256"}),
    "flipback_upstream_healthy": ("gauge", {"upstream"}),
    "flipback_verifications_total": ("counter", {"route", "result"}),
    "flipback_notifications_total": ("counter", {"result"}),
}
# Beyond SPEC §9: metrics the rules and dashboard may use too.
EXTENSION_METRICS: dict[str, tuple[str, set[str]]] = {
    "flipback_upstream_max_connections": ("gauge", {"upstream"}),
    "flipback_judge_state": ("gauge", {"route", "judge", "state"}),
    "flipback_guard_state": ("gauge", {"route", "guard", "state"}),
    "flipback_shadow_mismatched_requests_total": ("counter", {"route", "primary"}),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"\bflipback_[a-z0-9_]+")


def exposition_names() -> set[str]:
    names = set()
    for name, (kind, _) in (SPEC_METRICS | EXTENSION_METRICS).items():
        if kind != "histogram":
            names.add(name)
        if "histogram" in kind:
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return names


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY (no --from stages are used)."""
    result = []
    for args in instructions("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        result.append((parts[:-1], parts[-1]))
    return result


def image_config_path() -> str:
    cmd = exec_form(instructions("CMD")[-1])
    return cmd[cmd.index("-c") + 1]


def image_config_source() -> Path:
    target = image_config_path()
    for sources, dest in copies():
        if dest == target:
            assert len(sources) == 1
            return ROOT / sources[0]
    raise AssertionError(f"no COPY puts a config at {target}")


def test_dockerfile_base_is_slim_python_3_11_or_later() -> None:
    froms = instructions("FROM")
    assert froms, "no FROM"
    m = re.fullmatch(r"python:3\.(\d+)(\.\d+)?-slim(-\w+)?", froms[-1].split()[0])
    assert m, f"final stage must be a slim Python image, not {froms[-1]!r}"
    assert int(m.group(1)) >= 11


def test_dockerfile_installs_the_package_from_pyproject() -> None:
    sources = {src for srcs, _ in copies() for src in srcs}
    assert {"pyproject.toml", "proxy"} <= {s.rstrip("/") for s in sources}
    # setuptools needs the project's `readme` to build
    assert "README.md" in sources
    runs = instructions("RUN")
    assert any(re.search(r"\bpip install\b.*--no-cache-dir.*\s\.(\s|$)", run) for run in runs), (
        "the package must be installed with `pip install --no-cache-dir .`"
    )
    assert not any("requirements" in run for run in runs), "dependencies come from pyproject"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    words = [word for word, _ in dockerfile()]
    users = instructions("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so that Kubernetes' runAsNonRoot can verify it
    assert user.isdigit()
    last_user = len(words) - 1 - words[::-1].index("USER")
    assert last_user < words.index("ENTRYPOINT")
    assert "RUN" not in words[last_user:], "nothing should run after dropping to the user"


def test_dockerfile_exposes_the_ports_of_its_default_config() -> None:
    exposed = {int(p.split("/")[0]) for args in instructions("EXPOSE") for p in args.split()}
    assert {8080, 9901} <= exposed
    cfg = load_config(str(image_config_source()))
    assert split_listen(cfg.server.listen)[1] == 8080
    assert split_listen(cfg.admin.listen)[1] == 9901
    # the data plane must be reachable through `docker run -p`
    assert not is_loopback(split_listen(cfg.server.listen)[0])


def test_dockerfile_healthcheck_polls_healthz_with_the_python_stdlib() -> None:
    checks = instructions("HEALTHCHECK")
    assert len(checks) == 1
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[0])
    assert m, "HEALTHCHECK must use exec-form CMD"
    argv = exec_form(m.group(1))
    assert argv[:2] == ["python", "-c"], "slim images have no curl or wget"
    code = argv[2]
    compile(code, "<healthcheck>", "exec")
    cfg = load_config(str(image_config_source()))
    assert f"http://127.0.0.1:{split_listen(cfg.admin.listen)[1]}/healthz" in code
    assert "timeout=" in code


def test_dockerfile_entrypoint_and_cmd_are_exec_form_so_sigterm_reaches_flipback() -> None:
    assert exec_form(instructions("ENTRYPOINT")[-1]) == ["flipback"]
    cmd = exec_form(instructions("CMD")[-1])
    assert cmd[0] == "run" and "-c" in cmd


def test_dockerfile_default_config_is_valid_and_its_state_dir_is_owned_by_the_user() -> None:
    cfg = load_config(str(image_config_source()))  # raises ConfigError when invalid
    assert cfg.state.file is not None
    state_dir = posixpath.dirname(cfg.state.file)
    assert posixpath.isabs(state_dir)
    user = instructions("USER")[-1]
    assert any(
        state_dir in run and "chown" in run and user.split(":")[0] in run
        for run in instructions("RUN")
    ), f"the image must create {state_dir} owned by the runtime user"


def test_dockerfile_build_checks_its_default_config() -> None:
    assert any(f"flipback check -c {image_config_path()}" in run for run in instructions("RUN"))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies():
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: no such file"
            sample = next(path.rglob("*.py")) if path.is_dir() else path
            rel = sample.relative_to(ROOT).as_posix()
            assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_cli.py",
        ".flipback/state.json",
        "proxy/__pycache__/cli.cpython-312.pyc",
    ):
        assert dockerignored(local, patterns), f"{local} would be sent to the build"


# --- Kubernetes ------------------------------------------------------------------------


def k8s_docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def flipback_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "flipback"]
    assert len(found) == 1, "one container named flipback"
    return found[0]


def config_path(container: dict[str, Any]) -> str:
    args = container.get("args") or []
    assert "-c" in args, "flipback's args must name its config with -c"
    return str(args[args.index("-c") + 1])


def embedded_config(docs: list[dict[str, Any]]) -> ProxyConfig:
    """The flipback.yaml the Deployment mounts, through ``flipback check``'s validator."""
    path = config_path(flipback_container(one(docs, "Deployment")))
    text = one(docs, "ConfigMap")["data"][posixpath.basename(path)]
    try:
        return parse_config(text, path)
    except ConfigError as exc:
        pytest.fail("embedded config is refused:\n" + "\n".join(exc.errors))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def prestop_seconds(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    if "exec" in pre:
        command = pre["exec"]["command"]
        assert command[0] == "sleep", command
        return int(command[1])
    return 0


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_manifests_parse_and_hold_a_deployment_service_and_configmap(name: str) -> None:
    kinds = {d["kind"] for d in k8s_docs(name)}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_embedded_config_passes_flipback_check(name: str) -> None:
    cfg = embedded_config(k8s_docs(name))
    assert any(r.canary is not None for r in cfg.routes), "the example should show a canary"
    assert all(r.rollback.enabled for r in cfg.routes if r.canary is not None)


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_container_ports_match_the_configured_listeners(name: str) -> None:
    docs = k8s_docs(name)
    cfg = embedded_config(docs)
    fb = flipback_container(one(docs, "Deployment"))
    data_host, data_port = split_listen(cfg.server.listen)
    admin_host, admin_port = split_listen(cfg.admin.listen)
    assert port_number(fb, "http") == data_port
    assert port_number(fb, "admin") == admin_port
    # other pods and the kubelet must reach both
    assert not is_loopback(data_host) and not is_loopback(admin_host)


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_probes_use_readyz_and_healthz_on_the_admin_port(name: str) -> None:
    docs = k8s_docs(name)
    cfg = embedded_config(docs)
    fb = flipback_container(one(docs, "Deployment"))
    admin_port = split_listen(cfg.admin.listen)[1]
    ready = fb["readinessProbe"]["httpGet"]
    live = fb["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert port_number(fb, ready["port"]) == admin_port
    assert port_number(fb, live["port"]) == admin_port


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_grace_period_covers_prestop_and_drain(name: str) -> None:
    docs = k8s_docs(name)
    cfg = embedded_config(docs)
    deployment = one(docs, "Deployment")
    fb = flipback_container(deployment)
    pre = prestop_seconds(fb)
    assert pre >= 3, "a preStop pause lets endpoint removal land before the drain"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre + cfg.server.drain_timeout


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_config_is_mounted_as_a_configmap_directory_for_hot_reload(name: str) -> None:
    docs = k8s_docs(name)
    deployment = one(docs, "Deployment")
    fb = flipback_container(deployment)
    path = config_path(fb)
    mounts = [m for m in fb["volumeMounts"] if m["mountPath"] == posixpath.dirname(path)]
    assert len(mounts) == 1, f"no volume mounted at {posixpath.dirname(path)}"
    # a subPath mount never sees ConfigMap updates (no `..data` symlink swap)
    assert "subPath" not in mounts[0]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    volume = volumes[mounts[0]["name"]]
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert posixpath.basename(path) in one(docs, "ConfigMap")["data"]


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_non_loopback_admin_gets_its_token_from_a_secret(name: str) -> None:
    docs = k8s_docs(name)
    cfg = embedded_config(docs)
    assert not is_loopback(split_listen(cfg.admin.listen)[0])
    fb = flipback_container(one(docs, "Deployment"))
    env = {e["name"]: e for e in fb.get("env", [])}
    assert cfg.admin.token_env in env, "flipback refuses a non-loopback admin without a token"
    ref = env[cfg.admin.token_env]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert ref["name"] in secrets
    secret = secrets[ref["name"]]
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_flipback_is_non_root_read_only_with_a_writable_state_dir(name: str) -> None:
    docs = k8s_docs(name)
    cfg = embedded_config(docs)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    fb = flipback_container(deployment)
    sec = {**pod.get("securityContext", {}), **fb.get("securityContext", {})}
    assert sec.get("runAsNonRoot") is True
    assert sec.get("readOnlyRootFilesystem") is True
    assert sec.get("allowPrivilegeEscalation") is False
    assert cfg.state.file is not None and posixpath.isabs(cfg.state.file)
    state_dir = posixpath.dirname(cfg.state.file)
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [
        m
        for m in fb["volumeMounts"]
        if state_dir == m["mountPath"] or state_dir.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert writable, f"nothing writable is mounted at {state_dir}"
    assert not writable[-1].get("readOnly")
    assert "emptyDir" in volumes[writable[-1]["name"]]


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_flipback_has_resource_requests_and_limits(name: str) -> None:
    resources = flipback_container(one(k8s_docs(name), "Deployment"))["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_services_select_the_pods_and_target_flipback_ports(name: str) -> None:
    docs = k8s_docs(name)
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    fb = flipback_container(deployment)
    data_port = port_number(fb, "http")
    targets = []
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            targets.append(port_number(fb, port.get("targetPort", port["port"])))
    # client traffic always passes the proxy, never straight to a model server
    assert data_port in targets


def test_k8s_gateway_runs_several_replicas_with_a_disruption_budget() -> None:
    docs = k8s_docs("gateway.yaml")
    assert one(docs, "Deployment")["spec"]["replicas"] >= 2
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]


def test_k8s_gateway_upstreams_are_cluster_services() -> None:
    cfg = embedded_config(k8s_docs("gateway.yaml"))
    for name, up in cfg.upstreams.items():
        assert ".svc.cluster.local" in up.url, f"{name}: {up.url}"


def test_k8s_sidecar_proxies_the_model_server_in_its_pod_and_outlives_its_drain() -> None:
    docs = k8s_docs("sidecar.yaml")
    cfg = embedded_config(docs)
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    model = next(c for c in containers if c["name"] != "flipback")
    fb = flipback_container(deployment)
    model_port = int(model["ports"][0]["containerPort"])
    chat = next(r for r in cfg.routes if r.canary is not None)
    assert cfg.upstreams[chat.stable].url == f"http://127.0.0.1:{model_port}"
    # the model server must keep answering until flipback has drained
    assert prestop_seconds(model) > prestop_seconds(fb) + cfg.server.drain_timeout
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > prestop_seconds(model)


# --- Prometheus rules and Grafana dashboard --------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules
    return rules


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    return exprs


def queries(path: Path) -> list[str]:
    if path == ALERTS:
        return [rule["expr"] for rule in alert_rules()]
    dash = dashboard()
    variables = [str(v.get("definition", "")) for v in dash["templating"]["list"]]
    return dashboard_exprs(dash) + variables


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD], ids=lambda p: p.name)
def test_queries_use_only_spec_metric_names(path: Path) -> None:
    used = {name for q in queries(path) for name in METRIC_RE.findall(q)}
    assert used, "no flipback metric found at all"
    unknown = used - exposition_names()
    assert not unknown, f"not SPEC §9 metric names as exposed: {sorted(unknown)}"


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD], ids=lambda p: p.name)
def test_descriptions_name_only_spec_metrics(path: Path) -> None:
    # prose may name a histogram by its SPEC name; a typo anywhere still fails
    unknown = (set(METRIC_RE.findall(path.read_text())) - exposition_names() - set(SPEC_METRICS)
               - set(EXTENSION_METRICS))
    assert not unknown, f"not SPEC §9 metric names: {sorted(unknown)}"


def test_alert_rules_have_for_severity_and_summary() -> None:
    names = set()
    for rule in alert_rules():
        assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
        names.add(rule["alert"])
        assert METRIC_RE.search(rule["expr"]), rule["alert"]
        assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]


def test_alert_rules_cover_rollback_shadow_mismatch_saturation_and_reloads() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    assert "flipback_rollbacks_total" in exprs
    # Requests with any mismatch, not the sum over kinds (which reached 118%).
    assert "flipback_shadow_mismatched_requests_total" in exprs and 'outcome="sent"' in exprs
    assert "flipback_in_flight" in exprs  # saturation: requests queueing for connections
    assert 'flipback_config_reloads_total{result="refused"}' in exprs
    assert 'flipback_route_state{state="rolled_back"}' in exprs
    groups = [g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]]
    assert any("saturation" in g for g in groups)


def test_dashboard_has_a_datasource_variable_and_a_route_variable() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    route = variables["route"]
    assert route["definition"] == "label_values(flipback_canary_weight, route)"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for annotation in dash["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == "${DS_PROMETHEUS}", annotation["name"]


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]


def test_dashboard_quantiles_come_from_bucket_rates_by_le() -> None:
    quantiles = [e for e in dashboard_exprs(dashboard()) if "histogram_quantile" in e]
    assert len(quantiles) >= 4  # p50 and p99 of ttfb and duration
    for expr in quantiles:
        assert re.search(r"rate\(flipback_\w+_seconds_bucket\{", expr), expr
        assert re.search(r"by \([^)]*\ble\b[^)]*\)", expr), expr


def test_dashboard_shows_each_area_of_the_brief() -> None:
    exprs = " ".join(dashboard_exprs(dashboard()))
    for name in (
        "flipback_canary_weight",
        "flipback_route_state",
        "flipback_requests_total",
        "flipback_upstream_ttfb_seconds_bucket",
        "flipback_request_duration_seconds_bucket",
        "flipback_in_flight",
        "flipback_rollbacks_total",
        "flipback_shadow_mismatch_total",
        "flipback_config_reloads_total",
        "flipback_upstream_healthy",
        "flipback_notifications_total",
    ):
        assert name in exprs, f"no panel uses {name}"

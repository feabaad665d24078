"""The README and the annotated example config stand alone: the config names every key of
the schema, the README every metric a running flipback exposes (with its labels), its
"Running it for real" block starts what the example config points at, and neither refers
to a document users do not have."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import model as c
from proxy.config.parser import load_config
from proxy.workers.admin import parent_families
from proxy.workers.merge import render

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "config" / "flipback.yaml"
# Fields that are not YAML keys: derived from `url`, or where the config came from.
DERIVED = {
    (c.UpstreamConfig, "name"), (c.UpstreamConfig, "scheme"), (c.UpstreamConfig, "host"),
    (c.UpstreamConfig, "port"), (c.UpstreamConfig, "base_path"),
    (c.ProxyConfig, "source"), (c.ProxyConfig, "sha256"),
}
HISTOGRAM_PARTS = ("_bucket", "_count", "_sum")

EXERCISED = """
upstreams:
  v1: {{url: "{v1}", version: "1", health: {{path: /health, interval: 50ms}}}}
  v2: {{url: "{v2}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 100}}
    sticky: {{header: x-session}}
    shadow: {{upstream: v3, sample: 100, compare: {{json_paths: [model], record: null}}}}
"""


def schema_keys(cls: type, path: str = "") -> dict[str, str]:
    """Every YAML key of the schema: {dotted path: key}, from the dataclasses (whose field
    names are the keys)."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        if (cls, field.name) in DERIVED:
            continue
        where = f"{path}.{field.name}" if path else field.name
        keys[where] = field.name
        for arg in typing.get_args(hints[field.name]) or (hints[field.name],):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                keys |= schema_keys(arg, where)
    return keys


def test_example_config_names_every_key_of_the_schema():
    text = EXAMPLE.read_text()
    keys = schema_keys(c.ProxyConfig)
    assert "routes.shadow.compare.bodies" in keys and "upstreams.health.healthy_after" in keys
    missing = [path for path, key in keys.items()
               if not re.search(rf"(^|[\s{{,#]){re.escape(key)}:", text, re.MULTILINE)]
    assert not missing, f"config/flipback.yaml does not show: {missing}"
    # the keys the README calls out are set, not only mentioned
    cfg = load_config(str(EXAMPLE))
    assert cfg.routes[0].kill_switch.openai_message
    assert "openai_message:" in README.read_text()


def test_readme_and_config_never_refer_to_a_spec():
    for path in (README, EXAMPLE, ROOT / "config" / "prometheus" / "alerts.yaml"):
        assert not re.search(r"\bSPEC\b", path.read_text()), path


async def test_readme_lists_every_metric_with_its_labels(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(EXERCISED, v1=v1.url, v2=v2.url, v3=v3.url)
    fb.runtime.metrics.set_redis_source(lambda: (True, {"lookup": 1}))  # as state.redis does
    async with fb.session.post(fb.url + "/x", data=b"{}", headers={"x-session": "s"}) as resp:
        assert resp.status == 200
    async with fb.session.get(fb.admin + "/metrics") as resp:
        exposition = await resp.text()
    # `run --workers N`: the parent's own families beside the workers' merged ones
    exposition += render(parent_families({"ok": 0}, serving=2, restarts={0: 0},
                                         requests={0: 1.0})).decode()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):  # the client library's, per counter
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels.setdefault(name, set())
        for sample in family.samples:
            labels[name] |= set(sample.labels) - {"le"}
    assert len(labels) >= 26 and "flipback_upstream_max_connections" in labels
    readme = README.read_text()
    documented = {m.group(1): set(m.group(2).split(",")) if m.group(2) else set()
                  for m in re.finditer(r"`(flipback_[a-z_]+)(?:\{([a-z0-9_,]+)\})?`", readme)}
    missing = sorted(set(labels) - set(documented))
    assert not missing, f"README does not list: {missing}"
    for name, seen in labels.items():
        said = set().union(*(set(m.group(1).split(",")) for m in re.finditer(
            rf"`{name}\{{([a-z0-9_,]+)\}}`", readme)))
        assert seen <= said, f"{name}: labels {sorted(seen)}, README says {sorted(said)}"
    unknown = sorted(n for n in documented if n not in labels
                     and not any(n == base + part for base in labels for part in HISTOGRAM_PARTS))
    assert not unknown, f"README names metrics flipback does not expose: {unknown}"


def test_readme_block_starts_what_the_example_config_points_at():
    readme = README.read_text()
    section = readme[readme.index("## Running it for real"):readme.index("## Config walkthrough")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    lines = blocks[-1].strip().splitlines()
    cfg = load_config(str(EXAMPLE))
    toys = shlex.split(lines[0].split("&")[0])
    assert toys[:3] == ["python", "-m", "proxy.demo.models"]
    started = {name: int(port) for name, port in (t.rsplit(":", 1) for t in toys[3:])}
    used = {u for r in cfg.routes for u in (r.stable, r.canary and r.canary.upstream) if u}
    assert {u: cfg.upstreams[u].port for u in used} == started
    assert all(cfg.upstreams[u].host == "127.0.0.1" for u in used)
    assert lines[1].startswith("flipback run -c config/flipback.yaml & ")
    assert lines[2].startswith("flipback status --wait ")  # ready before the first curl
    port = cfg.server.listen.rsplit(":", 1)[1]
    assert all(f"127.0.0.1:{port}/" in ln for ln in lines if "curl" in ln)
    assert cfg.admin.listen == "127.0.0.1:9901"  # the CLI's default admin address
    kill = lines[-1]  # everything started is stopped, by the ids saved when started
    assert kill.startswith("kill ") and "$MODELS" in kill and "$FLIPBACK" in kill
    assert yaml.safe_load(EXAMPLE.read_text())["routes"][0]["name"] == "chat"

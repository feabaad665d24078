"""One admin view of N workers (pure: no I/O). Each worker answers for the requests it
served; the parent adds them up here.

Metrics: counters and histograms are summed series by series (bucket by bucket); gauges
that count things under way (``SUMMED_GAUGES``) are summed, the others are a shared
reading (weight, state, health, info) and the largest value stands. ``/routes``: the
window counts that add (requests, failures, in flight) are summed and the error rate is
recomputed from them; a merged p50/p99 is the largest worker's (an upper bound: worker
windows cannot be merged into one quantile); the state is the first worker's, and
``workers`` lists each worker's state and weight. ``/events``: each worker's own events,
without the copies it received from the others and without its reload events (the
parent's stand for them), health events from the first worker alone, newest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SUMMED_GAUGES = frozenset({"flipback_in_flight", "flipback_client_connections"})
PARENT_OWNED = frozenset({"flipback_config_reloads"})  # counted once, in the parent
ADDITIVE = ("requests", "failures", "in_flight")
CONFIG_KINDS = frozenset({"reload", "reload_refused"})
# Each worker probes the upstreams itself: their health events come from the first alone.
HEALTH_KINDS = frozenset({"canary_unhealthy", "canary_healthy"})


def merge_metrics(texts: Sequence[str], extra: Iterable[Metric] = ()) -> bytes:
    """Workers' ``/metrics`` texts as one exposition, plus the parent's ``extra``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name.removesuffix("_created") in PARENT_OWNED:
                continue
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            summed = fam.type != "gauge" or fam.name in SUMMED_GAUGES
            cells = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if s.name.endswith("_created"):
                    cells[key] = min(cells.get(key, s.value), s.value)
                elif summed:
                    cells[key] = cells.get(key, 0.0) + s.value
                else:
                    cells[key] = max(cells.get(key, s.value), s.value)
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
    return render([*families.values(), *extra])


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


def requests_per_worker(text: str) -> float:
    """The total of ``flipback_requests_total`` in one worker's exposition."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "flipback_requests":
            total += sum(s.value for s in fam.samples if s.name == "flipback_requests_total")
    return total


def merge_route(views: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ROUTE (SPEC §8) from each worker's view of it (first worker first)."""
    merged = dict(views[0])
    upstreams: dict[str, dict[str, Any]] = {}
    for view in views:
        for name, up in view.get("upstreams", {}).items():
            into = upstreams.get(name)
            if into is None:
                upstreams[name] = dict(up)
                continue
            for key in ADDITIVE:
                into[key] = (into.get(key) or 0) + (up.get(key) or 0)
            for key in ("p50_ms", "p99_ms"):
                found = [v for v in (into.get(key), up.get(key)) if v is not None]
                into[key] = max(found) if found else None
    for up in upstreams.values():
        requests = up.get("requests") or 0
        up["error_rate"] = round(up.get("failures", 0) * 100.0 / requests, 3) if requests else 0.0
    merged["upstreams"] = upstreams
    shadows = [v["shadow"] for v in views if v.get("shadow")]
    if shadows:
        merged["shadow"] = _merge_shadow(shadows)
    merged["sticky_sessions"] = max(v.get("sticky_sessions", 0) for v in views)
    merged["workers"] = [{"state": v.get("state"), "effective_weight": v.get("effective_weight")}
                         for v in views]
    return merged


def _merge_shadow(shadows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(shadows[0])
    out["in_flight"] = sum(s.get("in_flight", 0) for s in shadows)
    for key in ("copies", "mismatches"):
        if isinstance(out.get(key), dict):
            out[key] = {k: sum((s.get(key) or {}).get(k, 0) for s in shadows) for k in out[key]}
    if out.get("compared") is not None:
        out["compared"] = sum(s.get("compared") or 0 for s in shadows)
    return out


def merge_routes(per_worker: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``/routes``: each route across the workers, in the first worker's order."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for routes in per_worker:
        for view in routes:
            by_name.setdefault(view["name"], []).append(view)
    return [merge_route(views) for views in by_name.values()]


def merge_events(parent: list[dict[str, Any]], per_worker: Sequence[list[dict[str, Any]]],
                 limit: int) -> list[dict[str, Any]]:
    """``/events``: the parent's (config) events and each worker's own, newest first."""
    found = list(parent)
    for i, events in enumerate(per_worker):
        left_out = CONFIG_KINDS | HEALTH_KINDS if i else CONFIG_KINDS
        found += [e for e in events if e.get("kind") not in left_out
                  and "via" not in (e.get("figures") or {})]
    found.sort(key=lambda e: str(e.get("time", "")), reverse=True)
    return found[:limit]

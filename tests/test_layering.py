"""Layering: pure decision code stays pure, and imports point one way (STYLE §2)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"

# Importing one of these must pull in neither asyncio nor aiohttp.
PURE = (
    "proxy.units",
    "proxy.errors",
    "proxy.config.model",
    "proxy.config.yamlnodes",
    "proxy.config.values",
    "proxy.config.schema",
    "proxy.config.parser",
    "proxy.config.preflight",
    "proxy.rollout.windows",
    "proxy.rollout.rules",
    "proxy.rollout.sticky",
    "proxy.rollout.pins",
    "proxy.rollout.pick",
    "proxy.rollout.state",
    "proxy.rollout.carry",
    "proxy.rollout.lanes",
    "proxy.rollout.machine",
    "proxy.rollout.judge",
    "proxy.rollout.judge_evidence",
    "proxy.rollout.judge_threshold",
    "proxy.routing",
    "proxy.headers",
    "proxy.events",
    "proxy.metrics",
    "proxy.shadow.compare",
    "proxy.answer",
    "proxy.guard.evidence",
    "proxy.guard.drift",
    "proxy.guard.feedback",
    "proxy.guard.disagreement",
    "proxy.guard.route",
    "proxy.fleet.state",
    "proxy.llm.reader",
    "proxy.llm.window",
    "proxy.llm.rules",
    "proxy.llm.lane",
)
# The serving side; the config and the decision cores must never reach up to it.
SERVING = ("proxy.server", "proxy.handler", "proxy.runtime")
CORES = (*sorted((PROXY / "config").glob("*.py")), PROXY / "rollout" / "windows.py",
         PROXY / "rollout" / "rules.py", PROXY / "rollout" / "state.py",
         PROXY / "rollout" / "carry.py", *sorted((PROXY / "llm").glob("*.py")))


def test_layering_pure_modules_import_neither_asyncio_nor_aiohttp() -> None:
    # One fresh interpreter; each module is checked right after its own import, so a
    # failure names the module that pulled asyncio or aiohttp (or the serving side) in.
    code = (
        "import importlib, sys\n"
        f"for name in {PURE!r}:\n"
        "    importlib.import_module(name)\n"
        f"    bad = sorted({{'asyncio', 'aiohttp', *{SERVING!r}}} & set(sys.modules))\n"
        "    if bad:\n"
        "        print(name, bad)\n"
        "        break\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_layering_config_and_decision_cores_never_import_the_serving_side() -> None:
    assert len(CORES) > 3
    for path in CORES:
        upward = sorted(name for name in _imports(path)
                        if any(name == s or name.startswith(s + ".") for s in SERVING))
        assert not upward, f"{path.relative_to(PROXY.parent)} imports {upward}"

"""Layer 0 stays pure: importing it must not pull in asyncio or aiohttp."""

from __future__ import annotations

import subprocess
import sys

LAYER_0 = ("proxy.windows", "proxy.rollback", "proxy.units", "proxy.config", "proxy.errors")


def test_layering_layer_0_imports_neither_asyncio_nor_aiohttp() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LAYER_0)
        + "print(sorted({'asyncio', 'aiohttp'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"

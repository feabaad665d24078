"""Hot reload (SPEC §7): the config file is checked every second by content, on SIGHUP and
on ``POST /reload``; a valid config is applied between requests, an invalid one refused.

The check reads the file through its path every time, so it follows editors that write a
temp file and rename it, and the ``..data`` symlink swap of Kubernetes ConfigMap volumes:
neither inode nor mtime is trusted, only the content hash. Reading and parsing run in a
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import replace
from typing import Protocol

from proxy.config.model import ProxyConfig
from proxy.config.parser import parse_config
from proxy.errors import ConfigError, describe
from proxy.runtime import ReloadResult
from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0


def _read_and_parse(path: str, *known: str) -> tuple[str, ProxyConfig | None, list[str]]:
    """(content sha256, config or None, errors). Runs in a worker thread. Content whose
    hash is in ``known`` is not parsed again (the poll reads the file every second)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return "", None, [f"{path}: cannot read: {exc.strerror or exc}"]
    digest = hashlib.sha256(data).hexdigest()
    if digest in known:
        return digest, None, []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return digest, None, [f"{path}:1: (root): the file is not UTF-8 text"]
    try:
        cfg = parse_config(text, path)
    except ConfigError as exc:
        return digest, None, exc.errors
    except Exception as exc:
        # A parser bug must not become a crash loop: refuse this content like any invalid
        # config (the old one keeps serving) and keep the traceback for debugging.
        logger.debug("parsing %s failed unexpectedly", path, exc_info=True)
        return digest, None, [f"{path}:1: (root): cannot read this config: {describe(exc)}"]
    return digest, _with_hash(cfg, digest), []


def _with_hash(cfg: ProxyConfig, digest: str) -> ProxyConfig:
    return replace(cfg, sha256=digest)


class _HasConfig(Protocol):
    @property
    def config(self) -> ProxyConfig: ...


class ReloadTarget(Protocol):
    """What a watcher reloads: a ``Runtime``, or the parent of ``run --workers``."""

    @property
    def snapshot(self) -> _HasConfig: ...

    def apply(self, config: ProxyConfig) -> ReloadResult: ...

    def refuse(self, errors: list[str]) -> ReloadResult: ...


class ConfigWatcher:
    """Polls one config file and applies or refuses what it finds there."""

    def __init__(self, path: str, runtime: ReloadTarget,
                 interval: float = POLL_INTERVAL) -> None:
        self._path = path
        self._runtime = runtime
        self._interval = interval
        self._current = runtime.snapshot.config.sha256
        self._refused = ""  # hash of the last refused content: refuse it once, not every tick
        self._lock = asyncio.Lock()
        self._tasks = TaskSet("config-watch", limit=1)

    def start(self) -> None:
        self._tasks.spawn(self._poll(), name="config-watch")

    async def aclose(self) -> None:
        await self._tasks.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check(force=False)
            except Exception:  # the watch must outlive any one bad check
                logger.exception("config check failed")

    async def check(self, force: bool) -> ReloadResult:
        """Reload if the file's content changed; with ``force`` (SIGHUP, ``POST /reload``)
        a content refused before is tried again too. Unchanged content is a no-op either
        way. Unreadable files during a swap are retried on the next tick."""
        async with self._lock:
            known = (self._current,) if force else (self._current, self._refused)
            digest, cfg, errors = await asyncio.to_thread(_read_and_parse, self._path, *known)
            if digest == self._current or (not force and digest in ("", self._refused)):
                # Same content as what serves now: nothing to apply (a forced reload of an
                # unchanged file is a no-op, not a second identical event).
                return ReloadResult(ok=True, changed=False, reason="unchanged", errors=[])
            if cfg is None:
                return self._refuse(digest, errors)
            previous = self._runtime.snapshot
            try:
                result = self._runtime.apply(cfg)
            except Exception as exc:
                if self._runtime.snapshot is previous:
                    # Building the new snapshot failed and nothing changed: refuse it like
                    # an invalid file, once for this content.
                    logger.debug("applying %s failed unexpectedly", self._path, exc_info=True)
                    return self._refuse(digest, [
                        f"{self._path}:1: (root): cannot apply this config: {describe(exc)}"
                    ])
                # Swapped in already: the new config serves; a later step failed. Note it
                # once and do not apply the same content again on every tick.
                logger.exception("config applied (%s), but a follow-up step failed",
                                 digest[:12])
                self._refused, self._current = "", digest
                return ReloadResult(ok=True, changed=True, errors=[],
                                    reason=f"applied; then failed: {describe(exc)}")
            self._refused = ""
            self._current = digest
            logger.info("config reloaded (%s): %s", digest[:12], result.reason)
            return result

    def _refuse(self, digest: str, errors: list[str]) -> ReloadResult:
        self._refused = digest
        result = self._runtime.refuse(errors)
        logger.error("config reload refused, old config keeps serving: %s", result.reason)
        return result

"""Webhook notifications (SPEC §5 Notify): matching events are POSTed as JSON, off the
request path.

``offer`` is an ``EventLog`` listener: it runs inside ``emit``, on the loop, in the middle
of a flip, so it only filters and enqueues (a full queue drops and counts). One worker task
drains the queue through one small ``ClientSession``; a slow, failing or absent receiver
costs that worker time and nothing else.

Delivery is at least once: an attempt that timed out may still have reached the receiver,
and is sent again. Every attempt at one event carries the same ``X-Flipback-Delivery`` id
(and ``X-Flipback-Attempt``: 1, 2, ...), so a receiver can drop the repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets as random_ids
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiohttp
import orjson

from proxy import __version__
from proxy.config.model import NotifyConfig
from proxy.events import Event
from proxy.metrics import Metrics
from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)

QUEUE_SIZE = 1000
BACKOFF = (0.2, 0.5, 1.0)  # seconds before each retry: 3 retries, 4 attempts in all
REDACTED = "[redacted]"
MIN_SUBSTRING_SECRET = 8  # shorter secrets are redacted only where a whole string equals them
USER_AGENT = f"flipback/{__version__}"

Secrets = Callable[[], Iterable[str]]


def _no_secrets() -> Iterable[str]:
    return ()


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` (JSON-like) with every string equal to a secret, or containing a secret of
    at least ``MIN_SUBSTRING_SECRET`` characters, replaced by ``"[redacted]"``; dict keys
    too. A secret such as ``"Bearer sk-..."`` also counts its long parts on their own."""
    exact: set[str] = set()
    for secret in secrets:
        if secret:
            exact.add(secret)
            exact.update(p for p in secret.split() if len(p) >= MIN_SUBSTRING_SECRET)
    if not exact:
        return value
    # Longest first, so a secret that contains another is replaced whole.
    long = sorted((s for s in exact if len(s) >= MIN_SUBSTRING_SECRET), key=len, reverse=True)

    def scrub(item: Any) -> Any:
        if isinstance(item, str):
            if item in exact:
                return REDACTED
            for secret in long:
                if secret in item:
                    item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {scrub(k): scrub(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [scrub(v) for v in item]
        return item

    return scrub(value)


class Notifier:
    """Sends events of ``cfg.kinds`` to ``cfg.webhook``. Construct anywhere; ``start`` on
    the running loop; ``aclose`` when done. Counts every event it accepts or refuses in
    ``flipback_notifications_total{result}``: ``sent``, ``failed`` (after all attempts) or
    ``dropped`` (queue full, still queued at close, or offered after it)."""

    def __init__(
        self,
        cfg: NotifyConfig,
        metrics: Metrics,
        *,
        secrets: Secrets = _no_secrets,
        queue_size: int = QUEUE_SIZE,
        backoff: Sequence[float] = BACKOFF,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._secrets = secrets
        self._backoff = tuple(backoff)
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self._session: aiohttp.ClientSession | None = None
        self._worker = TaskSet("notify", limit=1)
        self._closed = False

    @property
    def cfg(self) -> NotifyConfig:
        return self._cfg

    def reconfigure(self, cfg: NotifyConfig) -> None:
        """Hot reload: the kinds apply to events emitted from now on; the webhook and
        timeout to every delivery attempt from now on, queued events included."""
        self._cfg = cfg

    def offer(self, event: Event) -> None:
        """The ``EventLog`` listener: enqueue a matching event without waiting, or drop it.
        Never raises, never does I/O."""
        if not self._cfg.webhook or event.kind not in self._cfg.kinds:
            return
        if self._closed:
            self._count("dropped")
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._count("dropped")

    def start(self) -> None:
        """Open the session and start the worker; needs a running loop. Idempotent."""
        if len(self._worker) or self._closed:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
            auto_decompress=False,
        )
        self._worker.spawn(self._run(), name="notify")

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop accepting, deliver what can be within ``timeout``, then cancel the rest
        (counted ``dropped``) and close the session."""
        self._closed = True
        try:
            if len(self._worker):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout)
        finally:  # also when aclose itself is cancelled: no worker may outlive the session
            await self._worker.cancel()
            left = self._queue.qsize()
            while not self._queue.empty():
                self._queue.get_nowait()
            if left:
                self._count("dropped", left)
            if self._session is not None:
                await self._session.close()
                self._session = None

    def pending(self) -> int:
        """Events queued and not yet taken by the worker (at most ``queue_size``)."""
        return self._queue.qsize()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                sent = await self._deliver(event)
            except asyncio.CancelledError:
                self._count("dropped")  # cut by aclose mid-delivery
                raise
            except Exception:  # a broken event must not stop later notifications
                logger.exception("notify: cannot deliver %s event", event.kind)
                sent = False
            finally:
                self._queue.task_done()
            self._count("sent" if sent else "failed")

    async def _deliver(self, event: Event) -> bool:
        body = orjson.dumps(redact(event.as_json(), self._secrets()))
        delivery = random_ids.token_hex(8)
        assert self._session is not None
        problem = ""
        for attempt in range(len(self._backoff) + 1):
            if attempt:
                await asyncio.sleep(self._backoff[attempt - 1])
            cfg = self._cfg
            if not cfg.webhook:
                return False
            try:
                async with self._session.post(
                    cfg.webhook,
                    data=body,
                    headers={"X-Flipback-Delivery": delivery,
                             "X-Flipback-Attempt": str(attempt + 1)},
                    timeout=aiohttp.ClientTimeout(total=cfg.timeout),
                    allow_redirects=False,
                ) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    problem = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = repr(exc)
        logger.warning("notify: %s event not delivered after %d attempts: %s", event.kind,
                       len(self._backoff) + 1, problem)
        return False

    def _count(self, result: str, n: int = 1) -> None:
        self._metrics.notifications_total.labels(result=result).inc(n)

    def __repr__(self) -> str:
        return (f"<Notifier {self._cfg.webhook}: {self._queue.qsize()} queued"
                f"{', closed' if self._closed else ''}>")

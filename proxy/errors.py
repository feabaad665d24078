"""The error tree. Third-party exceptions are converted into these once, at the I/O edge."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error flipback raises on purpose."""


class ConfigError(ProxyError):
    """A config that cannot be served. ``errors`` holds every problem found, each a
    ready-to-print ``FILE:LINE: path.to.field: message`` line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors[0] if errors else "invalid config")
        self.errors = errors


class UpstreamError(ProxyError):
    """The upstream did not give a usable answer. ``kind`` is the metric outcome label."""

    kind = "error"
    status = 502


class ConnectFailed(UpstreamError):
    """Connecting (or writing the request) failed; nothing was received."""


class UpstreamTimeout(UpstreamError):
    """No response headers within ``timeout``, or a body gap over ``idle_timeout``."""

    kind = "timeout"
    status = 504


class Saturated(UpstreamError):
    """``max_pending`` requests already wait for a connection to this upstream."""

    status = 503


class StreamBroken(UpstreamError):
    """The upstream connection ended or reset before the response was complete."""


class ClientRequestError(ProxyError):
    """The client's request cannot be served as sent: ``status`` is the 4xx answer and
    ``reason`` the ``flipback_client_rejections_total`` label."""

    def __init__(self, status: int, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class BodyTooLarge(ClientRequestError):
    """The client's request body passed ``server.max_body``."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message, reason="body_too_large")


class BodyTimeout(ClientRequestError, TimeoutError):
    """No request body byte for ``server.body_timeout``. A TimeoutError too, so that
    aiohttp's lingering read after the handler treats it as the timeout it is."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message, reason="body_timeout")


def describe(exc: BaseException) -> str:
    """An unexpected exception in one line: its type and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

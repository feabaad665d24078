"""The kill switch's answer (SPEC §5): a static response, or a well-formed OpenAI chat
completion carrying ``openai_message`` so chat UIs degrade gracefully instead of breaking."""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.config.model import KillSwitchConfig
from proxy.http1.response import Reply


def _wants_stream(body: bytes) -> tuple[bool, str]:
    """(``"stream": true`` in the request, the requested model name)."""
    if not body:
        return False, "flipback"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, "flipback"
    if not isinstance(data, dict):
        return False, "flipback"
    model = data.get("model")
    return data.get("stream") is True, model if isinstance(model, str) else "flipback"


def kill_response(cfg: KillSwitchConfig, request_body: bytes, request_id: str,
                  id_header: str = "x-request-id") -> Reply:
    headers: tuple[tuple[str, str], ...] = (("x-flipback-upstream", "kill_switch"),)
    if request_id:
        headers += ((id_header, request_id),)
    message = cfg.openai_message
    if message is None:
        return Reply(status=cfg.status, body=cfg.body.encode(),
                     headers=(*headers, ("Content-Type", cfg.content_type)))
    stream, model = _wants_stream(request_body)
    created = int(time.time())
    ident = f"chatcmpl-flipback-{request_id}"
    if not stream:
        completion = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": message},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        return Reply(status=200, body=orjson.dumps(completion),
                     headers=(*headers, ("Content-Type", "application/json")))

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        event = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(event) + b"\n\n"

    sse = (chunk({"role": "assistant", "content": message}, None)
           + chunk({}, "stop") + b"data: [DONE]\n\n")
    return Reply(status=200, body=sse, headers=(
        *headers, ("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")))

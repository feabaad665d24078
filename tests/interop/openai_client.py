"""The OpenAI Python SDK against an OpenAI-compatible server (through flipback): a
completion, a chat completion and a streamed chat completion, each with its response
headers. Prints one JSON document. Run with the llama venv's python (it has ``openai``):
``python openai_client.py BASE_URL``. It imports nothing from flipback."""

from __future__ import annotations

import json
import sys

from openai import OpenAI


def headers_of(raw: object) -> dict[str, list[str]]:
    h = raw.headers  # type: ignore[attr-defined]
    return {k: h.get_list(k) for k in ("x-request-id", "x-flipback-upstream")}


def main(base_url: str) -> dict[str, object]:
    client = OpenAI(base_url=base_url, api_key="interop", max_retries=0, timeout=60)
    out: dict[str, object] = {}

    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    completion = raw.parse()
    out["completion"] = {"headers": headers_of(raw), "request_id": completion._request_id,
                         "text": completion.choices[0].text,
                         "finish_reason": completion.choices[0].finish_reason,
                         "usage": completion.usage.completion_tokens if completion.usage else None}

    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0)
    chat = raw.parse()
    out["chat"] = {"headers": headers_of(raw), "request_id": chat._request_id,
                   "role": chat.choices[0].message.role,
                   "content": chat.choices[0].message.content,
                   "finish_reason": chat.choices[0].finish_reason}

    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
            temperature=0, stream=True) as resp:
        chunks = list(resp.parse())
        out["stream"] = {"headers": headers_of(resp), "chunks": len(chunks),
                         "content": "".join(c.choices[0].delta.content or ""
                                            for c in chunks if c.choices),
                         "finish_reason": [c.choices[0].finish_reason
                                           for c in chunks if c.choices][-1]}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))

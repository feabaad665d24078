"""OpenAI-style responses as servers write them, for the LLM telemetry tests.

Each stream is the body exactly as recorded in shape from the named server (ids, times
and fingerprints made up; field order, spacing and the extra fields kept), one list item
per SSE event, in the order sent. ``sse`` joins them into the bytes on the wire.
"""

from __future__ import annotations


def _content(word: str) -> str:
    return '{"content":"' + word + '"}'


def _args(piece: str) -> str:
    return '{"tool_calls":[{"index":0,"function":{"arguments":"' + piece + '"}}]}'


# OpenAI chat completions, stream: true, stream_options: {include_usage: true}: every
# chunk carries "usage":null, the finish chunk has an empty delta, then a usage chunk with
# no choices. 9 content events, usage says 9 completion tokens.
_OA = ('{"id":"chatcmpl-AbC4x9","object":"chat.completion.chunk","created":1733390000,'
       '"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
       '"system_fingerprint":"fp_0705bf87c0","choices":[{"index":0,"delta":%s,'
       '"logprobs":null,"finish_reason":%s}],"usage":null}')
OPENAI_CHAT_USAGE = [
    _OA % ('{"role":"assistant","content":"","refusal":null}', "null"),
    *(_OA % (_content(word), "null") for word in
      ("Hello", "!", " How", " can", " I", " help", " you", " today", "?")),
    _OA % ("{}", '"stop"'),
    ('{"id":"chatcmpl-AbC4x9","object":"chat.completion.chunk","created":1733390000,'
     '"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
     '"system_fingerprint":"fp_0705bf87c0","choices":[],"usage":{"prompt_tokens":19,'
     '"completion_tokens":9,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":0,'
     '"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
     '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}'),
    "[DONE]",
]

# vLLM's OpenAI server, no include_usage: no usage anywhere; "stop_reason" beside
# finish_reason. 6 content events ("The", " capital", ... "."), the role chunk empty.
_VL = ('{"id":"chatcmpl-5c1d0f3e","object":"chat.completion.chunk","created":1733390001,'
       '"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":%s,'
       '"logprobs":null,"finish_reason":%s%s}]}')
VLLM_CHAT_NO_USAGE = [
    _VL % ('{"role":"assistant","content":""}', "null", ""),
    *(_VL % (_content(word), "null", "") for word in
      ("The", " capital", " of", " France", " is", " Paris.")),
    _VL % ('{"content":""}', '"stop"', ',"stop_reason":null'),
    "[DONE]",
]

# OpenAI tool call: content null, the function name first with empty arguments, then the
# arguments in 5 pieces (the content events), finish_reason tool_calls, usage.
OPENAI_TOOL_CALL = [
    _OA % ('{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_Qm1x",'
           '"type":"function","function":{"name":"get_weather","arguments":""}}],'
           '"refusal":null}', "null"),
    *(_OA % (_args(piece), "null")
      for piece in ('{\\"', 'city', '\\":\\"', 'Paris', '\\"}')),
    _OA % ("{}", '"tool_calls"'),
    ('{"id":"chatcmpl-AbC4x9","object":"chat.completion.chunk","created":1733390000,'
     '"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":81,'
     '"completion_tokens":15,"total_tokens":96}}'),
    "[DONE]",
]

# llama.cpp's server: finish_reason first in the choice, the object last; the answer is
# cut at max_tokens (finish_reason "length") and the last chunk has usage and timings.
_LC = ('{"choices":[{"finish_reason":%s,"index":0,"delta":%s}],"created":1733390002,'
       '"id":"chatcmpl-xJ2k","model":"tiny","system_fingerprint":"b4273-0d9a8d9e",'
       '"object":"chat.completion.chunk"%s}')
LLAMACPP_LENGTH = [
    *(_LC % ("null", _content(word), "") for word in
      ("Once", " upon", " a", " time", ",", " there", " was", " a")),
    _LC % ('"length"', "{}", ',"usage":{"completion_tokens":8,"prompt_tokens":14,'
           '"total_tokens":22},"timings":{"prompt_n":14,"prompt_ms":12.1,"predicted_n":8,'
           '"predicted_ms":80.4}'),
    "[DONE]",
]

# A stream that fails midway: 3 content events, then the server's error chunk (OpenAI
# error shape), and the connection closes without [DONE].
OPENAI_ERROR_MIDWAY = [
    *(_VL % (_content(word), "null", "") for word in ("Let", " me", " think")),
    '{"error":{"message":"The server had an error while processing your request.",'
    '"type":"server_error","param":null,"code":null}}',
]

# Legacy completions (POST /v1/completions), vLLM: choices[].text, no usage.
_LEG = ('{"id":"cmpl-9a8b7c","object":"text_completion","created":1733390003,'
        '"model":"gpt2","choices":[{"index":0,"text":"%s","logprobs":null,'
        '"finish_reason":%s,"stop_reason":null}]}')
LEGACY_COMPLETION = [
    *(_LEG % (word, "null") for word in (" the", " quick", " brown", " fox")),
    _LEG % ("", '"length"'),
    "[DONE]",
]

# Non-streamed chat completion (OpenAI).
OPENAI_JSON = (
    b'{\n  "id": "chatcmpl-AbC4y0",\n  "object": "chat.completion",\n  "created": 1733390004,'
    b'\n  "model": "gpt-4o-mini-2024-07-18",\n  "choices": [\n    {\n      "index": 0,\n'
    b'      "message": {\n        "role": "assistant",\n        "content": "Hi there! How can'
    b' I help?",\n        "refusal": null\n      },\n      "logprobs": null,\n'
    b'      "finish_reason": "stop"\n    }\n  ],\n  "usage": {\n    "prompt_tokens": 9,\n'
    b'    "completion_tokens": 8,\n    "total_tokens": 17\n  },\n'
    b'  "system_fingerprint": "fp_0705bf87c0"\n}\n'
)


def sse(events: list[str], newline: str = "\n") -> list[bytes]:
    """Each event as the bytes of one ``data:`` event (one chunk per event)."""
    return [f"data: {event}{newline}{newline}".encode() for event in events]

"""Admin API guards (SPEC §8, issue 14): what a browser can and cannot make the admin do
(Host, Origin, JSON Content-Type), a bearer header that is not UTF-8, and the rollback
reason cap. Requests go over raw sockets so that every header is sent exactly as written."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest

from tests.test_admin import ROUTE

JSON = "application/json"
WEIGHT_100 = b'{"weight": 100}'
MARK = "…[truncated]"


Answer = tuple[int, dict[str, str], bytes]  # status, headers (lowercased names), body


async def raw(port: int, head: str | bytes, body: bytes = b"") -> Answer:
    """Send one request as written (``head``: request line and headers, no blank line; a
    Content-Length is added for ``body``) and read the whole answer."""
    if isinstance(head, str):
        head = head.encode()
    head += b"\r\nConnection: close"
    if body:
        head += b"\r\nContent-Length: %d" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    top, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, payload


def post(path: str, host: str, *extra: str) -> str:
    return "\r\n".join([f"POST {path} HTTP/1.1", f"Host: {host}", *extra])


async def _chat(fb) -> dict:
    return await fb.get_json("/routes/chat")


async def _start(model, flipback, admin: str = ""):
    v1, v2 = await model("v1"), await model("v2")
    return await flipback(admin + ROUTE, v1=v1.url, v2=v2.url, weight=0, extra="")


async def test_guard_refuses_dns_rebinding_and_cross_site_posts(model, flipback):
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    # The curl: a page on evil.example, its name rebound to 127.0.0.1.
    status, headers, body = await raw(port, post(
        "/routes/chat/weight", "evil.example", "Origin: http://evil.example",
        "Content-Type: text/plain"), WEIGHT_100)
    assert status == 421 and headers["content-type"].startswith(JSON)
    assert "evil.example" in orjson.loads(body)["error"]
    # Even a well-formed JSON POST is refused under a foreign name (with its port too).
    status, _, _ = await raw(port, post("/routes/chat/weight", f"evil.example:{port}",
                                        f"Content-Type: {JSON}"), WEIGHT_100)
    assert status == 421
    # A loopback Host with a foreign (or opaque, or other-port) Origin: a cross-site form.
    for origin in ("http://evil.example", "null", f"http://localhost:{port + 1}",
                   f"https://127.0.0.1:{port}", f"http://127.0.0.1.evil.example:{port}"):
        status, _, body = await raw(port, post(
            "/routes/chat/weight", f"127.0.0.1:{port}", f"Origin: {origin}",
            f"Content-Type: {JSON}"), WEIGHT_100)
        assert status == 403, origin
        assert "origin" in orjson.loads(body)["error"].lower()
    # A form POST (rollback) from a page: no JSON content type.
    status, _, body = await raw(port, post(
        "/routes/chat/rollback", f"127.0.0.1:{port}",
        "Content-Type: application/x-www-form-urlencoded"), b"reason=x")
    assert status == 415 and "application/json" in orjson.loads(body)["error"]
    chat = await _chat(fb)
    assert chat["effective_weight"] == 0 and chat["state"] == "stable"
    assert (await fb.get_json("/events"))["events"] == []


async def test_guard_needs_json_content_type_even_without_a_body(model, flipback):
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    for path in ("/reload", "/routes/chat/promote", "/routes/chat/resume"):
        status, headers, body = await raw(port, post(path, f"127.0.0.1:{port}"))
        assert status == 415, path
        assert headers["content-type"].startswith(JSON) and orjson.loads(body)["error"]
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/jsonx",
                  "application/merge-patch+json"):
        status, _, _ = await raw(port, post("/routes/chat/weight", f"127.0.0.1:{port}",
                                            f"Content-Type: {ctype}"), WEIGHT_100)
        assert status == 415, ctype
    assert (await _chat(fb))["effective_weight"] == 0
    # An empty JSON POST is fine; so is a charset parameter.
    status, _, body = await raw(port, post("/routes/chat/promote", f"127.0.0.1:{port}",
                                           f"Content-Type: {JSON}"))
    assert status == 200 and orjson.loads(body)["state"] == "promoted"
    status, _, _ = await raw(port, post("/routes/chat/weight", f"127.0.0.1:{port}",
                                        "Content-Type: Application/JSON; charset=utf-8"),
                             b'{"weight": 10}')
    assert status == 200 and (await _chat(fb))["effective_weight"] == 10


async def test_guard_accepts_every_loopback_name_and_own_origin(model, flipback):
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    weight = 0
    for host, origin in [("127.0.0.1", None), (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
                         ("localhost", None), (f"LocalHost:{port}", f"http://localhost:{port}"),
                         (f"127.9.8.7:{port}", f"http://127.9.8.7:{port}"),
                         (f"[::1]:{port}", f"http://[::1]:{port}"), ("[::1]", None)]:
        weight += 1
        extra = [f"Content-Type: {JSON}"] + ([f"Origin: {origin}"] if origin else [])
        status, _, body = await raw(port, post("/routes/chat/weight", host, *extra),
                                    b'{"weight": %d}' % weight)
        assert status == 200, (host, origin, body)
    assert (await _chat(fb))["effective_weight"] == pytest.approx(weight)


async def test_guard_leaves_reads_open_under_any_host(model, flipback):
    """Probes and Prometheus reach the admin by pod IP; dashboards read routes and events."""
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    for path in ("/healthz", "/readyz", "/metrics", "/routes", "/routes/chat", "/events"):
        status, _, _ = await raw(port, f"GET {path} HTTP/1.1\r\nHost: 10.1.2.3:9901\r\n"
                                       "Origin: http://evil.example")
        assert status == 200, path


async def test_guard_grants_no_cors_preflight(model, flipback):
    """A cross-origin ``fetch`` with a JSON body needs a preflight; the admin never grants it."""
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    status, headers, _ = await raw(port, "\r\n".join([
        "OPTIONS /routes/chat/weight HTTP/1.1", f"Host: 127.0.0.1:{port}",
        "Origin: http://evil.example", "Access-Control-Request-Method: POST",
        "Access-Control-Request-Headers: content-type"]))
    assert status >= 400 and "access-control-allow-origin" not in headers


async def test_guard_with_token_skips_host_but_needs_json(model, flipback, monkeypatch):
    """A token is the real protection: a gateway admin reached by a service name works."""
    monkeypatch.setenv("FB_TEST_TOKEN", "s3cret")
    fb = await _start(model, flipback,
                      'admin: {{listen: "127.0.0.1:0", token_env: FB_TEST_TOKEN}}\n')
    port = fb.app.admin_port
    host = "flipback-admin.prod.svc.cluster.local:9901"
    status, _, _ = await raw(port, post("/routes/chat/weight", host, f"Content-Type: {JSON}",
                                        "Authorization: Bearer s3cret"), WEIGHT_100)
    assert status == 200 and (await _chat(fb))["effective_weight"] == 100
    status, _, body = await raw(port, post("/routes/chat/weight", host, "Content-Type: text/plain",
                                           "Authorization: Bearer s3cret"), b'{"weight": 5}')
    assert status == 415 and orjson.loads(body)["error"]
    status, _, _ = await raw(port, post("/routes/chat/weight", host, f"Content-Type: {JSON}"),
                             b'{"weight": 5}')
    assert status == 401
    assert (await _chat(fb))["effective_weight"] == 100


@pytest.mark.parametrize("credentials", [b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer s3cr\xe9t",
                                         b"Bearer s3cr\xc3\xa9t\xff"])
async def test_auth_bearer_not_utf8_is_401_without_traceback(model, flipback, monkeypatch,
                                                           caplog, credentials: bytes):
    monkeypatch.setenv("FB_TEST_TOKEN", "s3crét")
    fb = await _start(model, flipback,
                      'admin: {{listen: "127.0.0.1:0", token_env: FB_TEST_TOKEN}}\n')
    port = fb.app.admin_port
    caplog.set_level(logging.DEBUG)
    head = post("/routes/chat/promote", f"127.0.0.1:{port}", f"Content-Type: {JSON}").encode()
    status, headers, body = await raw(port, head + b"\r\nAuthorization: " + credentials)
    assert status == 401 and headers["content-type"].startswith(JSON)
    assert "unauthorized" in orjson.loads(body)["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await _chat(fb))["state"] == "stable"
    # The same token, sent as its UTF-8 bytes, is accepted (and the scheme is case-blind).
    status, _, _ = await raw(port, head + b"\r\nAuthorization: bearer s3cr\xc3\xa9t")
    assert status == 200 and (await _chat(fb))["state"] == "promoted"


async def test_rollback_reason_is_capped_at_1_kib(model, flipback, tmp_path: Path):
    fb = await _start(model, flipback)
    reason = "é" + "x" * 900_000  # one 2-byte character first: the cut still lands on a boundary
    status, body = await fb.post_admin("/routes/chat/rollback", {"reason": reason})
    assert status == 200 and body["state"] == "rolled_back" and body["reason_truncated"] is True
    stored = (await fb.get_json("/events"))["events"][0]["reason"]
    assert stored.endswith(MARK) and stored.startswith("éxxx")
    assert len(stored.encode()) <= 1024
    assert body["last_event"]["reason"] == stored
    await fb.runtime.flush_state()
    saved = orjson.loads((tmp_path / "state.json").read_bytes())
    assert saved["routes"]["chat"]["latch"]["detail"] == stored
    assert (tmp_path / "state.json").stat().st_size < 8192


async def test_rollback_reason_cut_on_a_character_boundary(model, flipback):
    fb = await _start(model, flipback)
    status, body = await fb.post_admin("/routes/chat/rollback", {"reason": "€" * 400})
    stored = body["last_event"]["reason"]
    assert status == 200 and body["reason_truncated"] is True
    assert stored == "€" * ((1024 - len(MARK.encode())) // 3) + MARK


async def test_rollback_reason_up_to_1_kib_is_kept_whole(model, flipback):
    fb = await _start(model, flipback)
    reason = "é" * 512  # exactly 1024 bytes
    status, body = await fb.post_admin("/routes/chat/rollback", {"reason": reason})
    assert status == 200 and body["reason_truncated"] is False
    assert body["last_event"]["reason"] == reason


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_cli_verbs_pass_the_guard(model, flipback, monkeypatch, capsys, token):
    """``flipback rollback|promote|weight|resume|kill`` send JSON, by any loopback name."""
    from proxy.cli.commands import run_verb

    admin = ""
    if token:
        monkeypatch.setenv("FB_TEST_TOKEN", token)
        admin = 'admin: {{listen: "127.0.0.1:0", token_env: FB_TEST_TOKEN}}\n'
    fb = await _start(model, flipback, admin)
    url = f"localhost:{fb.app.admin_port}"
    rollout = fb.runtime.rollout("chat")
    for verb, arg, state in [("weight", 30.0, "canary"), ("kill", "on", "killed"),
                             ("kill", "off", "canary"), ("rollback", "x" * 2000, "rolled_back"),
                             ("resume", None, "stable"), ("promote", None, "promoted")]:
        assert await run_verb(url, token, verb, "chat", arg) == 0, verb
        assert rollout.state == state, verb
    err = capsys.readouterr().err
    assert err.count("cut to 1 KiB") == 1


async def test_guard_headers_not_utf8_are_refused_without_traceback(model, flipback, caplog):
    fb = await _start(model, flipback)
    port = fb.app.admin_port
    caplog.set_level(logging.DEBUG)
    host, json_type = f"127.0.0.1:{port}".encode(), JSON.encode()
    for headers, expected in [((b"Host: \xff\xfe", b"Content-Type: " + json_type), 421),
                              ((b"Host: " + host, b"Origin: http://\xff", b"Content-Type: "
                                + json_type), 403),
                              ((b"Host: " + host, b"Content-Type: application/\xffjson"), 415)]:
        head = b"\r\n".join([b"POST /routes/chat/promote HTTP/1.1", *headers])
        status, _, body = await raw(port, head)
        assert status == expected and orjson.loads(body)["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await _chat(fb))["state"] == "stable"

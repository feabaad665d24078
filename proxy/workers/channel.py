"""The local channel between the parent and its workers: length-prefixed orjson frames
over a unix stream socket. A frame is a JSON object whose ``t`` says what it is."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a config or a batch of pins; anything larger is a bug

Frame = dict[str, Any]


class ChannelError(Exception):
    """The other side sent something that is not a frame."""


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None when the other side closed the channel."""
    try:
        head = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ChannelError(f"frame of {size} bytes")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    try:
        frame = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ChannelError(str(exc)) from None
    if not isinstance(frame, dict):
        raise ChannelError("frame is not an object")
    return frame


def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    """Queue one frame (never blocks; the transport buffers, in order)."""
    body = orjson.dumps(frame)
    writer.write(HEADER.pack(len(body)) + body)

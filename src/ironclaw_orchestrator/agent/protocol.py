"""The agent wire protocol: frames, limits and the version handshake (docs/agent-protocol.md).

Shared by the guest agent and the host client, so it is standard library only and runs on
Python 3.7+ (the agent is copied into guest images whose Python may be old). Nothing here
imports the rest of the project.

A frame is an 8-byte header, two big-endian ``u32``: the length of a UTF-8 JSON object
(1 .. :data:`MAX_JSON` bytes) and the length of a binary payload (0 .. :data:`MAX_PAYLOAD`),
followed by the JSON object, then the payload. Every JSON object has a string ``"t"``
naming the message. Both limits are checked before anything is allocated, so a hostile or
broken peer can make the reader fail, never grow without bound.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Dict  # noqa: UP035

#: The protocol versions this code speaks; the handshake picks the highest common one.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
#: Sent in both ``hello`` messages, so that a stray peer is recognised at once.
PROTOCOL_NAME = "ironclaw-agent"
#: The guest vsock port the agent listens on by default.
DEFAULT_VSOCK_PORT = 5252

HEADER = struct.Struct(">II")
MAX_JSON = 64 * 1024
MAX_PAYLOAD = 256 * 1024
#: Size of the data chunks the two ends send (file bodies, command output).
CHUNK = 64 * 1024
#: Bytes of a command's output the host client keeps unless told otherwise.
DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024

Message = Dict[str, Any]  # noqa: UP006 (the guest may run Python 3.7)


class FrameError(Exception):
    """A frame that breaks the protocol; ``code`` is sent to the peer before closing."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


def encode_frame(msg: Message, payload: bytes = b"") -> bytes:
    """One frame: header, compact JSON of ``msg`` (which must carry ``"t"``), ``payload``."""
    body = json.dumps(msg, separators=(",", ":"), ensure_ascii=True).encode()
    if not 0 < len(body) <= MAX_JSON:
        raise FrameError(f"message {msg.get('t')!r} is {len(body)} bytes of JSON (max {MAX_JSON})")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(body), len(payload)) + body + payload


def decode_header(raw: bytes) -> tuple[int, int]:
    """Lengths from a frame header, refused before anything is read or allocated."""
    json_len, payload_len = HEADER.unpack(raw)
    if not 0 < json_len <= MAX_JSON:
        raise FrameError(f"frame announces {json_len} bytes of JSON (allowed 1 .. {MAX_JSON})")
    if payload_len > MAX_PAYLOAD:
        raise FrameError(f"frame announces a {payload_len}-byte payload (max {MAX_PAYLOAD})")
    return json_len, payload_len


def decode_message(body: bytes) -> Message:
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"frame JSON does not parse: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError('frame JSON is not an object with a string "t"')
    return msg


async def read_frame(reader: asyncio.StreamReader) -> tuple[Message, bytes] | None:
    """The next frame, or ``None`` on a clean end of stream between frames.

    Raises :class:`FrameError` for a broken frame and ``asyncio.IncompleteReadError`` when
    the stream ends inside one.
    """
    try:
        raw = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    json_len, payload_len = decode_header(raw)
    body = await reader.readexactly(json_len)
    payload = await reader.readexactly(payload_len) if payload_len else b""
    return decode_message(body), payload


def hello(role: str, **extra: Any) -> Message:
    """The first message of each end: name, versions spoken, who is speaking."""
    msg: Message = {"t": "hello", "proto": PROTOCOL_NAME, "versions": list(SUPPORTED_VERSIONS)}
    msg["role"] = role
    msg.update(extra)
    return msg


def choose_version(offered: Any) -> int | None:
    """The highest version both ends speak, ``None`` if there is none (or ``offered`` is junk)."""
    if not isinstance(offered, list):
        return None
    common = [v for v in offered if type(v) is int and v in SUPPORTED_VERSIONS]
    return max(common) if common else None


def error(code: str, message: str) -> Message:
    return {"t": "error", "code": code, "message": message}

"""The tunnel's frame codec: bytes in, frames out, and back. No I/O (docs/protocol.md)."""

from __future__ import annotations

import json
import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple


from gateway import boundedjson
from gateway.errors import ProtocolError

FRAME_VERSION = 1
HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12
BASE_WINDOW = 256 * 1024
MAX_PAYLOAD = 1024 * 1024
MAX_METADATA = 16 * 1024
MAX_REASON = 1024


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(IntEnum):
    """Why a whole tunnel ends."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    UNSUPPORTED_VERSION = 3
    NOT_AUTHORIZED = 4


class ResetCode(IntEnum):
    """Why one stream was reset; carried in the RST frame with a sentence for people."""

    CANCELLED = 0
    REFUSED = 1
    CONNECT_FAILED = 2
    UNKNOWN_PROTOCOL = 3
    INTERNAL_ERROR = 4
    UNKNOWN_APP = 5
    TIMEOUT = 6
    GOING_AWAY = 7
    TOO_MANY_STREAMS = 8
    FLOW_CONTROL = 9
    # Private Access (user tunnels): why a user's stream was refused or ended.
    NOT_ASSIGNED = 10
    NO_SEGMENT = 11
    NO_CONNECTOR = 12
    DESTINATION_REFUSED = 13
    REVOKED = 14


class Frame(NamedTuple):
    """One decoded frame. `value` is the window delta (WINDOW_UPDATE) or opaque (PING).

    A NamedTuple of plain ints (compare them with FrameType / Flag members): the decoder
    builds one per frame, and enum construction was a measurable share of a request's cost.
    """

    type: int
    flags: int
    stream_id: int
    value: int = 0
    payload: bytes = b""


# Plain-int copies of the flags for hot paths (IntFlag arithmetic runs Python code).
SYN, ACK, FIN, RST = 1, 2, 4, 8


def data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(FRAME_VERSION, 0, flags, stream_id, len(payload)) + payload



def syn(stream_id: int, metadata: dict) -> bytes:
    return data(stream_id, encode_metadata(metadata), SYN)


def window_update(stream_id: int, delta: int, flags: int = 0) -> bytes:
    return HEADER.pack(FRAME_VERSION, 1, flags, stream_id, delta)


def ping(opaque: int, ack: bool = False) -> bytes:
    return HEADER.pack(FRAME_VERSION, 2, ACK if ack else SYN, 0, opaque)


def go_away(code: int, message: str) -> bytes:
    body = _reason_body(code, message)
    return HEADER.pack(FRAME_VERSION, 3, 0, 0, len(body)) + body


def rst(stream_id: int, code: int, reason: str) -> bytes:
    body = _reason_body(code, reason)
    return HEADER.pack(FRAME_VERSION, 0, RST, stream_id, len(body)) + body


def fin(stream_id: int) -> bytes:
    return HEADER.pack(FRAME_VERSION, 0, FIN, stream_id, 0)


def _reason_body(code: int, reason: str) -> bytes:
    return struct.pack("!I", code) + reason.encode("utf-8")[:MAX_REASON]


def decode_reason(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        return 0, ""
    (code,) = struct.unpack_from("!I", payload)
    return code, payload[4:].decode("utf-8", "replace")


def encode_metadata(metadata: dict) -> bytes:
    block = json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(block) > MAX_METADATA:
        raise ValueError(f"stream metadata is {len(block)} bytes; the limit is {MAX_METADATA}")
    return block


def decode_metadata(payload: bytes) -> dict:
    try:
        value = boundedjson.loads(payload)
    except boundedjson.TooDeep as e:
        raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"SYN metadata {e}")
    except ValueError as e:
        raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"SYN metadata is not a JSON object: {e}")
    if not isinstance(value, dict):
        raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, "SYN metadata is not a JSON object")
    return value


class FrameDecoder:
    """Turns a byte stream into frames; raises ProtocolError on anything malformed."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, chunk: bytes) -> list[Frame]:
        buf = self._buffer
        buf += chunk
        frames = []
        offset = 0
        end = len(buf)
        unpack = HEADER.unpack_from
        while end - offset >= HEADER_SIZE:
            version, ftype, flags, stream_id, length = unpack(buf, offset)
            if version != FRAME_VERSION:
                raise ProtocolError(
                    GoAwayCode.UNSUPPORTED_VERSION,
                    f"frame version {version} is not supported (this end speaks {FRAME_VERSION});"
                    " this is not a gateway tunnel or the peer runs an incompatible release",
                )
            if ftype == 0 or ftype == 3:  # DATA, GO_AWAY: a payload follows
                if length > self._max_payload:
                    raise ProtocolError(
                        GoAwayCode.PROTOCOL_ERROR,
                        f"frame of {length} bytes exceeds the limit of {self._max_payload}",
                    )
                if end - offset - HEADER_SIZE < length:
                    break
                start = offset + HEADER_SIZE
                payload = bytes(buf[start:start + length])
                offset = start + length
                frames.append(Frame(ftype, flags, stream_id, 0, payload))
            elif ftype == 1 or ftype == 2:  # WINDOW_UPDATE, PING: the length is a value
                offset += HEADER_SIZE
                frames.append(Frame(ftype, flags, stream_id, length))
            else:
                raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"unknown frame type {ftype}")
            if flags & ~0xF:
                raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"unknown flags 0x{flags:x}")
        if offset:
            del buf[:offset]
        return frames

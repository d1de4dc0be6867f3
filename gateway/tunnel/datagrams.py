"""UDP datagrams carried on a stream with their boundaries kept, and a bounded queue. No I/O.

A UDP flow (Private Access, issue 10) is one stream; its bytes are a sequence of datagrams,
each a 2-byte big-endian length followed by that many bytes (docs/protocol.md, *UDP flows*).
:class:`DatagramDecoder` turns the stream's bytes back into datagrams, however they were split;
:class:`DatagramQueue` holds datagrams waiting for a slow side and drops the oldest when full,
counting what it drops, because for UDP a fresh datagram is worth more than an old one and
memory must stay bounded.

Used by the UDP flows of Private Access: the tcp plugin's "udp" handler on the connector and
the access client.
"""

from __future__ import annotations

import struct
from collections import deque

from gateway.errors import GatewayError

__all__ = ["LENGTH_SIZE", "MAX_DATAGRAM", "DatagramDecoder", "DatagramError", "DatagramQueue", "encode_datagram"]

_LENGTH = struct.Struct("!H")
LENGTH_SIZE = _LENGTH.size  # 2
MAX_DATAGRAM = 0xFFFF


class DatagramError(GatewayError):
    """A datagram longer than this end takes; the flow's stream should be reset with the message."""


def encode_datagram(datagram: bytes) -> bytes:
    """The length prefix and the datagram; ValueError above MAX_DATAGRAM bytes."""
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(datagram)} bytes does not fit the 2-byte length (at most {MAX_DATAGRAM})")
    return _LENGTH.pack(len(datagram)) + datagram


class DatagramDecoder:
    """Length-prefixed datagrams back out of a byte stream fed in arbitrary chunks.

    What it keeps between calls is at most one incomplete datagram and its prefix:
    ``max_datagram + 1`` bytes. A prefix announcing more than ``max_datagram`` raises
    DatagramError at once, before its bytes are waited for.
    """

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be 0..{MAX_DATAGRAM}, got {max_datagram}")
        self._buffer = bytearray()
        self._max = max_datagram

    @property
    def pending(self) -> int:
        """Bytes held of a datagram not yet complete."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buffer
        buf += chunk
        datagrams = []
        offset = 0
        end = len(buf)
        while end - offset >= LENGTH_SIZE:
            (length,) = _LENGTH.unpack_from(buf, offset)
            if length > self._max:
                raise DatagramError(f"a datagram of {length} bytes is over this end's limit of {self._max}")
            start = offset + LENGTH_SIZE
            if end - start < length:
                break
            datagrams.append(bytes(buf[start:start + length]))
            offset = start + length
        if offset:
            del buf[:offset]
        return datagrams


class DatagramQueue:
    """Datagrams waiting to be sent, at most ``max_datagrams`` and ``max_bytes`` of them.

    A push that would go over either bound drops the oldest datagrams until the new one fits;
    a datagram larger than ``max_bytes`` by itself is dropped instead. ``dropped`` and
    ``dropped_bytes`` count every datagram dropped, for the flow's session record and metrics.
    """

    def __init__(self, max_datagrams: int, max_bytes: int) -> None:
        if max_datagrams < 1 or max_bytes < 0:
            raise ValueError(f"a queue holds at least 1 datagram and 0 bytes, got {max_datagrams} and {max_bytes}")
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self._items: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, datagram: bytes) -> int:
        """Queue a datagram; returns how many datagrams this push dropped."""
        size = len(datagram)
        if size > self.max_bytes:
            self._count_drop(size)
            return 1
        dropped = 0
        while self._items and (len(self._items) >= self.max_datagrams or self.queued_bytes + size > self.max_bytes):
            self._count_drop(len(self.pop()))
            dropped += 1
        self._items.append(datagram)
        self.queued_bytes += size
        return dropped

    def pop(self) -> bytes:
        """The oldest datagram; IndexError when the queue is empty."""
        datagram = self._items.popleft()
        self.queued_bytes -= len(datagram)
        return datagram

    def clear(self) -> None:
        """Forget what is queued (the flow ended); that is not counted as dropped."""
        self._items.clear()
        self.queued_bytes = 0

    def _count_drop(self, size: int) -> None:
        self.dropped += 1
        self.dropped_bytes += size

"""WebSocket by hand (RFC 6455) for integration tests: frames both ways and the server's side of
the upgrade. test_http_proxy.py's echo back end and test_browser.py's web app use it."""

from __future__ import annotations

import base64
import hashlib
import socket
import struct

# RFC 6455 1.3 (our test client and server share it, so only a browser shows it is the right one:
# test_browser.py's Chromium does)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_switch(conn: socket.socket, key: bytes) -> None:
    """Answer an upgrade request carrying Sec-WebSocket-Key `key` with 101 Switching Protocols."""
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n")


def recv_exactly(sock: socket.socket, n: int, buf: bytes = b"") -> tuple[bytes, bytes]:
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed with {len(buf)} of {n} bytes")
        buf += data
    return buf[:n], buf[n:]


def ws_frame(payload: bytes, opcode: int = 1, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame (RFC 6455), masked when `mask` is given (clients must mask)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def ws_read(sock: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """(opcode, payload, rest) of the next frame."""
    two, buf = recv_exactly(sock, 2, buf)
    opcode, n, masked = two[0] & 0x0F, two[1] & 0x7F, two[1] & 0x80
    if n == 126:
        ext, buf = recv_exactly(sock, 2, buf)
        n = struct.unpack("!H", ext)[0]
    elif n == 127:
        ext, buf = recv_exactly(sock, 8, buf)
        n = struct.unpack("!Q", ext)[0]
    mask = b""
    if masked:
        mask, buf = recv_exactly(sock, 4, buf)
    payload, buf = recv_exactly(sock, n, buf)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, buf

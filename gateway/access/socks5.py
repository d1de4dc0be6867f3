"""The server side of SOCKS5 (RFC 1928) for a loopback listener, as a state machine without I/O.

Bytes go in with :meth:`Socks5Server.feed`, in whatever chunks they arrive; what to write back
comes out in a :class:`Step`, and a complete request comes out for the caller to decide on.
The caller answers with :meth:`Socks5Server.reply`; after a success every byte that followed
the request is handed over as payload. A broken greeting or request raises
:class:`SocksError` carrying the bytes to write before closing (a refusal the client can
read, where the protocol has one).

What this server speaks: the method "no authentication" only (the listener is on loopback; any
other offer gets 0xFF), the commands CONNECT and UDP ASSOCIATE (BIND gets reply 0x07), and the
address types IPv4, domain name and IPv6. A domain name is handed over as the name the client
sent and never resolved here: names resolve on the connector (issue 10, private DNS).

Also the header of UDP datagrams relayed for UDP ASSOCIATE (RFC 1928 section 7).
``gateway access socks`` (gateway/access/client.py) drives it.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum

from attrs import frozen

from gateway.errors import GatewayError

__all__ = [
    "MAX_EARLY_DATA",
    "NO_ACCEPTABLE_METHODS",
    "NO_AUTHENTICATION",
    "AddressType",
    "Command",
    "Reply",
    "Request",
    "Socks5Server",
    "SocksError",
    "Step",
    "UdpDatagram",
    "decode_reply",
    "decode_udp",
    "encode_address",
    "encode_greeting",
    "encode_request",
    "encode_udp",
]

VERSION = 5
NO_AUTHENTICATION = 0x00
NO_ACCEPTABLE_METHODS = 0xFF
# Bytes a client may send after its request, before our reply (optimistic data); more is refused,
# so a client that ignores the protocol cannot grow the buffer. The caller normally stops reading
# while it decides, so this is a backstop.
MAX_EARLY_DATA = 64 * 1024
_PORT = struct.Struct("!H")


class Command(IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Reply(IntEnum):
    """The REP field of a reply (RFC 1928 section 6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class SocksError(GatewayError):
    """The client broke SOCKS5 or asked for what we refuse: write ``reply``, then close.

    ``reason`` is for the log; ``reply`` holds every byte still owed to the client (a method
    selection already due, then the refusal), possibly nothing.
    """

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        self.reason = reason
        self.reply = reply
        super().__init__(reason)


@frozen
class Request:
    """A complete request: CONNECT or UDP ASSOCIATE, and the address as sent (a name stays a name)."""

    command: Command
    host: str
    port: int
    address_type: AddressType


@frozen
class Step:
    """What the caller does after feeding bytes or replying.

    ``send``: write these bytes. ``request``: decide on this request, then call ``reply``.
    ``payload``: bytes of the connection proper (after a successful reply). ``close``: close
    once ``send`` is written (after a refusal).
    """

    send: bytes = b""
    request: Request | None = None
    payload: bytes = b""
    close: bool = False


class _Incomplete(Exception):
    """More bytes are needed."""


class _Refused(Exception):
    def __init__(self, code: Reply, reason: str) -> None:
        self.code = code
        self.reason = reason


def _decode_address(buf: bytes | bytearray, offset: int) -> tuple[AddressType, str, int, int]:
    """ATYP, DST.ADDR, DST.PORT at ``offset``: (type, host, port, end offset).

    Raises _Incomplete when bytes are missing and _Refused for an address we cannot take.
    """
    if len(buf) <= offset:
        raise _Incomplete()
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
    elif atyp == AddressType.IPV6:
        end = start + 16
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= start:
            raise _Incomplete()
        start += 1
        end = start + buf[start - 1]
        if end == start:
            raise _Refused(Reply.GENERAL_FAILURE, "the domain name is empty")
    else:
        raise _Refused(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp} is not IPv4 (1), a name (3) or IPv6 (4)")
    if len(buf) < end + 2:
        raise _Incomplete()
    raw = bytes(buf[start:end])
    if atyp == AddressType.DOMAIN:
        try:
            host = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(Reply.GENERAL_FAILURE, "the domain name is not UTF-8") from None
    else:
        host = str(ipaddress.ip_address(raw))
    (port,) = _PORT.unpack_from(buf, end)
    return AddressType(atyp), host, port, end + 2


def encode_address(host: str, port: int) -> bytes:
    """ATYP, ADDR, PORT for an IP address literal or a name (1..255 bytes of UTF-8)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"a SOCKS5 name is 1..255 bytes, got {len(name)}") from None
        return bytes([AddressType.DOMAIN, len(name)]) + name + _PORT.pack(port)
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes([atyp]) + address.packed + _PORT.pack(port)


def _reply(code: int, host: str, port: int) -> bytes:
    return bytes([VERSION, code, 0]) + encode_address(host, port)


_REFUSAL_ADDRESS = ("0.0.0.0", 0)


class Socks5Server:
    """One client connection's SOCKS5 negotiation: greeting, request, reply, then payload.

    States: ``greeting`` → ``request`` → ``waiting`` (a request is out for a decision) →
    ``established`` after a successful reply, or ``closed`` after a refusal or an error.
    """

    def __init__(self) -> None:
        self.state = "greeting"
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Step:
        """Take bytes from the client; raises SocksError when the connection must end."""
        if self.state == "established":
            return Step(payload=bytes(data))
        if self.state == "closed":
            raise SocksError("bytes after the negotiation ended in a refusal")
        self._buffer += data
        out = b""
        request = None
        try:
            if self.state == "greeting":
                out = self._greeting()
            if self.state == "request":
                request = self._request()
            if self.state == "waiting" and len(self._buffer) > MAX_EARLY_DATA:
                raise _Refused(Reply.GENERAL_FAILURE, f"the client sent more than {MAX_EARLY_DATA} bytes "
                                                      "after its request, before the reply")
        except _Incomplete:
            pass
        except _Refused as refused:
            self._close()
            raise SocksError(refused.reason, out + _reply(refused.code, *_REFUSAL_ADDRESS)) from None
        except SocksError as error:
            self._close()
            error.reply = out + error.reply
            raise
        return Step(send=out, request=request)

    def reply(self, code: Reply, host: str = "0.0.0.0", port: int = 0) -> Step:
        """Answer the request: SUCCEEDED with the bound address (UDP ASSOCIATE: the relay's), or a refusal."""
        if self.state != "waiting":
            raise RuntimeError(f"reply() needs a request waiting for a decision; the state is {self.state}")
        send = _reply(code, host, port)
        if code != Reply.SUCCEEDED:
            self._close()
            return Step(send=send, close=True)
        self.state = "established"
        payload = bytes(self._buffer)
        self._buffer = bytearray()
        return Step(send=send, payload=payload)

    def _greeting(self) -> bytes:
        buf = self._buffer
        if not buf:
            raise _Incomplete()
        if buf[0] != VERSION:
            what = "SOCKS4, which is not supported" if buf[0] == 4 else f"version {buf[0]}"
            raise SocksError(f"the greeting is not SOCKS5 but {what}")
        if len(buf) < 2:
            raise _Incomplete()
        count = buf[1]
        if count == 0:
            raise SocksError("the greeting offers no authentication method", bytes([VERSION, NO_ACCEPTABLE_METHODS]))
        if len(buf) < 2 + count:
            raise _Incomplete()
        methods = bytes(buf[2:2 + count])
        del buf[:2 + count]
        if NO_AUTHENTICATION not in methods:
            raise SocksError(f"the client offers only methods {', '.join(f'0x{m:02x}' for m in methods)}; "
                             "this listener takes 'no authentication' (0x00) only",
                             bytes([VERSION, NO_ACCEPTABLE_METHODS]))
        self.state = "request"
        return bytes([VERSION, NO_AUTHENTICATION])

    def _request(self) -> Request:
        buf = self._buffer
        if len(buf) < 3:
            raise _Incomplete()
        if buf[0] != VERSION:
            raise _Refused(Reply.GENERAL_FAILURE, f"the request is not SOCKS5 but version {buf[0]}")
        command = buf[1]
        if command == Command.BIND:
            raise _Refused(Reply.COMMAND_NOT_SUPPORTED, "BIND is not supported")
        if command not in (Command.CONNECT, Command.UDP_ASSOCIATE):
            raise _Refused(Reply.COMMAND_NOT_SUPPORTED, f"command {command} is not CONNECT (1) or UDP ASSOCIATE (3)")
        if buf[2] != 0:
            raise _Refused(Reply.GENERAL_FAILURE, f"the request's reserved byte is {buf[2]}, not 0")
        atyp, host, port, end = _decode_address(buf, 3)
        del buf[:end]
        self.state = "waiting"
        return Request(Command(command), host, port, atyp)

    def _close(self) -> None:
        self.state = "closed"
        self._buffer = bytearray()


# ---------------------------------------------------------------------------
# UDP ASSOCIATE datagrams (RFC 1928 section 7)


@frozen
class UdpDatagram:
    """One datagram between the client and the relay: its far address and its data."""

    host: str
    port: int
    address_type: AddressType
    data: bytes


def encode_udp(host: str, port: int, data: bytes) -> bytes:
    """RSV (2 bytes of 0), FRAG 0, ATYP, DST.ADDR, DST.PORT, DATA."""
    return b"\x00\x00\x00" + encode_address(host, port) + data


def decode_udp(datagram: bytes) -> UdpDatagram:
    """Read one relayed datagram; raises SocksError (drop it) when it is malformed or a fragment.

    Fragments (FRAG ≠ 0) are refused: reassembly is optional in RFC 1928, and a relay that
    drops them is what common clients expect.
    """
    if len(datagram) < 4:
        raise SocksError(f"a UDP datagram of {len(datagram)} bytes is shorter than its header")
    if datagram[0] or datagram[1]:
        raise SocksError("a UDP datagram's reserved bytes are not 0")
    if datagram[2]:
        raise SocksError(f"a UDP datagram is fragment {datagram[2]}; fragments are not supported")
    try:
        atyp, host, port, end = _decode_address(datagram, 3)
    except _Incomplete:
        raise SocksError("a UDP datagram ends inside its address") from None
    except _Refused as refused:
        raise SocksError(f"a UDP datagram's address: {refused.reason}") from None
    return UdpDatagram(host, port, atyp, bytes(datagram[end:]))


# ---------------------------------------------------------------------------
# The client's side, for tests and for the client's own tests


def encode_greeting(methods: bytes = bytes([NO_AUTHENTICATION])) -> bytes:
    return bytes([VERSION, len(methods)]) + methods


def encode_request(command: int, host: str, port: int) -> bytes:
    return bytes([VERSION, command, 0]) + encode_address(host, port)


def decode_reply(data: bytes) -> tuple[int, str, int]:
    """(REP, BND.ADDR, BND.PORT) of a complete reply; ValueError when it is not one."""
    if len(data) < 3 or data[0] != VERSION:
        raise ValueError("not a SOCKS5 reply")
    try:
        _, host, port, end = _decode_address(data, 3)
    except (_Incomplete, _Refused):
        raise ValueError("not a complete SOCKS5 reply") from None
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the reply")
    return data[1], host, port

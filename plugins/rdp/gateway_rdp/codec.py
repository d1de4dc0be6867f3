"""The start of an RDP connection, read without I/O: X.224 Connection Request and Confirm.

An RDP client opens with a TPKT (RFC 1006: version 3, a reserved byte, a 16-bit big-endian
length) carrying an X.224 Connection Request (MS-RDPBCGR 2.2.1.1): the optional routing token
or ``Cookie: mstshash=USER`` line, then the optional RDP Negotiation Request with the security
protocols the client can do. The server answers with a TPKT carrying an X.224 Connection
Confirm (2.2.1.2) with an RDP Negotiation Response (the protocol it selected) or an RDP
Negotiation Failure. After that the connection is TLS (or standard RDP security) and is no
business of ours.

:class:`RdpInspector` is fed both directions in whatever chunks they arrive and answers each
chunk with a :class:`Verdict`; what it saw is in :attr:`RdpInspector.record`. It never alters a
byte: the caller forwards every chunk it fed, once the verdict is not ``refuse``. It buffers at
most :data:`MAX_PDU` bytes per direction and never raises on bad input: malformed, oversized or
truncated input is a ``refuse`` verdict naming what was wrong.

The cookie user is what the client *claims* (mstsc writes the user name it was given, truncated;
FreeRDP drops the domain); it is not authenticated by anyone. The user is authenticated only
inside CredSSP (NLA), between the client and the RDP server, where we do not look.

The rdp plugin feeds it on the connector through gateway.tunnel.inspect.
"""

from __future__ import annotations

import struct
from enum import Enum

from attrs import define, evolve, field, frozen

__all__ = [
    "FAILURE_CODES",
    "HYBRID_REQUIRED_BY_SERVER",
    "MAX_PDU",
    "PROTOCOL_HYBRID",
    "PROTOCOL_HYBRID_EX",
    "PROTOCOL_RDP",
    "PROTOCOL_RDSAAD",
    "PROTOCOL_RDSTLS",
    "PROTOCOL_SSL",
    "Action",
    "RdpInspector",
    "RdpRecord",
    "Verdict",
    "encode_connection_confirm",
    "encode_connection_request",
    "negotiation_failure",
    "protocol_names",
]

# The X.224 length indicator is one octet and 255 is reserved, so a well-formed Connection
# Request or Confirm is at most 4 (TPKT) + 1 (LI) + 254 bytes. A TPKT announcing more is refused
# before any of it is buffered.
MAX_PDU = 4 + 1 + 254

# requestedProtocols / selectedProtocol (MS-RDPBCGR 2.2.1.1.1). PROTOCOL_RDP is no flag: it is
# what a client asks for when it sends no Negotiation Request at all.
PROTOCOL_RDP = 0x00
PROTOCOL_SSL = 0x01
PROTOCOL_HYBRID = 0x02
PROTOCOL_RDSTLS = 0x04
PROTOCOL_HYBRID_EX = 0x08
PROTOCOL_RDSAAD = 0x10
_PROTOCOL_NAMES = {
    PROTOCOL_SSL: "tls",
    PROTOCOL_HYBRID: "credssp",
    PROTOCOL_RDSTLS: "rdstls",
    PROTOCOL_HYBRID_EX: "credssp-ex",
    PROTOCOL_RDSAAD: "rdsaad",
}
# CredSSP (NLA): the client authenticates to the server before a session is built.
_CREDSSP = PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX

# RDP Negotiation Failure codes (2.2.1.2.2).
HYBRID_REQUIRED_BY_SERVER = 0x05
FAILURE_CODES = {
    0x01: "SSL_REQUIRED_BY_SERVER",
    0x02: "SSL_NOT_ALLOWED_BY_SERVER",
    0x03: "SSL_CERT_NOT_ON_SERVER",
    0x04: "INCONSISTENT_FLAGS",
    HYBRID_REQUIRED_BY_SERVER: "HYBRID_REQUIRED_BY_SERVER",
    0x06: "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
}

_TPKT = struct.Struct("!BBH")
_NEG = struct.Struct("<BBHI")  # type, flags, length (8), protocols or failure code
_X224_CR = 0xE0
_X224_CC = 0xD0
_TYPE_NEG_REQ = 0x01
_TYPE_NEG_RSP = 0x02
_TYPE_NEG_FAILURE = 0x03
_TYPE_CORRELATION_INFO = 0x06
_CORRELATION_INFO_LENGTH = 36
_COOKIE = b"Cookie: mstshash="


def protocol_names(protocols: int) -> tuple[str, ...]:
    """The names of the protocol flags set, for logs; ``("rdp",)`` for PROTOCOL_RDP (no flag)."""
    if protocols == PROTOCOL_RDP:
        return ("rdp",)
    names = tuple(name for flag, name in _PROTOCOL_NAMES.items() if protocols & flag)
    unknown = protocols & ~sum(_PROTOCOL_NAMES)
    return names + ((f"0x{unknown:x}",) if unknown else ())


class Action(Enum):
    CONTINUE = "continue"  # keep feeding both directions
    DONE = "done"  # the negotiation is seen: splice the rest without feeding it here
    REFUSE = "refuse"  # send ``reply`` to the client (if any), then close both sides


@frozen
class Verdict:
    """What the caller does with the chunk it fed, and after.

    ``code`` names a refusal's kind (``malformed``, ``too_large``, ``nla_required``,
    ``nla_not_selected``) for policies and tests; ``reason`` says what was wrong, for the log.
    ``reply``: bytes to write to the client before closing (the Negotiation Failure PDU).
    """

    action: Action
    reason: str = ""
    code: str = ""
    reply: bytes = b""


CONTINUE = Verdict(Action.CONTINUE)


@frozen
class RdpRecord:
    """What the negotiation showed. None: not seen (yet).

    ``cookie_user``: the ``Cookie: mstshash=`` value, claimed by the client and unverified.
    ``routing_token``: a load-balancing routing token sent instead of the cookie.
    ``requested_protocols``: the client's requestedProtocols flags (PROTOCOL_RDP when it sent no
    Negotiation Request). ``selected_protocol``: from the server's Negotiation Response
    (PROTOCOL_RDP when its Connection Confirm carried none). ``failure_code``: from the server's
    Negotiation Failure.
    """

    cookie_user: str | None = None
    routing_token: str | None = None
    requested_protocols: int | None = None
    request_flags: int | None = None
    selected_protocol: int | None = None
    response_flags: int | None = None
    failure_code: int | None = None

    @property
    def offers_credssp(self) -> bool:
        """The client offered CredSSP (NLA), plain or extended."""
        return bool((self.requested_protocols or 0) & _CREDSSP)


class _Malformed(Exception):
    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _printable(raw: bytes) -> str:
    """Bytes a peer sent as text fit for a log line: UTF-8 where it is, escapes for the rest."""
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


@define
class _TpktReader:
    """Collects one TPKT from a direction's chunks, holding at most MAX_PDU bytes."""

    what: str
    buffer: bytearray = field(factory=bytearray)

    def feed(self, data: bytes) -> bytes | None:
        """The whole TPKT once it is in (bytes after it are left to the caller), else None."""
        pos = 0
        while True:
            header = len(self.buffer) < 4
            need = 4 if header else _TPKT.unpack_from(self.buffer)[2]
            take = need - len(self.buffer)
            self.buffer += data[pos : pos + take]
            pos += take
            if len(self.buffer) < need:
                return None
            if not header:
                return bytes(self.buffer)
            self._check_header()

    def _check_header(self) -> None:
        version, _reserved, length = _TPKT.unpack_from(self.buffer)
        if version != 3:
            raise _Malformed(f"the {self.what} does not start with a TPKT header (version 3):"
                             f" got {bytes(self.buffer).hex()}")
        if length > MAX_PDU:
            raise _Malformed(f"the {self.what}'s TPKT length {length} is over {MAX_PDU} bytes", "too_large")
        if length < 4 + 7:
            raise _Malformed(f"the {self.what}'s TPKT length {length} is too short for an X.224 header")


def _x224(pdu: bytes, code: int, what: str) -> bytes:
    """The variable part of an X.224 TPDU of the given code after its checks."""
    li = pdu[4]
    if li != len(pdu) - 5:
        raise _Malformed(f"the {what}'s X.224 length indicator {li} does not match its TPKT length {len(pdu)}")
    if pdu[5] != code:
        raise _Malformed(f"expected an X.224 {what} (0x{code:02x}), got TPDU code 0x{pdu[5]:02x}")
    # DST-REF, SRC-REF (2 bytes each) and the class option (class 0, no options).
    if pdu[10] != 0:
        raise _Malformed(f"the {what}'s X.224 class option is 0x{pdu[10]:02x}, RDP uses class 0")
    return pdu[11:]


def _negotiation(data: bytes, what: str) -> tuple[int, int, int]:
    """type, flags, value of an 8-byte RDP negotiation structure, which must be all of ``data``."""
    if len(data) < _NEG.size:
        raise _Malformed(f"the {what} ends inside an RDP negotiation structure ({len(data)} of 8 bytes)")
    kind, flags, length, value = _NEG.unpack_from(data)
    if length != _NEG.size:
        raise _Malformed(f"the {what}'s RDP negotiation structure says length {length}, it is 8")
    return kind, flags, value


def _parse_request(pdu: bytes) -> RdpRecord:
    data = _x224(pdu, _X224_CR, "Connection Request")
    cookie = token = None
    if data and data[0] not in (_TYPE_NEG_REQ, _TYPE_CORRELATION_INFO):
        end = data.find(b"\r\n")
        if end < 0:
            raise _Malformed("the Connection Request's cookie or routing token has no CR LF ending")
        line, data = data[:end], data[end + 2 :]
        if line.startswith(_COOKIE):
            cookie = _printable(line[len(_COOKIE) :])
        else:
            token = _printable(line)
    record = RdpRecord(cookie_user=cookie, routing_token=token, requested_protocols=PROTOCOL_RDP)
    if not data:
        return record
    kind, flags, protocols = _negotiation(data, "Connection Request")
    if kind != _TYPE_NEG_REQ:
        raise _Malformed(f"expected an RDP Negotiation Request (type 1) in the Connection Request, got type {kind}")
    data = data[_NEG.size :]
    if data:
        # RDP_NEG_CORRELATION_INFO: type 6, flags 0, length 36, a correlation id, 16 reserved bytes.
        if len(data) != _CORRELATION_INFO_LENGTH or data[0] != _TYPE_CORRELATION_INFO or data[2:4] != b"\x24\x00":
            raise _Malformed(f"{len(data)} unexpected bytes after the Connection Request's RDP Negotiation Request")
    return evolve(record, requested_protocols=protocols, request_flags=flags)


def _parse_confirm(pdu: bytes, record: RdpRecord) -> RdpRecord:
    data = _x224(pdu, _X224_CC, "Connection Confirm")
    if not data:
        return evolve(record, selected_protocol=PROTOCOL_RDP)
    kind, flags, value = _negotiation(data, "Connection Confirm")
    if len(data) != _NEG.size:
        raise _Malformed(f"{len(data) - _NEG.size} unexpected bytes after the Connection Confirm's negotiation structure")
    if kind == _TYPE_NEG_RSP:
        return evolve(record, selected_protocol=value, response_flags=flags)
    if kind == _TYPE_NEG_FAILURE:
        return evolve(record, failure_code=value)
    raise _Malformed(f"expected an RDP Negotiation Response (2) or Failure (3) in the Connection Confirm, got type {kind}")


@define
class RdpInspector:
    """Watches one connection's X.224 negotiation, both directions, without I/O.

    ``require_nla``: a client that offers no CredSSP is refused with the Negotiation Failure PDU
    (``HYBRID_REQUIRED_BY_SERVER``) as the reply, before its request reaches the server; so is a
    server that selects something other than CredSSP. Feed :meth:`feed_client` and
    :meth:`feed_server`; after ``done`` or ``refuse`` further feeding returns that verdict again
    and holds nothing.
    """

    require_nla: bool = True
    record: RdpRecord = field(factory=RdpRecord)
    verdict: Verdict = CONTINUE
    _client: _TpktReader = field(factory=lambda: _TpktReader("Connection Request"))
    _server: _TpktReader = field(factory=lambda: _TpktReader("Connection Confirm"))
    _requested: bool = False

    @property
    def buffered(self) -> int:
        """Bytes held between calls: at most MAX_PDU per direction."""
        return len(self._client.buffer) + len(self._server.buffer)

    def feed_client(self, data: bytes) -> Verdict:
        """Bytes from the client. After its Connection Request the client's bytes are not read."""
        if self.verdict.action is not Action.CONTINUE or self._requested:
            return self.verdict
        return self._step(self._client, data, self._requested_by_client)

    def feed_server(self, data: bytes) -> Verdict:
        """Bytes from the server: its Connection Confirm ends the inspection."""
        if self.verdict.action is not Action.CONTINUE:
            return self.verdict
        if not self._requested:
            if data:
                return self._end(Verdict(Action.REFUSE, "the server sent bytes before the client's Connection Request", "malformed"))
            return self.verdict
        return self._step(self._server, data, self._confirmed_by_server)

    def _step(self, reader: _TpktReader, data: bytes, complete) -> Verdict:
        try:
            pdu = reader.feed(data)
            if pdu is None:
                return self.verdict
            return complete(pdu)
        except _Malformed as e:
            return self._end(Verdict(Action.REFUSE, e.reason, e.code))

    def _requested_by_client(self, pdu: bytes) -> Verdict:
        self.record = _parse_request(pdu)
        self._requested = True
        self._client.buffer.clear()
        if self.require_nla and not self.record.offers_credssp:
            offered = ", ".join(protocol_names(self.record.requested_protocols or 0))
            return self._end(Verdict(Action.REFUSE, f"the client offers no CredSSP (NLA), only {offered}",
                                     "nla_required", negotiation_failure()))
        return self.verdict

    def _confirmed_by_server(self, pdu: bytes) -> Verdict:
        self.record = _parse_confirm(pdu, self.record)
        record = self.record
        if record.failure_code is not None:
            name = FAILURE_CODES.get(record.failure_code, f"0x{record.failure_code:x}")
            return self._end(Verdict(Action.DONE, f"the server refused the negotiation: {name}"))
        selected = record.selected_protocol or 0
        if selected and not selected & (record.requested_protocols or 0):
            raise _Malformed(f"the server selected {'/'.join(protocol_names(selected))}, which the client did not offer")
        if self.require_nla and not selected & _CREDSSP:
            return self._end(Verdict(Action.REFUSE, f"the server selected {'/'.join(protocol_names(selected))}, not CredSSP (NLA)",
                                     "nla_not_selected", negotiation_failure()))
        return self._end(Verdict(Action.DONE, f"the server selected {'/'.join(protocol_names(selected))}"))

    def _end(self, verdict: Verdict) -> Verdict:
        self.verdict = verdict
        self._client.buffer.clear()
        self._server.buffer.clear()
        return verdict


def _tpkt_x224(code: int, variable: bytes) -> bytes:
    """TPKT + X.224 TPDU (DST-REF 0, SRC-REF 0, class 0) + ``variable``."""
    x224 = bytes([6 + len(variable), code, 0, 0, 0, 0, 0]) + variable
    return _TPKT.pack(3, 0, 4 + len(x224)) + x224


def negotiation_failure(code: int = HYBRID_REQUIRED_BY_SERVER) -> bytes:
    """An X.224 Connection Confirm carrying an RDP Negotiation Failure, for a client we refuse.

    The same bytes FreeRDP's server sends (tests/unit/data/rdp_captures.txt, ``srv_rdp``);
    FreeRDP's client then logs ``HYBRID_REQUIRED_BY_SERVER`` and gives up.
    """
    return _tpkt_x224(_X224_CC, _NEG.pack(_TYPE_NEG_FAILURE, 0, _NEG.size, code))


def encode_connection_confirm(selected: int | None, flags: int = 0) -> bytes:
    """A Connection Confirm selecting ``selected`` (None: no Negotiation Response at all)."""
    variable = b"" if selected is None else _NEG.pack(_TYPE_NEG_RSP, flags, _NEG.size, selected)
    return _tpkt_x224(_X224_CC, variable)


def encode_connection_request(cookie_user: str | None = None, requested: int | None = PROTOCOL_SSL | PROTOCOL_HYBRID,
                              routing_token: bytes | None = None, flags: int = 0) -> bytes:
    """A Connection Request as a client sends it (for tests and test clients).

    ``requested`` None: no Negotiation Request (what ``xfreerdp /sec:rdp`` sends).
    """
    variable = b""
    if routing_token is not None:
        variable += routing_token + b"\r\n"
    elif cookie_user is not None:
        variable += _COOKIE + cookie_user.encode("utf-8") + b"\r\n"
    if requested is not None:
        variable += _NEG.pack(_TYPE_NEG_REQ, flags, _NEG.size, requested)
    return _tpkt_x224(_X224_CR, variable)

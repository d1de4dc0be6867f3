"""The start of an SMB2/3 connection, read without I/O and without altering a byte.

SMB over TCP port 445 frames each message with a 4-byte header: a zero byte and a 24-bit
big-endian length (MS-SMB2 2.1, "Direct TCP transport"). :class:`SmbInspector` is fed the
client's and the server's bytes in whatever chunks they arrive and reads, from the messages
before the first share is connected:

- NEGOTIATE: the dialects the client offers, the dialect the server chose, each side's
  SecurityMode (signing enabled/required), the server's capabilities, and for SMB 3.1.1 the
  encryption cipher and signing algorithm from the negotiate contexts;
- SESSION_SETUP: the mechanism in the security buffer (SPNEGO/GSS-API around NTLMSSP or a
  Kerberos AP-REQ). From an NTLMSSP AUTHENTICATE message (type 3): user, domain and workstation.
  A Kerberos AP-REQ does **not** show the client's name: it is in the authenticator, encrypted
  with the session key, and in the ticket's encrypted part, encrypted with the service's key;
  in clear there is only the ticket's realm and service name (``kerberos_service``, for
  example ``cifs/fs.example.test@EXAMPLE.TEST``), so the user stays None and the mechanism says
  ``kerberos``. Only a holder of the service's key could read the name. The response's
  SessionFlags: guest, anonymous (null), encrypt data;
- TREE_CONNECT: the path (``\\\\server\\share``) and the response's ShareFlags (encrypt data),
  as long as the messages are not encrypted.

It is done (verdict ``done``: splice the rest at full speed, feed nothing more) at the first
TREE_CONNECT response for a share other than ``IPC$`` (clients connect ``IPC$`` first for DFS
referrals and RPC), at the first encrypted message (an SMB2 TRANSFORM_HEADER, ``\\xfdSMB``:
nothing more can be read) or compressed one (``\\xfcSMB``), when the session's SessionFlags
say every message will be encrypted, after :data:`MAX_MESSAGES` messages, or at a message
over :data:`MAX_MESSAGE` bytes once the session is set up. Later tree connects on the same
connection (Windows reuses one connection for every share on a server) are not seen.

SMB1 (``\\xffSMB``) is refused (verdict ``refuse``, code ``smb1``), the SMB1-style
multi-protocol NEGOTIATE that lists ``SMB 2.002``/``SMB 2.???`` among its dialects included,
unless the inspector is made with ``allow_smb1``: then a multi-protocol NEGOTIATE is followed
to the dialect the server picks, and an SMB1 session is done at once, not inspected.

Malformed, truncated or oversized input is a ``refuse`` verdict naming what was wrong (codes
``malformed``, ``too_large``), never an exception, and nothing more than one message per
direction (:data:`MAX_MESSAGE`) is held between calls. The inspector decides nothing else:
policies (``require_signing``, ``require_encryption``) read :attr:`SmbInspector.record`.

The smb plugin feeds it (wrapped in gateway_smb.policy) on the connector through gateway.tunnel.inspect.
"""

from __future__ import annotations

import struct
from enum import Enum

from attrs import define, evolve, field, frozen

__all__ = [
    "MAX_MESSAGE",
    "MAX_MESSAGES",
    "Action",
    "Malformed",
    "SecurityIdentity",
    "SmbInspector",
    "SmbRecord",
    "Verdict",
    "read_security_buffer",
]

# A SESSION_SETUP request is the largest message before a share is connected: 64 bytes of
# header, 24 of request and a security buffer whose length field is 16 bits (a Kerberos ticket
# with a large PAC fills much of it: Windows' MaxTokenSize is 48,000 bytes by default and at
# most 65,535). Real NEGOTIATE and NTLM SESSION_SETUP messages are a few hundred bytes.
MAX_MESSAGE = 64 + 24 + 0xFFFF
# Messages (both directions) read before giving up on seeing a share: smbclient connects its
# share at the 13th, after IPC$ and a DFS referral.
MAX_MESSAGES = 64

_SMB2 = b"\xfeSMB"
_SMB1 = b"\xffSMB"
_TRANSFORM = b"\xfdSMB"
_COMPRESSED = b"\xfcSMB"

# ProtocolId, StructureSize, CreditCharge, Status, Command, Credit, Flags, NextCommand,
# MessageId, then (sync) Reserved + TreeId or (async) AsyncId, SessionId, Signature.
_HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
_NEGOTIATE, _SESSION_SETUP, _TREE_CONNECT = 0x0000, 0x0001, 0x0003
_FLAGS_SERVER_TO_REDIR = 0x00000001
_FLAGS_ASYNC = 0x00000002
_FLAGS_SIGNED = 0x00000008
_STATUS_SUCCESS = 0x00000000
_STATUS_PENDING = 0x00000103
_STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
_SIGNING_REQUIRED = 0x0002
_CAP_ENCRYPTION = 0x00000040
_SESSION_IS_GUEST, _SESSION_IS_NULL, _SESSION_ENCRYPT_DATA = 0x0001, 0x0002, 0x0004
_SHAREFLAG_ENCRYPT_DATA = 0x00008000
_ENCRYPTION_CONTEXT, _SIGNING_CONTEXT = 0x0002, 0x0008

_DIALECTS = {0x0202: "2.0.2", 0x0210: "2.1", 0x02FF: "2.???", 0x0300: "3.0", 0x0302: "3.0.2", 0x0311: "3.1.1"}
_CIPHERS = {1: "AES-128-CCM", 2: "AES-128-GCM", 3: "AES-256-CCM", 4: "AES-256-GCM"}
_SIGNING_ALGORITHMS = {0: "HMAC-SHA256", 1: "AES-CMAC", 2: "AES-GMAC"}


class Action(Enum):
    CONTINUE = "continue"  # forward the chunk and keep feeding both directions
    DONE = "done"  # forward the chunk; splice the rest without feeding it here
    REFUSE = "refuse"  # do not forward the chunk; close both sides


@frozen
class Verdict:
    """What the caller does with the chunk it fed, and after.

    ``code`` names a refusal's kind for policies and tests: ``smb1``, ``malformed`` or
    ``too_large``. ``reason`` says what was seen or wrong, for the log.
    """

    action: Action
    reason: str = ""
    code: str = ""


CONTINUE = Verdict(Action.CONTINUE)


@frozen
class SecurityIdentity:
    """What a SESSION_SETUP security buffer shows: the mechanism and, for NTLM, who."""

    mechanism: str | None = None  # "ntlm", "kerberos", "negoex", or the mechanism's OID
    user: str | None = None
    domain: str | None = None
    workstation: str | None = None
    kerberos_service: str | None = None  # the AP-REQ ticket's service principal and realm


@frozen
class SmbRecord:
    """What the start of the connection showed. None: not seen (yet).

    Strings a peer sent (dialect names from SMB1, user, domain, share) are made fit for a log
    line: control characters and undecodable bytes are escaped.
    """

    offered_dialects: tuple[str, ...] = ()
    dialect: str | None = None
    client_signing_required: bool | None = None
    server_signing_required: bool | None = None
    server_capabilities: int | None = None
    cipher: str | None = None
    signing_algorithm: str | None = None
    mechanism: str | None = None
    user: str | None = None
    domain: str | None = None
    workstation: str | None = None
    kerberos_service: str | None = None
    session_status: int | None = None
    guest: bool = False
    anonymous: bool = False
    session_encrypted: bool = False
    # The first request after the session setup carried a signature. Weaker than
    # signing_required: clients sign TREE_CONNECT even when signing is not required (smbclient
    # 4.17 on SMB 3.1.1 does: capture smb3_ntlm).
    signed: bool | None = None
    share: str | None = None
    tree_connect_status: int | None = None
    share_encrypted: bool = False
    encrypted_seen: bool = False  # an encrypted message (TRANSFORM_HEADER) went by

    @property
    def signing_required(self) -> bool | None:
        """Either side requires signing (MS-SMB2 3.2.5.3.1); None before the server answered."""
        if self.server_signing_required is None:
            return None
        return self.server_signing_required or bool(self.client_signing_required)

    @property
    def authenticated_user(self) -> str | None:
        """The NTLM user once the server accepted the session as that user (not guest, not null).

        Until then, and for a guest session (a server may map any unknown user to guest), ``user``
        is only what the client claimed.
        """
        if self.session_status != 0 or self.guest or self.anonymous:
            return None
        return self.user

    @property
    def encrypted(self) -> bool:
        """The session or the share is encrypted, or encrypted messages were seen."""
        return self.session_encrypted or self.share_encrypted or self.encrypted_seen


class Malformed(Exception):
    """Bytes that are not what they claim to be; the inspector turns it into a ``refuse`` verdict."""

    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Finished(Exception):
    """Inspection ends here; the connection goes on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _utf16(raw: bytes, what: str) -> str:
    if len(raw) % 2:
        raise Malformed(f"{what} has an odd UTF-16 length ({len(raw)} bytes)")
    try:
        return _printable(raw.decode("utf-16-le"))
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-16") from None


def _field(buf: bytes, offset_at: int, length_at: int, base: int, what: str, fmt: str = "<H") -> bytes:
    """A (offset, length) buffer of a message, checked against the message's end."""
    (offset,) = struct.unpack_from(fmt, buf, offset_at)
    (length,) = struct.unpack_from("<H", buf, length_at)
    if length == 0:
        return b""
    if offset < base or offset + length > len(buf):
        raise Malformed(f"{what} ({length} bytes at offset {offset}) lies outside its {len(buf)}-byte message")
    return buf[offset : offset + length]


# ---------------------------------------------------------------------------
# DER (SPNEGO, GSS-API, Kerberos): only what is needed, bounds checked, definite lengths.

_SPNEGO = bytes.fromhex("2b0601050502")  # 1.3.6.1.5.5.2
_KRB5 = bytes.fromhex("2a864886f712010202")  # 1.2.840.113554.1.2.2
_MS_KRB5 = bytes.fromhex("2a864882f712010202")  # 1.2.840.48018.1.2.2
_NTLM = bytes.fromhex("2b06010401823702020a")  # 1.3.6.1.4.1.311.2.2.10
_NEGOEX = bytes.fromhex("2b06010401823702021e")  # 1.3.6.1.4.1.311.2.2.30
_MECHANISMS = {_KRB5: "kerberos", _MS_KRB5: "kerberos", _NTLM: "ntlm", _NEGOEX: "negoex"}
_KRB5_AP_REQ = b"\x01\x00"
_MAX_CHILDREN = 32


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``, inside ``end``."""
    if pos + 2 > end:
        raise Malformed("the security buffer ends inside a DER header")
    tag, n = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise Malformed("the security buffer uses a high DER tag number")
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 3:
            raise Malformed("the security buffer has an indefinite or oversized DER length")
        if pos + k > end:
            raise Malformed("the security buffer ends inside a DER length")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > end:
        raise Malformed(f"a DER element of the security buffer runs {pos + n - end} bytes past its end")
    return tag, pos, pos + n


def _children(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """The elements directly inside ``start..end``, by tag (the first of each)."""
    found: dict[int, tuple[int, int]] = {}
    for _ in range(_MAX_CHILDREN):
        if start >= end:
            return found
        tag, s, e = _tlv(buf, start, end)
        found.setdefault(tag, (s, e))
        start = e
    raise Malformed(f"a DER element of the security buffer has more than {_MAX_CHILDREN} members")


def _inside(buf: bytes, span: tuple[int, int] | None, tag: int, what: str) -> tuple[int, int]:
    """The content of the one element of ``tag`` that fills ``span`` (an explicit tag's content)."""
    if span is None:
        raise Malformed(f"the security buffer has no {what}")
    t, s, e = _tlv(buf, *span)
    if t != tag:
        raise Malformed(f"the security buffer's {what} has DER tag 0x{t:02x}, expected 0x{tag:02x}")
    return s, e


def _oid_name(oid: bytes) -> str:
    if oid in _MECHANISMS:
        return _MECHANISMS[oid]
    if not oid:
        return "oid:"
    arcs, value = [], 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2) if arcs else 0
    head = [first, arcs[0] - 40 * first] if arcs else []
    return "oid:" + ".".join(str(a) for a in head + arcs[1:])


def _gss_initial(buf: bytes) -> tuple[bytes, bytes]:
    """The mechanism OID and the inner token of a GSS-API InitialContextToken (RFC 2743 3.1)."""
    tag, s, e = _tlv(buf, 0, len(buf))
    if tag != 0x60:
        raise Malformed(f"the security buffer's GSS-API token has tag 0x{tag:02x}, expected 0x60")
    t, os, oe = _tlv(buf, s, e)
    if t != 0x06:
        raise Malformed("the security buffer's GSS-API token does not start with a mechanism OID")
    return buf[os:oe], buf[oe:e]


def _kerberos(inner: bytes) -> SecurityIdentity:
    """The cleartext of a krb5 GSS token: for an AP-REQ, the ticket's service name and realm."""
    if inner[:2] != _KRB5_AP_REQ:
        return SecurityIdentity("kerberos")
    buf = inner[2:]
    tag, s, e = _tlv(buf, 0, len(buf))
    if tag != 0x6E:
        raise Malformed(f"the Kerberos AP-REQ has tag 0x{tag:02x}, expected 0x6e")
    ap_req = _children(buf, *_inside(buf, (s, e), 0x30, "AP-REQ sequence"))
    ticket = _inside(buf, _inside(buf, ap_req.get(0xA3), 0x61, "AP-REQ ticket"), 0x30, "ticket sequence")
    parts = _children(buf, *ticket)
    realm = buf[slice(*_inside(buf, parts.get(0xA1), 0x1B, "ticket realm"))]
    sname = _children(buf, *_inside(buf, parts.get(0xA2), 0x30, "ticket server name"))
    strings = _inside(buf, sname.get(0xA1), 0x30, "ticket server name strings")
    names, pos = [], strings[0]
    for _ in range(_MAX_CHILDREN):
        if pos >= strings[1]:
            break
        t, ns, ne = _tlv(buf, pos, strings[1])
        if t != 0x1B:
            raise Malformed("a ticket server name part is not a GeneralString")
        names.append(buf[ns:ne].decode("utf-8", "backslashreplace"))
        pos = ne
    service = "/".join(names) + "@" + realm.decode("utf-8", "backslashreplace")
    return SecurityIdentity("kerberos", kerberos_service=_printable(service))


def _ntlm(token: bytes) -> SecurityIdentity:
    """An NTLMSSP message (MS-NLMP 2.2.1): for AUTHENTICATE (type 3), user, domain and workstation."""
    if len(token) < 12:
        raise Malformed(f"the NTLMSSP message is {len(token)} bytes, too short for its type")
    (kind,) = struct.unpack_from("<I", token, 8)
    if kind != 3:
        return SecurityIdentity("ntlm")
    if len(token) < 64:
        raise Malformed(f"the NTLMSSP AUTHENTICATE message is {len(token)} bytes, shorter than its 64-byte header")
    (flags,) = struct.unpack_from("<I", token, 60)
    unicode = flags & 0x00000001  # NTLMSSP_NEGOTIATE_UNICODE; else OEM, read as ASCII here

    def text(at: int, what: str) -> str:
        raw = _field(token, at + 4, at, 0, f"the NTLMSSP {what}", "<I")
        if unicode:
            return _utf16(raw, f"the NTLMSSP {what}")
        return _printable(raw.decode("ascii", "backslashreplace"))

    return SecurityIdentity("ntlm", user=text(36, "user name"), domain=text(28, "domain name"),
                            workstation=text(44, "workstation name"))


def _mech_token(token: bytes, preferred: str | None) -> SecurityIdentity:
    if token.startswith(b"NTLMSSP\x00"):
        return _ntlm(token)
    if token[:1] == b"\x60":
        oid, inner = _gss_initial(token)
        if oid in (_KRB5, _MS_KRB5):
            return _kerberos(inner)
        return SecurityIdentity(_oid_name(oid))
    return SecurityIdentity(preferred)


def _spnego_init(buf: bytes) -> SecurityIdentity:
    """NegTokenInit (RFC 4178 4.2.1): the optimistic mechToken, else the preferred mechanism."""
    tag, s, e = _tlv(buf, 0, len(buf))
    if tag != 0xA0:
        raise Malformed(f"the SPNEGO token has tag 0x{tag:02x}, expected NegTokenInit (0xa0)")
    fields = _children(buf, *_inside(buf, (s, e), 0x30, "NegTokenInit sequence"))
    preferred = None
    if 0xA0 in fields:
        ms, me = _inside(buf, fields[0xA0], 0x30, "mechTypes")
        if ms < me:
            t, os, oe = _tlv(buf, ms, me)
            preferred = _oid_name(buf[os:oe]) if t == 0x06 else None
    if 0xA2 not in fields:
        return SecurityIdentity(preferred)
    return _mech_token(buf[slice(*_inside(buf, fields[0xA2], 0x04, "mechToken"))], preferred)


def _spnego_response(buf: bytes) -> SecurityIdentity:
    """NegTokenResp (RFC 4178 4.2.2): the responseToken, if any."""
    _tag, s, e = _tlv(buf, 0, len(buf))
    fields = _children(buf, *_inside(buf, (s, e), 0x30, "NegTokenResp sequence"))
    if 0xA2 not in fields:
        return SecurityIdentity()
    return _mech_token(buf[slice(*_inside(buf, fields[0xA2], 0x04, "responseToken"))], None)


def read_security_buffer(buf: bytes) -> SecurityIdentity:
    """What a client's SESSION_SETUP security buffer shows; raises only :class:`Malformed`.

    Handles SPNEGO NegTokenInit and NegTokenResp around NTLMSSP or a krb5 token, and a bare
    NTLMSSP message or krb5 token as some clients send them.
    """
    if not buf:
        return SecurityIdentity()
    if buf.startswith(b"NTLMSSP\x00"):
        return _ntlm(buf)
    if buf[0] == 0xA1:
        return _spnego_response(buf)
    oid, inner = _gss_initial(buf)
    if oid == _SPNEGO:
        return _spnego_init(inner)
    if oid in (_KRB5, _MS_KRB5):
        return _kerberos(inner)
    return SecurityIdentity(_oid_name(oid))


# ---------------------------------------------------------------------------
# SMB1: only enough to name what is refused.


def _smb1_dialects(message: bytes) -> tuple[str, ...] | None:
    """The dialect strings of an SMB1 NEGOTIATE request, or None if it is none or unreadable."""
    if len(message) < 35 or message[4] != 0x72 or message[32] != 0:
        return None
    (count,) = struct.unpack_from("<H", message, 33)
    data = message[35 : 35 + count]
    if len(data) != count or not data.endswith(b"\x00"):
        return None
    dialects = []
    for item in data[:-1].split(b"\x00"):
        if not item.startswith(b"\x02"):
            return None
        dialects.append(_printable(item[1:].decode("ascii", "backslashreplace")))
    return tuple(dialects)


# ---------------------------------------------------------------------------
# SMB2


@frozen
class _Header:
    command: int
    status: int
    flags: int
    next_command: int
    message_id: int


def _header(message: bytes) -> _Header:
    if len(message) < _HEADER.size:
        raise Malformed(f"an SMB2 message of {len(message)} bytes is shorter than its 64-byte header")
    _proto, size, _charge, status, command, _credit, flags, next_command, message_id, *_ = _HEADER.unpack_from(message)
    if size != 64:
        raise Malformed(f"the SMB2 header says StructureSize {size}, it is 64")
    return _Header(command, status, flags, next_command, message_id)


def _body(message: bytes, size: int, what: str) -> int:
    """Check the body's StructureSize (the fixed part, plus one if a buffer may follow)."""
    if len(message) < 64 + (size & ~1):
        raise Malformed(f"the {what} is {len(message)} bytes, too short for its {size}-byte structure")
    (actual,) = struct.unpack_from("<H", message, 64)
    if actual != size:
        raise Malformed(f"the {what} says StructureSize {actual}, expected {size}")
    return 64


def _dialect(code: int) -> str:
    return _DIALECTS.get(code, f"0x{code:04x}")


def _negotiate_request(message: bytes, record: SmbRecord) -> SmbRecord:
    b = _body(message, 36, "NEGOTIATE request")
    count, security_mode = struct.unpack_from("<HH", message, b + 2)
    dialects = message[b + 36 : b + 36 + 2 * count]
    if count == 0 or len(dialects) != 2 * count:
        raise Malformed(f"the NEGOTIATE request lists {count} dialects, which its {len(message)} bytes do not hold")
    offered = tuple(_dialect(d) for (d,) in struct.iter_unpack("<H", dialects))
    return evolve(record, offered_dialects=offered, client_signing_required=bool(security_mode & _SIGNING_REQUIRED))


def _negotiate_contexts(message: bytes, offset: int, count: int, record: SmbRecord) -> SmbRecord:
    """SMB 3.1.1 negotiate contexts (MS-SMB2 2.2.3.1): the cipher and signing algorithm chosen."""
    cipher = signing = None
    for _ in range(count):
        offset = (offset + 7) & ~7
        if offset + 8 > len(message):
            raise Malformed(f"the NEGOTIATE response's negotiate contexts run past its {len(message)} bytes")
        kind, length = struct.unpack_from("<HH", message, offset)
        data = message[offset + 8 : offset + 8 + length]
        if len(data) != length:
            raise Malformed(f"a negotiate context of {length} bytes runs past the NEGOTIATE response")
        if kind in (_ENCRYPTION_CONTEXT, _SIGNING_CONTEXT):
            if length < 4 or struct.unpack_from("<H", data)[0] != 1:
                raise Malformed(f"the NEGOTIATE response's context {kind} does not name exactly one algorithm")
            (chosen,) = struct.unpack_from("<H", data, 2)
            if kind == _ENCRYPTION_CONTEXT:
                cipher = _CIPHERS.get(chosen, f"0x{chosen:04x}") if chosen else None
            else:
                signing = _SIGNING_ALGORITHMS.get(chosen, f"0x{chosen:04x}")
        offset += 8 + length
    return evolve(record, cipher=cipher, signing_algorithm=signing)


def _negotiate_response(message: bytes, record: SmbRecord) -> SmbRecord:
    b = _body(message, 65, "NEGOTIATE response")
    security_mode, dialect, context_count = struct.unpack_from("<HHH", message, b + 2)
    (capabilities,) = struct.unpack_from("<I", message, b + 24)
    (context_offset,) = struct.unpack_from("<I", message, b + 60)
    record = evolve(record, dialect=_dialect(dialect), server_signing_required=bool(security_mode & _SIGNING_REQUIRED),
                    server_capabilities=capabilities)
    if dialect == 0x0311:
        if context_count and context_offset < b + 64:
            raise Malformed(f"the NEGOTIATE response's contexts start at {context_offset}, inside its fixed part")
        return _negotiate_contexts(message, context_offset, context_count, record)
    # SMB 3.0 and 3.0.2 encrypt with AES-128-CCM when the server has the encryption capability.
    cipher = "AES-128-CCM" if dialect in (0x0300, 0x0302) and capabilities & _CAP_ENCRYPTION else None
    return evolve(record, cipher=cipher)


def _session_setup_request(message: bytes, record: SmbRecord) -> SmbRecord:
    b = _body(message, 25, "SESSION_SETUP request")
    security_mode = message[b + 3]
    token = _field(message, b + 12, b + 14, b + 24, "the SESSION_SETUP security buffer")
    who = read_security_buffer(token)
    record = evolve(record, client_signing_required=bool(record.client_signing_required or security_mode & _SIGNING_REQUIRED))
    changes = {k: v for k, v in (("mechanism", who.mechanism), ("user", who.user), ("domain", who.domain),
                                 ("workstation", who.workstation), ("kerberos_service", who.kerberos_service))
               if v is not None}
    return evolve(record, **changes)


def _tree_connect_path(message: bytes) -> str:
    """The UNC path of a TREE_CONNECT request.

    PathOffset counts from the header in both layouts: with SMB2_TREE_CONNECT_FLAG_EXTENSION_PRESENT
    (3.1.1) it points past the 16-byte extension header to the extension's PathName.
    """
    b = _body(message, 9, "TREE_CONNECT request")
    return _utf16(_field(message, b + 4, b + 6, b + 8, "the TREE_CONNECT path"), "the TREE_CONNECT path")


def _is_ipc(path: str) -> bool:
    return path.rsplit("\\", 1)[-1].upper() == "IPC$"


@define
class _Direction:
    """One direction's framing: the NetBIOS header, then one message, at most MAX_MESSAGE bytes."""

    name: str
    buffer: bytearray = field(factory=bytearray)


@define
class SmbInspector:
    """Watches the start of one SMB connection, both directions, without I/O.

    Feed :meth:`feed_client` and :meth:`feed_server` every chunk before forwarding it; forward it
    unless the verdict is ``refuse``. After ``done`` or ``refuse`` further feeding returns that
    verdict again and holds nothing.
    """

    allow_smb1: bool = False
    record: SmbRecord = field(factory=SmbRecord)
    verdict: Verdict = CONTINUE
    messages: int = 0
    _client: _Direction = field(factory=lambda: _Direction("client"))
    _server: _Direction = field(factory=lambda: _Direction("server"))
    _session_up: bool = False
    _tree_connects: dict[int, str] = field(factory=dict)

    @property
    def buffered(self) -> int:
        """Bytes held between calls: at most 4 + MAX_MESSAGE per direction."""
        return len(self._client.buffer) + len(self._server.buffer)

    def feed_client(self, data: bytes) -> Verdict:
        """Bytes the client sent."""
        return self._feed(self._client, data)

    def feed_server(self, data: bytes) -> Verdict:
        """Bytes the server sent."""
        return self._feed(self._server, data)

    def _feed(self, side: _Direction, data: bytes) -> Verdict:
        if self.verdict.action is not Action.CONTINUE:
            return self.verdict
        try:
            pos = 0
            while pos < len(data):
                message, pos = self._take(side, data, pos)
                if message is not None:
                    self._message(side, message)
        except Malformed as e:
            return self._end(Verdict(Action.REFUSE, e.reason, e.code))
        except _Finished as e:
            return self._end(Verdict(Action.DONE, e.reason))
        return self.verdict

    def _end(self, verdict: Verdict) -> Verdict:
        self.verdict = verdict
        self._client.buffer.clear()
        self._server.buffer.clear()
        self._tree_connects.clear()
        return verdict

    def _take(self, side: _Direction, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """Add what fits of ``data[pos:]`` to the side's message; the message once whole."""
        buffer = side.buffer
        header = len(buffer) < 4
        need = 4 if header else 4 + int.from_bytes(buffer[1:4], "big")
        take = need - len(buffer)
        buffer += data[pos : pos + take]
        pos += take
        if len(buffer) < need:
            return None, pos
        if header:
            self._check_frame(side)
            return None, pos
        message = bytes(buffer[4:])
        buffer.clear()
        return message, pos

    def _check_frame(self, side: _Direction) -> None:
        kind, length = side.buffer[0], int.from_bytes(side.buffer[1:4], "big")
        if kind != 0:
            raise Malformed(f"the {side.name} sent a NetBIOS session packet of type 0x{kind:02x},"
                            " not a session message (0x00): not SMB over direct TCP")
        if length < 4:
            raise Malformed(f"the {side.name} sent a {length}-byte message, too short for any SMB header")
        if length > MAX_MESSAGE:
            if self._session_up:
                raise _Finished(f"the {side.name} sent a {length}-byte message, more than the {MAX_MESSAGE}"
                                " inspected, before any share was connected")
            raise Malformed(f"the {side.name} sent a {length}-byte message before the session was set up,"
                            f" more than the {MAX_MESSAGE} allowed", "too_large")
        self.messages += 1
        if self.messages > MAX_MESSAGES:
            raise _Finished(f"no share was connected in {MAX_MESSAGES} messages")

    def _message(self, side: _Direction, message: bytes) -> None:
        protocol = message[:4]
        if protocol == _TRANSFORM:
            self.record = evolve(self.record, encrypted_seen=True)
            raise _Finished(f"the {side.name} sent an encrypted message (TRANSFORM_HEADER): nothing more can be read")
        if protocol == _COMPRESSED:
            raise _Finished(f"the {side.name} sent a compressed message: inspection ends")
        if protocol == _SMB1:
            self._smb1(side, message)
            return
        if protocol != _SMB2:
            raise Malformed(f"the {side.name} sent a message with ProtocolId {protocol.hex()}, which is not SMB")
        offset = 0
        while True:
            header = _header(message[offset:])
            end = len(message)
            if header.next_command:
                if header.next_command % 8 or header.next_command < 64 or offset + header.next_command >= len(message):
                    raise Malformed(f"the {side.name}'s compounded message has NextCommand {header.next_command},"
                                    " not an 8-byte aligned offset of a following message")
                end = offset + header.next_command
            self._smb2(side, header, message[offset:end])
            if not header.next_command:
                return
            offset = end

    def _smb1(self, side: _Direction, message: bytes) -> None:
        if self.record.dialect is not None:
            raise Malformed(f"the {side.name} sent an SMB1 message after dialect {self.record.dialect} was negotiated")
        dialects = _smb1_dialects(message) if side is self._client and self.messages == 1 else None
        multi = dialects is not None and any(d.startswith("SMB 2.") for d in dialects)
        if not self.allow_smb1:
            if dialects is None:
                raise Malformed(f"the {side.name} sent an SMB1 message (command 0x{message[4:5].hex() or '??'});"
                                " SMB1 is not allowed (allow_smb1)", "smb1")
            kind = "an SMB1-style multi-protocol NEGOTIATE" if multi else "an SMB1 NEGOTIATE"
            raise Malformed(f"the client sent {kind} (dialects: {', '.join(dialects)});"
                            " SMB1 is not allowed (allow_smb1)", "smb1")
        if multi:
            self.record = evolve(self.record, offered_dialects=dialects)
            return
        self.record = evolve(self.record, dialect="SMB1")
        raise _Finished("SMB1, allowed: not inspected")

    def _smb2(self, side: _Direction, header: _Header, message: bytes) -> None:
        response = bool(header.flags & _FLAGS_SERVER_TO_REDIR)
        if response != (side is self._server):
            kind = "a response" if response else "a request"
            raise Malformed(f"the {side.name} sent {kind} (SMB2_FLAGS_SERVER_TO_REDIR {'set' if response else 'clear'})")
        if response:
            self._response(header, message)
        else:
            self._request(header, message)

    def _request(self, header: _Header, message: bytes) -> None:
        if self._session_up and self.record.signed is None and header.command not in (_NEGOTIATE, _SESSION_SETUP):
            self.record = evolve(self.record, signed=bool(header.flags & _FLAGS_SIGNED))
        if header.command == _NEGOTIATE:
            self.record = _negotiate_request(message, self.record)
        elif header.command == _SESSION_SETUP:
            self.record = _session_setup_request(message, self.record)
        elif header.command == _TREE_CONNECT:
            self._tree_connects[header.message_id] = _tree_connect_path(message)

    def _response(self, header: _Header, message: bytes) -> None:
        if header.flags & _FLAGS_ASYNC and header.status == _STATUS_PENDING:
            return  # an interim response; the real one follows
        if header.command == _NEGOTIATE and header.status == _STATUS_SUCCESS:
            self.record = _negotiate_response(message, self.record)
        elif header.command == _SESSION_SETUP:
            self._session_setup_response(header, message)
        elif header.command == _TREE_CONNECT and header.message_id in self._tree_connects:
            self._tree_connect_response(header, message)

    def _session_setup_response(self, header: _Header, message: bytes) -> None:
        self.record = evolve(self.record, session_status=header.status)
        if header.status not in (_STATUS_SUCCESS, _STATUS_MORE_PROCESSING_REQUIRED):
            return
        b = _body(message, 9, "SESSION_SETUP response")
        (flags,) = struct.unpack_from("<H", message, b + 2)
        _field(message, b + 4, b + 6, b + 8, "the SESSION_SETUP response's security buffer")
        if header.status != _STATUS_SUCCESS:
            return
        self._session_up = True
        self.record = evolve(self.record, guest=bool(flags & _SESSION_IS_GUEST), anonymous=bool(flags & _SESSION_IS_NULL),
                             session_encrypted=bool(flags & _SESSION_ENCRYPT_DATA))
        if flags & _SESSION_ENCRYPT_DATA:
            raise _Finished("the session is encrypted (SMB2_SESSION_FLAG_ENCRYPT_DATA): nothing more can be read")

    def _tree_connect_response(self, header: _Header, message: bytes) -> None:
        path = self._tree_connects.pop(header.message_id)
        if _is_ipc(path):
            return
        share_flags = 0
        if header.status == _STATUS_SUCCESS:
            b = _body(message, 16, "TREE_CONNECT response")
            (share_flags,) = struct.unpack_from("<I", message, b + 4)
        self.record = evolve(self.record, share=path, tree_connect_status=header.status,
                             share_encrypted=bool(share_flags & _SHAREFLAG_ENCRYPT_DATA))
        raise _Finished(f"the server answered the TREE_CONNECT to {path} (status 0x{header.status:08x})")

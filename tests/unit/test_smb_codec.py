"""The SMB codec (issue 11 groundwork): the start of an SMB2/3 connection read without I/O.

Real bytes first (tests/unit/data/smb_captures.txt: smbclient against smbd 4.17), then messages
built here for what the captures do not show (Kerberos, broken offsets, bounds), then hostile
and random input, which must end in a verdict, never an exception or a growing buffer.
"""

import struct

import pytest
from captures import feed, fed_whole_and_cut, load_captures, one_byte_at_a_time, one_side, random_cuts
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_smb.codec import (
    MAX_MESSAGE,
    MAX_MESSAGES,
    Action,
    Malformed,
    SecurityIdentity,
    SmbInspector,
    SmbRecord,
    read_security_buffer,
)

CAPTURES = load_captures("smb_captures.txt")
BOUND = 2 * (4 + MAX_MESSAGE)


def run(capture, inspector=None):
    """Feed a capture chunk by chunk; the inspector and the last verdict."""
    inspector = inspector if inspector is not None else SmbInspector()
    return inspector, feed(inspector, capture)


# ---------------------------------------------------------------------------
# A small encoder for what the captures do not cover


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(3, "big") + message


def header(command: int, response: bool = False, message_id: int = 0, status: int = 0, flags: int = 0,
           next_command: int = 0) -> bytes:
    flags |= 1 if response else 0
    return struct.pack("<4sHHIHHIIQIIQ16s", b"\xfeSMB", 64, 1, status, command, 1, flags, next_command,
                       message_id, 0, 0, 0, bytes(16))


def negotiate_request(dialects=(0x0202, 0x0311), security_mode=1) -> bytes:
    body = struct.pack("<HHHHI16sQ", 36, len(dialects), security_mode, 0, 0, bytes(16), 0)
    return header(0) + body + b"".join(struct.pack("<H", d) for d in dialects)


def negotiate_response(dialect=0x0311, security_mode=1, capabilities=0, contexts: bytes = b"", count: int = 0,
                       context_offset: int | None = None) -> bytes:
    offset = context_offset if context_offset is not None else (64 + 64 if contexts else 0)
    body = struct.pack("<HHHH16sIIIIQQHHI", 65, security_mode, dialect, count, bytes(16), capabilities,
                       65536, 65536, 65536, 0, 0, 0, 0, offset)
    return header(0, response=True) + body + contexts


def context(kind: int, data: bytes) -> bytes:
    raw = struct.pack("<HHI", kind, len(data), 0) + data
    return raw + bytes(-len(raw) % 8)


def session_setup_request(token: bytes, security_mode: int = 1, offset: int | None = None,
                          length: int | None = None) -> bytes:
    body = struct.pack("<HBBIIHHQ", 25, 0, security_mode, 0, 0, 88 if offset is None else offset,
                       len(token) if length is None else length, 0)
    return header(1, message_id=2) + body + token


def session_setup_response(status: int = 0, flags: int = 0) -> bytes:
    return header(1, response=True, message_id=2, status=status) + struct.pack("<HHHH", 9, flags, 0, 0)


def tree_connect_request(path: str, message_id: int = 3, flags: int = 0, raw: bytes | None = None,
                         extension: bool = False) -> bytes:
    """A TREE_CONNECT request; ``extension``: the 3.1.1 layout, a 16-byte extension header before the path."""
    data = path.encode("utf-16-le") if raw is None else raw
    prefix = struct.pack("<IH10s", 88 + len(data), 0, bytes(10)) if extension else b""
    return (header(3, message_id=message_id, flags=flags)
            + struct.pack("<HHHH", 9, 4 if extension else 0, 72 + len(prefix), len(data)) + prefix + data)


def tree_connect_response(message_id: int = 3, share_flags: int = 0, status: int = 0) -> bytes:
    return header(3, response=True, message_id=message_id, status=status) + struct.pack("<HBBIII", 16, 1, 0, share_flags, 0, 0x1F01FF)


def ntlm_authenticate(user: str = "alice", domain: str = "CORP", workstation: str = "PC1", unicode: bool = True,
                      fields: dict | None = None) -> bytes:
    """An NTLMSSP AUTHENTICATE (type 3); ``fields`` overrides a field's (length, offset)."""
    encode = (lambda s: s.encode("utf-16-le")) if unicode else (lambda s: s.encode("ascii"))
    payload, layout, pos = b"", {}, 88
    for name, value in (("domain", domain), ("user", user), ("workstation", workstation)):
        data = encode(value)
        layout[name] = (len(data), pos)
        payload += data
        pos += len(data)
    layout.update(fields or {})

    def f(name):
        length, offset = layout.get(name, (0, pos))
        return struct.pack("<HHI", length, length, offset)

    head = (b"NTLMSSP\x00" + struct.pack("<I", 3) + f("lm") + f("nt") + f("domain") + f("user") + f("workstation")
            + f("key") + struct.pack("<I", 1 if unicode else 0))
    return head + bytes(88 - len(head)) + payload


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


OID_SPNEGO = der(0x06, bytes.fromhex("2b0601050502"))
OID_KRB5 = der(0x06, bytes.fromhex("2a864886f712010202"))
OID_MS_KRB5 = der(0x06, bytes.fromhex("2a864882f712010202"))
OID_NTLM = der(0x06, bytes.fromhex("2b06010401823702020a"))


def spnego_init(mech_types: list[bytes], mech_token: bytes | None) -> bytes:
    fields = der(0xA0, der(0x30, b"".join(mech_types)))
    if mech_token is not None:
        fields += der(0xA2, der(0x04, mech_token))
    return der(0x60, OID_SPNEGO + der(0xA0, der(0x30, fields)))


def spnego_response(token: bytes) -> bytes:
    return der(0xA1, der(0x30, der(0xA0, der(0x0A, b"\x01")) + der(0xA2, der(0x04, token))))


def krb5_ap_req(service=("cifs", "fs.example.test"), realm="EXAMPLE.TEST") -> bytes:
    """A GSS krb5 token holding an AP-REQ whose encrypted parts are random-looking bytes."""
    sname = der(0x30, der(0xA0, der(0x02, b"\x02")) + der(0xA1, der(0x30, b"".join(der(0x1B, p.encode()) for p in service))))
    enc = der(0x30, der(0xA0, der(0x02, b"\x12")) + der(0xA2, der(0x04, bytes(range(200)))))
    ticket = der(0x61, der(0x30, der(0xA0, der(0x02, b"\x05")) + der(0xA1, der(0x1B, realm.encode())) + der(0xA2, sname)
                         + der(0xA3, enc)))
    ap_req = der(0x6E, der(0x30, der(0xA0, der(0x02, b"\x05")) + der(0xA1, der(0x02, b"\x0e"))
                           + der(0xA2, der(0x03, b"\x00\x20\x00\x00\x00")) + der(0xA3, ticket) + der(0xA4, enc)))
    return der(0x60, OID_KRB5 + b"\x01\x00" + ap_req)


def handshake(inspector: SmbInspector, token: bytes, session_flags: int = 0) -> None:
    """Negotiate 3.1.1 and a successful session setup with ``token``."""
    for side, message in ((inspector.feed_client, negotiate_request()), (inspector.feed_server, negotiate_response()),
                          (inspector.feed_client, session_setup_request(token)),
                          (inspector.feed_server, session_setup_response(flags=session_flags))):
        side(frame(message))


# ---------------------------------------------------------------------------
# Real clients, a real server


def test_smbclient_ntlm_session_and_share_are_read_from_the_capture():
    """smbclient's SMB 3.1.1 NTLM session: dialect, cipher, signing, user, domain and share, done at the share."""
    inspector, verdict = run(CAPTURES["smb3_ntlm"])
    assert verdict.action is Action.DONE
    assert verdict.reason == "the server answered the TREE_CONNECT to \\\\127.0.0.1\\share (status 0x00000000)"
    assert inspector.record == SmbRecord(
        offered_dialects=("2.0.2", "2.1", "3.0", "3.0.2", "3.1.1"), dialect="3.1.1", client_signing_required=False,
        server_signing_required=False, server_capabilities=0x0F, cipher="AES-128-GCM", signing_algorithm="AES-GMAC",
        mechanism="ntlm", user="alice", domain="TESTGROUP", workstation="VM", session_status=0, signed=True,
        share="\\\\127.0.0.1\\share", tree_connect_status=0)
    assert inspector.record.authenticated_user == "alice"
    assert inspector.record.signing_required is False
    assert inspector.messages == 14
    assert inspector.buffered == 0


def test_smbclient_kerberos_session_shows_the_service_but_not_the_user():
    """smbclient --use-kerberos=required: the AP-REQ gives kerberos and the ticket's service; the user stays unknown."""
    inspector, verdict = run(CAPTURES["smb3_kerberos"])
    assert verdict.action is Action.DONE
    record = inspector.record
    assert (record.mechanism, record.kerberos_service) == ("kerberos", "cifs/smb.example.test@EXAMPLE.TEST")
    assert (record.user, record.domain, record.authenticated_user) == (None, None, None)
    assert (record.session_status, record.signed, record.share) == (0, True, "\\\\smb.example.test\\share")


def test_ipc_tree_connect_is_not_the_share():
    """smbclient connects IPC$ first (a DFS referral); the inspection goes on to the real share."""
    inspector, _ = run(CAPTURES["smb3_ntlm"][:8])
    assert inspector.verdict.action is Action.CONTINUE
    assert inspector.record.share is None


def test_client_requiring_signing_is_recorded():
    """smbclient --client-protection=sign: the client's SecurityMode requires signing, so the session does."""
    record = run(CAPTURES["smb3_signed"])[0].record
    assert (record.client_signing_required, record.server_signing_required) == (True, False)
    assert record.signing_required is True
    assert record.signed is True


def test_guest_session_user_is_only_a_claim():
    """smbclient -N sends the local user; smbd maps it to guest: recorded as guest, unsigned, no authenticated user."""
    record = run(CAPTURES["smb3_guest"])[0].record
    assert (record.user, record.guest, record.signed) == ("root", True, False)
    assert record.authenticated_user is None
    assert record.share == "\\\\127.0.0.1\\share"


def test_encrypted_session_ends_the_inspection_at_the_first_encrypted_message():
    """smbclient --client-protection=encrypt: the user is read, then the first TRANSFORM_HEADER ends it."""
    inspector, verdict = run(CAPTURES["smb3_encrypted"])
    assert verdict.action is Action.DONE
    assert verdict.reason == "the client sent an encrypted message (TRANSFORM_HEADER): nothing more can be read"
    record = inspector.record
    assert (record.user, record.encrypted_seen, record.encrypted, record.share) == ("alice", True, True, None)
    assert record.client_signing_required is True


def test_smb1_nt1_negotiate_is_refused_by_default():
    """smbclient -m NT1's SMB1 NEGOTIATE is refused with code smb1, naming its dialects."""
    inspector, verdict = run(CAPTURES["smb1_nt1"][:1])
    assert (verdict.action, verdict.code) == (Action.REFUSE, "smb1")
    assert verdict.reason == ("the client sent an SMB1 NEGOTIATE (dialects: NT LANMAN 1.0, NT LM 0.12);"
                              " SMB1 is not allowed (allow_smb1)")
    assert inspector.buffered == 0


def test_smb1_multi_protocol_negotiate_is_refused_by_default():
    """An SMB1 NEGOTIATE offering SMB 2.002/2.??? (smbclient with client min protocol NT1) is refused as such."""
    verdict = run(CAPTURES["smb1_multiprotocol"][:1])[1]
    assert (verdict.action, verdict.code) == (Action.REFUSE, "smb1")
    assert verdict.reason.startswith("the client sent an SMB1-style multi-protocol NEGOTIATE (dialects: NT LANMAN 1.0,"
                                     " NT LM 0.12, SMB 2.002, SMB 2.???)")


def test_allow_smb1_follows_a_multi_protocol_negotiate_to_smb3():
    """With allow_smb1 the multi-protocol NEGOTIATE is followed through the 2.??? answer to 3.1.1 and the share."""
    inspector, verdict = run(CAPTURES["smb1_multiprotocol"], SmbInspector(allow_smb1=True))
    assert verdict.action is Action.DONE
    assert (inspector.record.dialect, inspector.record.user) == ("3.1.1", "alice")
    assert inspector.record.share == "\\\\127.0.0.1\\share"


def test_allow_smb1_lets_an_smb1_session_through_uninspected():
    """With allow_smb1 a plain SMB1 NEGOTIATE is done at once, the dialect recorded as SMB1."""
    inspector, verdict = run(CAPTURES["smb1_nt1"], SmbInspector(allow_smb1=True))
    assert (verdict.action, verdict.reason) == (Action.DONE, "SMB1, allowed: not inspected")
    assert inspector.record.dialect == "SMB1"


def test_smb1_after_smb2_was_negotiated_is_malformed_even_when_allowed():
    """An SMB1 message once an SMB2 dialect is chosen is refused, so it cannot relabel the session SMB1."""
    inspector = SmbInspector(allow_smb1=True)
    run(CAPTURES["smb3_ntlm"][:2], inspector)
    verdict = inspector.feed_client(one_side(CAPTURES["smb1_nt1"], "c"))
    assert (verdict.action, verdict.code) == (Action.REFUSE, "malformed")
    assert verdict.reason == "the client sent an SMB1 message after dialect 3.1.1 was negotiated"
    assert inspector.record.dialect == "3.1.1"


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_byte_by_byte_feeding_gives_the_same_record(name):
    """Every capture fed one byte at a time ends in the same verdict and record as fed chunk by chunk."""
    for allow in (False, True):
        whole, cut = fed_whole_and_cut(lambda: SmbInspector(allow_smb1=allow), CAPTURES[name], one_byte_at_a_time)
        assert cut == whole


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CAPTURES)), st.data())
def test_arbitrary_chunking_gives_the_same_record(name, data):
    """A capture cut at random points gives the same record and verdict as fed chunk by chunk."""
    whole, cut = fed_whole_and_cut(SmbInspector, CAPTURES[name], random_cuts(data))
    assert cut == whole


# ---------------------------------------------------------------------------
# Security buffers


def test_kerberos_ap_req_gives_the_mechanism_and_service_but_no_user():
    """A SPNEGO-wrapped Kerberos AP-REQ records kerberos and the ticket's service; the client name is not visible."""
    inspector = SmbInspector()
    handshake(inspector, spnego_init([OID_MS_KRB5, OID_KRB5, OID_NTLM], krb5_ap_req()))
    record = inspector.record
    assert (record.mechanism, record.user, record.domain) == ("kerberos", None, None)
    assert record.kerberos_service == "cifs/fs.example.test@EXAMPLE.TEST"
    assert record.authenticated_user is None


def test_spnego_ntlm_rounds_give_the_user_from_the_authenticate_message():
    """NTLM NEGOTIATE in a NegTokenInit, then AUTHENTICATE in a NegTokenResp: user, domain, workstation."""
    inspector = SmbInspector()
    inspector.feed_client(frame(negotiate_request()))
    inspector.feed_server(frame(negotiate_response()))
    inspector.feed_client(frame(session_setup_request(spnego_init([OID_NTLM], b"NTLMSSP\x00\x01\x00\x00\x00" + bytes(24)))))
    assert inspector.record.mechanism == "ntlm"
    inspector.feed_server(frame(session_setup_response(status=0xC0000016)))
    inspector.feed_client(frame(session_setup_request(spnego_response(ntlm_authenticate("bob", "CORP", "PC7")))))
    inspector.feed_server(frame(session_setup_response()))
    assert (inspector.record.user, inspector.record.domain, inspector.record.workstation) == ("bob", "CORP", "PC7")
    assert inspector.record.authenticated_user == "bob"


@pytest.mark.parametrize(("token", "expected"), [
    (b"", SecurityIdentity()),
    (ntlm_authenticate("eve", "LAB"), SecurityIdentity("ntlm", "eve", "LAB", "PC1")),
    (ntlm_authenticate("eve", "LAB", unicode=False), SecurityIdentity("ntlm", "eve", "LAB", "PC1")),
    (ntlm_authenticate("", "", ""), SecurityIdentity("ntlm", "", "", "")),
    (ntlm_authenticate("a\x1bb"), SecurityIdentity("ntlm", "a\\x1bb", "CORP", "PC1")),
    (spnego_init([OID_KRB5], None), SecurityIdentity("kerberos")),
    (spnego_init([der(0x06, b"\x2a\x03")], None), SecurityIdentity("oid:1.2.3")),
    (krb5_ap_req(("host", "a", "b"), "R"), SecurityIdentity("kerberos", kerberos_service="host/a/b@R")),
    (der(0x60, OID_KRB5 + b"\x02\x00"), SecurityIdentity("kerberos")),
    (spnego_response(b"NTLMSSP\x00\x03"), None),
    (der(0x30, b""), None),
])
def test_security_buffers(token, expected):
    """Bare and wrapped NTLMSSP and Kerberos tokens are read; broken ones raise only Malformed."""
    if expected is None:
        with pytest.raises(Malformed):
            read_security_buffer(token)
    else:
        assert read_security_buffer(token) == expected


@pytest.mark.parametrize(("fields", "reason"), [
    ({"user": (10, 5000)}, "the NTLMSSP user name (10 bytes at offset 5000) lies outside its"),
    ({"user": (0xFFFF, 88)}, "the NTLMSSP user name (65535 bytes at offset 88) lies outside"),
    ({"domain": (3, 88)}, "the NTLMSSP domain name has an odd UTF-16 length (3 bytes)"),
    ({"user": (2, 0xFFFFFFFF)}, "lies outside"),
])
def test_ntlm_offsets_and_lengths_are_checked(fields, reason):
    """NTLM fields pointing outside the message or holding odd UTF-16 are a refusal, never an exception."""
    inspector = SmbInspector()
    handshake(inspector, spnego_response(ntlm_authenticate(fields=fields)))
    assert (inspector.verdict.action, inspector.verdict.code) == (Action.REFUSE, "malformed")
    assert reason in inspector.verdict.reason


def test_ntlm_user_with_a_lone_surrogate_is_malformed():
    """A UTF-16 user name that does not decode is refused, not recorded half-read."""
    token = ntlm_authenticate(fields={"user": (2, 88)})
    token = token[:88] + b"\x00\xd8" + token[90:]
    with pytest.raises(Malformed, match="not valid UTF-16"):
        read_security_buffer(token)


@pytest.mark.parametrize(("offset", "length"), [(5000, 10), (40, 10), (88, 0xFFFF)])
def test_security_buffer_outside_the_message_is_refused(offset, length):
    """A SESSION_SETUP security buffer offset/length outside the message is refused as malformed."""
    inspector = SmbInspector()
    inspector.feed_client(frame(negotiate_request()))
    verdict = inspector.feed_client(frame(session_setup_request(b"x" * 20, offset=offset, length=length)))
    assert (verdict.action, verdict.code) == (Action.REFUSE, "malformed")
    assert "the SESSION_SETUP security buffer" in verdict.reason


# ---------------------------------------------------------------------------
# Negotiate, session and share flags


def test_smb30_with_the_encryption_capability_means_aes_128_ccm():
    """SMB 3.0 and 3.0.2 have no negotiate contexts: the encryption capability means AES-128-CCM."""
    inspector = SmbInspector()
    inspector.feed_client(frame(negotiate_request((0x0300,))))
    inspector.feed_server(frame(negotiate_response(0x0300, security_mode=3, capabilities=0x40)))
    assert (inspector.record.dialect, inspector.record.cipher) == ("3.0", "AES-128-CCM")
    assert inspector.record.signing_required is True


def test_311_contexts_name_cipher_and_signing_algorithm():
    """SMB 3.1.1 negotiate contexts give the chosen cipher and signing algorithm; cipher 0 is none."""
    contexts = context(1, bytes(38)) + context(2, struct.pack("<HH", 1, 4)) + context(8, struct.pack("<HH", 1, 1))
    inspector = SmbInspector()
    inspector.feed_server(frame(negotiate_response(contexts=contexts, count=3)))
    assert (inspector.record.cipher, inspector.record.signing_algorithm) == ("AES-256-GCM", "AES-CMAC")
    none = SmbInspector()
    none.feed_server(frame(negotiate_response(contexts=context(2, struct.pack("<HH", 1, 0)), count=1)))
    assert none.record.cipher is None


@pytest.mark.parametrize(("contexts", "count", "offset", "reason"), [
    (context(2, struct.pack("<HH", 1, 2)), 2, None, "negotiate contexts run past"),
    (struct.pack("<HHI", 2, 40, 0) + b"\x01\x00", 1, None, "runs past the NEGOTIATE response"),
    (context(2, struct.pack("<HHH", 2, 1, 2)), 1, None, "does not name exactly one algorithm"),
    (context(2, struct.pack("<HH", 1, 2)), 1, 70, "inside its fixed part"),
])
def test_broken_negotiate_contexts_are_refused(contexts, count, offset, reason):
    """Negotiate contexts that overrun the message or say nonsense are a refusal naming the problem."""
    inspector = SmbInspector()
    verdict = inspector.feed_server(frame(negotiate_response(contexts=contexts, count=count, context_offset=offset)))
    assert (verdict.action, verdict.code) == (Action.REFUSE, "malformed")
    assert reason in verdict.reason


def test_session_encrypt_flag_ends_the_inspection():
    """A SESSION_SETUP response with SMB2_SESSION_FLAG_ENCRYPT_DATA is done: what follows is encrypted."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate(), session_flags=0x4)
    assert inspector.verdict.action is Action.DONE
    assert inspector.record.session_encrypted and inspector.record.encrypted


def test_share_encrypt_flag_is_recorded():
    """A TREE_CONNECT response with SMB2_SHAREFLAG_ENCRYPT_DATA records the share as encrypted."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    inspector.feed_client(frame(tree_connect_request("\\\\fs\\secret", flags=8)))
    verdict = inspector.feed_server(frame(tree_connect_response(share_flags=0x8000)))
    assert verdict.action is Action.DONE
    assert (inspector.record.share, inspector.record.share_encrypted, inspector.record.signed) == ("\\\\fs\\secret", True, True)


def test_tree_connect_with_the_311_extension_is_read():
    """A TREE_CONNECT with SMB2_TREE_CONNECT_FLAG_EXTENSION_PRESENT: the path after the extension header is read."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    inspector.feed_client(frame(tree_connect_request("\\\\fs\\ext", extension=True)))
    assert inspector.feed_server(frame(tree_connect_response())).action is Action.DONE
    assert inspector.record.share == "\\\\fs\\ext"


def test_refused_tree_connect_is_recorded_and_done():
    """A share the server refuses (BAD_NETWORK_NAME) is recorded with the status, and the inspection ends."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    inspector.feed_client(frame(tree_connect_request("\\\\fs\\nope")))
    verdict = inspector.feed_server(frame(tree_connect_response(status=0xC00000CC)))
    assert verdict.action is Action.DONE
    assert (inspector.record.share, inspector.record.tree_connect_status) == ("\\\\fs\\nope", 0xC00000CC)


def test_tree_connect_path_with_odd_length_is_refused():
    """A TREE_CONNECT path of odd UTF-16 length is malformed."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    verdict = inspector.feed_client(frame(tree_connect_request("", raw=b"\\\x00\\")))
    assert (verdict.code, verdict.reason) == ("malformed", "the TREE_CONNECT path has an odd UTF-16 length (3 bytes)")


def test_compounded_requests_are_each_read():
    """A NEGOTIATE compounded before a SESSION_SETUP (NextCommand) is read message by message."""
    first = negotiate_request()
    first += bytes(-len(first) % 8)
    first = header(0, next_command=len(first)) + first[64:]
    inspector = SmbInspector()
    inspector.feed_client(frame(first + session_setup_request(ntlm_authenticate("carol"))))
    assert (inspector.record.offered_dialects, inspector.record.user) == (("2.0.2", "3.1.1"), "carol")


# ---------------------------------------------------------------------------
# Framing, bounds and hostile input


@pytest.mark.parametrize(("wire", "code", "reason"), [
    (b"\x85\x00\x00\x00", "malformed", "NetBIOS session packet of type 0x85"),
    (b"\x00\x00\x00\x02ab", "malformed", "a 2-byte message, too short"),
    (b"\x00\xff\xff\xff", "too_large", f"a 16777215-byte message before the session was set up, more than the {MAX_MESSAGE}"),
    (frame(b"GET / HTTP/1.1\r\n"), "malformed", "ProtocolId 47455420, which is not SMB"),
    (frame(b"\xfeSMB" + bytes(20)), "malformed", "shorter than its 64-byte header"),
    (frame(header(0, response=True)), "malformed", "the client sent a response"),
    (frame(header(0)), "malformed", "too short for its 36-byte structure"),
    (frame(header(0) + struct.pack("<HH", 36, 50) + bytes(32)), "malformed", "lists 50 dialects"),
    (frame(header(0, next_command=65) + bytes(100)), "malformed", "NextCommand 65"),
    (frame(header(0, next_command=64)), "malformed", "NextCommand 64"),
    (frame(b"\xffSMB\x2e" + bytes(40)), "smb1", "an SMB1 message (command 0x2e)"),
])
def test_broken_client_bytes_are_refused_with_a_reason(wire, code, reason):
    """Broken framing or headers from the client are a refusal naming what is wrong, holding nothing."""
    inspector = SmbInspector()
    verdict = inspector.feed_client(wire)
    assert (verdict.action, verdict.code) == (Action.REFUSE, code)
    assert reason in verdict.reason
    assert inspector.buffered == 0


def test_oversized_message_is_refused_before_it_is_buffered():
    """A length over the bound is refused at its 4-byte header: the body that follows is never held."""
    inspector = SmbInspector()
    assert inspector.feed_client((MAX_MESSAGE + 1).to_bytes(4, "big")).code == "too_large"
    assert inspector.feed_client(bytes(100_000)).code == "too_large"
    assert inspector.buffered == 0


def test_a_message_of_exactly_the_bound_is_read():
    """A SESSION_SETUP with a 65,535-byte security buffer (the most its length field says) is accepted."""
    inspector = SmbInspector()
    wire = frame(session_setup_request(b"NTLMSSP\x00\x01\x00\x00\x00" + bytes(0xFFFF - 12)))
    assert len(wire) == 4 + MAX_MESSAGE
    assert inspector.feed_client(wire).action is Action.CONTINUE
    assert inspector.record.mechanism == "ntlm"


def test_partial_message_is_held_only_up_to_its_length():
    """Bytes of an unfinished message are held, up to its announced length, and no more."""
    inspector = SmbInspector()
    wire = frame(negotiate_request())
    inspector.feed_client(wire[:-1])
    assert inspector.buffered == len(wire) - 1
    inspector.feed_client(wire[-1:] + b"\x00\x00")
    assert inspector.buffered == 2


def test_large_message_after_the_session_ends_the_inspection():
    """Once the session is up, a message over the bound (a big RPC answer on IPC$) ends the inspection, not the connection."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    verdict = inspector.feed_server((MAX_MESSAGE + 1).to_bytes(4, "big") + bytes(1000))
    assert verdict.action is Action.DONE
    assert "before any share was connected" in verdict.reason
    assert inspector.buffered == 0


def test_compressed_message_ends_the_inspection():
    """A compressed message (\\xfcSMB) cannot be read in place: the inspection ends."""
    inspector = SmbInspector()
    assert inspector.feed_server(frame(b"\xfcSMB" + bytes(12))).action is Action.DONE


def test_message_bound_ends_the_inspection():
    """Without a share, the inspection ends after MAX_MESSAGES messages."""
    inspector = SmbInspector()
    handshake(inspector, ntlm_authenticate())
    echo = frame(header(13, message_id=9) + struct.pack("<HH", 4, 0))
    verdicts = [inspector.feed_client(echo) for _ in range(MAX_MESSAGES)]
    assert verdicts[MAX_MESSAGES - 5].action is Action.CONTINUE
    assert verdicts[-1] == verdicts[MAX_MESSAGES - 4]
    assert verdicts[-1].reason == f"no share was connected in {MAX_MESSAGES} messages"


def test_refusal_and_done_are_final():
    """After a verdict other than continue, feeding returns it again and holds nothing."""
    inspector = SmbInspector()
    refused = inspector.feed_client(b"\x85\x00\x00\x00")
    assert inspector.feed_server(frame(negotiate_response())) == refused
    assert inspector.feed_client(b"\x00\x00\x00\x10" + bytes(8)) == refused
    assert inspector.buffered == 0


# ---------------------------------------------------------------------------
# Random input


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=400)), max_size=12), st.booleans())
def test_random_bytes_never_raise_nor_overbuffer(chunks, allow):
    """Random chunks from both sides give verdicts and never more than the bound held."""
    inspector = SmbInspector(allow_smb1=allow)
    for client, chunk in chunks:
        verdict = (inspector.feed_client if client else inspector.feed_server)(chunk)
        assert verdict.action in Action
        assert inspector.buffered <= BOUND


COMMANDS = st.sampled_from([0, 1, 3, 13])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), COMMANDS, st.integers(0, 0xFFFFFFFF), st.binary(max_size=300)), max_size=10))
def test_random_bodies_behind_valid_headers_never_raise(messages):
    """Valid frames and SMB2 headers of the parsed commands with random bodies give verdicts, never exceptions."""
    inspector = SmbInspector()
    for response, command, status, body in messages:
        wire = frame(header(command, response=response, message_id=3, status=status if response else 0) + body)
        verdict = (inspector.feed_server if response else inspector.feed_client)(wire)
        assert verdict.action in Action
        assert inspector.buffered <= BOUND


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_ntlm_fields_never_raise(data):
    """NTLM AUTHENTICATE fields with any lengths and offsets give an identity or Malformed, nothing else."""
    fields = {name: (data.draw(st.integers(0, 0xFFFF)), data.draw(st.integers(0, 0xFFFFFFFF)))
              for name in data.draw(st.lists(st.sampled_from(["user", "domain", "workstation"]), max_size=3))}
    token = ntlm_authenticate(fields=fields, unicode=data.draw(st.booleans()))
    token = token[: data.draw(st.integers(0, len(token)))]
    try:
        identity = read_security_buffer(data.draw(st.sampled_from([token, spnego_response(token)])))
    except Malformed as e:
        assert e.reason
    else:
        assert identity.mechanism in ("ntlm", None)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_security_buffers_never_raise(data):
    """Real-shaped SPNEGO/Kerberos/NTLM tokens with bytes flipped or cut raise only Malformed."""
    token = bytearray(data.draw(st.sampled_from([
        spnego_init([OID_MS_KRB5, OID_KRB5], krb5_ap_req()), spnego_init([OID_NTLM], ntlm_authenticate()),
        spnego_response(ntlm_authenticate()), krb5_ap_req()])))
    for _ in range(data.draw(st.integers(0, 6))):
        token[data.draw(st.integers(0, len(token) - 1))] = data.draw(st.integers(0, 255))
    token = bytes(token[: data.draw(st.integers(0, len(token)))])
    try:
        assert isinstance(read_security_buffer(token), SecurityIdentity)
    except Malformed as e:
        assert e.reason


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_captures_never_raise(data):
    """A real conversation with bytes flipped gives verdicts and a bounded buffer, never an exception."""
    capture = [(side, bytearray(chunk)) for side, chunk in CAPTURES[data.draw(st.sampled_from(sorted(CAPTURES)))]]
    for _ in range(data.draw(st.integers(1, 8))):
        chunk = capture[data.draw(st.integers(0, len(capture) - 1))][1]
        chunk[data.draw(st.integers(0, len(chunk) - 1))] = data.draw(st.integers(0, 255))
    inspector, verdict = run([(side, bytes(chunk)) for side, chunk in capture], SmbInspector(allow_smb1=data.draw(st.booleans())))
    assert verdict.action in Action
    assert inspector.buffered <= BOUND

"""The RDP codec (issue 11 groundwork): X.224 Connection Request and Confirm read without I/O.

Real bytes first (tests/unit/data/rdp_captures.txt: xfreerdp 2.11 and freerdp-shadow-cli), then
hostile and random input, which must end in a verdict, never an exception or a growing buffer.
"""

import struct

import pytest
from captures import feed, fed_whole_and_cut, load_captures, one_byte_at_a_time, random_cuts, one_side
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_rdp.codec import (
    HYBRID_REQUIRED_BY_SERVER,
    MAX_PDU,
    PROTOCOL_HYBRID,
    PROTOCOL_HYBRID_EX,
    PROTOCOL_RDP,
    PROTOCOL_SSL,
    Action,
    RdpInspector,
    RdpRecord,
    encode_connection_confirm,
    encode_connection_request,
    negotiation_failure,
    protocol_names,
)

CAPTURES = load_captures("rdp_captures.txt")


def run(capture, inspector=None):
    """Feed a capture chunk by chunk; the inspector and the last verdict."""
    inspector = inspector if inspector is not None else RdpInspector()
    return inspector, feed(inspector, capture)


# ---------------------------------------------------------------------------
# Real clients and a real server


@pytest.mark.parametrize(("name", "protocols"), [
    ("rdp_nla", PROTOCOL_SSL | PROTOCOL_HYBRID),
    ("rdp_default", PROTOCOL_SSL | PROTOCOL_HYBRID),
    ("rdp_ext", PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX),
])
def test_xfreerdp_offering_nla_is_let_through_with_its_cookie(name, protocols):
    """xfreerdp's Connection Requests offering CredSSP pass, with the cookie user and protocols read."""
    inspector, verdict = run(CAPTURES[name])
    assert verdict.action is Action.CONTINUE
    assert inspector.record == RdpRecord(cookie_user="alice", requested_protocols=protocols, request_flags=0)
    assert inspector.record.offers_credssp


@pytest.mark.parametrize(("name", "offered"), [("rdp_tls", "tls"), ("rdp_rdp", "rdp")])
def test_xfreerdp_without_nla_is_refused_with_the_failure_pdu(name, offered):
    """/sec:tls and /sec:rdp requests are refused under require_nla, with HYBRID_REQUIRED_BY_SERVER as the reply."""
    inspector, verdict = run(CAPTURES[name])
    assert verdict.action is Action.REFUSE
    assert verdict.code == "nla_required"
    assert verdict.reason == f"the client offers no CredSSP (NLA), only {offered}"
    assert verdict.reply == negotiation_failure()
    assert inspector.record.cookie_user == "alice"


def test_sec_rdp_sends_no_negotiation_request_and_asks_for_standard_security():
    """A request without an RDP Negotiation Request (xfreerdp /sec:rdp) asks for PROTOCOL_RDP."""
    inspector, _ = run(CAPTURES["rdp_rdp"], RdpInspector(require_nla=False))
    assert inspector.record.requested_protocols == PROTOCOL_RDP
    assert inspector.record.request_flags is None


def test_without_require_nla_a_tls_client_passes():
    """With require_nla off, a TLS-only client is inspected and let through."""
    inspector, verdict = run(CAPTURES["srv_tls"][:1], RdpInspector(require_nla=False))
    assert verdict.action is Action.CONTINUE
    assert inspector.record.requested_protocols == PROTOCOL_SSL


def test_our_failure_pdu_is_the_one_freerdps_server_sends():
    """negotiation_failure() is byte for byte what freerdp-shadow-cli sends a client without NLA."""
    assert negotiation_failure() == one_side(CAPTURES["srv_rdp"], "s")
    assert negotiation_failure(HYBRID_REQUIRED_BY_SERVER) == bytes.fromhex("030000130ed000000000000300080005000000")


def test_server_selecting_credssp_ends_the_inspection():
    """The shadow server's Connection Confirm selecting CredSSP is done, with protocol and flags recorded."""
    inspector, verdict = run(CAPTURES["srv_nla"])
    assert verdict.action is Action.DONE
    assert verdict.reason == "the server selected credssp"
    assert inspector.record == RdpRecord(cookie_user="rdpuser", requested_protocols=3, request_flags=0,
                                         selected_protocol=PROTOCOL_HYBRID, response_flags=3)
    assert inspector.buffered == 0


def test_server_negotiation_failure_is_recorded_and_done():
    """A server's own Negotiation Failure (client let through without require_nla) is done, with the code."""
    inspector, verdict = run(CAPTURES["srv_tls"], RdpInspector(require_nla=False))
    assert verdict.action is Action.DONE
    assert verdict.reason == "the server refused the negotiation: HYBRID_REQUIRED_BY_SERVER"
    assert inspector.record.failure_code == HYBRID_REQUIRED_BY_SERVER


def test_cookie_user_comes_without_domain_and_defaults_to_the_local_user():
    """FreeRDP drops the domain from the cookie ('/u:CORP\\bob' -> bob) and sends the local user without /u."""
    assert run(CAPTURES["rdp_domain"])[0].record.cookie_user == "bob"
    assert run(CAPTURES["rdp_nouser"])[0].record.cookie_user == "root"


def test_routing_token_is_recorded_instead_of_a_cookie():
    """A load-balancing routing token (xfreerdp /load-balance-info) is recorded; there is no cookie user."""
    record = run(CAPTURES["rdp_lb"])[0].record
    assert record.routing_token == "tsv://MS Terminal Services Plugin.1.Sessions"
    assert record.cookie_user is None


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_byte_by_byte_feeding_gives_the_same_record(name):
    """Every capture fed one byte at a time ends in the same verdict and record as fed whole."""
    whole, cut = fed_whole_and_cut(RdpInspector, CAPTURES[name], one_byte_at_a_time)
    assert cut == whole


# ---------------------------------------------------------------------------
# The server's choice under require_nla


def test_server_selecting_tls_is_refused_under_require_nla():
    """A server choosing TLS though the client offered CredSSP is refused, the failure PDU replacing its confirm."""
    inspector = RdpInspector()
    inspector.feed_client(encode_connection_request("alice"))
    verdict = inspector.feed_server(encode_connection_confirm(PROTOCOL_SSL))
    assert (verdict.action, verdict.code) == (Action.REFUSE, "nla_not_selected")
    assert verdict.reply == negotiation_failure()


def test_server_selecting_standard_security_is_refused_under_require_nla():
    """A Connection Confirm with no Negotiation Response (standard RDP security) is refused under require_nla."""
    inspector = RdpInspector()
    inspector.feed_client(encode_connection_request("alice"))
    verdict = inspector.feed_server(encode_connection_confirm(None))
    assert verdict.code == "nla_not_selected"
    assert inspector.record.selected_protocol == PROTOCOL_RDP


def test_server_selecting_what_the_client_did_not_offer_is_malformed():
    """A server selecting a protocol the client never offered is refused as malformed."""
    inspector = RdpInspector(require_nla=False)
    inspector.feed_client(encode_connection_request("alice", requested=PROTOCOL_SSL))
    verdict = inspector.feed_server(encode_connection_confirm(PROTOCOL_HYBRID))
    assert verdict.code == "malformed"
    assert "did not offer" in verdict.reason


# ---------------------------------------------------------------------------
# Hostile input


def cr(variable: bytes, li_delta: int = 0, code: int = 0xE0) -> bytes:
    x224 = bytes([6 + len(variable) + li_delta, code, 0, 0, 0, 0, 0]) + variable
    return struct.pack("!BBH", 3, 0, 4 + len(x224)) + x224


@pytest.mark.parametrize(("wire", "code", "reason"), [
    (b"\x16\x03\x01\x00\x10", "malformed", "does not start with a TPKT header"),
    (b"\x03\x00\xff\xff", "too_large", f"TPKT length 65535 is over {MAX_PDU} bytes"),
    (struct.pack("!BBH", 3, 0, MAX_PDU + 1), "too_large", "is over"),
    (b"\x03\x00\x00\x05\x00", "malformed", "too short for an X.224 header"),
    (cr(b"", li_delta=1), "malformed", "length indicator"),
    (cr(b"", code=0xD0), "malformed", "expected an X.224 Connection Request"),
    (cr(b"Cookie: mstshash=alice"), "malformed", "no CR LF ending"),
    (cr(b"\x01\x00\x08\x00\x03\x00"), "malformed", "ends inside an RDP negotiation structure"),
    (cr(b"\x01\x00\x09\x00\x03\x00\x00\x00"), "malformed", "says length 9"),
    (cr(b"\x06\x00\x08\x00\x03\x00\x00\x00"), "malformed", "expected an RDP Negotiation Request"),
    (cr(b"\x01\x00\x08\x00\x03\x00\x00\x00junk"), "malformed", "4 unexpected bytes"),
])
def test_broken_connection_requests_are_refused_with_a_reason(wire, code, reason):
    """Broken TPKT/X.224/negotiation bytes are a refusal naming what is wrong, never an exception."""
    inspector = RdpInspector(require_nla=False)
    verdict = inspector.feed_client(wire)
    assert (verdict.action, verdict.code) == (Action.REFUSE, code)
    assert reason in verdict.reason
    assert inspector.buffered == 0


def test_correlation_info_after_the_request_is_accepted():
    """A Negotiation Request followed by RDP_NEG_CORRELATION_INFO (mstsc sends one) is read."""
    wire = cr(b"Cookie: mstshash=eve\r\n" + struct.pack("<BBHI", 1, 0x08, 8, 3)
              + struct.pack("<BBH", 6, 0, 36) + bytes(32))
    inspector = RdpInspector()
    assert inspector.feed_client(wire).action is Action.CONTINUE
    assert inspector.record.request_flags == 0x08


def test_server_bytes_before_the_request_are_refused():
    """A server speaking first is refused: RDP's client opens."""
    verdict = RdpInspector().feed_server(b"\x03\x00\x00\x13")
    assert verdict.code == "malformed"


def test_control_characters_in_the_cookie_are_escaped():
    """A cookie with control characters or bad UTF-8 is recorded escaped, fit for a log line."""
    inspector = RdpInspector()
    inspector.feed_client(cr(b"Cookie: mstshash=a\x1b[31mb\xff\r\n" + struct.pack("<BBHI", 1, 0, 8, 3)))
    assert inspector.record.cookie_user == "a\\x1b[31mb\\xff"


def test_refusal_and_done_are_final():
    """After a verdict other than continue, feeding returns it again and buffers nothing."""
    inspector = RdpInspector()
    refused = inspector.feed_client(encode_connection_request("x", requested=PROTOCOL_SSL))
    assert inspector.feed_client(b"\x03" * 100) == refused
    assert inspector.feed_server(b"\x03" * 100) == refused
    assert inspector.buffered == 0


def test_protocol_names():
    """Protocol flags are named for logs, unknown bits in hex, and no flag is standard RDP security."""
    assert protocol_names(0) == ("rdp",)
    assert protocol_names(0x0B) == ("tls", "credssp", "credssp-ex")
    assert protocol_names(0x101) == ("tls", "0x100")


# ---------------------------------------------------------------------------
# Random input


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_never_raise_nor_overbuffer(client_chunks, server_chunks):
    """Random chunks from both sides give verdicts, and never more than MAX_PDU per side is held."""
    inspector = RdpInspector()
    for c, s in zip(client_chunks, server_chunks + [b""] * len(client_chunks)):
        assert inspector.feed_client(c).action in Action
        assert inspector.feed_server(s).action in Action
        assert inspector.buffered <= 2 * MAX_PDU


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_requests_never_raise(data):
    """A real Connection Request with bytes flipped, cut or grown gives a verdict and a bounded buffer."""
    wire = bytearray(one_side(CAPTURES[data.draw(st.sampled_from(sorted(CAPTURES)))], "c"))
    for _ in range(data.draw(st.integers(0, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    wire = bytes(wire[: data.draw(st.integers(0, len(wire)))]) + data.draw(st.binary(max_size=40))
    inspector = RdpInspector(require_nla=data.draw(st.booleans()))
    verdict = inspector.feed_client(wire)
    assert verdict.action in Action
    assert inspector.buffered <= MAX_PDU


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(CAPTURES)), st.data())
def test_arbitrary_chunking_gives_the_same_record(name, data):
    """A capture cut at random points gives the same record and verdict as fed chunk by chunk."""
    whole, cut = fed_whole_and_cut(RdpInspector, CAPTURES[name], random_cuts(data))
    assert cut == whole

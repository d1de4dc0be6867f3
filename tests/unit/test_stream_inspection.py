"""gateway.tunnel.inspect: a connector stream whose handshake a codec watches, then a plain splice.

A real tunnel session pair in memory (iosim, Clock); the socket to the app is a StringTransport.
"""

from captures import load_captures
from twisted.internet.testing import StringTransport

from gateway.config import AppConfig
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.inspect import REFUSAL_GRACE, Inspection, InspectingSocketSide
from gateway.tunnel.stream import StreamReset
from gateway_rdp import RDPHandler
from gateway_rdp.codec import (
    PROTOCOL_HYBRID,
    PROTOCOL_SSL,
    encode_connection_confirm,
    encode_connection_request,
    negotiation_failure,
)
from gateway_smb import SMBHandler
from tests.unit.test_session import Collector, Pair

SMB = load_captures("smb_captures.txt")


class Counting:
    """An inspector wrapper that counts the chunks fed to it."""

    def __init__(self, inner):
        self.inner = inner
        self.fed = 0

    def feed_client(self, data):
        self.fed += 1
        return self.inner.feed_client(data)

    def feed_server(self, data):
        self.fed += 1
        return self.inner.feed_server(data)


def inspected(handler, options=None, metadata=None):
    """A user's stream to an app of ``handler``'s protocol whose connector side is inspected.

    Returns (pair, the user's stream, what the user received, the socket to the app, the
    inspection, the connector's stream)."""
    app = AppConfig(name="app1", listen="", destination="127.0.0.1:9", host="127.0.0.1", port=9,
                    protocol=handler.name, options=options or {})
    made = {}

    def on_stream(stream):
        inspector = Counting(handler.inspector(app))
        inspection = Inspection(stream, app, inspector, lambda c: handler.facts(c.inner), pair.clock)
        backend = InspectingSocketSide(inspection)
        backend.makeConnection(StringTransport())
        stream.accept()
        backend.join(stream)
        made.update(inspection=inspection, backend=backend, stream=stream)

    pair = Pair(on_stream=on_stream)
    user = pair.open({"kind": "app", "app": "app1", "client": "127.0.0.1:5000", "user": "alice", **(metadata or {})})
    received = Collector()
    user.attach(received)
    return pair, user, received, made["backend"], made["inspection"], made["stream"]


def test_rdp_client_without_credssp_gets_the_failure_pdu_then_fin_and_the_app_nothing():
    """/sec:rdp's request: the user gets the Negotiation Failure and FIN, the app not a byte and a
    close; the refusal is recorded; the client's later bytes and FIN are dropped without error."""
    pair, user, received, backend, inspection, stream = inspected(RDPHandler())
    user.write(encode_connection_request("bob", requested=None))
    pair.pump.flush()
    assert received.received == negotiation_failure() and received.eof
    assert backend.transport.value() == b"" and backend.transport.disconnecting
    facts = stream.session_facts
    assert facts["decision"] == "refused" and facts["code"] == "nla_required" and facts["cookie_user"] == "bob"
    user.write(b"more after the refusal")
    user.loseConnection()
    pair.pump.flush()
    assert backend.transport.value() == b"" and stream.closed and received.lost is not None


def test_a_refused_client_that_never_closes_is_reset_after_the_grace():
    """A refusal holds nothing open for long: the stream is reset once REFUSAL_GRACE has passed."""
    pair, user, received, backend, inspection, stream = inspected(RDPHandler())
    user.write(b"\x03\x00\xff\xff")
    pair.pump.flush()
    assert stream.session_facts["code"] == "too_large" and not stream.closed
    pair.clock.advance(REFUSAL_GRACE)
    pair.pump.flush()
    assert stream.closed and received.lost is not None and received.lost.check(StreamReset)
    assert received.lost.value.code == ResetCode.REFUSED


def test_rdp_nla_negotiation_passes_untouched_then_splices_without_the_inspector():
    """Request and Confirm reach their peer byte for byte; after the Confirm the inspector is
    not called any more, and the facts hold the cookie user and the selected protocol."""
    pair, user, received, backend, inspection, stream = inspected(RDPHandler())
    request = encode_connection_request("rdpuser", requested=PROTOCOL_SSL | PROTOCOL_HYBRID)
    user.write(request)
    pair.pump.flush()
    assert backend.transport.value() == request
    confirm = encode_connection_confirm(PROTOCOL_HYBRID)
    backend.dataReceived(confirm + b"\x16\x03\x01 tls")
    pair.pump.flush()
    assert received.received == confirm + b"\x16\x03\x01 tls"
    fed = inspection.inspector.fed
    user.write(b"client hello")
    backend.dataReceived(b"server hello")
    pair.pump.flush()
    assert inspection.inspector.fed == fed
    assert backend.transport.value() == request + b"client hello"
    assert received.received.endswith(b"server hello")
    facts = stream.session_facts
    assert facts["decision"] == "spliced" and facts["cookie_user"] == "rdpuser"
    assert facts["selected_protocol"] == "credssp" and facts["requested_protocols"] == "tls/credssp"


def test_smb_capture_passes_byte_for_byte_and_records_the_session():
    """A real smbclient session goes through unaltered both ways; the facts name dialect, user, share."""
    pair, user, received, backend, inspection, stream = inspected(SMBHandler())
    sent_up = sent_down = b""
    for side, chunk in SMB["smb3_ntlm"]:
        if side == "c":
            user.write(chunk)
            sent_up += chunk
        else:
            backend.dataReceived(chunk)
            sent_down += chunk
        pair.pump.flush()
    assert backend.transport.value() == sent_up and received.received == sent_down
    facts = stream.session_facts
    assert facts["decision"] == "spliced" and facts["dialect"] == "3.1.1" and facts["user"] == "alice"
    assert facts["share"] == r"\\127.0.0.1\share" and facts["authenticated"] is True


def test_smb_signing_policy_refuses_at_the_session_setup_response():
    """With require_signing, the server's SESSION_SETUP success of an unsigned session is not
    forwarded: the client never gets the session."""
    pair, user, received, backend, inspection, stream = inspected(SMBHandler(), {"require_signing": True})
    forwarded = b""
    for side, chunk in SMB["smb3_ntlm"]:
        if side == "c":
            user.write(chunk)
        else:
            backend.dataReceived(chunk)
        pair.pump.flush()
        if inspection.refused:
            break
        if side == "s":
            forwarded += chunk
    assert inspection.refused and side == "s" and stream.session_facts["code"] == "signing_required"
    assert received.received == forwarded and received.eof and backend.transport.disconnecting


def test_the_connection_ending_during_the_handshake_is_recorded():
    """A client that goes away before the handshake is done leaves a record saying so."""
    pair, user, received, backend, inspection, stream = inspected(SMBHandler())
    user.write(SMB["smb3_ntlm"][0][1])
    pair.pump.flush()
    backend.connectionLost(None)
    assert stream.session_facts["decision"] == "closed"


def test_an_inspector_that_raises_costs_its_stream_only():
    """An exception inside an inspector (or its facts) is a refusal of that stream (logged), not a
    broken tunnel."""
    class Broken:
        def feed_client(self, data):
            raise ValueError("bug")

        feed_server = feed_client

    pair, user, received, backend, inspection, stream = inspected(SMBHandler())
    inspection.inspector = Broken()
    inspection.facts = lambda inspector: {}["no such fact"]
    other = pair.open({"kind": "app", "app": "app1"})
    user.write(b"\x00\x00\x00\x04\xfeSMB")
    pair.pump.flush()
    facts = stream.session_facts
    assert facts["code"] == "internal" and "ValueError('bug')" in facts["reason"] and "KeyError" in facts["facts_error"]
    assert received.eof and not other.closed and pair.client.streams

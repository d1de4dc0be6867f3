"""Tunnel sessions over an in-memory connection (iosim), driven by a Clock."""

import hashlib

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect
from zope.interface import implementer

from gateway.tunnel import frame
from gateway.tunnel.frame import BASE_WINDOW, GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.stream import StreamReset


@implementer(IHalfCloseableProtocol)
class Collector(Protocol):
    def __init__(self):
        self.data = []
        self.lost = None
        self.eof = False

    def dataReceived(self, data):
        self.data.append(data)

    def readConnectionLost(self):
        self.eof = True

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.lost = reason

    @property
    def received(self):
        return b"".join(self.data)


class Pair:
    def __init__(self, settings=TunnelSettings(), on_stream=None):
        self.clock = Clock()
        self.accepted = []
        self.client = TunnelSession(self.clock, settings, is_client=True)
        self.server = TunnelSession(self.clock, settings, is_client=False, on_stream=on_stream or self._accept)
        self.ct = FakeTransport(self.client, isServer=False)
        self.st = FakeTransport(self.server, isServer=True)
        self.pump = connect(self.server, self.st, self.client, self.ct, greet=False)
        self.pump.flush()

    def _accept(self, stream):
        stream.accept()
        proto = Collector()
        stream.attach(proto)
        self.accepted.append((stream, proto))

    def open(self, metadata=None):
        d = self.client.open_stream(metadata or {"kind": "app", "app": "x"})
        self.pump.flush()
        return self.successful(d)

    @staticmethod
    def successful(d):
        results = []
        d.addBoth(results.append)
        assert results, "deferred did not fire"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


def test_open_stream_carries_metadata_and_data_both_ways():
    """A SYN delivers its metadata; bytes flow both ways; FIN from both ends closes cleanly."""
    p = Pair()
    stream = p.open({"kind": "app", "app": "web", "destination": "127.0.0.1:80"})
    mine = Collector()
    stream.attach(mine)
    (remote, theirs), = p.accepted
    assert remote.metadata == {"kind": "app", "app": "web", "destination": "127.0.0.1:80"}
    stream.write(b"hello")
    remote.write(b"world")
    p.pump.flush()
    assert theirs.received == b"hello" and mine.received == b"world"
    stream.loseConnection()
    p.pump.flush()
    assert theirs.eof and theirs.lost is None
    remote.loseConnection()
    p.pump.flush()
    assert mine.lost is not None and theirs.lost is not None
    assert not p.client.streams and not p.server.streams


def test_large_transfer_respects_window_and_arrives_intact():
    """4 MiB through one stream arrives byte for byte although the window is 256 KiB."""
    p = Pair()
    stream = p.open()
    (remote, theirs), = p.accepted
    payload = bytes(range(256)) * (4 * 4096)
    for i in range(0, len(payload), 65536):
        stream.write(payload[i:i + 65536])
        p.pump.flush()
    p.pump.flush()
    assert hashlib.sha256(theirs.received).digest() == hashlib.sha256(payload).digest()


def test_paused_reader_bounds_what_peer_sends():
    """A paused reader stops window credit: the sender holds data, the receiver gets at most a window."""
    p = Pair()
    stream = p.open()
    (remote, theirs), = p.accepted
    remote.pauseProducing()
    paused = []

    class Producer:
        def pauseProducing(self):
            paused.append(True)

        def resumeProducing(self):
            paused.append(False)

        def stopProducing(self):
            pass

    stream.registerProducer(Producer(), True)
    for _ in range(64):
        stream.write(b"x" * 65536)
        p.pump.flush()
    assert len(theirs.received) <= BASE_WINDOW
    assert paused and paused[-1] is True
    remote.resumeProducing()
    p.pump.flush()
    assert len(theirs.received) == 64 * 65536
    assert paused[-1] is False


def test_slow_stream_does_not_stall_another():
    """One stream whose reader is paused leaves a second stream on the same tunnel flowing."""
    p = Pair()
    slow = p.open()
    fast = p.open()
    (slow_remote, slow_proto), (fast_remote, fast_proto) = p.accepted
    slow_remote.pauseProducing()
    for _ in range(20):
        slow.write(b"s" * 65536)
    p.pump.flush()
    fast.write(b"f" * 1000000)
    p.pump.flush()
    assert len(fast_proto.received) == 1000000
    assert len(slow_proto.received) <= BASE_WINDOW


def test_window_grows_for_a_fast_reader():
    """A reader that keeps up gets a larger window than the base (autotuning)."""
    p = Pair()
    stream = p.open()
    (remote, theirs), = p.accepted
    for _ in range(200):
        stream.write(b"z" * 65536)
        p.pump.flush()
    assert remote.target_window > BASE_WINDOW
    assert remote.target_window <= p.server.max_window


def test_refused_stream_fails_open_with_reason():
    """A handler that resets the SYN makes open_stream fail with the code and reason."""
    p = Pair(on_stream=lambda s: s.reset(ResetCode.REFUSED, "destination 10.0.0.1:22 is not allowed"))
    d = p.client.open_stream({"kind": "app"})
    p.pump.flush()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(StreamReset)
    assert failures[0].value.code == ResetCode.REFUSED
    assert "not allowed" in failures[0].value.reason
    assert not p.client.streams


def test_faulty_handler_resets_one_stream_not_tunnel():
    """An exception in the stream handler resets that stream; the tunnel stays up."""
    calls = []

    def handler(stream):
        calls.append(stream)
        if len(calls) == 1:
            raise RuntimeError("plugin bug")
        stream.accept()

    p = Pair(on_stream=handler)
    d1 = p.client.open_stream({"kind": "app"})
    p.pump.flush()
    errors = []
    d1.addErrback(errors.append)
    assert errors[0].value.code == ResetCode.INTERNAL_ERROR
    assert p.open() is not None
    assert p.client.connected and p.server.connected


def test_garbage_gets_go_away_protocol_error():
    """Bytes that are not frames end the tunnel with a GO_AWAY naming the problem."""
    p = Pair()
    p.server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    p.pump.flush()
    assert p.client.go_away_reason is not None
    code, message = p.client.go_away_reason
    assert code == GoAwayCode.UNSUPPORTED_VERSION
    assert "frame version" in message


def test_oversized_frame_is_refused():
    """A frame longer than the limit is a protocol error, without buffering its payload."""
    p = Pair()
    header = frame.HEADER.pack(frame.FRAME_VERSION, frame.FrameType.DATA, 0, 1, 64 * 1024 * 1024)
    p.server.dataReceived(header)
    p.pump.flush()
    code, message = p.client.go_away_reason
    assert code == GoAwayCode.PROTOCOL_ERROR and "exceeds the limit" in message


def test_ping_measures_rtt_and_dead_tunnel_is_closed():
    """PINGs are answered; a tunnel silent for two intervals is aborted."""
    p = Pair(TunnelSettings(ping_interval=5))
    p.clock.advance(5)
    p.pump.flush()
    assert p.client._pings == {} and p.client.connected
    # Now the server stops answering anything.
    p.st.write = lambda data: None
    p.st.writeSequence = lambda data: None
    p.clock.advance(5)
    p.pump.flush()
    assert not (p.ct.disconnecting or p.ct.disconnected)
    p.clock.advance(5)
    p.pump.flush()
    assert p.ct.disconnecting or p.ct.disconnected, "not noticed within two intervals"


def test_go_away_refuses_new_streams_but_keeps_open_ones():
    """After GO_AWAY the peer opens no new streams; an open stream still carries data."""
    p = Pair()
    stream = p.open()
    (remote, theirs), = p.accepted
    p.server.go_away(GoAwayCode.NORMAL, "draining")
    p.pump.flush()
    assert not p.client.available
    with pytest.raises(Exception):
        p.client.open_stream({"kind": "app"})
    stream.write(b"still here")
    p.pump.flush()
    assert theirs.received == b"still here"


def test_fair_share_while_transport_paused():
    """When the tunnel resumes, queued streams are served round-robin, one frame each."""
    p = Pair()
    a = p.open()
    b = p.open()
    p.client.pauseProducing()
    a.write(b"a" * 300000)
    b.write(b"b" * 300000)
    written = []
    real_write = p.client.write_frame
    p.client.write_frame = lambda data: (written.append(data[4:8]), real_write(data))
    p.client.resumeProducing()
    order = [int.from_bytes(sid, "big") for sid in written[:4]]
    assert order[0] != order[1] and order[2] != order[3]


def test_protocol_exception_resets_only_its_stream():
    """A stream protocol raising in dataReceived resets that stream; the tunnel and other streams live on."""
    p = Pair()
    bad = p.open()
    good = p.open()
    (bad_remote, _), (good_remote, good_proto) = p.accepted

    class Exploding(Collector):
        def dataReceived(self, data):
            raise RuntimeError("plugin bug")

    bad_remote.protocol = Exploding()
    mine = Collector()
    bad.attach(mine)
    bad.write(b"boom")
    good.write(b"fine")
    p.pump.flush()
    assert mine.lost is not None and mine.lost.check(StreamReset)
    assert mine.lost.value.code == ResetCode.INTERNAL_ERROR
    assert good_proto.received == b"fine" and p.client.connected and p.server.connected


def test_protocol_error_logged_once_and_input_ignored_after():
    """After a violation the session sends one GO_AWAY and ignores whatever follows."""
    p = Pair()
    sent = []
    real = p.server.write_frame
    p.server.write_frame = lambda data: (sent.append(data), real(data))
    p.server.dataReceived(frame.HEADER.pack(1, 9, 0, 1, 0))
    p.server.dataReceived(frame.ping(7))
    go_aways = [d for d in sent if d[1] == frame.FrameType.GO_AWAY]
    assert len(go_aways) == 1 and not any(d[1] == frame.FrameType.PING for d in sent)


def test_oversized_metadata_from_peer_is_refused():
    """A SYN whose metadata block exceeds 16 KiB is a protocol error."""
    p = Pair()
    block = b'{"x":"' + b"y" * frame.MAX_METADATA + b'"}'
    p.client.write_frame(frame.data(1, block, frame.Flag.SYN))
    p.pump.flush()
    code, message = p.client.go_away_reason
    assert code == GoAwayCode.PROTOCOL_ERROR and "metadata" in message


def test_stream_ids_exhausted_means_go_away_not_crash():
    """A tunnel that used all its stream ids refuses new streams with TunnelClosed and drains."""
    from gateway.tunnel.session import MAX_STREAM_ID, TunnelClosed

    p = Pair()
    p.client._next_id = MAX_STREAM_ID + 2
    with pytest.raises(TunnelClosed):
        p.client.open_stream({"kind": "app"})
    assert p.client.going_away


def test_open_streams_counts_app_streams_not_control():
    """open_streams counts every open stream except the control stream, and drops closed ones."""
    p = Pair()
    p.open({"kind": "control"})
    app = p.open({"kind": "app"})
    p.open({"kind": "app"})
    assert p.client.open_streams == 2 and p.server.open_streams == 2
    app.reset(ResetCode.CANCELLED, "done")
    p.pump.flush()
    assert p.client.open_streams == 1 and p.server.open_streams == 1

"""The bounds on what a tunnel peer can make us do: admission, JSON depth, PING replies, capacity,
the handshake deadline, the TCP idle timeout and the open-files limit (issue 9)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway import boundedjson
from gateway.config import parse_config
from gateway.control import messages as m
from gateway.errors import GatewayError, ProtocolError
from gateway.metrics import NULL_ROLE
from gateway.service.admission import AddressCounter, RateLimiter, ThrottledLog, address_key
from gateway.service.tunnels import ServiceTunnelFactory, TunnelHandler, capacity_problem
from gateway.tap import raise_open_files_limit
from gateway.tunnel import frame
from gateway.tunnel.frame import FrameDecoder, GoAwayCode
from gateway.tunnel.session import MAX_OWED_PONGS, TunnelSession, TunnelSettings

# -- JSON depth -------------------------------------------------------------------------------


def test_nesting_depth_skips_brackets_inside_strings():
    """Brackets in strings (escaped quotes included) do not count towards the depth."""
    assert boundedjson.nesting_depth(b'{"a": [1, {"b": "[[[{{{\\"]]]"}]}') == 3
    assert boundedjson.nesting_depth(b'"[[[["') == 0


def test_deep_json_is_refused_before_it_is_parsed():
    """16 KiB of '[' is a ValueError naming the limit, not a RecursionError."""
    with pytest.raises(boundedjson.TooDeep, match="nested more than 32 levels deep"):
        boundedjson.loads(b"[" * 16000)
    assert boundedjson.loads(b"[" * 32 + b"]" * 32) is not None
    with pytest.raises(boundedjson.TooDeep):
        boundedjson.loads(b"[" * 33 + b"]" * 33)


def test_hostile_syn_metadata_is_a_protocol_error():
    """A SYN whose metadata nests 10,000 deep decodes to ProtocolError PROTOCOL_ERROR, not RecursionError."""
    [f] = FrameDecoder().feed(frame.data(1, b'{"kind":' + b"[" * 10000, frame.SYN))
    with pytest.raises(ProtocolError) as e:
        frame.decode_metadata(f.payload)
    assert e.value.code == GoAwayCode.PROTOCOL_ERROR and "nested more than 32 levels" in e.value.message


def test_deep_control_message_is_a_value_error():
    """A control message nesting deeper than the limit is refused like any malformed message."""
    with pytest.raises(ValueError, match="control message is nested more than 32"):
        m.decode(b'{"type": "hello", "x": ' + b"{\"a\":" * 100 + b"1" + b"}" * 101)


# -- admission ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_address_key_counts_ipv6_by_its_64(host, key):
    """IPv4 is counted per address, IPv6 per /64, a v4-mapped address as its IPv4."""
    assert address_key(host) == key


def test_address_counter_caps_each_address_separately():
    """The limit applies per address; releasing frees a place."""
    counter = AddressCounter(2)
    assert counter.acquire("a") and counter.acquire("a") and not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a") and counter.counts == {"a": 2, "b": 1}
    for _ in range(3):
        counter.release("b")
    assert "b" not in counter.counts


def test_rate_limiter_allows_a_burst_then_a_steady_rate():
    """10 a minute: ten at once, then one every 6 s, with the wait reported."""
    clock = Clock()
    limiter = RateLimiter(10, clock)
    assert [limiter.take("a") for _ in range(10)] == [0.0] * 10
    assert limiter.take("a") == pytest.approx(6.0)
    assert limiter.take("b") == 0.0
    clock.advance(6)
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0


class FakeLog:
    def __init__(self):
        self.lines = []

    def warn(self, format, **fields):
        self.lines.append(format.format(**fields))


def test_throttled_log_folds_a_flood_into_one_line_a_second():
    """100 events in a second make one line; the next line says how many were folded in."""
    clock, log = Clock(), FakeLog()
    throttled = ThrottledLog(log, clock, "refused {address} ({more} more)")
    for _ in range(100):
        throttled.emit(address="x")
    clock.advance(1)
    throttled.emit(address="y")
    assert log.lines == ["refused x (0 more)", "refused y (99 more)"]


def test_throttled_log_by_key_keeps_one_line_per_key_and_a_bounded_memory():
    """Keyed, each key gets its own line per interval; past max_keys the events fold under no key."""
    clock, log = Clock(), FakeLog()
    throttled = ThrottledLog(log, clock, "refused {address} ({more} more)", max_keys=2)
    for address in ("a", "b", "a", "b", "c", "d"):
        throttled.emit(address, address=address)
    assert log.lines == ["refused a (0 more)", "refused b (0 more)", "refused c (0 more)"]
    assert len(throttled._seen) == 3   # a and b, and None for everything past them
    clock.advance(1)
    throttled.emit("a", address="a")
    assert log.lines[-1] == "refused a (1 more)" and len(throttled._seen) <= 3


# -- the service's tunnel handler ---------------------------------------------------------------


def make_factory(tmp_path, **service):
    config = parse_config({"service": {"state_dir": str(tmp_path), "max_handshakes": 4, **service}}, "s.toml")
    node = SimpleNamespace(config=config, reactor=Clock(), settings=TunnelSettings(), stream_closed=None,
                           node_metrics=NULL_ROLE)
    return ServiceTunnelFactory(node)


def connection(factory, host="192.0.2.7"):
    addr = SimpleNamespace(host=host, port=40000)
    assert factory.admit(addr)
    session = factory.buildProtocol(addr)
    transport = StringTransport()
    session.makeConnection(transport)
    return session, transport


def test_one_address_cannot_take_every_handshake_slot(tmp_path):
    """With max_unauthenticated_per_address = 2, a third connection from one address is refused, another's is not."""
    factory = make_factory(tmp_path, max_unauthenticated_per_address=2)
    connection(factory)
    connection(factory)
    assert not factory.admit(SimpleNamespace(host="192.0.2.7", port=1))
    assert factory.admit(SimpleNamespace(host="192.0.2.8", port=1))


def test_a_connection_without_tls_is_closed_after_handshake_timeout(tmp_path):
    """No handshake within handshake_timeout: the connection is aborted and its slots freed."""
    factory = make_factory(tmp_path, handshake_timeout=5)
    session, transport = connection(factory)
    factory.node.reactor.advance(4.9)
    assert not transport.disconnecting
    factory.node.reactor.advance(0.2)
    assert transport.disconnecting
    session.connectionLost(None)
    assert factory.handshaking == 0 and factory.unauthenticated.counts == {}


def test_the_handshake_deadline_stops_once_tls_is_done(tmp_path):
    """A connection whose TLS completed is not cut by handshake_timeout (the hello timeout applies)."""
    factory = make_factory(tmp_path, handshake_timeout=5)
    session, transport = connection(factory)
    session.owner._handshake_over()
    session.owner.state = "enrolling"
    factory.node.reactor.advance(10)
    assert not transport.disconnecting


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0, 1e308, 1000.5, "1", True, None])
def test_unusable_capacities_are_named(value):
    """Capacities that are not finite numbers in (0, 1000] get a sentence saying so."""
    assert "capacity must be a finite number > 0 and <= 1000" in capacity_problem(value)


@pytest.mark.parametrize("value", [0.01, 1, 1.0, 1000])
def test_sane_capacities_pass(value):
    """Finite positive capacities up to 1000 are accepted."""
    assert capacity_problem(value) is None


# -- PING replies -------------------------------------------------------------------------------


def paused_session():
    session = TunnelSession(Clock(), TunnelSettings(), is_client=False)
    transport = StringTransport()
    session.makeConnection(transport)
    session.pauseProducing()
    return session, transport


def test_pongs_wait_while_paused_and_go_out_on_resume():
    """While the transport is paused, PING replies are held (up to the limit) and sent on resume."""
    session, transport = paused_session()
    session.dataReceived(frame.ping(1) * MAX_OWED_PONGS)
    assert transport.value() == b""
    session.resumeProducing()
    replies = FrameDecoder().feed(transport.value())
    assert [(f.type, f.flags, f.value) for f in replies] == [(2, frame.ACK, 1)] * MAX_OWED_PONGS


def test_a_peer_pinging_without_reading_gets_go_away():
    """One PING more than MAX_OWED_PONGS while paused: GO_AWAY PROTOCOL_ERROR and the tunnel closes."""
    session, transport = paused_session()
    session.dataReceived(frame.ping(1) * (MAX_OWED_PONGS + 1))
    [go_away] = FrameDecoder().feed(transport.value())
    assert go_away.type == 3 and transport.disconnecting
    code, reason = frame.decode_reason(go_away.payload)
    assert code == GoAwayCode.PROTOCOL_ERROR and "PINGs while not reading our replies" in reason


# -- TCP apps: idle timeout -----------------------------------------------------------------------


def tcp_app(**options):
    return SimpleNamespace(name="db", options=options)


def test_idle_timeout_option_is_validated():
    """idle_timeout defaults to 2 hours; 0 disables it; negative, non-finite or non-numbers are errors."""
    from gateway_tcp import DEFAULT_IDLE_TIMEOUT, idle_timeout

    assert idle_timeout(tcp_app()) == DEFAULT_IDLE_TIMEOUT == 7200
    assert idle_timeout(tcp_app(idle_timeout=0)) is None
    assert idle_timeout(tcp_app(idle_timeout=30)) == 30.0
    for bad in (-1, float("inf"), "1h", True):
        with pytest.raises(GatewayError, match="app db: options.idle_timeout: expected a number of seconds >= 0"):
            idle_timeout(tcp_app(idle_timeout=bad))


class FakeStream:
    bytes_in = bytes_out = 0


def idle_client(timeout):
    from gateway_tcp import _ClientSide

    clock = Clock()
    side = _ClientSide(tcp_app(idle_timeout=timeout), None, clock, timeout)
    side.transport = StringTransport()
    side.stream = FakeStream()
    side._active_at = clock.seconds()
    side._idle_call = clock.callLater(timeout / 4, side._check_idle)
    return side, clock


def test_an_idle_tcp_connection_is_closed_and_a_busy_one_is_not():
    """No byte either way for idle_timeout closes the connection; traffic in either direction keeps it."""
    side, clock = idle_client(100)
    for _ in range(20):
        clock.advance(25)
        side.stream.bytes_in += 1 if _ % 2 else 0
        side.stream.bytes_out += 0 if _ % 2 else 1
    assert not side.transport.disconnecting
    clock.pump([25] * 4)  # the last traffic is seen at the first of these checks
    assert not side.transport.disconnecting
    clock.advance(25)
    assert side.transport.disconnecting


# -- open files ---------------------------------------------------------------------------------


class FakeRlimits:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        self.limits = limits


class RecordingLog:
    def __init__(self):
        self.events = []

    def info(self, format, **fields):
        self.events.append(("info", format.format(**fields)))

    def warn(self, format, **fields):
        self.events.append(("warn", format.format(**fields)))


def test_the_soft_open_files_limit_is_raised_to_the_hard_one():
    """Soft 1024, hard 65536: raised to 65536 with one info line saying from what to what."""
    rlimits, log = FakeRlimits(1024, 65536), RecordingLog()
    assert raise_open_files_limit(rlimits, log) == (1024, 65536)
    assert rlimits.limits == (65536, 65536)
    assert log.events == [("info", "open files limit (RLIMIT_NOFILE) raised from 1024 to 65536 (hard limit 65536)")]


def test_a_low_hard_open_files_limit_is_warned_about():
    """A hard limit of 4096 is taken, with a warning saying how to raise it."""
    rlimits, log = FakeRlimits(1024, 4096), RecordingLog()
    raise_open_files_limit(rlimits, log)
    assert log.events[1][0] == "warn" and "LimitNOFILE=" in log.events[1][1]


def test_an_unlimited_hard_open_files_limit_is_capped():
    """An infinite hard limit raises the soft one to the cap, not to infinity."""
    rlimits = FakeRlimits(1024, FakeRlimits.RLIM_INFINITY)
    raise_open_files_limit(rlimits, RecordingLog())
    assert rlimits.limits == (1_048_576, FakeRlimits.RLIM_INFINITY)


# -- enrolment connections ------------------------------------------------------------------------


def enrolling(factory, host="192.0.2.7"):
    """A connection past TLS without a client certificate, and what the service wrote on it."""
    factory.node.enrol = lambda message, address: succeed({"type": "error", "code": "enrolment_refused",
                                                            "message": "unknown token"})
    session, transport = connection(factory, host)
    session.owner._handshake_over()
    session.owner.state = "enrolling"
    return session, transport


def sent_frames(transport):
    return FrameDecoder().feed(transport.value())


def enrol_syn(sid):
    return frame.syn(sid, {"kind": "enrol"})


def enrol_request(sid):
    body = m.encode({"type": "enrol_request", "token_id": "t", "secret": "s", "csr": "c"})
    return frame.data(sid, len(body).to_bytes(4, "big") + body)


def test_the_fifth_stream_before_hello_ends_the_tunnel(tmp_path):
    """Four streams before hello are answered one by one; the fifth is RST TOO_MANY_STREAMS and GO_AWAY."""
    session, transport = enrolling(make_factory(tmp_path))
    session.dataReceived(b"".join(frame.syn(sid, {"kind": "control"}) for sid in (1, 3, 5, 7, 9)))
    frames = sent_frames(transport)
    resets = [frame.decode_reason(f.payload)[0] for f in frames if f.type == 0 and f.flags & frame.RST]
    assert resets == [1, 1, 1, 1, 8]
    assert frames[-1].type == 3 and frame.decode_reason(frames[-1].payload)[0] == GoAwayCode.PROTOCOL_ERROR
    assert transport.disconnecting


def test_one_enrolment_per_connection(tmp_path):
    """The answer to an enrolment is followed by GO_AWAY NORMAL and a close; a second enrol stream is refused."""
    session, transport = enrolling(make_factory(tmp_path))
    session.dataReceived(enrol_syn(1) + enrol_syn(3))
    [rst] = [f for f in sent_frames(transport) if f.flags & frame.RST]
    assert rst.stream_id == 3 and b"one enrolment per connection" in rst.payload
    session.dataReceived(enrol_request(1))
    go_away = sent_frames(transport)[-1]
    assert go_away.type == 3 and frame.decode_reason(go_away.payload) == (0, "one enrolment per connection")
    assert transport.disconnecting


def test_a_second_enrolment_request_ends_the_tunnel(tmp_path):
    """Two enrol_requests on one stream: GO_AWAY PROTOCOL_ERROR, and the store is asked once."""
    factory = make_factory(tmp_path)
    session, transport = enrolling(factory)
    asked = []
    factory.node.enrol = lambda message, address: asked.append(message) or Deferred()  # the store is slow
    session.dataReceived(enrol_syn(1) + enrol_request(1) + enrol_request(1))
    go_away = sent_frames(transport)[-1]
    code, reason = frame.decode_reason(go_away.payload)
    assert code == GoAwayCode.PROTOCOL_ERROR and "more than one enrolment request" in reason
    assert len(asked) == 1


def test_enrolments_are_rate_limited_per_address(tmp_path):
    """With enrolments_per_minute = 2, the third request from one address is answered rate_limited; 30 s later one passes."""
    factory = make_factory(tmp_path, enrolments_per_minute=2)

    def reply(host="192.0.2.7"):
        session, transport = enrolling(factory, host)
        session.dataReceived(enrol_syn(1) + enrol_request(1))
        data = b"".join(f.payload for f in sent_frames(transport) if f.type == 0 and f.stream_id == 1
                        and not f.flags & (frame.SYN | frame.RST))
        session.connectionLost(None)
        return m.decode(data[4:])

    assert [reply()["code"] for _ in range(2)] == ["enrolment_refused"] * 2
    limited = reply()
    assert limited["code"] == "rate_limited" and "try again in 30 s" in limited["message"]
    assert reply("192.0.2.8")["code"] == "enrolment_refused"
    factory.node.reactor.advance(30)
    assert reply()["code"] == "enrolment_refused"


def test_a_tunnel_checked_while_the_node_stops_is_sent_away_normally_not_as_an_internal_error():
    """The store closes under a tunnel's certificate check at shutdown: GO_AWAY NORMAL, nothing
    logged as critical (it logged "internal error" with a traceback for every such tunnel)."""
    from types import SimpleNamespace

    from twisted.logger import Logger
    from twisted.python.failure import Failure

    from gateway.errors import StoreClosed
    from gateway.tunnel.frame import GoAwayCode

    events, refused = [], []
    handler = SimpleNamespace(log=Logger(observer=events.append), ctx={"tunnel_id": "svc/t3"},
                              refuse=lambda code, message: refused.append((code, message)))
    TunnelHandler._internal_error(handler, Failure(StoreClosed("the store is closed: the service is shutting down")))
    assert refused == [(GoAwayCode.NORMAL, "service node is shutting down")] and events == []
    TunnelHandler._internal_error(handler, Failure(ValueError("a bug")))
    assert refused[-1][0] == GoAwayCode.INTERNAL_ERROR and len(events) == 1

"""options.balance = "request": the front door's requests take turns over the group's connectors
through a pool of idle streams shared by its client connections."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.errors import GatewayError
from gateway.service.registry import NoConnector
from gateway_http import check_options, check_own_listener_apps
from gateway_http.frontdoor import FrontDoor, Timeouts
from gateway_http.streampool import StreamPool
from test_http_frontdoor import GET, App, FakeStream

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class PooledStream(FakeStream):
    """A FakeStream on a connector's tunnel, as the node's open_stream gives it."""

    def __init__(self, metadata: dict, connector_id: str) -> None:
        super().__init__(metadata)
        self.log_info = SimpleNamespace(connector_id=connector_id)
        self.session = SimpleNamespace(available=True)
        self.disconnecting = False

    def loseConnection(self) -> None:
        self.fin = True
        self.disconnecting = True


class Service:
    """The node's side: choose_connector takes the connectors in turn; open_stream records where."""

    def __init__(self, connectors=("c0", "c1"), idle_timeout: float = 20) -> None:
        self.clock = Clock()
        self.connectors = list(connectors)
        self.turn = 0
        self.opens: list[tuple[Deferred, PooledStream, str | None]] = []
        self.pool = StreamPool(self.clock, idle_timeout, max_idle=2)
        self.app = App(options={"balance": "request"})

    def choose_connector(self, app: Any) -> str:
        if not self.connectors:
            raise NoConnector("no healthy connector of group 'default'")
        connector = self.connectors[self.turn % len(self.connectors)]
        self.turn += 1
        return connector

    def open_stream(self, app: Any, extra: dict, connector: str | None = None) -> Deferred:
        d: Deferred = Deferred()
        self.opens.append((d, PooledStream(extra, connector or "any"), connector))
        return d

    def client(self) -> "Client":
        return Client(self)


class Client:
    """One keep-alive client connection to the front door."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.door = FrontDoor(lambda host, target: service.app, service.open_stream, reactor=service.clock,
                              timeouts=Timeouts(header=5, idle=20), choose_connector=service.choose_connector,
                              pool=service.pool)
        self.transport = StringTransport()
        self.door.makeConnection(self.transport)

    def request(self) -> PooledStream:
        """Send a GET, accept a stream if one was opened for it, answer it; the stream it went on."""
        opened = len(self.service.opens)
        before = {id(s): len(s.data) for _, s, _ in self.service.opens}
        self.door.dataReceived(GET)
        if len(self.service.opens) > opened:
            d, stream, _ = self.service.opens[-1]
            d.callback(stream)
        else:
            stream = next(s for _, s, _ in self.service.opens if len(s.data) > before[id(s)])
        stream.answer(OK)
        assert self.transport.value().endswith(b"ok"), self.transport.value()
        self.transport.clear()
        return stream


def test_the_requests_of_one_client_connection_take_turns_over_the_connectors():
    """Four requests on one keep-alive connection: two streams opened (one on each connector, as
    chosen), then each reused in turn; with balance = "connection" all four would share one."""
    service = Service()
    client = service.client()
    streams = [client.request() for _ in range(4)]
    assert [connector for _, _, connector in service.opens] == ["c0", "c1"]
    assert [s.log_info.connector_id for s in streams] == ["c0", "c1", "c0", "c1"]
    assert streams[2] is streams[0] and streams[3] is streams[1]
    assert all(s.data.count(b"GET /") == 2 for s in streams[:2])


def test_a_stream_one_client_connection_finished_with_serves_another():
    service = Service(connectors=["c0"])
    first = service.client().request()
    second = service.client().request()
    assert second is first and len(service.opens) == 1 and first.data.count(b"GET /") == 2


def test_per_connection_balancing_keeps_one_stream_without_the_option():
    service = Service()
    service.app = App()
    client = service.client()
    streams = [client.request() for _ in range(3)]
    assert len(service.opens) == 1 and streams[0] is streams[1] is streams[2]
    assert service.turn == 0, "choose_connector asked without balance = request"


def test_a_stream_of_a_draining_tunnel_is_not_taken_again():
    service = Service(connectors=["c0"])
    first = service.client().request()
    first.session.available = False     # the connector said GO_AWAY
    second = service.client().request()
    assert second is not first and len(service.opens) == 2 and first.fin


def test_streams_are_kept_apart_by_signed_in_identity():
    """The connector reads the user from the stream's metadata (single sign-on): Ann's stream is not Bob's."""
    pool = StreamPool(Clock(), 20)
    app = App()
    ann = PooledStream({}, "c0")
    assert pool.put(ann, app, {"sub": "ann"})
    assert pool.take(app, {"sub": "bob"}, "c0") is None
    assert pool.take(app, None, "c0") is None
    assert pool.take(app, {"sub": "ann"}, "c1") is None
    assert pool.take(app, {"sub": "ann"}, "c0") is ann
    assert pool.take(app, {"sub": "ann"}, "c0") is None   # taken: one request at a time


def test_a_stream_of_an_app_replaced_by_a_reload_is_closed_not_reused():
    pool = StreamPool(Clock(), 20)
    old, new = App(), App()
    stream = PooledStream({}, "c0")
    pool.put(stream, old, None)
    assert pool.take(new, None, "c0") is None and stream.fin


def test_the_pool_is_bounded_per_connector_and_idle_streams_are_closed_after_the_idle_timeout():
    clock = Clock()
    pool = StreamPool(clock, 20, max_idle=2)
    app = App()
    streams = [PooledStream({}, "c0") for _ in range(3)]
    assert [pool.put(s, app, None) for s in streams] == [True, True, False]
    other = PooledStream({}, "c1")
    assert pool.put(other, app, None)
    clock.advance(12)
    fresh = PooledStream({}, "c1")
    pool.put(fresh, app, None)
    clock.advance(10)          # the first three are 22 s idle, `fresh` 10 s
    assert streams[0].fin and streams[1].fin and other.fin and not fresh.fin
    assert len(pool) == 1
    clock.advance(20)
    assert fresh.fin and len(pool) == 0 and not clock.getDelayedCalls()


def test_the_pool_is_bounded_in_all_across_identities():
    """Many signed-in users make many keys: past max_total no stream is parked (the caller closes it)."""
    pool = StreamPool(Clock(), 20, max_idle=2, max_total=3)
    app = App()
    parked = [pool.put(PooledStream({}, "c0"), app, {"sub": f"user{i}"}) for i in range(4)]
    assert parked == [True, True, True, False] and len(pool) == 3
    assert pool.take(app, {"sub": "user0"}, "c0") is not None
    assert pool.put(PooledStream({}, "c0"), app, {"sub": "user9"})


def test_the_listeners_factory_closes_the_parked_streams_when_it_stops():
    """A reload replaced the listener, or the node stops: its idle streams end then, not at the sweep."""
    from gateway_http import front_door_factory

    clock = Clock()
    factory = front_door_factory([App(options={"balance": "request"})], lambda *a, **k: Deferred(), reactor=clock,
                                 choose_connector=lambda app: "c0")
    stream = PooledStream({}, "c0")
    assert factory.pool.put(stream, App(), None)
    factory.doStart()
    factory.doStop()
    assert stream.fin and len(factory.pool) == 0 and not clock.getDelayedCalls()


def test_a_parked_stream_that_gets_bytes_is_reset_and_forgotten():
    """No request is in flight on a parked stream: bytes on it are a connector's error, not a response."""
    service = Service(connectors=["c0"])
    stream = service.client().request()
    assert len(service.pool) == 1
    stream.answer(b"HTTP/1.1 200 OK\r\n\r\n")
    assert stream.reset_with is not None and len(service.pool) == 0


def test_a_parked_stream_the_connector_closes_is_forgotten():
    service = Service(connectors=["c0"])
    stream = service.client().request()
    stream.end()
    assert len(service.pool) == 0
    assert service.client().request() is not stream


def test_no_connector_now_leaves_the_wait_to_open_stream():
    """choose_connector finds none (all restarting): the request goes to open_stream without a
    connector, which waits for one or fails saying why."""
    service = Service(connectors=[])
    client = service.client()
    client.door.dataReceived(GET)
    assert len(service.opens) == 1 and service.opens[0][2] is None


@pytest.mark.parametrize("value", ["round-robin", 1, True])
def test_a_bad_balance_value_is_refused_naming_both(value):
    with pytest.raises(GatewayError, match=r"options\.balance.*\"connection\".*\"request\""):
        check_options([_config_app(value)])


def test_balance_per_request_needs_the_front_door():
    app = _config_app("request", listen="tcp:8080")
    with pytest.raises(GatewayError, match=r"options\.balance = 'request' needs the \[http\] front door"):
        check_own_listener_apps([app])


def _config_app(balance: Any, listen: str = "") -> Any:
    from gateway.config import parse_config

    entry = {"name": "wiki", "protocol": "http", "options": {"preauth": "passthrough", "balance": balance}}
    if listen:
        entry.update(listen=listen, destination="127.0.0.1:8000", options={"preauth": "none", "balance": balance})
    else:
        entry.update(external_url="http://wiki.example.test/", internal_url="http://127.0.0.1:8000/")
    return parse_config({"service": {"state_dir": "/tmp/unused"}, "apps": [entry]}, "svc.toml").apps[0]

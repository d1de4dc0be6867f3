"""Tests for gateway.service.changes: StoreHealth (a store outage logged once, the grace, the
catch-up), ChangeFeed (notices coalesced, a re-established LISTEN re-reads everything) and
ThreadedStore's outage gate (one call at a time while the store is down)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.errors import StoreUnavailable
from gateway.service.changes import EVERYTHING, ChangeFeed, StoreHealth


def events_of(health: StoreHealth) -> list[dict]:
    seen: list[dict] = []
    health.log.observer = seen.append
    return seen


def test_an_outage_is_logged_once_and_its_end_once_with_a_catch_up():
    """Many failures log one store_outage; the first success logs one store_back and catches up once."""
    clock, caught_up = Clock(), []
    health = StoreHealth(clock, "postgresql://gw@db/gw", 900.0, on_back=lambda: caught_up.append(1))
    seen = events_of(health)
    for _ in range(5):
        health.failed("the store postgresql://gw@db/gw failed: connection refused")
    clock.advance(42)
    health.ok()
    health.ok()
    assert [e.get("event") for e in seen] == ["store_outage", "store_back"] and caught_up == [1]


def test_new_streams_are_refused_only_after_the_grace():
    """stale is false within store_outage_grace of the outage's start and true after it; the reason names the store."""
    clock = Clock()
    health = StoreHealth(clock, "postgresql://gw@db/gw", 10.0)
    events_of(health)
    health.failed("down")
    clock.advance(10)
    assert not health.stale
    clock.advance(1)
    assert health.stale and "postgresql://gw@db/gw" in health.stale_reason()
    assert "store_outage_grace (10s)" in health.stale_reason()


def test_quiet_takes_an_outage_and_passes_other_failures_on():
    """quiet() swallows StoreUnavailable (starting the outage) and returns any other failure."""
    health = StoreHealth(Clock(), "db", 900.0)
    events_of(health)
    assert health.quiet(Failure(StoreUnavailable("the store db failed: gone"))) is None
    assert health.down_since == 0
    other = Failure(ValueError("bug"))
    assert health.quiet(other) is other


class FakeStore:
    def __init__(self):
        self.listener = None

    def listen(self, on_notice, on_state):
        self.listener = (on_notice, on_state)
        return self

    def stop(self):
        self.listener = None


class ThreadlessReactor(Clock):
    def callFromThread(self, f, *args):
        f(*args)


def test_the_feed_coalesces_notices_and_re_reads_everything_after_a_reconnect():
    """Notices within one reactor turn are applied once together; a LISTEN re-established after the first reads everything."""
    reactor, store, applied = ThreadlessReactor(), FakeStore(), []
    health = StoreHealth(reactor, "db", 900.0)
    events_of(health)
    feed = ChangeFeed(store, reactor, health, applied.append)
    feed.startService()
    on_notice, on_state = store.listener
    on_state(True, "")
    on_notice("apps")
    on_notice("connectors,tokens")
    reactor.advance(0)
    assert applied == [{"apps", "connectors", "tokens"}]
    on_state(True, "")   # reconnected with no outage seen: what came meanwhile is lost
    assert applied[-1] == set(EVERYTHING)
    feed.stopService()
    assert store.listener is None


def test_a_lost_listen_is_an_outage_and_its_return_the_end():
    """The feed's connection lost starts an outage; the LISTEN back ends it (health's catch-up)."""
    reactor, store, caught_up = ThreadlessReactor(), FakeStore(), []
    health = StoreHealth(reactor, "db", 900.0, on_back=lambda: caught_up.append(1))
    seen = events_of(health)
    ChangeFeed(store, reactor, health, lambda topics: None).startService()
    on_notice, on_state = store.listener
    on_state(True, "")
    on_state(False, "the store db failed: server closed the connection")
    on_state(False, "the store db failed: connection refused")
    on_state(True, "")
    assert [e.get("event") for e in seen] == ["store_outage", "store_back"] and caught_up == [1]


def test_during_an_outage_one_store_call_at_a_time_waits_and_the_others_fail_at_once():
    """With the store down and a call in flight, a further call fails at once with StoreUnavailable naming the store;
    once the call in flight is answered, the store is back and calls go through again."""
    import threading

    from gateway.store.threaded import ThreadedStore
    from test_store import FakeReactor

    release = threading.Event()

    class SlowStore:
        def list_groups(self):
            release.wait(10)
            return ["default"]

        def list_apps(self):
            return []

        def close(self):
            pass

    reactor = FakeReactor()
    health = StoreHealth(Clock(), "postgresql://gw@db/gw", 900.0)
    events_of(health)
    store = ThreadedStore(SlowStore(), reactor)
    store.health = health
    try:
        health.failed("down")
        in_flight = store.list_groups()
        failures = []
        store.list_apps().addErrback(failures.append)
        assert failures and failures[0].check(StoreUnavailable)
        assert "postgresql://gw@db/gw is unreachable" in failures[0].getErrorMessage()
        release.set()
        assert reactor.result_of(in_flight) == ["default"] and health.down_since is None
        assert reactor.result_of(store.list_apps()) == []
    finally:
        release.set()
        reactor.result_of(store.close())

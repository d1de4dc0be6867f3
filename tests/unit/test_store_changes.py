"""Tests for the PostgreSQL change feed (issue 15): writes NOTIFY what they change on commit, and
ChangeListener delivers it from a connection and thread of its own."""

from __future__ import annotations

import queue
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import GatewayError
from gateway.store.records import AppRecord, TokenRecord
from gateway.pki.tokens import hash_secret

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def pg(postgres_cluster):
    from gateway.store.postgresql import PostgreSQLStore

    store = PostgreSQLStore(postgres_cluster.new_database())
    yield store
    store.close()


@pytest.fixture
def feed(pg):
    """(events queue, listener): ("notice", topics) and ("state", up, why) as they come."""
    events: queue.Queue = queue.Queue()
    listener = pg.listen(lambda topics: events.put(("notice", topics)),
                         lambda up, why: events.put(("state", up, why)))
    assert events.get(timeout=30) == ("state", True, "")
    yield events
    listener.stop()


def test_a_committed_write_notifies_its_topics(pg, feed):
    """An app added and a token created reach the listener as their topics, in order."""
    pg.ensure_group("office", NOW)
    pg.add_app(AppRecord("wiki", "office", {"destination": "10.0.0.1:80"}, NOW, NOW))
    pg.create_token(TokenRecord("t1", hash_secret("s"), "office", NOW, NOW + timedelta(hours=1)))
    assert [feed.get(timeout=30), feed.get(timeout=30)] == [("notice", "apps"), ("notice", "tokens")]


def test_a_refused_write_notifies_nothing(pg, feed):
    """A write that fails (the app's group does not exist) rolls back its notice with it."""
    with pytest.raises(GatewayError):
        pg.add_app(AppRecord("wiki", "nowhere", {"destination": "10.0.0.1:80"}, NOW, NOW))
    pg.set_session_log("group", "default", True, NOW)
    assert feed.get(timeout=30) == ("notice", "log_switches")


def test_a_node_heartbeat_is_not_a_change_but_a_new_node_is(pg, feed):
    """A new node's row is announced once; its later heartbeats are not; its removal is."""
    pg.record_node("n1", "localhost:1", NOW, NOW)
    pg.record_node("n1", "localhost:1", NOW, NOW + timedelta(seconds=1))
    pg.remove_node("n1")
    pg.set_session_log("group", "default", True, NOW)  # a marker: everything before it has arrived
    assert [feed.get(timeout=30) for _ in range(3)] == [("notice", "nodes"), ("notice", "nodes"),
                                                        ("notice", "log_switches")]

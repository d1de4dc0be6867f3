"""Tests for the store's node rows (issue 15): each service node's tunnel address and heartbeat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.store.records import NodeRecord

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    yield s
    s.close()


def test_a_node_row_is_written_then_refreshed(store):
    """record_node inserts a node once and later calls refresh its address and last_seen."""
    store.record_node("n1", "localhost:9001", T0, T0)
    store.record_node("n1", "gw1.example.test:9001", T0, T0 + timedelta(seconds=15))
    assert store.list_nodes() == [NodeRecord("n1", "gw1.example.test:9001", T0, T0 + timedelta(seconds=15))]


def test_only_nodes_seen_since_the_cutoff_are_listed(store):
    """list_nodes(seen_since) leaves out a node whose heartbeat stopped before the cutoff."""
    store.record_node("old", "localhost:9001", T0, T0)
    store.record_node("live", "localhost:9002", T0, T0 + timedelta(minutes=5))
    assert [n.node_id for n in store.list_nodes(T0 + timedelta(minutes=1))] == ["live"]
    assert [n.node_id for n in store.list_nodes()] == ["live", "old"]


def test_a_stopped_node_is_removed(store):
    """remove_node deletes the row once and says whether there was one."""
    store.record_node("n1", "localhost:9001", T0, T0)
    assert store.remove_node("n1") is True
    assert store.remove_node("n1") is False
    assert store.list_nodes() == []


def test_two_store_objects_see_each_others_nodes(store_backend):
    """Two nodes on one database (two store objects) each see the other's row."""
    a, b = store_backend.open(), store_backend.open()
    try:
        a.record_node("a", "localhost:9001", T0, T0)
        b.record_node("b", "localhost:9002", T0, T0)
        assert [n.node_id for n in a.list_nodes()] == ["a", "b"] == [n.node_id for n in b.list_nodes()]
    finally:
        a.close()
        b.close()


def test_the_first_ca_claimed_is_the_one_recorded(store):
    """claim_ca records the first node's CA and answers it to every later claim, whatever CA they bring."""
    assert store.recorded_ca() is None
    assert store.claim_ca("sha256:aa", "PEM A", T0) == "sha256:aa"
    assert store.claim_ca("sha256:bb", "PEM B", T0) == "sha256:aa"
    assert store.recorded_ca() == "sha256:aa"

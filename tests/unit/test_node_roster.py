"""Tests for gateway.service.nodes.NodeRoster: this node's row kept fresh and the live nodes read back."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from gateway.errors import StoreUnavailable
from gateway.service.nodes import LIVE_HEARTBEATS, NodeRoster
from gateway.store.records import NodeRecord
from gateway.store.sqlite import SQLiteStore


class SyncStore:
    """A ThreadedStore stand-in: the SQLite store's methods, answered at once."""

    closed = False

    def __init__(self, path):
        self.store = SQLiteStore(path)
        self.down = False

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def call(*args):
            if self.down:
                return fail(StoreUnavailable("the store x failed: connection refused"))
            return succeed(method(*args))

        return call


def roster(store, clock, node_id, changes=None):
    return NodeRoster(store, clock, node_id, f"{node_id}.example.test:8443", 15.0,
                      on_change=(changes.append if changes is not None else lambda nodes: None))


def test_each_beat_writes_the_row_and_reads_the_live_nodes(tmp_path):
    """Two nodes on one store each list both after their beats, with the addresses they advertise."""
    clock, store = Clock(), SyncStore(tmp_path / "gw.db")
    clock.advance(1_800_000_000)
    a, b = roster(store, clock, "a"), roster(store, clock, "b")
    a.beat(), b.beat(), a.beat()
    assert [(n.node_id, n.tunnel_address) for n in a.live] == [("a", "a.example.test:8443"),
                                                                 ("b", "b.example.test:8443")]


def test_a_node_that_stopped_beating_drops_out(tmp_path):
    """A node whose row is older than LIVE_HEARTBEATS intervals leaves the others' list, and on_change says so."""
    clock, store, changes = Clock(), SyncStore(tmp_path / "gw.db"), []
    clock.advance(1_800_000_000)
    a, b = roster(store, clock, "a", changes), roster(store, clock, "b")
    b.beat(), a.beat()
    clock.advance(15.0 * LIVE_HEARTBEATS + 1)
    a.beat()
    assert [n.node_id for n in a.live] == ["a"]
    assert [[n.node_id for n in nodes] for nodes in changes] == [["a", "b"], ["a"]]


def test_a_clean_stop_removes_the_row(tmp_path):
    """leave() deletes the node's row, so the others drop it at their next beat."""
    clock, store = Clock(), SyncStore(tmp_path / "gw.db")
    a, b = roster(store, clock, "a"), roster(store, clock, "b")
    a.beat(), b.beat()
    b.leave()
    a.beat()
    assert [n.node_id for n in a.live] == ["a"]


def test_a_store_failure_keeps_the_last_list(tmp_path):
    """With the store down a beat changes nothing: the last live nodes stay and no change is reported."""
    clock, store, changes = Clock(), SyncStore(tmp_path / "gw.db"), []
    a = roster(store, clock, "a", changes)
    a.beat()
    store.down = True
    a.beat()
    assert [n.node_id for n in a.live] == ["a"] and len(changes) == 1
    assert isinstance(a.live[0], NodeRecord) and a.started == datetime.fromtimestamp(0, UTC)

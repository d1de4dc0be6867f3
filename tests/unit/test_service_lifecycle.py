"""Tests for gateway.service.lifecycle: connector status writes, group moves and the inactive sweep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from attrs import define, field
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from gateway.service.lifecycle import StatusRecorder, Sweeper, SweeperService
from gateway.service.registry import ConnectorTunnel, Registry
from gateway.store.records import CertificateRecord, ConnectorRecord, ConnectorStatus, TokenRecord
from gateway.store.sqlite import SQLiteStore

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STATUS = ConnectorStatus("active", "0.1.0", "10.0.0.7:5000", 1, 0, "node-1", "abc1", None)
MINUTE = 60.0
DAY = 86400.0


class DeferredStore:
    """A SQLiteStore whose methods return (already fired) Deferreds, like ThreadedStore's."""

    def __init__(self, store: SQLiteStore) -> None:
        self.sync = store
        self.calls: list[str] = []
        self.closed = False

    def __getattr__(self, name):
        method = getattr(self.sync, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return maybeDeferred(method, *args, **kwargs)

        return call


@define
class FakeHandler:
    identity: object = None
    group: str = "office"
    configs_sent: int = 0

    def send_config(self) -> None:
        self.configs_sent += 1


@define
class FakeSession:
    owner: FakeHandler = field(factory=FakeHandler)
    connected: bool = True
    peer_going_away: bool = False
    open_streams: int = 0

    @property
    def available(self) -> bool:
        return self.connected and not self.peer_going_away


@define
class FakeIdentity:
    connector_id: str
    serial_hex: str = "abc1"
    not_after: datetime = START + timedelta(days=90)


@pytest.fixture
def clock():
    c = Clock()
    c.advance(START.timestamp())
    return c


@pytest.fixture
def sync_store(tmp_path):
    s = SQLiteStore(tmp_path / "gateway.db")
    yield s
    s.close()


@pytest.fixture
def store(sync_store):
    return DeferredStore(sync_store)


def enrol(sync_store, connector_id="conn-1", group="office"):
    sync_store.ensure_group(group, START)
    sync_store.create_token(TokenRecord(f"t-{connector_id}", "h", group, START, START + timedelta(hours=1)))
    sync_store._insert_connector(sync_store._db, ConnectorRecord(connector_id, "laptop", group, START))
    sync_store._insert_certificate(sync_store._db, CertificateRecord("abc1", connector_id, START + timedelta(days=90)))


def connect(registry, connector_id="conn-1", group="office", streams=0) -> ConnectorTunnel:
    """Add a live tunnel of the connector to the registry, as tunnel_up does."""
    handler = FakeHandler(identity=FakeIdentity(connector_id), group=group)
    entry = ConnectorTunnel(session=FakeSession(owner=handler, open_streams=streams), connector_id=connector_id,
                            group=group, address="10.0.0.7:5000", software_version="0.1.0")
    registry.add(entry)
    return entry


def sweeper(store, clock, registry, inactive_after=10 * MINUTE, remove_after=10 * DAY) -> Sweeper:
    return Sweeper(store, clock, lambda cid: bool(registry.tunnels_of(cid)), inactive_after, remove_after)


def recorder(store, clock, registry, heartbeat_interval=15.0) -> StatusRecorder:
    return StatusRecorder(store, registry, clock, "node-1", heartbeat_interval)


# status


def test_tunnel_up_writes_the_status_at_once(store, sync_store, clock):
    """A tunnel coming up writes state, version, address, tunnels, streams, node and certificate."""
    enrol(sync_store)
    registry = Registry()
    connect(registry, streams=2)
    connect(registry, streams=1)
    recorder(store, clock, registry).changed("conn-1")
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.software_version, c.address, c.tunnels, c.open_streams, c.node_id, c.cert_serial) == (
        "active", "0.1.0", "10.0.0.7:5000", 2, 3, "node-1", "abc1")
    assert c.cert_not_after == START + timedelta(days=90)
    assert c.last_seen == START


def test_heartbeats_are_coalesced_to_one_write_per_interval(store, sync_store, clock):
    """Heartbeats of two tunnels within one interval make one write; the next interval another."""
    enrol(sync_store)
    registry = Registry()
    connect(registry)
    connect(registry)
    rec = recorder(store, clock, registry, heartbeat_interval=15)
    rec.changed("conn-1")
    for _ in range(2):
        clock.advance(15)
        rec.heartbeat("conn-1")
        clock.advance(0.1)
        rec.heartbeat("conn-1")
    assert store.calls.count("record_status") == 3
    assert sync_store.get_connector("conn-1").last_seen == START + timedelta(seconds=30.1)


def test_go_away_on_every_tunnel_is_draining(store, sync_store, clock):
    """When the connector said GO_AWAY on all its tunnels it is recorded as draining."""
    enrol(sync_store)
    registry = Registry()
    tunnels = [connect(registry), connect(registry)]
    rec = recorder(store, clock, registry)
    tunnels[0].session.peer_going_away = True
    rec.changed("conn-1")
    assert sync_store.get_connector("conn-1").state == "active"
    tunnels[1].session.peer_going_away = True
    rec.changed("conn-1")
    assert sync_store.get_connector("conn-1").state == "draining"


def test_last_tunnel_lost_keeps_state_with_no_tunnels(store, sync_store, clock):
    """Losing the last tunnel writes 0 tunnels and keeps the state for the sweeper to judge."""
    enrol(sync_store)
    registry = Registry()
    entry = connect(registry, streams=4)
    rec = recorder(store, clock, registry)
    rec.changed("conn-1")
    registry.remove(entry.session)
    rec.changed("conn-1")
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.tunnels, c.open_streams) == ("active", 0, 0)


def test_group_move_in_the_store_reaches_live_tunnels(store, sync_store, clock):
    """After `connectors move`, the next write updates the registry entries and pushes the new config."""
    enrol(sync_store)
    sync_store.ensure_group("lab", START)
    registry = Registry()
    entries = [connect(registry), connect(registry)]
    rec = recorder(store, clock, registry)
    rec.changed("conn-1")
    assert [e.session.owner.configs_sent for e in entries] == [0, 0]
    sync_store.move_connector("conn-1", "lab")
    clock.advance(15)
    rec.heartbeat("conn-1")
    assert [e.group for e in entries] == ["lab", "lab"]
    assert [e.session.owner.group for e in entries] == ["lab", "lab"]
    assert [e.session.owner.configs_sent for e in entries] == [1, 1]
    assert registry.pick("lab") in entries


def test_no_writes_once_the_store_is_closing(store, sync_store, clock):
    """Tunnels lost while the node stops write nothing (and log no failure) once the store closes."""
    enrol(sync_store)
    registry = Registry()
    connect(registry)
    rec = recorder(store, clock, registry)
    store.closed = True
    rec.changed("conn-1")
    clock.advance(60)
    rec.heartbeat("conn-1")
    assert "record_status" not in store.calls


# the sweep


def test_sweep_tags_a_connector_inactive_after_inactive_after(store, sync_store, clock):
    """Not seen for inactive_after and no tunnel: tagged inactive; a moment earlier it is not."""
    enrol(sync_store)
    sync_store.record_status("conn-1", STATUS, START)
    sw = sweeper(store, clock, Registry())
    clock.advance(10 * MINUTE - 1)
    sw.sweep()
    assert sync_store.get_connector("conn-1").state == "active"
    clock.advance(1)
    sw.sweep()
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.state_since) == ("inactive", START + timedelta(minutes=10))


def test_sweep_never_tags_a_connected_connector(store, sync_store, clock):
    """A connector with a live tunnel stays active however old its last write is."""
    enrol(sync_store)
    registry = Registry()
    connect(registry)
    clock.advance(DAY)
    sweeper(store, clock, registry).sweep()
    assert sync_store.get_connector("conn-1").state == "active"


def test_sweep_removes_after_remove_inactive_after_and_revokes(store, sync_store, clock):
    """Inactive for remove_inactive_after: deleted and its certificate revoked."""
    enrol(sync_store)
    sw = sweeper(store, clock, Registry())
    clock.advance(10 * MINUTE)
    sw.sweep()
    clock.advance(10 * DAY - 1)
    sw.sweep()
    assert sync_store.get_connector("conn-1").deleted_at is None
    clock.advance(1)
    sw.sweep()
    c = sync_store.get_connector("conn-1")
    assert c.deleted_at == START + timedelta(minutes=10, days=10)
    assert sync_store.certificate_status("abc1", "conn-1") == "connector deleted"
    revoked = sync_store._db.execute("SELECT revoked_at FROM certificates").fetchone()[0]
    assert revoked is not None


def test_a_connector_coming_back_is_active_again(store, sync_store, clock):
    """An inactive connector that connects again is active, and its removal clock starts over."""
    enrol(sync_store)
    registry = Registry()
    sw = sweeper(store, clock, registry)
    rec = recorder(store, clock, registry)
    clock.advance(10 * MINUTE)
    sw.sweep()
    assert sync_store.get_connector("conn-1").state == "inactive"
    clock.advance(9 * DAY)
    entry = connect(registry)
    rec.changed("conn-1")
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.tunnels) == ("active", 1)
    registry.remove(entry.session)
    rec.changed("conn-1")
    clock.advance(2 * DAY)  # inactive again after 10 minutes, but not yet for 10 days
    sw.sweep()
    sw.sweep()
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.deleted_at) == ("inactive", None)


def test_sweeper_service_runs_every_interval(store, sync_store, clock):
    """The service sweeps one interval after start and then every interval, on the injected clock."""
    enrol(sync_store)
    sw = sweeper(store, clock, Registry(), inactive_after=30)
    service = SweeperService(sw, 60, clock)
    service.startService()
    clock.advance(59)
    assert "list_connectors" not in store.calls
    clock.advance(1)
    assert store.calls.count("list_connectors") == 1
    assert sync_store.get_connector("conn-1").state == "inactive"
    clock.advance(60)
    assert store.calls.count("list_connectors") == 2
    done = []
    service.stopService().addCallback(done.append)
    assert done


def test_a_node_without_the_connectors_tunnel_does_not_sweep_it_while_another_node_has_one(store, sync_store, clock):
    """Two nodes on one store: node 2's heartbeat writes keep node 1's sweeper from tagging it inactive."""
    enrol(sync_store)
    on_node_2, nobody_here = Registry(), Registry()
    connect(on_node_2)
    node_2 = StatusRecorder(store, on_node_2, clock, "node-2", heartbeat_interval=15.0)
    node_1_sweeper = sweeper(store, clock, nobody_here)
    for _ in range(80):   # 20 minutes of heartbeats on node 2, node 1 sweeping every 15 s
        clock.advance(15)
        node_2.heartbeat("conn-1")
        node_1_sweeper.sweep()
    c = sync_store.get_connector("conn-1")
    assert (c.state, c.node_id, c.tunnels) == ("active", "node-2", 1)
    on_node_2.remove(on_node_2.tunnels_of("conn-1")[0].session)
    clock.advance(10 * MINUTE + 15)
    node_1_sweeper.sweep()
    assert sync_store.get_connector("conn-1").state == "inactive"

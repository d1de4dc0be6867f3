"""Tests for the store's connector status, lifecycle and group methods, and the schema upgrade."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import GatewayError
from gateway.pki.tokens import hash_secret
from gateway.store.records import CertificateRecord, ConnectorRecord, ConnectorStatus, TokenRecord
from gateway.store import schema
from gateway.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STATUS = ConnectorStatus(
    state="active", software_version="0.1.0", address="10.0.0.7:5000", tunnels=2, open_streams=3,
    node_id="node-1", cert_serial="ABC1", cert_not_after=NOW + timedelta(days=30),
)


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    yield s
    s.close()


def add_connector(store, connector_id="conn-1", group="office", token_id=None):
    """Enrol a connector through a token, as the service does."""
    store.ensure_group(group, NOW)
    token_id = token_id or f"tok-{connector_id}"
    store.create_token(TokenRecord(token_id, hash_secret("s"), group, NOW, NOW + timedelta(hours=1)))

    def issue(token):
        return (ConnectorRecord(connector_id, connector_id, token.group, NOW),
                CertificateRecord(f"{connector_id}-serial", connector_id, NOW + timedelta(days=30)), None)

    store.enrol(token_id, "s", NOW, issue)


def test_old_database_is_upgraded_and_keeps_its_connectors(tmp_path):
    """A version-1 database gains the status columns; its connectors read back as active."""
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.executescript(schema.render(MIGRATIONS[0], "sqlite"))
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.execute("INSERT INTO groups VALUES ('default', '2025-01-01T00:00:00.000000+00:00')")
    raw.execute("INSERT INTO connectors VALUES ('c1', 'old', 'default', '2025-01-01T00:00:00.000000+00:00',"
                " '2025-01-02T00:00:00.000000+00:00', NULL)")
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    try:
        [c] = store.list_connectors()
        assert (c.connector_id, c.state, c.tunnels, c.software_version) == ("c1", "active", 0, None)
        assert c.last_seen == datetime(2025, 1, 2, tzinfo=UTC)
        version = store._db.execute("SELECT version FROM schema_version").fetchone()[0]
        assert version == SCHEMA_VERSION >= 2
    finally:
        store.close()


def test_record_status_stores_everything_and_returns_the_record(store):
    """record_status writes the node's view and last_seen, and returns the fresh record."""
    add_connector(store)
    record = store.record_status("conn-1", STATUS, NOW + timedelta(minutes=1))
    assert record == store.get_connector("conn-1")
    assert (record.state, record.software_version, record.address, record.tunnels, record.open_streams,
            record.node_id, record.cert_serial, record.cert_not_after) == (
        "active", "0.1.0", "10.0.0.7:5000", 2, 3, "node-1", "abc1", NOW + timedelta(days=30))
    assert record.last_seen == record.state_since == NOW + timedelta(minutes=1)


def test_state_since_changes_only_with_the_state(store):
    """Repeated writes of one state keep state_since; a new state moves it."""
    add_connector(store)
    store.record_status("conn-1", STATUS, NOW)
    again = store.record_status("conn-1", STATUS, NOW + timedelta(minutes=5))
    assert again.state_since == NOW and again.last_seen == NOW + timedelta(minutes=5)
    draining = store.record_status("conn-1", ConnectorStatus(**{**_fields(STATUS), "state": "draining"}),
                                   NOW + timedelta(minutes=6))
    assert (draining.state, draining.state_since) == ("draining", NOW + timedelta(minutes=6))


def _fields(status):
    from attrs import asdict

    return asdict(status)


def test_record_status_of_unknown_connector_is_none(store):
    """A status for an id the store does not know changes nothing and returns None."""
    assert store.record_status("ghost", STATUS, NOW) is None


def test_mark_inactive_only_when_not_seen_since_the_cutoff(store):
    """mark_inactive tags a connector last seen before the cutoff, once; a recently seen one is left."""
    add_connector(store)
    store.record_status("conn-1", STATUS, NOW)
    assert store.mark_inactive("conn-1", NOW - timedelta(microseconds=1), NOW + timedelta(hours=1)) is False
    assert store.mark_inactive("conn-1", NOW + timedelta(seconds=1), NOW + timedelta(hours=1)) is True
    assert store.mark_inactive("conn-1", NOW + timedelta(seconds=1), NOW + timedelta(hours=2)) is False
    c = store.get_connector("conn-1")
    assert (c.state, c.state_since, c.tunnels) == ("inactive", NOW + timedelta(hours=1), 0)


def test_groups_create_rename_delete(store):
    """Groups can be created, renamed (with their connectors and tokens) and deleted with a move."""
    store.ensure_group("default", NOW)
    store.create_group("lab", NOW)
    with pytest.raises(GatewayError, match="already exists"):
        store.create_group("lab", NOW)
    add_connector(store, group="lab")
    assert store.rename_group("lab", "lab2") == 1
    assert store.get_connector("conn-1").group == "lab2"
    assert {t.group for t in store.list_tokens()} == {"lab2"}
    with pytest.raises(GatewayError, match="has 1 connector.*--move-connectors-to"):
        store.delete_group("lab2")
    assert store.delete_group("lab2", move_to="default") == 1
    assert store.get_connector("conn-1").group == "default"
    assert [g.name for g in store.list_groups()] == ["default"]


def test_default_group_cannot_be_deleted_or_renamed(store):
    """The default group always exists."""
    store.ensure_group("default", NOW)
    with pytest.raises(GatewayError, match="cannot be deleted"):
        store.delete_group("default")
    with pytest.raises(GatewayError, match="cannot be renamed"):
        store.rename_group("default", "other")


def test_delete_empty_group_drops_unused_tokens(store):
    """An empty group goes away with its unused tokens."""
    store.ensure_group("default", NOW)
    store.ensure_group("lab", NOW)
    store.create_token(TokenRecord("t", "h", "lab", NOW, NOW + timedelta(hours=1)))
    assert store.delete_group("lab") == 0
    assert store.list_tokens() == []


def test_move_connector(store):
    """move_connector changes the group; an unknown group or connector is an error."""
    add_connector(store, group="office")
    store.ensure_group("lab", NOW)
    assert store.move_connector("conn-1", "lab").group == "lab"
    with pytest.raises(GatewayError, match="no group named 'nowhere'"):
        store.move_connector("conn-1", "nowhere")
    with pytest.raises(GatewayError, match="no active connector"):
        store.move_connector("ghost", "lab")

"""Tests for the `gateway groups` and `gateway connectors list|move` commands on a store file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway import cli
from gateway.store.records import CertificateRecord, ConnectorRecord, ConnectorStatus
from gateway.store.sqlite import SQLiteStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ID = "4d1c0e6b0f6b4c1f9a3f2b7d8e9a0c11"


@pytest.fixture
def service(tmp_path):
    """A service config with an app in group 'web', and a store holding one connector in 'lab'."""
    config = tmp_path / "svc.toml"
    config.write_text(
        '[service]\nstate_dir = "state"\n\n'
        '[[apps]]\nname = "wiki"\ngroup = "web"\nlisten = "tcp:18080"\ndestination = "10.0.0.5:80"\noptions.preauth = "none"\n'
    )
    store = SQLiteStore(_state(tmp_path))
    for group in ("default", "web", "lab"):
        store.ensure_group(group, NOW)
    store._insert_connector(store._db, ConnectorRecord(ID, "dc1-conn-1", "lab", NOW))
    store._insert_certificate(store._db, CertificateRecord("abc1", ID, NOW + timedelta(days=90)))
    store.record_status(ID, ConnectorStatus("active", "0.1.0", "10.0.0.7:5000", 2, 1, "node-1", "abc1",
                                            NOW + timedelta(days=90)), NOW)
    store.close()
    return config


def _state(tmp_path):
    (tmp_path / "state").mkdir(exist_ok=True)
    return tmp_path / "state" / "gateway.db"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def group_of(service):
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    try:
        return store.get_connector(ID).group
    finally:
        store.close()


def test_connectors_list_shows_status_columns(service, capsys):
    """The table has the status columns and a 12-character id; --wide shows the whole id."""
    code, out, _ = run(capsys, "connectors", "list", "--config", str(service))
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "GROUP", "STATE", "VERSION", "ADDRESS", "TUNNELS", "STREAMS",
                              "LAST", "HEARTBEAT", "CERT", "EXPIRES"]
    assert row.split()[:8] == [ID[:12], "dc1-conn-1", "lab", "active", "0.1.0", "10.0.0.7:5000", "2", "1"]
    assert "2025-03-01 12:00:00" in row and "2025-05-30 12:00:00" in row
    code, out, _ = run(capsys, "connectors", "list", "--wide", "--config", str(service))
    assert out.splitlines()[1].startswith(ID + " ")


def test_connectors_list_json_has_the_full_records(service, capsys):
    """--json prints every field of each record, times as ISO-8601."""
    code, out, _ = run(capsys, "connectors", "list", "--json", "--config", str(service))
    [record] = json.loads(out)
    assert record["connector_id"] == ID
    assert (record["state"], record["tunnels"], record["open_streams"], record["software_version"]) == (
        "active", 2, 1, "0.1.0")
    assert record["last_seen"] == NOW.isoformat()


def test_connectors_move_by_prefix(service, capsys):
    """A unique id prefix moves the connector; an unknown group is refused."""
    code, out, _ = run(capsys, "connectors", "move", ID[:8], "--group", "web", "--config", str(service))
    assert code == 0 and "moved from group 'lab' to 'web'" in out
    assert group_of(service) == "web"
    code, _, err = run(capsys, "connectors", "move", ID[:8], "--group", "nowhere", "--config", str(service))
    assert code == 1 and "no group named 'nowhere'" in err


def test_groups_named_by_apps_cannot_be_renamed_or_deleted(service, capsys):
    """Renaming or deleting a group an app names fails, naming the app and the config."""
    for argv in (("rename", "web", "web2"), ("delete", "web")):
        code, _, err = run(capsys, "groups", *argv, "--config", str(service))
        assert code == 1
        assert "apps wiki in" in err and "edit the config first" in err


def test_group_delete_needs_a_target_for_its_connectors(service, capsys):
    """Deleting a group with connectors needs --move-connectors-to, which moves them."""
    code, _, err = run(capsys, "groups", "delete", "lab", "--config", str(service))
    assert code == 1 and "--move-connectors-to" in err
    code, out, _ = run(capsys, "groups", "delete", "lab", "--move-connectors-to", "default", "--config", str(service))
    assert code == 0 and "1 connectors moved to 'default'" in out
    assert group_of(service) == "default"


def test_default_group_is_kept(service, capsys):
    """The default group can be neither deleted nor renamed."""
    assert run(capsys, "groups", "delete", "default", "--config", str(service))[0] == 1
    assert run(capsys, "groups", "rename", "default", "x", "--config", str(service))[0] == 1


def test_groups_create_rename_list(service, capsys):
    """A created group can be renamed and is listed with its connectors and apps."""
    assert run(capsys, "groups", "create", "branch", "--config", str(service))[0] == 0
    code, _, err = run(capsys, "groups", "create", "Bad Name", "--config", str(service))
    assert code == 1 and "must match" in err
    assert run(capsys, "groups", "rename", "lab", "lab2", "--config", str(service))[0] == 0
    code, out, _ = run(capsys, "groups", "list", "--config", str(service))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"branch", "default", "lab2", "web"}
    assert rows["lab2"][1] == "1" and rows["web"][2] == "wiki"


def test_status_shows_groups_apps_and_share(service, capsys):
    """`gateway status` lists each group with its apps and each active connector's share of open streams."""
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    other = "9" * 32
    store._insert_connector(store._db, ConnectorRecord(other, "dc1-conn-2", "lab", NOW))
    store.record_status(other, ConnectorStatus("active", "0.1.0", "10.0.0.8:5000", 2, 3, "node-1", None, None), NOW)
    store.close()
    code, out, _ = run(capsys, "status", "--config", str(service))
    assert code == 0
    assert "group lab: 2/2 connectors active, 4 open streams, ok" in out
    assert "75%" in out and "25%" in out
    assert "group web: 0/0 connectors active" in out and "NO ACTIVE CONNECTOR" in out and "apps: wiki" in out

"""Tests for `gateway apps add|set|list` with private apps (--segment, --allow-user, --allow-group)."""

from __future__ import annotations

import json

import pytest

from gateway.config import load_config
from gateway.service import store_apps
from gateway.store.sqlite import SQLiteStore

from test_cli_apps import apps, service_config, stored

SSH = ["--segment", "tcp 10.1.0.0/16:22", "--allow-user", "alice@example.test"]


@pytest.fixture
def service(tmp_path):
    """A service config with a private app (lab-ssh, group lab, 10.9.0.0/16:22); the store knows 'office'."""
    return service_config(
        tmp_path,
        '[[apps]]\nname = "lab-ssh"\ngroup = "lab"\noptions.allowed_groups = ["lab"]\n'
        '[[apps.segments]]\ndestination = "10.9.0.0/16"\nports = "22"\n')


def served(service):
    """The apps the service would serve from the file and the store, and those it leaves out."""
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    try:
        parsed, problems = store_apps.parse_records(store.list_apps())
    finally:
        store.close()
    merged, left_out = store_apps.merge(load_config(service), parsed, {"tcp", "http"})
    return {a.name: a for a in merged.apps}, {**problems, **left_out}


def test_add_stores_a_private_app_the_service_serves(service, capsys):
    """--segment and --allow-* make a private app whose stored table the service parses like the file's."""
    code, out, err = apps(service, capsys, "add", "corp-ssh", "--segment", "tcp 10.1.0.0/16:22,8000-8100",
                          "--segment", "udp [fd00::/64]:53", "--allow-user", "alice@example.test",
                          "--allow-group", "admins", "--group", "office")
    assert code == 0, err
    assert "app 'corp-ssh' added: private app, segments tcp 10.1.0.0/16:22,8000-8100, udp [fd00::/64]:53" in out
    assert stored(service)["corp-ssh"].definition == {
        "segments": [{"destination": "10.1.0.0/16", "ports": "22,8000-8100", "protocol": "tcp"},
                     {"destination": "fd00::/64", "ports": "53", "protocol": "udp"}],
        "options": {"allowed_users": ["alice@example.test"], "allowed_groups": ["admins"]},
    }
    apps_by_name, left_out = served(service)
    assert left_out == {}
    app = apps_by_name["corp-ssh"]
    assert app.is_private and app.group == "office" and [str(s) for s in app.segments] == [
        "tcp 10.1.0.0/16:22,8000-8100", "udp [fd00::/64]:53"]


def test_segment_without_protocol_is_tcp(service, capsys):
    """A --segment without a protocol word means tcp, as in the file."""
    assert apps(service, capsys, "add", "web", "--segment", "*.corp.example:443", *SSH[2:])[0] == 0
    assert stored(service)["web"].definition["segments"] == [
        {"destination": "*.corp.example", "ports": "443", "protocol": "tcp"}]


@pytest.mark.parametrize("argv, message", [
    ([], "expected --external-url and --internal-url (a web app) or --segment (a private app), got neither"),
    (["--segment", "tcp 10.0.0.0/8"], '--segment (#1): expected "[tcp|udp] DESTINATION:PORTS"'),
    (["--segment", "tcp udp 10.0.0.0/8:22"], '--segment (#1): expected "[tcp|udp] DESTINATION:PORTS"'),
    ([*SSH, "--segment", "sctp 10.2.0.0/16:22"], '--segment (#2): expected "tcp" or "udp", got "sctp"'),
    (["--segment", "tcp 10.0.0.0/8:0", *SSH[2:]], "--segment (#1): expected"),
    (["--segment", "tcp 10.0.0.0/33:22", *SSH[2:]], "--segment (#1): expected"),
    (["--segment", "tcp 10.1.0.0/16:22"],
     "--allow-user: expected options.allowed_users or options.allowed_groups"),
    (["--segment", "tcp 10.1.0.0/16:22", "--allow-user", " "], "--allow-user: expected a list of non-empty strings"),
    ([*SSH, "--external-url", "http://x.example.test/"], "--external-url: expected no external_url in a private app"),
    ([*SSH, "--option", "preauth=none"], "expected no options.preauth in a private app"),
])
def test_add_refuses_bad_private_apps_naming_the_flag(service, capsys, argv, message):
    """Each bad private app is refused naming its flag, and nothing is stored."""
    code, _, err = apps(service, capsys, "add", "corp-ssh", *argv)
    assert code == 1, err
    assert message in err
    assert stored(service) == {}


def test_overlap_with_a_file_app_of_another_group_is_refused(service, capsys):
    """A segment overlapping the file's app of another group is refused naming both; the same group is fine."""
    code, _, err = apps(service, capsys, "add", "corp-ssh", "--segment", "tcp 10.9.1.0/24:20-30", *SSH[2:],
                        "--group", "office")
    assert code == 1
    assert ("--segment: segment 'tcp 10.9.1.0/24:20-30' overlaps segment 'tcp 10.9.0.0/16:22' of the config"
            " file's app 'lab-ssh' in group 'lab'") in err
    assert stored(service) == {}
    assert apps(service, capsys, "add", "corp-ssh", "--segment", "tcp 10.9.1.0/24:20-30", *SSH[2:],
                "--group", "lab")[0] == 0


def test_overlap_with_a_stored_app_of_another_group_is_refused(service, capsys):
    """Two stored private apps in different groups cannot overlap, on add or on set."""
    assert apps(service, capsys, "add", "a", *SSH)[0] == 0
    code, _, err = apps(service, capsys, "add", "b", "--segment", "tcp 10.1.2.3:22", *SSH[2:], "--group", "office")
    assert code == 1 and "overlaps segment 'tcp 10.1.0.0/16:22' of stored app 'a' in group 'default'" in err
    assert apps(service, capsys, "add", "b", "--segment", "tcp 10.1.2.3:23", *SSH[2:], "--group", "office")[0] == 0
    code, _, err = apps(service, capsys, "set", "b", "--segment", "tcp 10.1.2.3:22")
    assert code == 1 and "overlaps" in err
    assert stored(service)["b"].definition["segments"][0]["ports"] == "23"


def test_merge_leaves_out_a_stored_app_that_overlaps(service, capsys):
    """A stored app that came to overlap (the file changed later) is left out with the reason; the file wins."""
    assert apps(service, capsys, "add", "corp-ssh", "--segment", "tcp 10.9.1.0/24:22", *SSH[2:], "--group", "lab")[0] == 0
    service.write_text(service.read_text().replace('group = "lab"', 'group = "default"'))
    apps_by_name, left_out = served(service)
    assert "corp-ssh" not in apps_by_name and "lab-ssh" in apps_by_name
    assert "overlaps segment 'tcp 10.9.0.0/16:22' of the config file's app 'lab-ssh'" in left_out["corp-ssh"]


def test_set_replaces_segments_and_assignments(service, capsys):
    """set with --segment or --allow-* replaces that list and keeps the rest."""
    assert apps(service, capsys, "add", "corp-ssh", *SSH, "--allow-group", "admins")[0] == 0
    code, out, err = apps(service, capsys, "set", "corp-ssh", "--segment", "udp 10.1.0.0/16:53",
                          "--allow-user", "bob-sub")
    assert code == 0, err and "changed: private app" in out
    definition = stored(service)["corp-ssh"].definition
    assert definition["segments"] == [{"destination": "10.1.0.0/16", "ports": "53", "protocol": "udp"}]
    assert definition["options"] == {"allowed_users": ["bob-sub"], "allowed_groups": ["admins"]}


def test_set_does_not_turn_a_web_app_into_a_private_app(service, capsys):
    """set refuses to change an app's kind, and says to remove and add it again."""
    assert apps(service, capsys, "add", "blog", "--external-url", "http://blog.example.test/",
                "--internal-url", "http://10.0.0.6/")[0] == 0
    assert apps(service, capsys, "add", "corp-ssh", *SSH)[0] == 0
    code, _, err = apps(service, capsys, "set", "blog", *SSH)
    assert code == 1 and "--segment: app 'blog' is a web app" in err and "gateway apps remove blog" in err
    code, _, err = apps(service, capsys, "set", "corp-ssh", "--external-url", "http://ssh.example.test/")
    assert code == 1 and "--external-url: app 'corp-ssh' is a private app" in err


def test_list_shows_private_apps_segments(service, capsys):
    """list shows a private app's segments (and --json lists them)."""
    assert apps(service, capsys, "add", "corp-ssh", *SSH)[0] == 0
    code, out, _ = apps(service, capsys, "list")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "(private)" in rows["corp-ssh"] and "tcp 10.1.0.0/16:22" in rows["corp-ssh"]
    assert "tcp 10.9.0.0/16:22" in rows["lab-ssh"]
    code, out, _ = apps(service, capsys, "list", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["corp-ssh"]["segments"] == ["tcp 10.1.0.0/16:22"] and entries["corp-ssh"]["served"]

"""Apps kept in the store: the SQLite table, the merge with the file's apps, and the service's refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from gateway import plugins
from gateway.config import parse_config
from gateway.errors import GatewayError
from gateway.service import store_apps
from gateway.service.node import ServiceNode
from gateway.store.records import AppRecord
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore

from components import SETUP_VENV, missing
from test_store import database_at_version

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BLOG = {"external_url": "http://blog.example.test/", "internal_url": "http://10.0.0.6:8080/"}


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    s.ensure_group("default", NOW)
    yield s
    s.close()


def record(name="blog", group="default", **definition):
    return AppRecord(name, group, {**BLOG, **definition}, NOW, NOW)


# -- the store -----------------------------------------------------------------------------------


def test_apps_round_trip(store):
    """An added app reads back equal, listed by name; remove says whether there was one."""
    store.add_app(record("wiki", external_url="http://wiki.example.test/", options={"translate_host": False}))
    store.add_app(record("blog"))
    assert [a.name for a in store.list_apps()] == ["blog", "wiki"]
    assert store.get_app("wiki") == record("wiki", external_url="http://wiki.example.test/",
                                           options={"translate_host": False})
    assert store.remove_app("wiki") is True
    assert store.remove_app("wiki") is False
    assert store.get_app("wiki") is None


def test_add_refuses_a_second_app_of_a_name_and_an_unknown_group(store):
    """One name once; the group must exist, and the error says what to do."""
    store.add_app(record())
    with pytest.raises(GatewayError, match="in the store already: change it with `gateway apps set blog`"):
        store.add_app(record())
    with pytest.raises(GatewayError, match="no group named 'lab': create the group first"):
        store.add_app(record("other", group="lab"))


def test_check_runs_inside_the_transaction_and_can_refuse(store):
    """The check sees the other apps; raising from it stores nothing."""
    store.add_app(record("blog"))
    seen = []

    def refuse(others):
        seen.append([a.name for a in others])
        raise GatewayError("no")

    with pytest.raises(GatewayError, match="no"):
        store.add_app(record("wiki"), check=refuse)
    with pytest.raises(GatewayError, match="no"):
        store.update_app("blog", "default", {**BLOG, "affinity": "client"}, NOW, check=refuse)
    assert seen == [["blog"], []]  # update_app leaves the app itself out
    assert [a.name for a in store.list_apps()] == ["blog"]
    assert store.get_app("blog").definition == BLOG


def test_update_changes_group_and_definition(store):
    """update_app replaces the definition and group and stamps updated_at."""
    store.add_app(record())
    store.create_group("lab", NOW)
    later = NOW + timedelta(hours=1)
    updated = store.update_app("blog", "lab", {**BLOG, "affinity": "user"}, later)
    assert (updated.group, updated.definition["affinity"], updated.created_at, updated.updated_at) == (
        "lab", "user", NOW, later)
    with pytest.raises(GatewayError, match="no app 'nope' in the store"):
        store.update_app("nope", "lab", BLOG, later)


def test_group_rename_carries_apps_and_delete_refuses(store):
    """Renaming a group moves its apps along; a group apps name cannot be deleted."""
    store.create_group("lab", NOW)
    store.add_app(record(group="lab"))
    store.rename_group("lab", "lab2")
    assert store.get_app("blog").group == "lab2"
    with pytest.raises(GatewayError, match=r"apps blog in the store name it; move them with `gateway apps set"):
        store.delete_group("lab2")
    store.remove_app("blog")
    store.delete_group("lab2")


def test_version_2_database_gains_the_apps_table(tmp_path):
    """A database at schema version 2 is upgraded in place; its groups stay."""
    store = SQLiteStore(database_at_version(tmp_path / "old.db", 2))
    try:
        assert store._db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION >= 3
        assert store.list_apps() == []
        store.add_app(record(group="lab"))
        assert store.get_app("blog").group == "lab"
    finally:
        store.close()


# -- parsing and merging ---------------------------------------------------------------------------


def file_config(*apps, **sections):
    data = {"service": {"state_dir": "/tmp/unused", "config_interval": 30}, "apps": list(apps), **sections}
    known = plugins.config_sections(plugins.make_plugin_manager()) if sections else None
    return parse_config(data, "/etc/gateway/svc.toml", known)


WIKI = {"name": "wiki", "external_url": "http://wiki.example.test/", "internal_url": "http://10.0.0.5/"}


def test_parse_records_checks_like_the_file():
    """A stored app gets the file's checks; a bad one is reported by name with the key."""
    good, problems = store_apps.parse_records([record("blog"), record("bad", internal_url="ftp://x/")])
    assert [a.name for a in good] == ["blog"]
    assert good[0].destination == "10.0.0.6:8080" and good[0].protocol == "http"
    assert problems["bad"].startswith("store app bad: internal_url: expected a URL starting with http://")


def test_merge_lets_the_file_win():
    """Same name or same external URL as a file app: the stored app is left out, with the reason."""
    config = file_config(WIKI)
    apps, _ = store_apps.parse_records([
        record("wiki", external_url="http://other.example.test/"),
        record("copy", external_url="http://WIKI.example.test:80/"),
        record("blog"),
        record("blog2"),
    ])
    merged, left_out = store_apps.merge(config, apps, {"http"})
    assert [a.name for a in merged.apps] == ["wiki", "blog"]
    assert merged.apps[0].external_url == "http://wiki.example.test/"
    assert "the config file wins" in left_out["wiki"]
    assert "the config file's app 'wiki' has the same external URL" in left_out["copy"]
    assert "stored app 'blog' has the same external URL" in left_out["blog2"]
    _, left_out = store_apps.merge(config, apps[2:3], set())
    assert left_out == {"blog": "no loaded plugin provides protocol 'http'"}


# -- the service node ------------------------------------------------------------------------------


class DeferredStore:
    """A SQLiteStore whose methods return fired Deferreds, like ThreadedStore's, without threads."""

    closed = False

    def __init__(self, sync):
        self.sync = sync

    def __getattr__(self, name):
        method = getattr(self.sync, name)
        return lambda *a, **kw: maybeDeferred(method, *a, **kw)


@pytest.fixture
def node(store):
    """A running service node (in memory) whose file has the wiki app, over `store`."""
    pm = plugins.make_plugin_manager()
    handlers = plugins.protocol_handlers(pm)
    if "http" not in handlers:
        missing("the http plugin (entry point gateway_http)", SETUP_VENV)
    reactor = MemoryReactorClock()
    config = file_config(WIKI, http={"listen": "tcp:18080:interface=127.0.0.1"})
    n = ServiceNode(config, reactor, pm, handlers)
    n.events = []
    n.log = Logger(observer=n.events.append)
    n.store = DeferredStore(store)
    n.running = True
    n._bind_shared_listeners()
    return n


def messages(node):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in node.events]


def front_door_apps(node):
    """The names the front door routes, by asking the plugin for the apps of the node's config."""
    from gateway_http import web_apps

    return sorted(a.name for a in web_apps(node.config))


def test_refresh_serves_added_changed_and_removed_store_apps(node, store):
    """Each refresh applies what changed in the store, logs it, and puts it in the group's config."""
    store.add_app(record("blog"))
    node.refresh_store_apps()
    assert front_door_apps(node) == ["blog", "wiki"]
    assert "app blog added (from the store)" in messages(node)
    assert [a["name"] for a in node.group_config("default")["apps"]] == ["blog", "wiki"]

    store.create_group("lab", NOW)
    store.update_app("blog", "lab", {**BLOG, "internal_url": "http://10.0.0.7/"}, NOW)
    node.refresh_store_apps()
    assert "app blog changed (from the store)" in messages(node)
    [blog] = node.group_config("lab")["apps"]
    assert blog["destination"] == "10.0.0.7:80"
    assert [a["name"] for a in node.group_config("default")["apps"]] == ["wiki"]

    store.remove_app("blog")
    node.refresh_store_apps()
    assert front_door_apps(node) == ["wiki"] and "blog" not in node.apps
    assert "app blog removed (from the store)" in messages(node)


def test_refresh_without_a_change_leaves_the_listeners_alone(node, store):
    """No change in the store: nothing is closed or bound again."""
    bound = len(node.reactor.tcpServers)
    node.refresh_store_apps()
    node.refresh_store_apps()
    assert len(node.reactor.tcpServers) == bound
    assert not any("applied" in m for m in messages(node))


def test_the_file_app_wins_and_the_stored_one_is_reported_once(node, store):
    """A stored app named like a file app is not served; the warning is logged once, not every refresh."""
    store.add_app(record("wiki", external_url="http://elsewhere.example.test/"))
    node.refresh_store_apps()
    node.refresh_store_apps()
    assert node.apps["wiki"].external_url == "http://wiki.example.test/"
    warnings = [m for m in messages(node) if "in the store is not served" in m]
    assert len(warnings) == 1 and "the config file wins" in warnings[0]


def test_reload_reads_the_store_again(node, store):
    """SIGHUP's reload applies the new file together with the store's apps."""
    store.add_app(record("blog"))
    new_file = file_config({**WIKI, "name": "wiki2"}, http={"listen": "tcp:18080:interface=127.0.0.1"})
    node.reload(new_file)
    assert front_door_apps(node) == ["blog", "wiki2"]
    assert "app blog added (from the store)" in messages(node)
    assert any(m.startswith("configuration reloaded; apps: blog, wiki2") for m in messages(node))


def test_a_stored_app_the_plugin_refuses_does_not_take_the_front_door_down(node, store):
    """Options the http plugin refuses (written past the command): the file's apps stay served."""
    store.add_app(record("blog", options={"translate_host": "yes"}))
    node.refresh_store_apps()
    assert front_door_apps(node) == ["wiki"] and "blog" not in node.apps
    assert any("the listeners refuse the apps from the store" in m and "translate_host" in m
               for m in messages(node))
    assert [s.name for s in node._shared_services] == ["listener:http"]

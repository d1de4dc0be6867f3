"""The admin API's route table against its OpenAPI document, the status page's sessions, and the
group summaries the API, the page and `gateway status` share."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from gateway.admin.auth import Sessions, bearer_token, foreign_origin
from gateway.admin.openapi import document
from gateway.admin.routes import ROUTES
from gateway.admin.summary import connector_from_json, jsonable, summarise
from gateway.store.records import ConnectorRecord
from gateway.store.sqlite import SQLiteStore

from tests.unit.syncstore import NowStore, result_of

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_every_route_is_documented():
    """Each (method, path) of the route table is an operation of the OpenAPI document, and the
    document names no route the table does not serve."""
    served = {(r.method.lower(), r.template) for r in ROUTES}
    documented = {(method, path) for path, operations in document()["paths"].items() for method in operations}
    assert served - documented == set(), "routes missing from gateway/admin/openapi.py"
    assert documented - served == set(), "documented routes nobody serves"


def test_the_document_is_openapi_3_json_with_its_references_resolved():
    """The document survives a JSON round trip, says OpenAPI 3, and every $ref names a component."""
    doc = json.loads(json.dumps(document()))
    assert doc["openapi"].startswith("3.0")
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs and all(ref.split("/")[-1] in doc["components"]["schemas"] for ref in refs)
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            assert operation["responses"], path
            for name in [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]:
                assert "{" + name + "}" in path


def test_a_route_matches_only_its_method_and_shape():
    """Path templates take one non-empty segment per parameter; other methods and shapes do not match."""
    move = next(r for r in ROUTES if r.template.endswith("/move"))
    assert move.match("POST", ["api", "v1", "connectors", "abc", "move"]) == {"connector_id": "abc"}
    assert move.match("GET", ["api", "v1", "connectors", "abc", "move"]) is None
    assert move.match("POST", ["api", "v1", "connectors", "", "move"]) is None
    assert move.match("POST", ["api", "v1", "connectors", "abc"]) is None


@pytest.fixture
def node(tmp_path):
    """Just what Sessions uses of a node: a clock and the store (SQLite, answering at once)."""
    store = SQLiteStore(tmp_path / "gateway.db")
    yield SimpleNamespace(reactor=Clock(), store=NowStore(store))
    store.close()


def test_sessions_expire_and_stay_bounded(node):
    """A session ends at its lifetime; beyond max_sessions the oldest is dropped; a forged id is None."""
    sessions = Sessions(node, lifetime=60, max_sessions=2)
    first = result_of(sessions.create("t1"))
    node.reactor.advance(1)
    second = result_of(sessions.create("t2"))
    assert result_of(sessions.get(first.session_id)) == first
    third = result_of(sessions.create("t3"))
    assert result_of(sessions.get(first.session_id)) is None
    assert result_of(sessions.get(second.session_id)) == second
    assert result_of(sessions.get("forged")) is None and result_of(sessions.get(None)) is None
    node.reactor.advance(60)
    assert result_of(sessions.get(third.session_id)) is None


def test_sessions_are_stored_hashed_with_a_csrf_token_of_their_own(node):
    """The store holds no session id; each session's CSRF token differs from its id and from another's."""
    sessions = Sessions(node, lifetime=60)
    a, b = result_of(sessions.create("t1")), result_of(sessions.create("t1"))
    stored = {r[0] for r in node.store.store._db.execute("SELECT session_hash FROM admin_sessions")}
    assert len(stored) == 2 and not stored & {a.session_id, b.session_id}
    assert a.csrf != a.session_id and a.csrf != b.csrf
    assert result_of(sessions.get(a.session_id)).csrf == a.csrf


def test_revoking_a_token_ends_its_sessions_only(node):
    """end_token drops every session of that token and keeps the others."""
    sessions = Sessions(node, lifetime=60)
    a1, a2, b = (result_of(sessions.create(t)) for t in ("a", "a", "b"))
    result_of(sessions.end_token("a"))
    assert result_of(sessions.get(a1.session_id)) is None and result_of(sessions.get(a2.session_id)) is None
    assert result_of(sessions.get(b.session_id)) == b


def test_only_a_bearer_header_carries_a_token():
    """No header, another scheme or an empty bearer: a missing_token refusal; a bearer: its text."""
    assert bearer_token(None).code == "missing_token"
    assert bearer_token(b"Basic abc").code == "missing_token"
    assert bearer_token(b"Bearer ").code == "missing_token"
    assert bearer_token(b"bearer gwa1.x ") == "gwa1.x"


def test_an_origin_is_foreign_unless_it_is_the_pages_own():
    """Another site's Origin is foreign, the page's own (any case, trailing slash) and a missing one are not."""
    own = "https://127.0.0.1:8444"
    assert foreign_origin(b"https://evil.example.test", own)
    assert foreign_origin(b"http://127.0.0.1:8444", own)
    assert not foreign_origin(b"HTTPS://127.0.0.1:8444/", own)
    assert not foreign_origin(None, own)


def _connector(name: str, group: str, state: str = "active", streams: int = 0) -> ConnectorRecord:
    return ConnectorRecord(connector_id=f"id-{name}", name=name, group=group, created_at=NOW, state=state,
                           open_streams=streams, last_seen=NOW)


class _App:
    def __init__(self, name: str, group: str) -> None:
        self.name, self.group = name, group


def test_group_summaries_give_health_and_the_spread_of_streams():
    """Shares count active connectors only; a group with apps and no active connector says so."""
    connectors = [_connector("a", "web", streams=3), _connector("b", "web", streams=1),
                  _connector("c", "web", state="inactive", streams=0), _connector("d", "files", state="inactive")]
    files, idle, web = summarise(["idle"], [_App("wiki", "web"), _App("share", "files")], connectors)
    assert (web.name, web.health, web.open_streams) == ("web", "ok", 4)
    assert [c.name for c in web.connectors] == ["a", "b", "c"]
    assert [web.share(c) for c in web.connectors] == ["75%", "25%", "-"]
    assert (files.name, files.health) == ("files", "NO ACTIVE CONNECTOR")
    assert (idle.name, idle.health, idle.apps) == ("idle", "idle", ())


def test_a_connector_goes_through_json_and_back_unchanged():
    """jsonable then connector_from_json gives the same record (the --service client reads the API so)."""
    record = _connector("a", "web", streams=2)
    assert connector_from_json(json.loads(json.dumps(jsonable(record)))) == record

"""Tests for gateway.store: the store on SQLite and on PostgreSQL (store_backend), and its thread-pool wrapper."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.errors import EnrolmentError, GatewayError, StoreClosed
from gateway.pki.tokens import hash_secret
from gateway.store import schema
from gateway.store.records import CertificateRecord, ConnectorRecord, GroupRecord, TokenRecord
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore
from gateway.store.threaded import ThreadedStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "s3cret"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "gateway.db"


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path):
    s = SQLiteStore(db_path)
    yield s
    s.close()


def database_at_version(path, version: int, group: str = "lab"):
    """A database file as a gateway of schema `version` left it, holding one group."""
    raw = sqlite3.connect(path)
    _build_at_version(raw, "sqlite", "?", version, group)
    raw.commit()
    raw.close()
    return path


def _build_at_version(raw, dialect: str, mark: str, version: int, group: str) -> None:
    for statement in schema.statements(dialect, 0, version):
        raw.execute(statement)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute(f"INSERT INTO schema_version VALUES ({mark})", (version,))
    raw.execute(f"INSERT INTO groups VALUES ({mark}, '2025-01-01T00:00:00.000000+00:00')", (group,))


def backend_at_version(store_backend, version: int, group: str = "lab") -> None:
    """The backend's database as a gateway of schema `version` left it, holding one group."""
    if store_backend.name == "sqlite":
        database_at_version(store_backend.target, version, group)
        return
    import psycopg

    with psycopg.connect(store_backend.target, autocommit=True) as raw:
        _build_at_version(raw, "postgresql", "%s", version, group)


def add_token(store, token_id="tok1", expires_at=NOW + timedelta(hours=1), group="office"):
    store.ensure_group(group, NOW)
    store.create_token(TokenRecord(token_id, hash_secret(SECRET), group, NOW, expires_at))


def issuer(connector_id="conn-1", revoked_at=None, calls=None):
    """An `issue` callback that makes records for connector_id and returns 'result'."""

    def issue(token):
        if calls is not None:
            calls.append(token)
        connector = ConnectorRecord(connector_id, "laptop", token.group, NOW)
        cert = CertificateRecord("ABC1", connector_id, NOW + timedelta(days=30), revoked_at)
        return connector, cert, "result"

    return issue


def enrolled(store, connector_id="conn-1", token_id="tok1", **kwargs):
    add_token(store, token_id)
    return store.enrol(token_id, SECRET, NOW, issuer(connector_id, **kwargs))


# schema and settings


def test_open_uses_wal_and_foreign_keys(sqlite_store):
    """The connection runs in WAL mode with foreign keys and a 5 s busy timeout."""
    db = sqlite_store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_schema_has_the_contract_tables(store):
    """All five tables exist and the schema version is recorded."""
    for table in ("schema_version", "groups", "tokens", "connectors", "certificates"):
        assert store._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 0
    assert store._db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert store.migrated == (0, SCHEMA_VERSION)


def test_reopening_keeps_data_and_does_not_remigrate(store_backend):
    """A second open of the same database sees the data, migrates nothing and has one version row."""
    first = store_backend.open()
    first.ensure_group("office", NOW)
    first.close()
    second = store_backend.open()
    try:
        assert second.list_groups() == [GroupRecord("office", NOW)]
        assert second.migrated == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert second._db.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    finally:
        second.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_every_older_schema_is_migrated_keeping_its_rows(store_backend, version):
    """A database any older gateway left (every schema version) is brought to the newest at open, rows kept."""
    backend_at_version(store_backend, version)
    store = store_backend.open()
    try:
        assert store.migrated == (version, SCHEMA_VERSION)
        assert store.list_groups() == [GroupRecord("lab", datetime(2025, 1, 1, tzinfo=UTC))]
        assert store._db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        store.close()


def test_times_are_timestamptz_on_postgresql(postgres_cluster):
    """On PostgreSQL the {time} columns are TIMESTAMPTZ (SQL can compare them), read back as aware UTC."""
    from gateway.store.postgresql import PostgreSQLStore

    store = PostgreSQLStore(postgres_cluster.new_schema())
    try:
        store.ensure_group("office", NOW.astimezone(timezone(timedelta(hours=-5))))
        types = dict(store._db.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND column_name IN ('created_at', 'name')").fetchall())
        assert types["groups.created_at"] == types["tokens.created_at"] == "timestamp with time zone"
        assert types["groups.name"] == "text"
        [(later,)] = store._db.execute("SELECT created_at > ? FROM groups", (NOW - timedelta(seconds=1),)).fetchall()
        assert later is True and store.list_groups() == [GroupRecord("office", NOW)]
    finally:
        store.close()


def test_a_write_inside_a_write_fails_at_once(store):
    """A write transaction opened inside another on the same thread fails rather than waiting on itself."""
    with store._write() as db:
        with pytest.raises((RuntimeError, sqlite3.OperationalError), match="transaction"):
            with store._write():
                pass
        db.execute("INSERT INTO groups (name, created_at) VALUES (?, ?)", ("office", NOW.isoformat()))
    assert [g.name for g in store.list_groups()] == ["office"]


def test_postgresql_replaces_a_connection_the_server_dropped(postgres_cluster):
    """A pooled connection the server terminated is replaced on the next call, which succeeds."""
    from gateway.store.postgresql import PostgreSQLStore

    url = postgres_cluster.new_database()
    store = PostgreSQLStore(url)
    try:
        store.ensure_group("office", NOW)
        postgres_cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             f" WHERE datname = '{url.rpartition('/')[2]}'")
        assert store.list_groups() == [GroupRecord("office", NOW)]
        store.ensure_group("lab", NOW)
        assert [g.name for g in store.list_groups()] == ["lab", "office"]
    finally:
        store.close()


def test_newer_schema_is_refused(store_backend):
    """A database written by a newer gateway is refused with advice to upgrade."""
    store = store_backend.open()
    with store._write() as db:
        db.execute("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(GatewayError, match="version 99 is newer.*upgrade gateway"):
        store_backend.open()


# groups and tokens


def test_ensure_group_is_idempotent_and_keeps_creation_time(store):
    """Ensuring an existing group neither duplicates it nor changes its created_at."""
    store.ensure_group("office", NOW)
    again = store.ensure_group("office", NOW + timedelta(days=1))
    store.ensure_group("lab", NOW)
    assert again == GroupRecord("office", NOW)
    assert [g.name for g in store.list_groups()] == ["lab", "office"]


def test_tokens_round_trip_with_aware_utc_times(store):
    """A token read back equals the one stored, times converted to UTC."""
    store.ensure_group("office", NOW)
    paris = timezone(timedelta(hours=1))
    record = TokenRecord("t", "h", "office", NOW.astimezone(paris), NOW + timedelta(hours=1))
    store.create_token(record)
    [back] = store.list_tokens()
    assert back == record
    assert back.created_at.utcoffset() == timedelta(0)


def test_times_are_stored_as_iso8601_utc_text(sqlite_store):
    """The file holds ISO-8601 UTC text, so the CLI and humans can read it."""
    sqlite_store.ensure_group("office", NOW.astimezone(timezone(timedelta(hours=-5))))
    raw = sqlite_store._db.execute("SELECT created_at FROM groups").fetchone()[0]
    assert raw == "2025-03-01T12:00:00.000000+00:00"


def test_naive_datetimes_are_refused(store):
    """A naive datetime is a bug in the caller and is refused rather than guessed."""
    with pytest.raises(ValueError, match="naive"):
        store.ensure_group("office", datetime(2025, 1, 1))


def test_token_for_unknown_group_is_refused(store):
    """create_token names the missing group instead of a bare integrity error."""
    with pytest.raises(GatewayError, match="no group named 'nowhere'"):
        store.create_token(TokenRecord("t", "h", "nowhere", NOW, NOW + timedelta(hours=1)))


# enrol


def test_enrol_stores_connector_certificate_and_marks_token(store):
    """A good token yields the connector and result, and the token is marked used by it."""
    connector, result = enrolled(store)
    assert result == "result"
    assert store.get_connector("conn-1") == connector == ConnectorRecord("conn-1", "laptop", "office", NOW)
    [token] = store.list_tokens()
    assert (token.used_at, token.used_by) == (NOW, "conn-1")
    assert store.certificate_status("abc1", "conn-1") == "valid"


def test_enrol_passes_the_token_record_to_issue(store):
    """issue() receives the stored token so it can put the connector in the token's group."""
    add_token(store, group="lab")
    calls = []
    store.enrol("tok1", SECRET, NOW, issuer(calls=calls))
    assert [(t.token_id, t.group) for t in calls] == [("tok1", "lab")]


def test_enrol_refuses_unknown_token(store):
    """An id the store never issued is 'unknown token'."""
    with pytest.raises(EnrolmentError, match="^unknown token"):
        store.enrol("nope", SECRET, NOW, issuer())


def test_enrol_treats_wrong_secret_as_unknown_and_leaves_token_usable(store):
    """A wrong secret is indistinguishable from an unknown id and does not burn the token."""
    add_token(store)
    with pytest.raises(EnrolmentError, match="^unknown token"):
        store.enrol("tok1", "guess", NOW, issuer())
    assert store.enrol("tok1", SECRET, NOW, issuer())[1] == "result"


def test_enrol_refuses_second_use(store):
    """A token redeems once; the second attempt is 'token already used'."""
    enrolled(store)
    with pytest.raises(EnrolmentError, match="^token already used"):
        store.enrol("tok1", SECRET, NOW, issuer("conn-2"))


def test_enrol_compares_expiry_with_now_argument(store):
    """Expiry is judged by `now`: usable just before expires_at, refused at it."""
    expires = NOW + timedelta(hours=1)
    add_token(store, "a", expires_at=expires)
    add_token(store, "b", expires_at=expires)
    with pytest.raises(EnrolmentError, match="^token expired at 2025-03-01T13:00:00"):
        store.enrol("a", SECRET, expires, issuer("conn-a"))
    assert store.enrol("b", SECRET, expires - timedelta(microseconds=1), issuer("conn-b"))[1] == "result"


def test_enrol_is_all_or_nothing_when_issue_fails(store):
    """If issue() raises, no connector is stored and the token stays unused."""
    add_token(store)

    def broken(token):
        raise EnrolmentError("bad CSR")

    with pytest.raises(EnrolmentError, match="bad CSR"):
        store.enrol("tok1", SECRET, NOW, broken)
    assert store.list_connectors(include_deleted=True) == []
    assert store.list_tokens()[0].used_at is None


def test_concurrent_enrol_from_two_stores_redeems_once(store_backend):
    """Two nodes' stores racing on one token: exactly one wins, the other hears 'already used'."""
    first, second = store_backend.open(), store_backend.open()
    add_token(first)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def slow_issue(connector_id):
        def issue(token):
            time.sleep(0.2)  # hold the transaction open so the other thread overlaps it
            # A serial of its own: only the token may stop the second redemption.
            return (ConnectorRecord(connector_id, "laptop", token.group, NOW),
                    CertificateRecord(f"{connector_id}ab", connector_id, NOW + timedelta(days=30)), "result")

        return issue

    def attempt(store, connector_id):
        barrier.wait()
        try:
            outcomes[connector_id] = store.enrol("tok1", SECRET, NOW, slow_issue(connector_id))[1]
        except Exception as e:  # recorded, then asserted on below
            outcomes[connector_id] = e

    threads = [threading.Thread(target=attempt, args=a) for a in ((first, "c1"), (second, "c2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    first.close()
    second.close()
    results = sorted(outcomes.values(), key=lambda o: isinstance(o, Exception))
    assert results[0] == "result"
    assert isinstance(results[1], EnrolmentError) and "already used" in str(results[1])


# connectors and certificates


def test_delete_connector_revokes_and_hides_it(store):
    """Deleting marks the connector, revokes its certificates and hides it from the default list."""
    enrolled(store)
    assert store.delete_connector("conn-1", NOW) is True
    assert store.delete_connector("conn-1", NOW) is False
    assert store.list_connectors() == []
    [deleted] = store.list_connectors(include_deleted=True)
    assert deleted.deleted_at == NOW
    assert store.certificate_status("abc1", "conn-1") == "connector deleted"
    revoked = store._db.execute("SELECT revoked_at FROM certificates").fetchone()[0]
    assert revoked is not None


def test_delete_unknown_connector_returns_false(store):
    """Deleting an id that never enrolled reports False and changes nothing."""
    assert store.delete_connector("ghost", NOW) is False


def test_certificate_status_unknown_for_other_connector_or_serial(store):
    """A serial belongs to one connector: another connector, or an unknown serial, is 'unknown'."""
    enrolled(store)
    assert store.certificate_status("abc1", "conn-2") == "unknown"
    assert store.certificate_status("ffff", "conn-1") == "unknown"


def test_certificate_status_revoked(store):
    """A revoked certificate of a live connector is 'revoked'."""
    enrolled(store, revoked_at=NOW)
    assert store.certificate_status("abc1", "conn-1") == "revoked"


def test_touch_connector_updates_last_seen(store):
    """touch_connector records the given time as last_seen."""
    enrolled(store)
    store.touch_connector("conn-1", NOW + timedelta(minutes=3))
    assert store.get_connector("conn-1").last_seen == NOW + timedelta(minutes=3)


def test_get_unknown_connector_is_none(store):
    """get_connector returns None for an id it does not know."""
    assert store.get_connector("ghost") is None


# ThreadedStore


class FakeReactor:
    """Just enough reactor: callFromThread queues work for the test thread to run."""

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.from_threads: queue.Queue = queue.Queue()
        self.when_running: list = []
        self.triggers: dict[int, tuple] = {}

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.put((f, args, kwargs))

    def callWhenRunning(self, f, *args, **kwargs):
        self.when_running.append((f, args, kwargs))

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        handle = len(self.triggers) + 1
        self.triggers[handle] = (phase, event, f, args, kwargs)
        return handle

    def removeSystemEventTrigger(self, handle):
        del self.triggers[handle]

    def start(self):
        self.running = True
        for f, args, kwargs in self.when_running:
            f(*args, **kwargs)

    def result_of(self, d: Deferred, timeout: float = 5.0):
        """Run thread callbacks on this thread until `d` fires; return its result or raise."""
        outcome: list = []
        d.addBoth(outcome.append)
        deadline = time.monotonic() + timeout
        while not outcome:
            f, args, kwargs = self.from_threads.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


@pytest.fixture
def reactor():
    return FakeReactor()


@pytest.fixture
def threaded(db_path, reactor):
    t = ThreadedStore(SQLiteStore(db_path), reactor)
    yield t
    if t.threadpool.started:
        reactor.result_of(t.close())


def test_threaded_store_forwards_calls_and_results(threaded, reactor):
    """Calls reach the real store and their results come back through Deferreds."""
    reactor.result_of(threaded.ensure_group("office", NOW))
    assert reactor.result_of(threaded.list_groups()) == [GroupRecord("office", NOW)]


def test_threaded_store_runs_off_the_calling_thread(threaded, reactor):
    """The store's work (here, the issue callback) runs on the pool thread, not the reactor's."""
    reactor.result_of(threaded.ensure_group("office", NOW))
    token = TokenRecord("t", hash_secret(SECRET), "office", NOW, NOW + timedelta(days=1))
    reactor.result_of(threaded.create_token(token))
    seen = []

    def issue(token):
        seen.append(threading.get_ident())
        return issuer()(token)

    connector, result = reactor.result_of(threaded.enrol("t", SECRET, NOW, issue))
    assert result == "result" and connector.connector_id == "conn-1"
    assert seen and seen[0] != threading.get_ident()


def test_threaded_store_delivers_errors_as_failures(threaded, reactor):
    """A store exception arrives as the Deferred's failure, with its message intact."""
    with pytest.raises(EnrolmentError, match="unknown token"):
        reactor.result_of(threaded.enrol("nope", SECRET, NOW, issuer()))


def test_threaded_store_uses_one_thread(threaded):
    """The default pool has exactly one thread, matching the store's one connection."""
    assert (threaded.threadpool.min, threaded.threadpool.max) == (1, 1)


def test_threaded_store_waits_for_reactor_to_start_pool(db_path):
    """With the reactor not yet running, the pool starts only when the reactor does."""
    reactor = FakeReactor(running=False)
    threaded = ThreadedStore(SQLiteStore(db_path), reactor, ThreadPool(1, 1))
    assert not threaded.threadpool.started
    reactor.start()
    assert threaded.threadpool.started
    reactor.result_of(threaded.close())


def test_shutdown_trigger_closes_store_and_stops_pool(db_path, reactor):
    """The 'before shutdown' trigger closes the store and stops the thread; the reactor waits for it."""
    store = SQLiteStore(db_path)
    threaded = ThreadedStore(store, reactor)
    [(phase, event, f, args, kwargs)] = reactor.triggers.values()
    assert (phase, event) == ("before", "shutdown")
    reactor.result_of(f(*args, **kwargs))
    assert not threaded.threadpool.started
    with pytest.raises(sqlite3.ProgrammingError):
        store.list_groups()


def test_close_twice_fires_both_and_refuses_later_calls(threaded, reactor):
    """Both close() callers are told when it is done; a call after close fails, it does not hang."""
    assert threaded.closed is False
    first, second = threaded.close(), threaded.close()
    assert threaded.closed is True
    assert reactor.result_of(first) is None
    assert reactor.result_of(second) is None
    assert reactor.triggers == {}
    with pytest.raises(StoreClosed, match="closed: the service is shutting down"):
        reactor.result_of(threaded.list_groups())

"""The gateway store on PostgreSQL: SQLStore's queries over a psycopg 3 connection pool.

Chosen by ``[service] store = "postgresql://user@host:port/db"``; the password comes from
``store_password_file`` or from libpq itself (PGPASSWORD, ~/.pgpass), never from the URL.
Like the SQLite store it is synchronous and ThreadedStore runs it off the reactor thread.

Concurrency is PostgreSQL's, not one file's lock: every write transaction that checks
before it writes (add an app, rename a group, renew a certificate) first takes one
transaction-scoped advisory lock, so those are serialised across every node as SQLite's
BEGIN IMMEDIATE serialises them across processes; enrolment instead locks the token's row
(SELECT ... FOR UPDATE), so two nodes redeeming one token at once accept it once, and
enrolments of different tokens do not wait for each other.

For several nodes (issue 15, parts 2-5) this is the base: a write can NOTIFY in its own
transaction (delivered on commit only), a LISTEN needs a connection of its own outside the
pool, and a database that goes away surfaces as StoreUnavailable while the pool replaces
broken connections on the next checkout.

psycopg and psycopg_pool are the optional extra ``postgresql``
(``pip install 'gateway[postgresql]'``); the SQLite default needs neither.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field

from gateway.errors import GatewayError, StoreUnavailable
from gateway.store.sqlite import SQLStore

_MISSING = "No module named 'psycopg'"
try:
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as e:  # the optional extra is not installed
    psycopg = None
    _MISSING = str(e)

EXTRA_HINT = "install gateway with its postgresql extra: pip install 'gateway[postgresql]'"
# pg_advisory_xact_lock key of the serialised write transactions: "gateway" in ASCII.
WRITE_LOCK_KEY = 0x67617465776179
CONNECT_TIMEOUT = 10  # seconds, for a new connection and for a free one from the pool
POOL_MAX = 4
# The channel every write that changes what nodes serve NOTIFYs, with its topics as payload
# (comma-separated names of gateway.store.sqlite.CHANGE_TOPICS).
CHANGES_CHANNEL = "gateway_changes"
# A LISTEN connection waits quietly for hours: TCP keepalives notice a server that is gone
# without a word (a host down, a cut network) within about 15 s instead of never.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
# How often the listener wakes up to see whether it should stop, and waits to reconnect.
LISTEN_POLL = 1.0
RELISTEN_INTERVAL = 1.0


def open_postgresql(url: str, password_file: Path | None = None) -> "PostgreSQLStore":
    """The store at `url` ([service] store), with the password from `password_file` if given
    (else libpq's own: PGPASSWORD, ~/.pgpass); its schema migrated."""
    return PostgreSQLStore(url, None if password_file is None else read_password_file(password_file))


def read_password_file(path: Path) -> str:
    """The password in `path`: its first line, without the line break."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GatewayError(f"store_password_file {path}: cannot read it ({e.strerror}):"
                           " check the path and that the gateway's user may read it") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise GatewayError(f"store_password_file {path}: the file is empty: write the store user's password in it")
    return password


@define
class PostgreSQLStore(SQLStore):
    """Gateway state in a PostgreSQL database, shared by every node and the `gateway` CLI."""

    url: str
    password: str | None = field(default=None, repr=False)
    pool_max: int = POOL_MAX
    migrated: tuple[int, int] = field(init=False, default=(0, 0))
    _pool: Any = field(init=False, repr=False, default=None)
    _connect_kwargs: dict[str, Any] = field(init=False, repr=False, factory=dict)
    # The connection of the transaction this thread has open, if any: reads inside a
    # transaction (renew_certificate's status check) must see and lock what it does.
    _local: threading.local = field(init=False, repr=False, factory=threading.local)

    dialect: ClassVar[str] = "postgresql"
    _row_lock: ClassVar[str] = " FOR UPDATE"

    def __attrs_post_init__(self) -> None:
        if psycopg is None:
            raise GatewayError(f"[service] store is a PostgreSQL URL, but psycopg is not installed"
                               f" ({_MISSING}): {EXTRA_HINT}")
        kwargs = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, **KEEPALIVES}
        if self.password is not None:
            kwargs["password"] = self.password
        self._connect_kwargs = kwargs
        self._check_reachable(kwargs)
        # The pool says "error connecting" on stderr at every reconnection attempt, every second
        # of an outage; the node says it once (gateway.service.changes.StoreHealth).
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        self._pool = ConnectionPool(self.url, kwargs=kwargs, min_size=1, max_size=self.pool_max,
                                    timeout=CONNECT_TIMEOUT, name="gateway-store", open=False,
                                    check=ConnectionPool.check_connection)
        self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        try:
            self.migrated = self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @property
    def location(self) -> str:
        """The URL without any secret, for messages."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username
        return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc, query=""))

    def columns(self, table: str) -> list[str]:
        """The column names of ``table``, in order."""
        return [row[0] for row in self._db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ? ORDER BY ordinal_position", (table,)).fetchall()]

    @property
    def _db(self) -> "_Statements":
        conn = getattr(self._local, "conn", None)
        return _Statements(self, conn)

    def close(self) -> None:
        """Close every pooled connection; the store is unusable afterwards."""
        self._pool.close()

    @contextmanager
    def _write(self, serialised: bool = True, changes: str = "") -> Iterator["_Statements"]:
        if getattr(self._local, "conn", None) is not None:
            # A second pooled connection would wait for the advisory lock this thread holds:
            # refuse at once, as SQLite refuses a BEGIN inside a transaction.
            raise RuntimeError("a store write transaction inside another one on the same thread")
        with self._connection() as conn, self._unavailable_as_error(), conn.transaction():
            self._local.conn = conn
            try:
                if serialised:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                statements = _Statements(self, conn)
                yield statements
                if changes:
                    self._notify(statements, changes)
            finally:
                self._local.conn = None

    def _notify(self, db: "_Statements", changes: str) -> None:
        # In the transaction: PostgreSQL delivers it on commit only, and never for a rollback.
        db.execute("SELECT pg_notify(?, ?)", (CHANGES_CHANNEL, changes))

    def listen(self, on_notice: Callable[[str], None], on_state: Callable[[bool, str], None]) -> "ChangeListener":
        """Start a thread that LISTENs for the nodes' changes on a connection of its own (outside
        the pool); see ChangeListener. `on_notice` and `on_state` are called on that thread."""
        listener = ChangeListener(self.url, self._connect_kwargs, self.location, on_notice, on_state)
        listener.start()
        return listener

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as e:
            raise StoreUnavailable(f"the store {self.location} is unreachable: no connection within"
                                   f" {CONNECT_TIMEOUT} s ({e}): check that PostgreSQL is up") from None

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"the store {self.location} failed: {_first_line(e)}") from None

    def _check_reachable(self, kwargs: dict[str, Any]) -> None:
        # The pool only says "no connection in time"; one direct attempt says why (a wrong
        # password, no such database, connection refused) before the service goes on.
        try:
            psycopg.connect(self.url, **kwargs).close()
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot open the store {self.location}: {_first_line(e)}: check the"
                                   " URL in [service] store, the password (store_password_file,"
                                   " PGPASSWORD or ~/.pgpass) and that PostgreSQL is up") from None


class ChangeListener:
    """LISTENs on CHANGES_CHANNEL on a connection of its own, in a thread of its own (a LISTEN
    connection is held for good, so it must not be a pooled one, and psycopg blocks).

    ``on_notice(topics)`` runs for each notification; ``on_state(True, "")`` each time the
    LISTEN is (re)established, so the node can re-read what it may have missed, and
    ``on_state(False, why)`` when the connection is lost or cannot be made; it then tries again
    every RELISTEN_INTERVAL until stop(). Both callbacks run on the listener's thread.
    """

    def __init__(self, url: str, kwargs: dict[str, Any], location: str, on_notice: Callable[[str], None],
                 on_state: Callable[[bool, str], None]) -> None:
        self._url = url
        self._kwargs = kwargs
        self.location = location
        self._on_notice = on_notice
        self._on_state = on_state
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-store-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; the thread ends within LISTEN_POLL seconds (it is a daemon thread)."""
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self._on_state(True, "")
                    while not self._stopping.is_set():
                        for notice in conn.notifies(timeout=LISTEN_POLL):
                            self._on_notice(notice.payload)
            except psycopg.Error as e:
                if not self._stopping.is_set():
                    self._on_state(False, f"the store {self.location} failed: {_first_line(e)}")
            self._stopping.wait(RELISTEN_INTERVAL)


@define
class _Statements:
    """What SQLStore calls ``db``: ``execute(sql, params)`` with ``?`` placeholders, returning the
    whole result (a pooled connection goes back to the pool at once outside a transaction)."""

    store: PostgreSQLStore
    conn: Any  # the open transaction's connection, or None: borrow one per statement

    def execute(self, sql: str, params: tuple | list = ()) -> "_Result":
        if self.conn is not None:
            return _Result.of(self.conn.execute(_to_psycopg(sql), params))
        with self.store._connection() as conn, self.store._unavailable_as_error():
            return _Result.of(conn.execute(_to_psycopg(sql), params))


@define
class _Result:
    """A statement's rows and rowcount, read to the end (sqlite3's cursor interface)."""

    rows: list[tuple]
    rowcount: int

    @classmethod
    def of(cls, cursor: Any) -> "_Result":
        return cls(cursor.fetchall() if cursor.description is not None else [], cursor.rowcount)

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return list(self.rows)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)


@lru_cache(maxsize=512)
def _to_psycopg(sql: str) -> str:
    # SQLStore's statements hold no literal "?" or "%" of their own (a rule in its module
    # docstring), so the placeholders translate one for one.
    return sql.replace("%", "%%").replace("?", "%s")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

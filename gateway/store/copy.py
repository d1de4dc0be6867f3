"""Copy a store's lasting state into a new, empty store: the way from the embedded SQLite file to
PostgreSQL when a service grows to several nodes (or back, or between databases).

Both stores are opened (so both are at this gateway's schema version) and every table that
holds lasting state is copied in one transaction on the target, parents before children.
Left out: ``nodes`` (each node writes its own row when it starts), ``login_codes`` (a minute's
worth of sign-in codes) and ``admin_sessions`` (status page sign-ins: admins sign in again).
The source is read inside one transaction too, so a copy is a consistent snapshot; still, stop
the service first: what it changes after the copy is not in the target.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.errors import GatewayError
from gateway.store.sqlite import CHANGE_TOPICS, SQLStore, _to_text

# Parents first (foreign keys): groups before the tokens, connectors and apps that name one,
# connectors before their certificates.
TABLES = (
    "groups", "tokens", "connectors", "certificates", "apps", "user_credentials", "admin_tokens",
    "session_log_switches", "service_ca", "update_groups",
)
SKIPPED = ("nodes", "login_codes", "admin_sessions")


def copy_store(source: SQLStore, target: SQLStore) -> dict[str, int]:
    """Copy TABLES from ``source`` into the empty ``target``; the rows copied per table."""
    if source.location == target.location:
        raise GatewayError(f"the source and the target are the same store ({source.location})")
    held = {table: _count(target, table) for table in TABLES}
    if any(held.values()):
        what = ", ".join(f"{n} in {t}" for t, n in held.items() if n)
        raise GatewayError(f"{target.location} already holds rows ({what}): copy only into a new, empty "
                           f"database (or drop and create it again), so that nothing is mixed or overwritten")
    rows: dict[str, tuple[list[str], list[tuple]]] = {}
    with source._write():   # one consistent snapshot; a service writing meanwhile waits
        for table in TABLES:
            columns = source.columns(table)
            quoted = ", ".join(_quote(c) for c in columns)
            rows[table] = (columns, source._db.execute(f"SELECT {quoted} FROM {table}").fetchall())
    with target._write(changes=",".join(CHANGE_TOPICS)) as db:
        for table in TABLES:
            columns, values = rows[table]
            wanted = target.columns(table)
            if sorted(wanted) != sorted(columns):
                raise GatewayError(f"table {table} has columns {columns} in {source.location} but {wanted} in "
                                   f"{target.location}: both must be at the same schema version")
            quoted = ", ".join(_quote(c) for c in columns)
            marks = ", ".join("?" for _ in columns)
            for row in values:
                db.execute(f"INSERT INTO {table} ({quoted}) VALUES ({marks})", tuple(_portable(v) for v in row))
    return {table: len(rows[table][1]) for table in TABLES}


def _count(store: SQLStore, table: str) -> int:
    return store._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def _quote(column: str) -> str:
    return f'"{column}"'


def _portable(value: Any) -> Any:
    # PostgreSQL gives timestamptz columns back as datetimes; both stores take times as the
    # ISO text SQLStore writes.
    return _to_text(value) if isinstance(value, datetime) else value

"""The store's schema, as one list of versioned migrations for SQLite and PostgreSQL alike.

Migration i takes the schema from version i to i + 1; a store records its version in the
table schema_version and applies the missing ones at open, in one transaction (so
`gateway store migrate` is just an open). The SQL is what both databases accept, with
these marks a dialect fills in:

- ``{time}``: a point in time (SQLite: fixed-width ISO-8601 UTC TEXT, whose text order is
  time order; PostgreSQL: TIMESTAMPTZ);

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from collections.abc import Iterator

DIALECTS = ("sqlite", "postgresql")
_TYPES = {
    "sqlite": {"time": "TEXT"},
    "postgresql": {"time": "TIMESTAMPTZ"},
}


def render(script: str, dialect: str) -> str:
    """`script` with the dialect's types in place of its marks."""
    text = script
    for mark, sql_type in _TYPES[dialect].items():
        text = text.replace("{" + mark + "}", sql_type)
    return text


def statements(dialect: str, version: int) -> Iterator[str]:
    """The statements that take a database of `version` to the newest, one at a time
    (sqlite3's executescript would COMMIT the open transaction first)."""
    from gateway.store.sqlite import MIGRATIONS

    for script in MIGRATIONS[version:]:
        for statement in render(script, dialect).split(";"):
            if statement.strip():
                yield statement

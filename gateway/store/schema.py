"""The store's schema, as one list of versioned migrations for SQLite and PostgreSQL alike.

Migration i takes the schema from version i to i + 1; a store records its version in the
table schema_version and applies the missing ones at open, in one transaction (so
`gateway store migrate` is just an open). The SQL is what both databases accept, with
these marks a dialect fills in:

- ``{time}``: a point in time (SQLite: fixed-width ISO-8601 UTC TEXT, whose text order is
  time order; PostgreSQL: TIMESTAMPTZ). The store passes times as that text either way
  (PostgreSQL casts it) and reads both back as aware UTC datetimes.

Other types are written as both accept them: TEXT, INTEGER (0/1 for a flag), a column named
"user" quoted.

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from collections.abc import Iterator

# Script i takes the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        created_at {time} NOT NULL
    );
    CREATE TABLE tokens (
        token_id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        group_name TEXT NOT NULL REFERENCES groups(name),
        created_at {time} NOT NULL,
        expires_at {time} NOT NULL,
        used_at {time},
        used_by TEXT
    );
    CREATE TABLE connectors (
        connector_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        group_name TEXT NOT NULL REFERENCES groups(name),
        created_at {time} NOT NULL,
        last_seen {time},
        deleted_at {time}
    );
    CREATE TABLE certificates (
        serial_hex TEXT PRIMARY KEY,
        connector_id TEXT NOT NULL REFERENCES connectors(connector_id),
        not_after {time} NOT NULL,
        revoked_at {time}
    );
    CREATE INDEX certificates_by_connector ON certificates(connector_id);
    """,
    # 1 -> 2: connector status and lifecycle (what the node last saw; the sweeper's tag).
    """
    ALTER TABLE connectors ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
    ALTER TABLE connectors ADD COLUMN state_since {time};
    ALTER TABLE connectors ADD COLUMN software_version TEXT;
    ALTER TABLE connectors ADD COLUMN address TEXT;
    ALTER TABLE connectors ADD COLUMN tunnels INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE connectors ADD COLUMN open_streams INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE connectors ADD COLUMN node_id TEXT;
    ALTER TABLE connectors ADD COLUMN cert_serial TEXT;
    ALTER TABLE connectors ADD COLUMN cert_not_after {time};
    """,
    # 2 -> 3: apps published with `gateway apps add`; definition is the [[apps]] table as JSON.
    """
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        group_name TEXT NOT NULL REFERENCES groups(name),
        definition TEXT NOT NULL,
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL
    );
    CREATE INDEX apps_by_group ON apps(group_name);
    """,
    # 3 -> 4: Private Access users' credentials (personal tokens, browser sign-ins); identity is
    # the user as signed in, as JSON; only the secret's hash is kept.
    """
    CREATE TABLE user_credentials (
        credential_id TEXT PRIMARY KEY,
        "user" TEXT NOT NULL,
        kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at {time} NOT NULL,
        expires_at {time} NOT NULL,
        revoked_at {time},
        name TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX user_credentials_by_user ON user_credentials("user");
    """,
    # Admin API tokens (`gateway admin token create`); only the secret's hash is kept.
    """
    CREATE TABLE admin_tokens (
        token_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at {time} NOT NULL,
        expires_at {time} NOT NULL,
        revoked_at {time}
    );
    """,
    # Session log switches (`gateway logs session on|off`): per group or per connector, the
    # connector's own one winning; no row means off.
    """
    CREATE TABLE session_log_switches (
        scope TEXT NOT NULL CHECK (scope IN ('group', 'connector')),
        name TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        updated_at {time} NOT NULL,
        PRIMARY KEY (scope, name)
    );
    """,
    # The service's nodes sharing this store (issue 15): where connectors dial each one's
    # tunnel port, kept fresh by the node's heartbeat; a row not seen lately is a node gone.
    """
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        tunnel_address TEXT NOT NULL,
        started {time} NOT NULL,
        last_seen {time} NOT NULL
    );
    """,
    # The CA the nodes sharing this store issue and trust certificates with: its certificate
    # (public), so a node with another CA (or none) refuses to start instead of splitting them.
    """
    CREATE TABLE service_ca (
        fingerprint TEXT PRIMARY KEY,
        certificate TEXT NOT NULL,
        recorded_at {time} NOT NULL
    );
    """,
    # State that lived in one node's memory and must be shared by every node (issue 15): a
    # group's update lease and halt (one row per group, locked while a lease is decided), the
    # browser sign-in's one-time codes and the status page's sessions (only hashes of both).
    """
    CREATE TABLE update_groups (
        group_name TEXT PRIMARY KEY,
        lease_connector TEXT,
        lease_version TEXT,
        lease_expires {time},
        halted_version TEXT,
        halted_at {time}
    );
    CREATE TABLE login_codes (
        code_hash TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        challenge TEXT NOT NULL,
        expires_at {time} NOT NULL
    );
    CREATE INDEX login_codes_by_expiry ON login_codes(expires_at);
    CREATE TABLE admin_sessions (
        session_hash TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        created_at {time} NOT NULL,
        expires_at {time} NOT NULL
    );
    CREATE INDEX admin_sessions_by_token ON admin_sessions(token_id);
    """,
    # Admin tokens that only read (`gateway admin token create --role read`): monitoring, a
    # status page on a wall. Tokens made before are admins, as they were.
    """
    ALTER TABLE admin_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

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


def statements(dialect: str, version: int, target: int = SCHEMA_VERSION) -> Iterator[str]:
    """The statements that take a database of `version` to `target` (the newest), one at a
    time (sqlite3's executescript would COMMIT the open transaction first)."""
    for script in MIGRATIONS[version:target]:
        for statement in render(script, dialect).split(";"):
            if statement.strip():
                yield statement

"""The store's queries in SQL that SQLite and PostgreSQL both speak (SQLStore), and the
embedded SQLite store on them: one connection, WAL, schema migrated on open.

gateway.store.postgresql runs the same SQLStore methods on PostgreSQL, so a method added here
works on both: write it with ``?`` placeholders, ``self._db`` for reads and ``self._write()``
for changes, and only SQL both databases accept (``INSERT ... ON CONFLICT DO NOTHING``, not
``INSERT OR IGNORE``; quote the column "user"). A new table or column is a migration
appended to gateway.store.schema.MIGRATIONS (one list for both databases).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from attrs import define, field

from gateway.errors import AdminTokenError, EnrolmentError, GatewayError, UserCredentialError
from gateway.pki.tokens import secret_matches
from gateway.store import schema
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION  # noqa: F401 - re-exported
from gateway.store.records import (
    AdminSession,
    AdminTokenRecord,
    AppRecord,
    CertificateRecord,
    ConnectorRecord,
    ConnectorStatus,
    GroupRecord,
    LoginCode,
    NodeRecord,
    TokenRecord,
    UpdateLease,
    UserCredentialRecord,
)

R = TypeVar("R")
CertificateStatus = str  # "valid" | "unknown" | "revoked" | "connector deleted"
IssueResult = tuple[ConnectorRecord, CertificateRecord, R]
# Called inside the write transaction with the other stored apps; raises to refuse the change.
AppCheck = Callable[[list[AppRecord]], None]
# Called inside the lease transaction with the group's live lease and halted version; a refusal or None.
LeaseDecision = Callable[[UpdateLease | None, str | None], str | None]


DEFAULT_GROUP = "default"
# What a write can change, as the change feed names it (gateway.service.changes re-reads each).
CHANGE_TOPICS = ("apps", "connectors", "tokens", "credentials", "admin_tokens", "log_switches", "nodes")
BUSY_TIMEOUT_MS = 5000


@define
class SQLStore:
    """The gateway store's operations; a subclass owns the database connection.

    A subclass provides ``_db`` (runs a statement: inside the transaction this thread has open,
    else on its own), ``_write(serialised=True, changes="")`` (a transaction; serialised, it is
    the only writing transaction at a time, which check-then-write methods such as add_app rely
    on; ``changes`` names what it changes, comma-separated topics of CHANGE_TOPICS, for the
    other nodes: PostgreSQL notifies them on commit),
    ``close()`` and ``migrated`` (the schema versions before and after the open).
    """

    # Appended to a SELECT of the rows a transaction is about to consume (a token): PostgreSQL
    # locks them so a second node's transaction waits and then sees them used. SQLite's writers
    # are serialised anyway.
    _row_lock: ClassVar[str] = ""
    dialect: ClassVar[str] = "sqlite"  # which schema.statements() to migrate with

    # groups

    def ensure_group(self, name: str, now: datetime) -> GroupRecord:
        """The group called `name`, created now if it does not exist yet."""
        with self._write() as db:
            db.execute(
                "INSERT INTO groups (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, _to_text(now))
            )
            row = db.execute("SELECT name, created_at FROM groups WHERE name = ?", (name,)).fetchone()
        return _group(row)

    def list_groups(self) -> list[GroupRecord]:
        """All groups, by name."""
        return [_group(r) for r in self._db.execute("SELECT name, created_at FROM groups ORDER BY name")]

    def create_group(self, name: str, now: datetime) -> GroupRecord:
        """A new group; GatewayError if it exists."""
        with self._write(changes="apps") as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is not None:
                raise GatewayError(f"group {name!r} already exists")
            db.execute("INSERT INTO groups (name, created_at) VALUES (?, ?)", (name, _to_text(now)))
        return GroupRecord(name, now.astimezone(UTC))

    def rename_group(self, old: str, new: str) -> int:
        """Rename a group with its connectors and tokens; returns how many connectors moved."""
        with self._write(changes="apps,connectors") as db:
            if old == DEFAULT_GROUP:
                raise GatewayError(f"the group {DEFAULT_GROUP!r} always exists and cannot be renamed")
            self._require_group(db, old)
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (new,)).fetchone() is not None:
                raise GatewayError(f"group {new!r} already exists")
            # The foreign keys do not cascade: add the new name, move the rows, drop the old name.
            db.execute("INSERT INTO groups (name, created_at) SELECT ?, created_at FROM groups WHERE name = ?",
                       (new, old))
            moved = self._move_rows(db, old, new)
            db.execute("DELETE FROM groups WHERE name = ?", (old,))
        return moved

    def delete_group(self, name: str, move_to: str | None = None) -> int:
        """Delete a group; its connectors go to `move_to`, which is required if it has any.

        Unused tokens of the group are deleted; history (deleted connectors, used tokens)
        moves to `move_to`, or to the default group. Returns how many connectors moved.
        """
        with self._write(changes="apps,connectors") as db:
            if name == DEFAULT_GROUP:
                raise GatewayError(f"the group {DEFAULT_GROUP!r} always exists and cannot be deleted")
            self._require_group(db, name)
            apps = [r[0] for r in db.execute("SELECT name FROM apps WHERE group_name = ? ORDER BY name", (name,))]
            if apps:
                raise GatewayError(
                    f"cannot delete group {name!r}: apps {', '.join(apps)} in the store name it;"
                    " move them with `gateway apps set NAME --group OTHER` or remove them first"
                )
            live = db.execute(
                "SELECT count(*) FROM connectors WHERE group_name = ? AND deleted_at IS NULL", (name,)
            ).fetchone()[0]
            if move_to is None and live:
                raise GatewayError(
                    f"group {name!r} has {live} connector(s): give --move-connectors-to GROUP"
                    " (or move or delete them first)"
                )
            if move_to == name:
                raise GatewayError(f"cannot move the connectors of group {name!r} to itself")
            target = move_to or DEFAULT_GROUP
            self._require_group(db, target)
            db.execute("DELETE FROM tokens WHERE group_name = ? AND used_at IS NULL", (name,))
            moved = self._move_rows(db, name, target)
            db.execute("DELETE FROM groups WHERE name = ?", (name,))
        return live if moved else 0

    # apps (those the `gateway apps` command publishes; the TOML file's are not stored)

    def list_apps(self) -> list[AppRecord]:
        """All stored apps, by name."""
        return self._apps(self._db)

    def get_app(self, name: str) -> AppRecord | None:
        """The stored app called `name`, or None."""
        row = self._db.execute(f"SELECT {_APP_COLUMNS} FROM apps WHERE name = ?", (name,)).fetchone()
        return None if row is None else _app(row)

    def add_app(self, record: AppRecord, check: AppCheck | None = None) -> AppRecord:
        """Store a new app; its group must exist. `check(others)` runs in the same transaction,
        so two `gateway apps add` racing for one external URL cannot both pass it."""
        with self._write(changes="apps") as db:
            self._require_group(db, record.group)
            if db.execute("SELECT 1 FROM apps WHERE name = ?", (record.name,)).fetchone() is not None:
                raise GatewayError(
                    f"app {record.name!r} is in the store already: change it with `gateway apps set"
                    f" {record.name}` or remove it with `gateway apps remove {record.name}`"
                )
            if check is not None:
                check(self._apps(db))
            db.execute(
                f"INSERT INTO apps ({_APP_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (record.name, record.group, _definition_text(record.definition),
                 _to_text(record.created_at), _to_text(record.updated_at)),
            )
        return record

    def update_app(self, name: str, group: str, definition: dict[str, Any], now: datetime,
                   check: AppCheck | None = None) -> AppRecord:
        """Replace a stored app's group and definition; `check(others)` as for add_app."""
        with self._write(changes="apps") as db:
            if db.execute("SELECT 1 FROM apps WHERE name = ?", (name,)).fetchone() is None:
                raise GatewayError(f"no app {name!r} in the store; see `gateway apps list`")
            self._require_group(db, group)
            if check is not None:
                check([a for a in self._apps(db) if a.name != name])
            db.execute(
                "UPDATE apps SET group_name = ?, definition = ?, updated_at = ? WHERE name = ?",
                (group, _definition_text(definition), _to_text(now), name),
            )
        return self.get_app(name)

    def remove_app(self, name: str) -> bool:
        """Delete a stored app; False if there was none by that name."""
        with self._write(changes="apps") as db:
            return db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount == 1

    @staticmethod
    def _apps(db: sqlite3.Connection) -> list[AppRecord]:
        return [_app(r) for r in db.execute(f"SELECT {_APP_COLUMNS} FROM apps ORDER BY name")]

    # tokens

    def create_token(self, record: TokenRecord) -> None:
        """Store a new token; its group must exist (see ensure_group)."""
        with self._write(changes="tokens") as db:
            self._require_group(db, record.group)
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.token_id,
                    record.secret_hash,
                    record.group,
                    _to_text(record.created_at),
                    _to_text(record.expires_at),
                    _opt_text(record.used_at),
                    record.used_by,
                ),
            )

    def list_tokens(self) -> list[TokenRecord]:
        """All tokens, oldest first."""
        rows = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id")
        return [_token(r) for r in rows]

    def enrol(
        self, token_id: str, secret: str, now: datetime, issue: Callable[[TokenRecord], IssueResult[R]]
    ) -> tuple[ConnectorRecord, R]:
        """Redeem a token once: check it, mark it used, store what `issue` made; all or nothing.

        Not serialised with other writes: the token's row lock is what makes two nodes racing
        on one token redeem it once (the second waits, then reads it used).
        """
        # A new connector changes nothing a node serves yet: its tunnels bring it in.
        with self._write(serialised=False, changes="tokens") as db:
            token = self._redeemable_token(db, token_id, secret, now)
            connector, certificate, result = issue(token)
            self._insert_connector(db, connector)
            self._insert_certificate(db, certificate)
            db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_id = ?",
                (_to_text(now), connector.connector_id, token_id),
            )
        return connector, result

    # Private Access users' credentials

    def create_user_credential(self, record: UserCredentialRecord) -> UserCredentialRecord:
        """Store a new user credential (its secret already hashed)."""
        with self._write(changes="credentials") as db:
            db.execute(
                f"INSERT INTO user_credentials ({_USER_CREDENTIAL_COLUMNS}) VALUES ({', '.join('?' * 9)})",
                (record.credential_id, record.user, record.kind, _definition_text(record.identity),
                 record.secret_hash, _to_text(record.created_at), _to_text(record.expires_at),
                 _opt_text(record.revoked_at), record.name),
            )
        return record

    def get_user_credential(self, credential_id: str) -> UserCredentialRecord | None:
        """The credential with this id, revoked or expired ones too; None if there is none."""
        row = self._db.execute(f"SELECT {_USER_CREDENTIAL_COLUMNS} FROM user_credentials WHERE credential_id = ?",
                               (credential_id,)).fetchone()
        return None if row is None else _user_credential(row)

    def list_user_credentials(self, user: str | None = None) -> list[UserCredentialRecord]:
        """Every credential (of `user` only, if given), oldest first."""
        where, args = ('WHERE "user" = ?', (user,)) if user is not None else ("", ())
        rows = self._db.execute(f"SELECT {_USER_CREDENTIAL_COLUMNS} FROM user_credentials {where}"
                                " ORDER BY created_at, credential_id", args)
        return [_user_credential(r) for r in rows]

    def revoke_user_credential(self, credential_id: str, now: datetime) -> bool:
        """Mark one credential revoked; False if there is none by that id or it was revoked already."""
        with self._write(changes="credentials") as db:
            return db.execute("UPDATE user_credentials SET revoked_at = ? WHERE credential_id = ? AND revoked_at IS NULL",
                              (_to_text(now), credential_id)).rowcount == 1

    def revoke_user(self, user: str, now: datetime) -> int:
        """Revoke every credential of `user` not revoked yet (tokens and sign-ins); how many."""
        with self._write(changes="credentials") as db:
            return db.execute('UPDATE user_credentials SET revoked_at = ? WHERE "user" = ? AND revoked_at IS NULL',
                              (_to_text(now), user)).rowcount

    def redeem_user_secret(self, credential_id: str, secret: str, now: datetime) -> UserCredentialRecord:
        """The credential if `secret` is its secret and it is neither revoked nor expired at `now`;
        UserCredentialError ("unknown", "revoked", "expired") otherwise."""
        record = self.get_user_credential(credential_id)
        # A wrong secret looks exactly like a missing credential, so guessing ids teaches nothing.
        if record is None or not secret_matches(secret, record.secret_hash):
            raise UserCredentialError("unknown", "unknown credential: run gateway login again, or ask your "
                                                 "administrator for a new personal token")
        if record.revoked_at is not None:
            raise UserCredentialError("revoked", f"this credential was revoked at {record.revoked_at.isoformat()}:"
                                                 " run gateway login again, or ask your administrator")
        if now >= record.expires_at:
            raise UserCredentialError("expired", f"this credential expired at {record.expires_at.isoformat()}:"
                                                 " run gateway login again, or ask your administrator for a new"
                                                 " personal token")
        return record

    # admin API tokens

    def create_admin_token(self, record: AdminTokenRecord) -> AdminTokenRecord:
        """Store a new admin token (its secret already hashed)."""
        with self._write(changes="admin_tokens") as db:
            db.execute(f"INSERT INTO admin_tokens ({_ADMIN_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.token_id, record.name, record.secret_hash, _to_text(record.created_at),
                        _to_text(record.expires_at), _opt_text(record.revoked_at), record.role))
        return record

    def get_admin_token(self, token_id: str) -> AdminTokenRecord | None:
        """The admin token with this id, revoked or expired ones too; None if there is none."""
        row = self._db.execute(f"SELECT {_ADMIN_TOKEN_COLUMNS} FROM admin_tokens WHERE token_id = ?",
                               (token_id,)).fetchone()
        return None if row is None else _admin_token(row)

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        """Every admin token, revoked and expired ones too, oldest first."""
        rows = self._db.execute(f"SELECT {_ADMIN_TOKEN_COLUMNS} FROM admin_tokens ORDER BY created_at, token_id")
        return [_admin_token(r) for r in rows]

    def revoke_admin_token(self, token_id: str, now: datetime) -> bool:
        """Mark one admin token revoked; False if there is none by that id or it was revoked already."""
        with self._write(changes="admin_tokens") as db:
            revoked = db.execute("UPDATE admin_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                                 (_to_text(now), token_id)).rowcount == 1
            # Its status page sessions end with it, on every node.
            db.execute("DELETE FROM admin_sessions WHERE token_id = ?", (token_id,))
            return revoked

    def check_admin_token(self, token_id: str, secret: str, now: datetime) -> AdminTokenRecord:
        """The admin token if `secret` is its secret and it is neither revoked nor expired at `now`;
        AdminTokenError otherwise, saying which and what to do."""
        record = self.get_admin_token(token_id)
        # A wrong secret looks exactly like a missing token, so guessing ids teaches nothing.
        if record is None or not secret_matches(secret, record.secret_hash):
            raise AdminTokenError("unknown", "unknown admin token: copy the whole token again, or create one on"
                                             " the service with `gateway admin token create`")
        return self.usable_admin_token(record, now)

    @staticmethod
    def usable_admin_token(record: AdminTokenRecord, now: datetime) -> AdminTokenRecord:
        """`record` if it is neither revoked nor expired at `now`; AdminTokenError otherwise."""
        if record.revoked_at is not None:
            raise AdminTokenError("revoked", f"this admin token was revoked at {record.revoked_at.isoformat()}:"
                                             " create a new one with `gateway admin token create`")
        if now >= record.expires_at:
            raise AdminTokenError("expired", f"this admin token expired at {record.expires_at.isoformat()}:"
                                             " create a new one with `gateway admin token create`")
        return record

    # connectors and certificates

    def get_connector(self, connector_id: str) -> ConnectorRecord | None:
        """The connector with this id (deleted or not), or None."""
        row = self._db.execute(
            f"SELECT {_CONNECTOR_COLUMNS} FROM connectors WHERE connector_id = ?", (connector_id,)
        ).fetchone()
        return None if row is None else _connector(row)

    def list_connectors(self, include_deleted: bool = False) -> list[ConnectorRecord]:
        """Connectors, oldest first; deleted ones only when asked for."""
        where = "" if include_deleted else "WHERE deleted_at IS NULL"
        rows = self._db.execute(
            f"SELECT {_CONNECTOR_COLUMNS} FROM connectors {where} ORDER BY created_at, connector_id"
        )
        return [_connector(r) for r in rows]

    def delete_connector(self, connector_id: str, now: datetime) -> bool:
        """Mark the connector deleted and revoke its certificates; False if unknown or already deleted."""
        stamp = _to_text(now)
        with self._write(changes="connectors") as db:
            marked = db.execute(
                "UPDATE connectors SET deleted_at = ? WHERE connector_id = ? AND deleted_at IS NULL",
                (stamp, connector_id),
            ).rowcount
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE connector_id = ? AND revoked_at IS NULL",
                (stamp, connector_id),
            )
        return marked == 1

    def certificate_status(self, serial_hex: str, connector_id: str) -> CertificateStatus:
        """Whether a presented client certificate may still be used by this connector."""
        row = self._db.execute(
            "SELECT c.revoked_at, n.deleted_at FROM certificates c "
            "JOIN connectors n ON n.connector_id = c.connector_id "
            "WHERE c.serial_hex = ? AND c.connector_id = ?",
            (serial_hex.lower(), connector_id),
        ).fetchone()
        if row is None:
            return "unknown"
        revoked_at, deleted_at = row
        # Deletion is the more useful thing to tell the connector: it must enrol again.
        if deleted_at is not None:
            return "connector deleted"
        if revoked_at is not None:
            return "revoked"
        return "valid"

    def move_connector(self, connector_id: str, group: str) -> ConnectorRecord:
        """Put a (not deleted) connector in another existing group; returns the updated record."""
        with self._write(changes="connectors") as db:
            self._require_group(db, group)
            changed = db.execute(
                "UPDATE connectors SET group_name = ? WHERE connector_id = ? AND deleted_at IS NULL",
                (group, connector_id),
            ).rowcount
            if not changed:
                raise GatewayError(f"no active connector {connector_id!r}; see `gateway connectors list`")
        return self.get_connector(connector_id)

    def record_status(self, connector_id: str, status: ConnectorStatus, now: datetime) -> ConnectorRecord | None:
        """Store what a node saw of a connector now (also its last_seen); returns the updated record.

        state_since changes only when the state does. None if the connector is unknown.
        """
        stamp = _to_text(now)
        with self._write() as db:
            db.execute(
                "UPDATE connectors SET last_seen = ?,"
                " state_since = CASE WHEN state = ? AND state_since IS NOT NULL THEN state_since ELSE ? END,"
                " state = ?, software_version = ?, address = ?, tunnels = ?, open_streams = ?,"
                " node_id = ?, cert_serial = ?, cert_not_after = ? WHERE connector_id = ?",
                (
                    stamp, status.state, stamp, status.state, status.software_version, status.address,
                    status.tunnels, status.open_streams, status.node_id,
                    None if status.cert_serial is None else status.cert_serial.lower(),
                    _opt_text(status.cert_not_after), connector_id,
                ),
            )
        return self.get_connector(connector_id)

    def mark_inactive(self, connector_id: str, seen_before: datetime, now: datetime) -> bool:
        """Tag a connector inactive if it is not yet and was last seen (or made) at or before `seen_before`."""
        cutoff = _to_text(seen_before)
        with self._write() as db:
            changed = db.execute(
                "UPDATE connectors SET state = 'inactive', state_since = ?, tunnels = 0, open_streams = 0"
                " WHERE connector_id = ? AND deleted_at IS NULL AND state != 'inactive'"
                " AND COALESCE(last_seen, created_at) <= ?",
                (_to_text(now), connector_id, cutoff),
            ).rowcount
        return changed == 1

    def renew_certificate(
        self, serial_hex: str, connector_id: str, issue: Callable[[], tuple[CertificateRecord, R]],
        now: datetime | None = None,
    ) -> R:
        """Store a further certificate for a connector that presented `serial_hex`, all or nothing.

        Raises GatewayError naming the status unless that certificate is still valid (known, not
        revoked, connector not deleted). The presented certificate stays valid until it expires
        (tunnels made with it carry on); every other one of the connector's certificates is
        revoked, so a connector holds at most two valid certificates: the one it renewed with
        and the new one.
        """
        with self._write(changes="connectors") as db:
            status = self.certificate_status(serial_hex, connector_id)
            if status != "valid":
                raise GatewayError(f"certificate {serial_hex} of connector {connector_id} is {status}")
            certificate, result = issue()
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE connector_id = ? AND revoked_at IS NULL"
                " AND serial_hex != ?",
                (_to_text(now or datetime.now(UTC)), connector_id, serial_hex.lower()),
            )
            self._insert_certificate(db, certificate)
        return result

    def touch_connector(self, connector_id: str, now: datetime) -> None:
        """Record that the connector was just seen."""
        with self._write() as db:
            db.execute(
                "UPDATE connectors SET last_seen = ? WHERE connector_id = ?", (_to_text(now), connector_id)
            )

    # internals

    # session log switches

    def set_session_log(self, scope: str, name: str, enabled: bool, now: datetime) -> None:
        """Switch the session log of a group or a connector (scope "group" or "connector")."""
        with self._write(changes="log_switches") as db:
            db.execute(
                "INSERT INTO session_log_switches (scope, name, enabled, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (scope, name) DO UPDATE SET enabled = excluded.enabled, updated_at = excluded.updated_at",
                (scope, name, int(enabled), _to_text(now)),
            )

    def clear_session_log(self, scope: str, name: str) -> bool:
        """Forget a switch (a connector then follows its group); whether there was one."""
        with self._write(changes="log_switches") as db:
            return db.execute("DELETE FROM session_log_switches WHERE scope = ? AND name = ?",
                              (scope, name)).rowcount > 0

    def session_log_switches(self) -> dict[tuple[str, str], bool]:
        """Every switch: {(scope, name): enabled}."""
        rows = self._db.execute("SELECT scope, name, enabled FROM session_log_switches")
        return {(scope, name): bool(enabled) for scope, name, enabled in rows}

    # connector updates: a group's lease and halt

    def acquire_update_lease(self, group: str, connector_id: str, version: str, expires_at: datetime,
                             now: datetime, decide: LeaseDecision) -> str | None:
        """Give `connector_id` the update lease of `group` until `expires_at` unless
        ``decide(live lease or None, halted version or None)`` returns a refusal, which is returned.

        The group's row is locked while `decide` runs, so two nodes deciding for one group at
        once decide one after the other and the second sees the first's lease.
        """
        with self._write(serialised=False) as db:
            db.execute("INSERT INTO update_groups (group_name) VALUES (?) ON CONFLICT DO NOTHING", (group,))
            row = db.execute("SELECT lease_connector, lease_version, lease_expires, halted_version FROM update_groups"
                             f" WHERE group_name = ?{self._row_lock}", (group,)).fetchone()
            holder, held_version, until, halted = row[0], row[1], _from_text(row[2]), row[3]
            lease = UpdateLease(holder, held_version, until) if holder is not None and until > now else None
            refusal = decide(lease, halted)
            if refusal is None:
                db.execute("UPDATE update_groups SET lease_connector = ?, lease_version = ?, lease_expires = ?"
                           " WHERE group_name = ?", (connector_id, version, _to_text(expires_at), group))
        return refusal

    def release_update_lease(self, group: str, connector_id: str, failed_version: str | None, now: datetime) -> None:
        """End `connector_id`'s lease of `group` (if it holds it); with `failed_version`, halt
        the group's rollout of that version too."""
        with self._write(serialised=False) as db:
            db.execute("UPDATE update_groups SET lease_connector = NULL, lease_version = NULL, lease_expires = NULL"
                       " WHERE group_name = ? AND lease_connector = ?", (group, connector_id))
            if failed_version is not None:
                db.execute("INSERT INTO update_groups (group_name, halted_version, halted_at) VALUES (?, ?, ?)"
                           " ON CONFLICT (group_name) DO UPDATE SET halted_version = excluded.halted_version,"
                           " halted_at = excluded.halted_at", (group, failed_version, _to_text(now)))

    def update_halt(self, group: str) -> str | None:
        """The version whose rollout to `group` is halted, or None."""
        row = self._db.execute("SELECT halted_version FROM update_groups WHERE group_name = ?", (group,)).fetchone()
        return None if row is None else row[0]

    def lift_update_halt(self, group: str) -> str | None:
        """Let the rollout to `group` go on (`gateway update resume`); the version that was halted, or None."""
        with self._write(serialised=False) as db:
            row = db.execute(f"SELECT halted_version FROM update_groups WHERE group_name = ?{self._row_lock}",
                             (group,)).fetchone()
            if row is None or row[0] is None:
                return None
            db.execute("UPDATE update_groups SET halted_version = NULL, halted_at = NULL WHERE group_name = ?",
                       (group,))
        return row[0]

    # browser sign-in codes (only their hashes)

    def add_login_code(self, code_hash: str, code: LoginCode, now: datetime, limit: int) -> None:
        """Keep a new one-time sign-in code; expired ones go, and the oldest beyond `limit`."""
        with self._write(serialised=False) as db:
            db.execute("DELETE FROM login_codes WHERE expires_at <= ?", (_to_text(now),))
            _drop_oldest(db, "login_codes", "code_hash", limit)
            db.execute("INSERT INTO login_codes (code_hash, identity, challenge, expires_at) VALUES (?, ?, ?, ?)",
                       (code_hash, _definition_text(code.identity), code.challenge, _to_text(code.expires_at)))

    def take_login_code(self, code_hash: str, now: datetime) -> LoginCode | None:
        """The code's sign-in if it is known and not expired at `now`, else None; the code is
        spent either way. One statement deletes and returns it, so of two nodes taking one
        code at once only one gets it."""
        with self._write(serialised=False) as db:
            row = db.execute("DELETE FROM login_codes WHERE code_hash = ? RETURNING identity, challenge, expires_at",
                             (code_hash,)).fetchone()
        if row is None:
            return None
        code = LoginCode(json.loads(row[0]), row[1], _from_text(row[2]))
        return code if code.expires_at > now else None

    # status page sessions (only their ids' hashes)

    def add_admin_session(self, session_hash: str, session: AdminSession, now: datetime, limit: int) -> None:
        """Keep a new status page session; expired ones go, and the oldest beyond `limit`."""
        with self._write(serialised=False) as db:
            db.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (_to_text(now),))
            _drop_oldest(db, "admin_sessions", "session_hash", limit)
            db.execute("INSERT INTO admin_sessions (session_hash, token_id, created_at, expires_at)"
                       " VALUES (?, ?, ?, ?)",
                       (session_hash, session.token_id, _to_text(session.created_at), _to_text(session.expires_at)))

    def get_admin_session(self, session_hash: str, now: datetime) -> AdminSession | None:
        """The session if it exists and has not expired at `now`."""
        row = self._db.execute("SELECT token_id, created_at, expires_at FROM admin_sessions WHERE session_hash = ?"
                               " AND expires_at > ?", (session_hash, _to_text(now))).fetchone()
        return None if row is None else AdminSession(row[0], _from_text(row[1]), _from_text(row[2]))

    def end_admin_session(self, session_hash: str) -> bool:
        """Sign one session out; whether there was one."""
        with self._write(serialised=False) as db:
            return db.execute("DELETE FROM admin_sessions WHERE session_hash = ?", (session_hash,)).rowcount == 1

    def end_admin_sessions_of(self, token_id: str) -> int:
        """Sign out every session of an admin token; how many there were."""
        with self._write(serialised=False) as db:
            return db.execute("DELETE FROM admin_sessions WHERE token_id = ?", (token_id,)).rowcount

    # the service's nodes

    def record_node(self, node_id: str, tunnel_address: str, started: datetime, now: datetime) -> None:
        """Say that node `node_id` is alive now and takes tunnels at `tunnel_address`; a node
        new to the store is announced to the others at once (a heartbeat is not)."""
        with self._write(serialised=False) as db:
            refreshed = db.execute(
                "UPDATE nodes SET tunnel_address = ?, started = ?, last_seen = ? WHERE node_id = ?",
                (tunnel_address, _to_text(started), _to_text(now), node_id),
            ).rowcount
            if not refreshed:
                db.execute(
                    f"INSERT INTO nodes ({_NODE_COLUMNS}) VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                    " tunnel_address = excluded.tunnel_address, started = excluded.started,"
                    " last_seen = excluded.last_seen",
                    (node_id, tunnel_address, _to_text(started), _to_text(now)),
                )
                self._notify(db, "nodes")

    def list_nodes(self, seen_since: datetime | None = None) -> list[NodeRecord]:
        """The nodes (those seen at or after `seen_since` only, if given), by node id."""
        where, args = ("WHERE last_seen >= ?", (_to_text(seen_since),)) if seen_since is not None else ("", ())
        rows = self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes {where} ORDER BY node_id", args)
        return [_node(r) for r in rows]

    def remove_node(self, node_id: str) -> bool:
        """Forget a node (it stopped cleanly); whether there was a row."""
        with self._write(serialised=False, changes="nodes") as db:
            return db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)).rowcount == 1

    # the CA every node shares

    def recorded_ca(self) -> str | None:
        """The fingerprint of the CA the nodes on this store use, or None before the first node."""
        row = self._db.execute("SELECT fingerprint FROM service_ca ORDER BY recorded_at LIMIT 1").fetchone()
        return None if row is None else row[0]

    def claim_ca(self, fingerprint: str, certificate_pem: str, now: datetime) -> str:
        """Record this CA as the nodes' one unless one is recorded already; the recorded one's fingerprint."""
        with self._write() as db:
            row = db.execute("SELECT fingerprint FROM service_ca ORDER BY recorded_at LIMIT 1").fetchone()
            if row is not None:
                return row[0]
            db.execute("INSERT INTO service_ca (fingerprint, certificate, recorded_at) VALUES (?, ?, ?)",
                       (fingerprint, certificate_pem, _to_text(now)))
        return fingerprint

    def _notify(self, db: Any, changes: str) -> None:
        """Tell the other nodes, on commit, what the open transaction changed; one node
        (SQLite) has no one to tell."""

    def _migrate(self) -> tuple[int, int]:
        """Bring the schema to SCHEMA_VERSION in one transaction; the versions before and after."""
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise GatewayError(
                    f"{self.location}: database schema version {version} is newer than this gateway "
                    f"understands ({SCHEMA_VERSION}): upgrade gateway"
                )
            for statement in schema.statements(self.dialect, version):
                db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return version, SCHEMA_VERSION

    @staticmethod
    def _move_rows(db: sqlite3.Connection, old: str, new: str) -> int:
        moved = db.execute("UPDATE connectors SET group_name = ? WHERE group_name = ?", (new, old)).rowcount
        db.execute("UPDATE tokens SET group_name = ? WHERE group_name = ?", (new, old))
        db.execute("UPDATE apps SET group_name = ? WHERE group_name = ?", (new, old))
        return moved

    @staticmethod
    def _require_group(db: sqlite3.Connection, group: str) -> None:
        if db.execute("SELECT 1 FROM groups WHERE name = ?", (group,)).fetchone() is None:
            raise GatewayError(f"no group named {group!r}: create the group first")

    def _redeemable_token(self, db: Any, token_id: str, secret: str, now: datetime) -> TokenRecord:
        row = db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?{self._row_lock}",
                         (token_id,)).fetchone()
        # A wrong secret looks exactly like a missing token, so guessing ids teaches nothing.
        if row is None or not secret_matches(secret, row[1]):
            raise EnrolmentError(
                "unknown token: copy the whole token again, or create a new one on the service"
            )
        token = _token(row)
        if token.used_at is not None:
            raise EnrolmentError(
                f"token already used (at {token.used_at.isoformat()}): create a new token on the service"
            )
        if now >= token.expires_at:
            raise EnrolmentError(
                f"token expired at {token.expires_at.isoformat()}: create a new token on the service"
            )
        return token

    @staticmethod
    def _insert_connector(db: sqlite3.Connection, c: ConnectorRecord) -> None:
        db.execute(
            f"INSERT INTO connectors ({_CONNECTOR_COLUMNS}) VALUES ({', '.join('?' * 15)})",
            (
                c.connector_id,
                c.name,
                c.group,
                _to_text(c.created_at),
                _opt_text(c.last_seen),
                _opt_text(c.deleted_at),
                c.state,
                _opt_text(c.state_since),
                c.software_version,
                c.address,
                c.tunnels,
                c.open_streams,
                c.node_id,
                c.cert_serial,
                _opt_text(c.cert_not_after),
            ),
        )

    @staticmethod
    def _insert_certificate(db: sqlite3.Connection, c: CertificateRecord) -> None:
        db.execute(
            "INSERT INTO certificates (serial_hex, connector_id, not_after, revoked_at) VALUES (?, ?, ?, ?)",
            (c.serial_hex.lower(), c.connector_id, _to_text(c.not_after), _opt_text(c.revoked_at)),
        )


@define
class SQLiteStore(SQLStore):
    """Gateway state in one SQLite file, shared with the `gateway` CLI while the service runs."""

    path: Path = field(converter=Path)
    _db: sqlite3.Connection = field(init=False, repr=False)
    migrated: tuple[int, int] = field(init=False, default=(0, 0))

    def __attrs_post_init__(self) -> None:
        # check_same_thread=False: ThreadedStore uses this from its one pool thread.
        # isolation_level=None: we issue BEGIN ourselves, so every transaction is explicit.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # WAL lets the CLI read while the service writes (and vice versa).
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self.migrated = self._migrate()

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        self._db.close()

    @contextmanager
    def _write(self, serialised: bool = True, changes: str = "") -> Iterator[sqlite3.Connection]:
        # `changes` (what the write changes) is for other nodes; SQLite has one node, which
        # reads the store again every config_interval.
        # IMMEDIATE takes the write lock up front, so two processes that both read
        # "token unused" cannot both go on to redeem it: the second waits, then sees it used.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def location(self) -> str:
        return str(self.path)

    def columns(self, table: str) -> list[str]:
        """The column names of ``table``, in order."""
        return [row[1] for row in self._db.execute(f"PRAGMA table_info({table})").fetchall()]


_APP_COLUMNS = "name, group_name, definition, created_at, updated_at"
_USER_CREDENTIAL_COLUMNS = (
    'credential_id, "user", kind, identity, secret_hash, created_at, expires_at, revoked_at, name'
)
_ADMIN_TOKEN_COLUMNS = "token_id, name, secret_hash, created_at, expires_at, revoked_at, role"
_TOKEN_COLUMNS = "token_id, secret_hash, group_name, created_at, expires_at, used_at, used_by"
_NODE_COLUMNS = "node_id, tunnel_address, started, last_seen"
_CONNECTOR_COLUMNS = (
    "connector_id, name, group_name, created_at, last_seen, deleted_at, state, state_since,"
    " software_version, address, tunnels, open_streams, node_id, cert_serial, cert_not_after"
)


def _to_text(when: datetime) -> str:
    # Fixed-width ISO-8601 UTC, so text order is time order.
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: the store only takes timezone-aware times")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _opt_text(when: datetime | None) -> str | None:
    return None if when is None else _to_text(when)


def _from_text(text: str | datetime | None) -> datetime | None:
    # PostgreSQL's timestamptz columns come back as datetimes, SQLite's as our ISO text.
    if text is None or isinstance(text, datetime):
        return None if text is None else text.astimezone(UTC)
    return datetime.fromisoformat(text)


def _drop_oldest(db: Any, table: str, key: str, limit: int) -> None:
    """Delete the rows of `table` that expire first until one more fits under `limit`."""
    count = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    if count >= limit:
        db.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} ORDER BY expires_at LIMIT ?)",
                   (count - limit + 1,))


def _group(row: Any) -> GroupRecord:
    return GroupRecord(row[0], _from_text(row[1]))


def _token(row: Any) -> TokenRecord:
    token_id, secret_hash, group, created, expires, used_at, used_by = row
    return TokenRecord(
        token_id, secret_hash, group, _from_text(created), _from_text(expires), _from_text(used_at), used_by
    )


def _connector(row: Any) -> ConnectorRecord:
    (connector_id, name, group, created, last_seen, deleted_at, state, state_since, version, address,
     tunnels, open_streams, node_id, cert_serial, cert_not_after) = row
    return ConnectorRecord(
        connector_id, name, group, _from_text(created), _from_text(last_seen), _from_text(deleted_at),
        state=state, state_since=_from_text(state_since), software_version=version, address=address,
        tunnels=tunnels, open_streams=open_streams, node_id=node_id, cert_serial=cert_serial,
        cert_not_after=_from_text(cert_not_after),
    )


def _definition_text(definition: dict[str, Any]) -> str:
    # sort_keys: the same app is the same text, whatever order the command built it in.
    return json.dumps(definition, sort_keys=True, separators=(",", ":"))


def _app(row: Any) -> AppRecord:
    name, group, definition, created, updated = row
    return AppRecord(name, group, json.loads(definition), _from_text(created), _from_text(updated))


def _user_credential(row: Any) -> UserCredentialRecord:
    credential_id, user, kind, identity, secret_hash, created, expires, revoked, name = row
    return UserCredentialRecord(credential_id, user, kind, json.loads(identity), secret_hash, _from_text(created),
                                _from_text(expires), _from_text(revoked), name)


def _admin_token(row: Any) -> AdminTokenRecord:
    token_id, name, secret_hash, created, expires, revoked, role = row
    return AdminTokenRecord(token_id, name, secret_hash, _from_text(created), _from_text(expires), _from_text(revoked),
                            role)


def _node(row: Any) -> NodeRecord:
    node_id, tunnel_address, started, last_seen = row
    return NodeRecord(node_id, tunnel_address, _from_text(started), _from_text(last_seen))

"""Rows of the gateway store as immutable values. All times are timezone-aware UTC."""

from __future__ import annotations

from datetime import datetime

from typing import Any

from attrs import field, frozen


@frozen
class GroupRecord:
    """A named set of connectors that apps are routed through."""

    name: str
    created_at: datetime


@frozen
class TokenRecord:
    """An enrolment token; only the hash of its secret is ever stored."""

    token_id: str
    secret_hash: str
    group: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    used_by: str | None = None  # connector_id that redeemed it


@frozen
class ConnectorRecord:
    """An enrolled connector; deletion is a mark so its history stays readable."""

    connector_id: str
    name: str
    group: str
    created_at: datetime
    last_seen: datetime | None = None  # the last hello or heartbeat on any tunnel
    deleted_at: datetime | None = None
    # Status, as the service node saw it at last_seen (see ConnectorStatus).
    state: str = "active"  # "active" | "draining" | "inactive"
    state_since: datetime | None = None
    software_version: str | None = None
    address: str | None = None  # host:port of its last tunnel, as the node saw it
    tunnels: int = 0  # live tunnels on node_id
    open_streams: int = 0
    node_id: str | None = None
    cert_serial: str | None = None  # the certificate its tunnels presented
    cert_not_after: datetime | None = None


CONNECTOR_STATES = ("active", "draining", "inactive")


@frozen
class ConnectorStatus:
    """What a service node reports about a connector on hello, heartbeats and tunnel changes."""

    state: str  # "active" or "draining" ("inactive" is only set by the sweeper)
    software_version: str | None
    address: str | None
    tunnels: int
    open_streams: int
    node_id: str | None
    cert_serial: str | None
    cert_not_after: datetime | None


@frozen
class CertificateRecord:
    """A client certificate issued to a connector."""

    serial_hex: str
    connector_id: str
    not_after: datetime
    revoked_at: datetime | None = None


@frozen
class AppRecord:
    """An app published with `gateway apps add` rather than in the TOML file.

    `definition` holds the app's other ``[[apps]]`` keys (external_url, internal_url, options,
    ...) exactly as a TOML table would give them, so the service parses it with the same code
    and the same checks as the file. The group is a column of its own so that renaming a
    group carries its apps along.
    """

    name: str
    group: str
    definition: dict[str, Any] = field(hash=False)
    created_at: datetime
    updated_at: datetime


USER_CREDENTIAL_KINDS = ("token", "login")


@frozen
class UserCredentialRecord:
    """What lets a Private Access user get certificates: a personal token an admin issued
    (``kind = "token"``) or a browser sign-in's refresh credential (``"login"``). Only the hash of
    its secret is stored; ``identity`` is the user as signed in (sub, name, email,
    email_verified, groups), which assignments are checked against."""

    credential_id: str
    user: str  # the subject
    kind: str
    identity: dict[str, Any] = field(hash=False)
    secret_hash: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    name: str = ""  # what the admin called it (tokens)


@frozen
class AdminTokenRecord:
    """A token for the admin API and the status page (`gateway admin token create`); only the
    hash of its secret is stored."""

    token_id: str
    name: str  # what the admin called it: who or what holds it
    secret_hash: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    role: str = "admin"  # ADMIN_ROLES: "read" reads (GET) and changes nothing


# What an admin token may do: "admin" everything, "read" the API's GET routes and the status page.
ADMIN_ROLES = ("admin", "read")


@frozen
class NodeRecord:
    """A service node sharing the store: the tunnel address connectors should dial
    ([service] advertise), when it started and when its heartbeat last wrote the row."""

    node_id: str
    tunnel_address: str
    started: datetime
    last_seen: datetime


@frozen
class UpdateLease:
    """The one connector of a group allowed to update now, to which version, until when."""

    connector_id: str
    version: str
    expires_at: datetime


@frozen
class LoginCode:
    """What a browser sign-in's one-time code was issued for: the user as signed in and the
    PKCE challenge of the client that started it. The code itself is stored only hashed."""

    identity: dict[str, Any] = field(hash=False)
    challenge: str
    expires_at: datetime


@frozen
class AdminSession:
    """A status page sign-in: the admin token behind it and when it ends. The session id (the
    cookie) is stored only hashed."""

    token_id: str
    created_at: datetime
    expires_at: datetime

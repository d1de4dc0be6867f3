"""Rows of the gateway store as immutable values. All times are timezone-aware UTC."""

from __future__ import annotations

from datetime import datetime

from attrs import frozen


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
    last_seen: datetime | None = None
    deleted_at: datetime | None = None


@frozen
class CertificateRecord:
    """A client certificate issued to a connector."""

    serial_hex: str
    connector_id: str
    not_after: datetime
    revoked_at: datetime | None = None

"""Pre-authentication of web-app requests (stub: every app is passthrough until OIDC lands).

The front door asks ``Gate.check`` about every request before it opens a stream, so
unauthenticated traffic never reaches a connector.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred, succeed

SECTION_KEYS: tuple[str, ...] = ()

Headers = list[tuple[bytes, bytes]]


@frozen
class Identity:
    """Who signed in: what the connector and SSO plugins learn of a user."""

    subject: str
    name: str = ""
    email: str = ""
    groups: tuple[str, ...] = ()
    claims: dict[str, Any] = field(factory=dict, hash=False)

    def to_metadata(self) -> dict[str, Any]:
        return {"sub": self.subject, "name": self.name, "email": self.email, "groups": list(self.groups)}


@frozen
class Allow:
    """Forward the request: as whom (None for passthrough) and with which headers (None: unchanged)."""

    identity: Identity | None = None
    headers: Headers | None = None


@frozen
class Respond:
    """Answer the request at the front door (a redirect to sign in, a 403, the JWKS document...)."""

    status: int
    headers: Headers = field(factory=list)
    body: bytes = b""


def parse_section(table: dict, error: Any) -> dict:
    return {}


def check_app_options(app: Any) -> None:
    return None


class PassthroughGate:
    def check(self, request: Any, app: Any, external: Any, client_host: str) -> Deferred:
        return succeed(Allow())


def build_gate(section: dict, apps: list[Any], config: Any, reactor: Any) -> Any:
    return PassthroughGate()

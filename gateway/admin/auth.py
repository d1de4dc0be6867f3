"""Who may use the admin API and the status page.

The API takes an admin token in ``Authorization: Bearer``, nothing else: a browser's cookie never
authenticates an API call, so the API needs no CSRF defence. The status page signs in with the
same token through a form and then holds a random session id in an HttpOnly, SameSite=Strict
cookie (Secure over HTTPS), kept hashed in the store so that every node knows it; the token
behind a session is checked again on every page, and revoking it deletes its sessions, so a
revoked token signs its sessions out. Forms that change state carry a CSRF token: the sign-in
form a double-submit one (cookie and field must match), later forms the session's own; and a
request whose Origin is another site's is refused whatever it carries.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from attrs import define, field, frozen

from gateway.errors import AdminTokenError
from gateway.pki.tokens import AdminToken, hash_secret
from gateway.store.records import AdminSession

SESSION_COOKIE = b"gateway_admin_session"
SIGNIN_CSRF_COOKIE = b"gateway_admin_csrf"
MAX_SESSIONS = 1000
CREATE_HINT = "create one on the service with `gateway admin token create`"


@frozen
class Refusal:
    """Why a request is refused: an HTTP status, a stable code and what to do about it."""

    status: int
    code: str
    message: str

    def body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


MISSING_TOKEN = Refusal(401, "missing_token", "this API needs an admin token: send it as `Authorization: Bearer"
                                              f" TOKEN` ({CREATE_HINT})")


def bearer_token(header: bytes | None) -> str | Refusal:
    """The token text of an ``Authorization: Bearer`` header, or the refusal for its absence."""
    if header is None:
        return MISSING_TOKEN
    scheme, _, value = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return Refusal(401, "missing_token", f"expected `Authorization: Bearer TOKEN`, got the {scheme!r} scheme:"
                                             f" send an admin token ({CREATE_HINT})")
    return value.strip()


def parse_admin_token(text: str, ca_fingerprint: str) -> AdminToken:
    """The admin token in `text` if it is well-formed and names this service's CA; AdminTokenError otherwise."""
    token = AdminToken.parse(text)
    if token.ca_fingerprint != ca_fingerprint:
        # Another gateway's token: the same answer as an unknown one.
        raise AdminTokenError("unknown", f"unknown admin token: it was made by another gateway's CA; {CREATE_HINT}")
    return token


def token_refusal(error: AdminTokenError) -> Refusal:
    """The 401 for a token the store turned down (unknown, revoked or expired)."""
    return Refusal(401, f"{error.code}_token", str(error))


@frozen
class Session:
    """A status page sign-in: whose token, the CSRF token of its forms, when it ends (epoch seconds)."""

    session_id: str = field(repr=False)
    token_id: str
    csrf: str = field(repr=False)
    expires: float


def session_csrf(session_id: str) -> str:
    """The CSRF token of a session's forms, derived from its id: only the cookie's holder can
    know it, and nothing secret is stored beside the id's hash."""
    return hmac.new(session_id.encode("utf-8", "replace"), b"gateway admin csrf", hashlib.sha256).hexdigest()


@define
class Sessions:
    """The status page's sign-ins, kept in the store every node shares (a session made at one
    node works at the others and survives a node restart), only as hashes of their ids; they
    expire by themselves, end with their admin token's revocation, and beyond ``max_sessions``
    the oldest go first so that sign-ins cannot grow the store."""

    node: Any
    lifetime: float
    max_sessions: int = MAX_SESSIONS

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.node.reactor.seconds(), UTC)

    async def create(self, token_id: str) -> Session:
        now = self._now()
        session_id = secrets.token_urlsafe(32)
        stored = AdminSession(token_id, now, now + timedelta(seconds=self.lifetime))
        await self.node.store.add_admin_session(hash_secret(session_id), stored, now, self.max_sessions)
        return Session(session_id, token_id, session_csrf(session_id), stored.expires_at.timestamp())

    async def get(self, session_id: str | None) -> Session | None:
        """The live session with this id; None for an unknown, forged or expired one."""
        if not session_id:
            return None
        stored = await self.node.store.get_admin_session(hash_secret(session_id), self._now())
        if stored is None:
            return None
        return Session(session_id, stored.token_id, session_csrf(session_id), stored.expires_at.timestamp())

    async def end(self, session_id: str) -> None:
        await self.node.store.end_admin_session(hash_secret(session_id))

    async def end_token(self, token_id: str) -> None:
        """Sign out every session of a token (it was revoked or expired)."""
        await self.node.store.end_admin_sessions_of(token_id)


def same_secret(given: str | None, expected: str | None) -> bool:
    """Whether two CSRF tokens are present and equal, in constant time."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def foreign_origin(origin: bytes | None, own: str) -> bool:
    """Whether a request's Origin header names another site than ``own`` (scheme://host[:port]).
    A missing Origin is not foreign (older clients); the CSRF token still has to match."""
    if origin is None:
        return False
    return origin.decode("latin-1").strip().rstrip("/").lower() != own.lower()

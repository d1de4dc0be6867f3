"""Who may use the admin API and the status page.

The API takes an admin token in ``Authorization: Bearer``, nothing else: a browser's cookie never
authenticates an API call, so the API needs no CSRF defence. The status page signs in with the
same token through a form and then holds a random session id in an HttpOnly, SameSite=Strict
cookie (Secure over HTTPS); the token behind a session is checked again on every page, so a
revoked token signs its sessions out. Forms that change state carry a CSRF token: the sign-in
form a double-submit one (cookie and field must match), later forms the session's own; and a
request whose Origin is another site's is refused whatever it carries.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from typing import Any

from attrs import define, field, frozen

from gateway.errors import AdminTokenError
from gateway.pki.tokens import AdminToken

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


@define
class Sessions:
    """The status page's sign-ins, in memory (a node restart signs everyone out), oldest dropped
    first beyond ``max_sessions`` so that sign-ins cannot grow the node's memory."""

    clock: Any
    lifetime: float
    max_sessions: int = MAX_SESSIONS
    _by_id: OrderedDict[str, Session] = field(factory=OrderedDict, init=False)

    def create(self, token_id: str) -> Session:
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), token_id, secrets.token_urlsafe(32),
                          self.clock.seconds() + self.lifetime)
        self._by_id[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id; None for an unknown, forged or expired one."""
        session = self._by_id.get(session_id or "")
        if session is None:
            return None
        if self.clock.seconds() >= session.expires:
            del self._by_id[session.session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def end_token(self, token_id: str) -> None:
        """Sign out every session of a token (it was revoked or expired)."""
        for session_id in [s.session_id for s in self._by_id.values() if s.token_id == token_id]:
            del self._by_id[session_id]


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

"""Private Access users on the service: browser sign-in codes and certificates for credentials.

A user's client never holds a long-lived secret the service could not revoke: it trades a
credential (a one-time sign-in code from the browser flow, a personal token an admin issued,
or the refresh secret a sign-in left it) for a short-lived certificate of the service CA whose
CN names the credential. The credential lives in the store; revoking it cuts the tunnels of
its certificates at the next check (docs/protocol.md, *Private Access*).
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import GatewayError
from gateway.pki import keys
from gateway.pkce import s256
from gateway.pki.tokens import UserToken, hash_secret
from gateway.store.records import LoginCode, UserCredentialRecord

USER_CERTIFICATE_REQUEST = "user_certificate_request"
USER_CERTIFICATE = "user_certificate"

# A browser sign-in's code: used once, soon after the redirect to the loopback address.
CODE_LIFETIME = 120.0
MAX_PENDING_CODES = 1024
_ID_BYTES = 8


class Refused(GatewayError):
    """A credential that buys no certificate; ``code`` is the error code the client gets."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LoginCodes:
    """One-time codes the front door hands a signed-in browser for the user's loopback client.

    Kept in the store (so a code made at one node is redeemed at any other), only as hashes,
    bounded (the oldest go first) and short-lived; taking a code deletes it in the same
    statement, so of two nodes redeeming one code at once only one gets it. A code is bound to
    the PKCE challenge of the client that started the sign-in, so a code read off the browser's
    history is useless to anyone without the client's verifier.
    """

    def __init__(self, store: Any, clock: Any, lifetime: float = CODE_LIFETIME, limit: int = MAX_PENDING_CODES) -> None:
        self.store = store
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def issue(self, identity: dict[str, Any], challenge: str) -> Deferred:
        """Fires with a new code for `identity`, once the store holds its hash."""
        now = self._now()
        code = secrets.token_urlsafe(32)
        pending = LoginCode(dict(identity), challenge, now + timedelta(seconds=self.lifetime))
        return self.store.add_login_code(hash_secret(code), pending, now, self.limit).addCallback(lambda _: code)

    def redeem(self, code: str, verifier: str) -> Deferred:
        """Fires with the identity the code was issued for; fails with Refused when it is unknown,
        used, expired or the verifier does not match (the code is spent either way)."""
        return self.store.take_login_code(hash_secret(code), self._now()).addCallback(self._check, verifier)

    @staticmethod
    def _check(pending: LoginCode | None, verifier: str) -> dict[str, Any]:
        if pending is None:
            raise Refused("not_signed_in", "this sign-in code is unknown, used or expired: run gateway login again")
        if not verifier.isascii() or not hmac.compare_digest(s256(verifier), pending.challenge):
            raise Refused("not_signed_in", "this sign-in code was issued to another client (PKCE verifier"
                                           " mismatch): run gateway login again")
        return pending.identity


@frozen
class LoginPortal:
    """What the HTTP front door needs to finish `gateway login`; plugins get it as ``access`` in
    gateway_service_listeners (None when the service has no ``[access]`` table)."""

    url: str           # [access] url: where users point gateway login --service
    tunnel: str        # host:port their clients dial for the tunnel
    server_name: str   # the name the client checks the node certificate against
    ca_fingerprint: str
    issue_code: Any    # (identity: dict, code_challenge: str) -> Deferred firing with a one-time code

    @classmethod
    def from_config(cls, config: Any, ca_fingerprint: str, issue_code: Any) -> LoginPortal | None:
        access = getattr(config, "access", None)
        if access is None or not access.url:
            return None   # personal tokens only: no browser sign-in page
        host = access.tunnel.rsplit(":", 1)[0].strip("[]")
        return cls(access.url, access.tunnel, host, ca_fingerprint, issue_code)


def parse_request(message: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The CSR and the credential of a user_certificate_request; Refused("bad_request") if malformed."""
    if message.get("type") != USER_CERTIFICATE_REQUEST:
        raise Refused("bad_request", f"expected a {USER_CERTIFICATE_REQUEST}, got {message.get('type')!r}")
    csr = message.get("csr")
    credential = message.get("credential")
    if not isinstance(csr, str) or not isinstance(credential, dict):
        raise Refused("bad_request", "a user_certificate_request needs a PEM 'csr' and a 'credential' object")
    kind = credential.get("kind")
    wanted = {"code": ("code", "verifier"), "token": ("token",), "refresh": ("id", "secret")}.get(kind)
    if wanted is None:
        raise Refused("bad_request", f"credential kind must be code, token or refresh, got {kind!r}")
    for key in wanted:
        if not isinstance(credential.get(key), str) or not credential[key] or len(credential[key]) > 512:
            raise Refused("bad_request", f"credential of kind {kind} needs a string {key!r}")
    return csr.encode("ascii", "replace"), credential


class UserAuthority:
    """Issues user certificates for credentials; the service's half of `gateway login`."""

    log = Logger()

    def __init__(self, node: Any) -> None:
        self.node = node

    @property
    def codes(self) -> LoginCodes:
        # The node opens its store after making this; the codes live there, not here.
        return LoginCodes(self.node.store, self.node.reactor)

    @property
    def access(self) -> Any:
        return self.node.config.access

    def handle(self, message: dict[str, Any], address: str) -> Deferred:
        """Fires with the reply message for a user_certificate_request; never fails."""
        now = datetime.now(UTC)
        try:
            csr, credential = parse_request(message)
        except Refused as e:
            return succeed(self._refused(Failure(e), address))
        d = maybeDeferred(self._credential, credential, now)
        d.addCallback(self._issue, csr, now)
        return d.addErrback(self._refused, address)

    def _credential(self, credential: dict[str, Any], now: datetime) -> Deferred:
        """Fires with (record, new refresh secret or None) for a usable credential."""
        kind = credential["kind"]
        if kind == "code":
            return self.codes.redeem(credential["code"], credential["verifier"]).addCallback(self._signed_in, now)
        if kind == "token":
            try:
                token = UserToken.parse(credential["token"])
            except GatewayError as e:
                raise Refused("unknown", str(e)) from None
            if token.ca_fingerprint != self.node.ca.fingerprint:
                raise Refused("unknown", "this personal token was made for another service (its CA fingerprint"
                                         " differs): ask your administrator for a token of this service")
            credential_id, secret = token.token_id, token.secret
        else:
            credential_id, secret = credential["id"], credential["secret"]
        d = self.node.store.redeem_user_secret(credential_id, secret, now)
        return d.addCallback(lambda record: (record, None))

    def _signed_in(self, identity: dict[str, Any], now: datetime) -> Deferred:
        """Store the refresh credential of a browser sign-in; fires with (record, its secret)."""
        secret = secrets.token_urlsafe(32)
        record = UserCredentialRecord(
            credential_id=secrets.token_hex(_ID_BYTES), user=str(identity["sub"]), kind="login",
            identity=identity, secret_hash=hash_secret(secret), created_at=now,
            expires_at=now + timedelta(seconds=self.access.login_lifetime), name="browser sign-in",
        )
        return self.node.store.create_user_credential(record).addCallback(lambda _: (record, secret))

    def _issue(self, found: tuple[UserCredentialRecord, str | None], csr: bytes, now: datetime) -> dict[str, Any]:
        record, refresh_secret = found
        lifetime = min(timedelta(seconds=self.access.certificate_lifetime), record.expires_at - now)
        if lifetime <= timedelta(0):
            raise Refused("expired", "this credential has expired: run gateway login again")
        try:
            cert = self.node.ca.issue_user_certificate(csr, record.credential_id, now, lifetime)
        except GatewayError as e:
            raise Refused("bad_request", str(e)) from None
        self.log.info("user {user} got a certificate for credential {credential_id} ({kind}), valid until {until}",
                      user=record.user, credential_id=record.credential_id, kind=record.kind,
                      until=cert.not_valid_after_utc.isoformat(timespec="seconds"))
        reply: dict[str, Any] = {
            "type": USER_CERTIFICATE, "certificate": keys.cert_pem(cert).decode(),
            "ca": keys.cert_pem(self.node.ca.cert).decode(),
            "expires_at": cert.not_valid_after_utc.isoformat(), "user": record.identity,
        }
        if refresh_secret is not None:
            reply["credential"] = {"id": record.credential_id, "secret": refresh_secret,
                                   "expires_at": record.expires_at.isoformat()}
        return reply

    def _refused(self, failure: Failure, address: str) -> dict[str, Any]:
        if failure.check(Refused):
            code, message = failure.value.code, str(failure.value)
        elif failure.check(GatewayError):
            code, message = getattr(failure.value, "code", None) or "unknown", str(failure.value)
        else:
            self.log.failure("user certificate request from {address} failed", failure, address=address)
            code, message = "internal", "internal error on the service; see its log"
        self.log.info("user certificate request from {address} refused: {message}", address=address,
                      message=message)
        return {"type": "error", "code": code, "message": message}

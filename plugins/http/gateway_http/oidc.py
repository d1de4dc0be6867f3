"""The OpenID Connect relying party: settings, the provider client, and id_token checks.

- ``parse_settings`` reads ``[http.oidc]`` (no I/O; the secret file is read by ``load_secret``).
- ``Provider`` talks to the provider with Twisted's Agent (the reactor injected): discovery
  (``/.well-known/openid-configuration``), the JWKS, the token endpoint and userinfo. An
  id_token signed with a key id we do not know makes it fetch the JWKS again (at most once per
  ``JWKS_REFETCH_INTERVAL``), so a provider's key rotation just works.
- ``pkce_pair``, ``authorization_url`` and ``verify_id_token`` are pure.

Never logged: the client secret, codes, tokens.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

import jwt
from attrs import frozen
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.pkce import pkce_pair, s256  # noqa: F401 - part of this module's API

log = Logger(namespace="gateway_http")

KEYS = ("issuer", "client_id", "client_secret_file", "scopes", "groups_claim", "session_lifetime",
        "persistent_session", "ca_file", "emails_verified")
DEFAULT_SCOPES = ("openid", "profile", "email")
DEFAULT_LIFETIME = 8 * 3600
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Asymmetric algorithms only: "none" and HS* (keyed with the client secret) are refused.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_REFETCH_INTERVAL = 60.0
LEEWAY = 60  # seconds of clock skew allowed between us and the provider
FETCH_TIMEOUT = 15.0
MAX_BODY = 1024 * 1024


class SignInError(GatewayError):
    """A sign-in that cannot complete; the message is for the log (no tokens in it)."""


@frozen
class Settings:
    issuer: str
    client_id: str
    client_secret_file: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    groups_claim: str = "groups"
    session_lifetime: int = DEFAULT_LIFETIME
    persistent_session: bool = False
    ca_file: str = ""
    # The provider issues only addresses it has verified (Entra ID work accounts send no
    # email_verified claim): a missing claim then counts as verified; an explicit false never does.
    emails_verified: bool = False


def parse_settings(table: Any, error: Callable[[str, str], Exception]) -> Settings:
    """``[http.oidc]``; ``error(key, expected)`` makes the ConfigError (key relative to [http])."""
    if not isinstance(table, dict):
        raise error("oidc", f"expected a table [http.oidc], got {table!r}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise error(f"oidc.{unknown[0]}", f"unknown key; expected one of {', '.join(KEYS)}")

    def string(key: str, required: bool, default: str = "") -> str:
        value = table.get(key, None)
        if value is None:
            if required:
                raise error(f"oidc.{key}", "expected a value, got nothing (it is required)")
            return default
        if not isinstance(value, str) or not value.strip():
            raise error(f"oidc.{key}", f"expected a non-empty string, got {value!r}")
        return value.strip()

    issuer = string("issuer", True)
    parts = urlsplit(issuer)
    try:
        parts.port
    except ValueError:
        raise error("oidc.issuer", f"expected an https:// URL with a valid port, got {issuer!r}") from None
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        raise error("oidc.issuer", "expected an https:// URL (plain http only for 127.0.0.1 or localhost, "
                                   f"for tests), got {issuer!r}")
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise error("oidc.issuer", f"expected an https:// URL without query or fragment, got {issuer!r}")
    client_id = string("client_id", True)
    secret_file = string("client_secret_file", True)
    scopes_value = table.get("scopes", list(DEFAULT_SCOPES))
    if isinstance(scopes_value, str):
        scopes_value = scopes_value.split()
    if (not isinstance(scopes_value, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes_value)
            or "openid" not in scopes_value):
        raise error("oidc.scopes", f'expected a list of scopes including "openid", got {table.get("scopes")!r}')
    groups_claim = string("groups_claim", False, "groups")
    lifetime = table.get("session_lifetime", DEFAULT_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not 1 <= lifetime <= 400 * 86400:
        raise error("oidc.session_lifetime", f"expected a whole number of seconds from 1 to 34560000 (400 days), got {lifetime!r}")
    persistent = table.get("persistent_session", False)
    if not isinstance(persistent, bool):
        raise error("oidc.persistent_session", f"expected true or false, got {persistent!r}")
    emails_verified = table.get("emails_verified", False)
    if not isinstance(emails_verified, bool):
        raise error("oidc.emails_verified", f"expected true or false, got {emails_verified!r}")
    return Settings(issuer=issuer.rstrip("/") if parts.path in ("", "/") else issuer, client_id=client_id,
                    client_secret_file=secret_file, scopes=tuple(dict.fromkeys(scopes_value)),
                    groups_claim=groups_claim, session_lifetime=lifetime, persistent_session=persistent,
                    ca_file=string("ca_file", False), emails_verified=emails_verified)


def load_secret(path: Path) -> str:
    """The client secret from its file (first line, white space trimmed)."""
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError("the file is empty")
    return text.splitlines()[0].strip()


# -- the authorization request --------------------------------------------------------------------


def random_token() -> str:
    return secrets.token_urlsafe(32)


def authorization_url(metadata: dict[str, Any], settings: Settings, redirect_uri: str, state: str, nonce: str,
                      challenge: str) -> str:
    endpoint = metadata["authorization_endpoint"]
    query = urlencode({
        "response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
        "scope": " ".join(settings.scopes), "state": state, "nonce": nonce,
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    return endpoint + ("&" if "?" in endpoint else "?") + query


# -- id_token ---------------------------------------------------------------------------------------


def find_key(jwks: dict[str, Any], kid: str | None, alg: str) -> dict[str, Any] | None:
    keys = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("use", "sig") == "sig"]
    if kid is not None:
        found = [k for k in keys if k.get("kid") == kid]
    else:
        kty = {"R": "RSA", "P": "RSA", "E": "EC"}.get(alg[:1], "OKP")
        found = [k for k in keys if k.get("kty") == kty]
        found = found if len(found) == 1 else []
    return found[0] if found else None


def token_header(token: str) -> tuple[str | None, str]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as e:
        raise SignInError(f"the id_token is malformed: {e}") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise SignInError(f"the id_token is signed with {alg!r}; expected one of {', '.join(ALGORITHMS)}")
    kid = header.get("kid")
    return (kid if isinstance(kid, str) else None), alg


def verify_id_token(token: str, jwk: dict[str, Any], issuer: str, client_id: str, nonce: str,
                    now: float) -> dict[str, Any]:
    """The claims of an id_token whose signature, iss, aud, azp, exp, iat and nonce check out."""
    _, alg = token_header(token)
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
        claims = jwt.decode(token, key, algorithms=[alg], audience=client_id, issuer=issuer,
                            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                     "require": ["iss", "sub", "aud", "exp", "iat"]})
    except (jwt.InvalidTokenError, jwt.PyJWKError) as e:
        raise SignInError(f"the id_token does not check out: {e}") from None
    aud = claims["aud"]
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != client_id:
        raise SignInError("the id_token has several audiences and azp is not our client_id")
    if not isinstance(claims["exp"], (int, float)) or claims["exp"] + LEEWAY < now:
        raise SignInError("the id_token has expired")
    if not isinstance(claims["iat"], (int, float)) or claims["iat"] - LEEWAY > now:
        raise SignInError("the id_token was issued in the future (check the clocks)")
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise SignInError("the id_token's nonce is not the one we sent")
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise SignInError("the id_token has no subject")
    return claims


# -- the provider over HTTP -------------------------------------------------------------------------


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def make_agent(reactor: Any, settings: Settings, base_dir: Path) -> Agent:
    """An Agent that trusts the system store, or only ``ca_file`` when set."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    if settings.ca_file:
        path = Path(settings.ca_file)
        path = path if path.is_absolute() else base_dir / path
        pem = path.read_bytes()
        certs = [Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + piece)
                 for piece in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certs))
    else:
        policy = BrowserLikePolicyForHTTPS()
    return Agent(reactor, contextFactory=policy, connectTimeout=10, pool=HTTPConnectionPool(reactor, persistent=False))


class Provider:
    """One OpenID provider: its metadata and keys, cached; code exchange; userinfo."""

    def __init__(self, settings: Settings, secret: str, reactor: Any, agent: Any) -> None:
        self.settings = settings
        self.secret = secret
        self.reactor = reactor
        self.agent = agent
        self.metadata: dict[str, Any] | None = None
        self.jwks: dict[str, Any] = {"keys": []}
        self._loading: list[Deferred] | None = None
        self._last_refetch: float | None = None

    # -- plumbing --

    @inlineCallbacks
    def _fetch_json(self, method: bytes, url: str, what: str, headers: dict[bytes, list[bytes]] | None = None,
                    body: bytes | None = None) -> Any:
        d = self.agent.request(method, url.encode("ascii"), Headers(headers or {}),
                               _Bytes(body) if body is not None else None)
        d.addTimeout(FETCH_TIMEOUT, self.reactor)
        try:
            response = yield d
            data = yield readBody(response)
        except Exception as e:
            raise SignInError(f"{what} from {url}: {type(e).__name__}: {e}") from None
        if len(data) > MAX_BODY:
            raise SignInError(f"{what} from {url}: the answer is larger than {MAX_BODY} bytes")
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if response.code != 200:
            error = document.get("error") if isinstance(document, dict) else None
            raise SignInError(f"{what} from {url}: HTTP {response.code}" + (f" ({error})" if error else ""))
        if not isinstance(document, dict):
            raise SignInError(f"{what} from {url}: expected a JSON object")
        return document

    # -- discovery and keys --

    def ready(self) -> Deferred:
        """Fires with the metadata once discovery and the JWKS are loaded; concurrent callers share one fetch."""
        if self.metadata is not None:
            return succeed(self.metadata)
        d: Deferred = Deferred()
        if self._loading is not None:
            self._loading.append(d)
            return d
        self._loading = [d]
        self._discover().addBoth(self._loaded)
        return d

    def _loaded(self, result: Any) -> None:
        waiting, self._loading = self._loading or [], None
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    @inlineCallbacks
    def _discover(self) -> Any:
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        metadata = yield self._fetch_json(b"GET", url, "OpenID discovery")
        if metadata.get("issuer") != self.settings.issuer:
            raise SignInError(f"OpenID discovery from {url}: issuer is {metadata.get('issuer')!r}, "
                              f"expected {self.settings.issuer!r} (http.oidc.issuer)")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = metadata.get(key)
            if not isinstance(value, str) or urlsplit(value).scheme not in ("https", "http"):
                raise SignInError(f"OpenID discovery from {url}: no usable {key}")
            if urlsplit(value).scheme == "http" and urlsplit(value).hostname not in LOOPBACK:
                raise SignInError(f"OpenID discovery from {url}: {key} is plain http")
        methods = metadata.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise SignInError(f"OpenID discovery from {url}: the provider does not support PKCE with S256")
        self.jwks = yield self._fetch_json(b"GET", metadata["jwks_uri"], "the provider's JWKS")
        self.metadata = metadata
        log.info("oidc: provider {issuer} discovered; {count} signing keys", issuer=self.settings.issuer,
                 count=len(self.jwks.get("keys", [])))
        return metadata

    @inlineCallbacks
    def key_for(self, token: str) -> Any:
        """The JWK that signed ``token``; an unknown kid makes us fetch the JWKS again (rate-limited)."""
        kid, alg = token_header(token)
        key = find_key(self.jwks, kid, alg)
        if key is not None:
            return key
        now = self.reactor.seconds()
        if self._last_refetch is not None and now - self._last_refetch < JWKS_REFETCH_INTERVAL:
            raise SignInError(f"the id_token is signed with unknown key {kid!r} (the JWKS was fetched again "
                              f"{now - self._last_refetch:.0f} s ago; next refetch in at most {JWKS_REFETCH_INTERVAL:.0f} s)")
        self._last_refetch = now
        jwks = yield self._fetch_json(b"GET", self.metadata["jwks_uri"], "the provider's JWKS")
        self.jwks = jwks
        log.info("oidc: unknown key id {kid}: fetched the provider's JWKS again; {count} signing keys",
                 kid=kid, count=len(jwks.get("keys", [])))
        key = find_key(jwks, kid, alg)
        if key is None:
            raise SignInError(f"the id_token is signed with key {kid!r}, which the provider's JWKS does not have")
        return key

    # -- the code exchange --

    def _client_auth(self, form: dict[str, str]) -> dict[bytes, list[bytes]]:
        methods = self.metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods:
            from urllib.parse import quote

            pair = f"{quote(self.settings.client_id, safe='')}:{quote(self.secret, safe='')}".encode()
            return {b"Authorization": [b"Basic " + base64.b64encode(pair)]}
        form["client_id"] = self.settings.client_id
        form["client_secret"] = self.secret
        return {}

    @inlineCallbacks
    def exchange(self, code: str, verifier: str, redirect_uri: str) -> Any:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}
        headers = {b"Content-Type": [b"application/x-www-form-urlencoded"], b"Accept": [b"application/json"]}
        headers.update(self._client_auth(form))
        tokens = yield self._fetch_json(b"POST", self.metadata["token_endpoint"], "the token request",
                                        headers, urlencode(form).encode("ascii"))
        if not isinstance(tokens.get("id_token"), str):
            raise SignInError("the token response has no id_token (is the openid scope allowed for this client?)")
        return tokens

    @inlineCallbacks
    def userinfo(self, access_token: str) -> Any:
        url = self.metadata.get("userinfo_endpoint")
        if not isinstance(url, str) or not access_token:
            return {}
        info = yield self._fetch_json(b"GET", url, "userinfo",
                                      {b"Authorization": [b"Bearer " + access_token.encode("ascii", "replace")],
                                       b"Accept": [b"application/json"]})
        return info

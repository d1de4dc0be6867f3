"""Pre-authentication of web-app requests: passthrough, or OpenID Connect sign-in (``options.preauth``).

The front door asks ``Gate.check`` about every request before it opens a stream, so
unauthenticated traffic never reaches a connector. The answer is ``Allow`` (forward, as whom,
with which headers) or ``Respond`` (the front door answers itself: a redirect to sign in, the
callback's redirect back, a 403 page, the JWKS).

An ``oidc`` app works like oauth2-proxy or Entra application proxy in front of it:

- no valid session cookie: a GET is redirected to the provider (authorization code + PKCE S256,
  ``state`` and ``nonce`` kept in a sealed, short-lived cookie scoped to the callback path, so
  any node sharing the key can finish it); other methods get 401, since their body would be lost;
- ``<prefix>.gateway/callback``: state checked, code exchanged, id_token verified, the session
  cookie set, and the browser sent back to the page it first asked for (same origin only);
- ``<prefix>.gateway/signout``: cookie cleared, then the provider's end_session_endpoint;
- a valid session: assignment (``allowed_users`` / ``allowed_groups``) checked on every request,
  and, with ``jwt_assertion``, a signed JWT added. (On every app, passthrough too, the front door
  takes our cookies out of the Cookie header and drops a client's X-Gateway-* headers.)

``/.gateway/jwks.json`` (under every web-app prefix) serves the assertion keys when any app
uses ``jwt_assertion``. Sign-in events are logged with the request id and the user; codes,
tokens, cookies and the client secret never are.
"""

from __future__ import annotations

import html
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from attrs import field, frozen
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from gateway import assignment
from gateway.errors import ConfigError, GatewayError

from . import oidc, sessions
from .assertion import HEADER as ASSERTION_HEADER
from .assertion import JWKS_PATH, Signer

log = Logger(namespace="gateway_http")

SECTION_KEYS: tuple[str, ...] = ("oidc",)
PREAUTH = ("passthrough", "oidc")
CALLBACK = ".gateway/callback"
SIGNOUT = ".gateway/signout"
SIGNED_OUT = ".gateway/signedout"
SIGNIN_LIFETIME = 600           # seconds a started sign-in may take at the provider
MAX_METADATA_GROUPS = 8 * 1024  # bytes of group names in the stream metadata (limit: 16 KiB in all)

Headers = list[tuple[bytes, bytes]]


@frozen
class Identity:
    """Who signed in: what the connector and SSO plugins learn of a user."""

    subject: str
    name: str = ""
    email: str = ""
    groups: tuple[str, ...] = ()
    claims: dict[str, Any] = field(factory=dict, hash=False)
    email_verified: bool = False   # only a verified email may match allowed_users

    def to_metadata(self) -> dict[str, Any]:
        # Stream metadata is limited (16 KiB): groups are capped, in the order the provider gave them.
        groups, size = [], 0
        for g in self.groups:
            size += len(g.encode("utf-8")) + 4
            if size > MAX_METADATA_GROUPS:
                break
            groups.append(g)
        meta = {"sub": self.subject[:256], "name": self.name[:256], "email": self.email[:256],
                "email_verified": self.email_verified, "groups": groups}
        if self.claims:   # only the claims the app asked for (options.sso_claims), already bounded
            meta["claims"] = dict(self.claims)
        return meta


@frozen
class Allow:
    """Forward the request: as whom (None for passthrough), with which headers (None: unchanged),
    and which headers of the gateway's own to add for the back end (the signed assertion: no
    X-Gateway-* header of the client's is forwarded, so ours are added after them)."""

    identity: Identity | None = None
    headers: Headers | None = None
    added: Headers = ()


ALLOW = Allow()   # passthrough's answer: frozen, so one will do


@frozen
class Respond:
    """Answer the request at the front door (a redirect to sign in, a 403, the JWKS document...)."""

    status: int
    headers: Headers = field(factory=list)
    body: bytes = b""


# -- configuration ---------------------------------------------------------------------------------


def parse_section(table: dict, error: Any) -> dict:
    """The ``[http.oidc]`` sub-table, if there is one, as ``{"oidc": oidc.Settings | None}``."""
    if "oidc" not in table:
        return {"oidc": None}
    return {"oidc": oidc.parse_settings(table["oidc"], error)}


def preauth(app: Any) -> str:
    return app.options.get("preauth", "passthrough")


def check_app_options(app: Any) -> None:
    """``preauth``, ``allowed_users``, ``allowed_groups`` and ``jwt_assertion`` of one web app."""
    options = app.options

    def bad(key: str, expected: str) -> GatewayError:
        return GatewayError(f"app {app.name}: options.{key}: expected {expected}, got {options[key]!r}")

    mode = options.get("preauth", "passthrough")
    # "none" is how the core has an app with a listen of its own say that nobody signs in there.
    if mode not in PREAUTH and not (mode == "none" and not app.external_url):
        raise bad("preauth", '"passthrough" or "oidc"')
    for key in ("allowed_users", "allowed_groups"):
        if key in options:
            value = options[key]
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise bad(key, "a list of non-empty strings")
    if "jwt_assertion" in options and not isinstance(options["jwt_assertion"], bool):
        raise bad("jwt_assertion", "true or false")
    if "sso_claims" in options:
        value = options["sso_claims"]
        if not isinstance(value, list) or len(value) > MAX_SSO_CLAIMS or not all(
                isinstance(v, str) and _CLAIM_NAME.fullmatch(v) for v in value):
            raise bad("sso_claims", f"a list of at most {MAX_SSO_CLAIMS} claim names such as [\"preferred_username\"]")
    if mode != "oidc":
        for key in ("allowed_users", "allowed_groups", "jwt_assertion", "sso_claims"):
            if key in options:
                raise GatewayError(f'app {app.name}: options.{key}: needs options.preauth = "oidc" '
                                   f"(the app is passthrough: nobody signs in)")


def app_prefix(app: Any) -> str:
    """The external URL's path, ending in "/": where the app's /.gateway/ paths live."""
    path = urlsplit(app.external_url).path if app.external_url else "/"
    return path if path.endswith("/") else path + "/"


def safe_return(target: str, prefix: str) -> str:
    """``target`` if it is a same-origin path (no scheme, no host, no backslash tricks), else the app's prefix."""
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(ord(c) < 0x21 or ord(c) == 0x7F for c in target) or urlsplit(target).netloc
            or urlsplit(target).scheme):
        return prefix
    return target


def split_target(target: bytes) -> tuple[str, str]:
    """(path, query) of an origin-form or absolute-form request target."""
    text = target.decode("latin-1")
    if text.lower().startswith(("http://", "https://")):
        parts = urlsplit(text)
        return parts.path or "/", parts.query
    path, _, query = text.partition("?")
    return path, query


# -- pages -------------------------------------------------------------------------------------------


def page(status: int, title: str, message: str, link: str = "", link_text: str = "",
         extra_headers: Headers | None = None) -> Respond:
    """A small HTML page the front door sends itself; names nothing internal."""
    body = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n<p>{html.escape(message)}</p>\n")
    if link:
        body += f"<p><a href=\"{html.escape(link)}\">{html.escape(link_text)}</a></p>\n"
    body += "</body></html>\n"
    headers = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Cache-Control", b"no-store"),
               *(extra_headers or [])]
    return Respond(status, headers, body.encode("utf-8"))


def redirect(location: str, extra_headers: Headers | None = None) -> Respond:
    return Respond(302, [(b"Location", location.encode("latin-1")), (b"Cache-Control", b"no-store"),
                         *(extra_headers or [])])


# -- gates -------------------------------------------------------------------------------------------


class PassthroughGate:
    """Every request goes through as it came."""

    def check(self, request: Any, app: Any, external: Any, client_host: str, request_id: str = "") -> Allow:
        return ALLOW


def email_verified(claims: dict[str, Any], trusted: bool) -> bool:
    """The ``email_verified`` claim: true (or the string "true", as some providers send it); when
    absent, ``trusted`` ([http.oidc] emails_verified) decides; an explicit false never counts."""
    value = claims.get("email_verified")
    if value is None:
        return trusted
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def identity_from_claims(claims: dict[str, Any], groups_claim: str, emails_verified: bool = False,
                         sso_claims: Any = ()) -> Identity:
    groups = claims.get(groups_claim, [])
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list):
        groups = []
    groups = tuple(dict.fromkeys(str(g) for g in groups if isinstance(g, (str, int)) and str(g)))
    email = claims.get("email") if isinstance(claims.get("email"), str) else ""
    name = next((claims[k] for k in ("name", "preferred_username") if isinstance(claims.get(k), str) and claims[k]),
                email or claims["sub"])
    return Identity(subject=claims["sub"], name=name, email=email, groups=groups,
                    email_verified=bool(email) and email_verified(claims, emails_verified),
                    claims=kept_claims(claims, sso_claims))


MAX_SSO_CLAIMS = 8
MAX_CLAIM_VALUE = 256
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def kept_claims(claims: dict[str, Any], names: Any) -> dict[str, str]:
    """The string claims an app's options.sso_claims names, for its SSO provider on the connector;
    a value longer than MAX_CLAIM_VALUE is left out rather than cut (a cut name is another name)."""
    return {n: claims[n] for n in names or () if isinstance(claims.get(n), str) and len(claims[n]) <= MAX_CLAIM_VALUE}


def is_assigned(identity: Identity, app: Any) -> bool:
    """``allowed_users`` / ``allowed_groups`` (gateway.assignment, the rule private apps share)."""
    return assignment.is_assigned(app, identity.subject, identity.email, identity.email_verified, identity.groups)


class OIDCGate:
    """Pre-authentication by OpenID Connect for the apps whose ``options.preauth`` is ``oidc``."""

    def __init__(self, settings: oidc.Settings, provider: oidc.Provider, sealer: sessions.Sealer,
                 signer: Signer | None, reactor: Any) -> None:
        self.settings = settings
        self.provider = provider
        self.sealer = sealer
        self.signer = signer
        self.reactor = reactor

    def check(self, request: Any, app: Any, external: Any, client_host: str,
              request_id: str = "") -> Allow | Deferred:
        path, query = split_target(request.target)
        prefix = app_prefix(app)
        if self.signer is not None and path == prefix + JWKS_PATH:
            return succeed(Respond(200, [(b"Content-Type", b"application/json"),
                                         (b"Cache-Control", b"public, max-age=300")], self.signer.jwks()))
        if preauth(app) != "oidc":
            return ALLOW
        if path == prefix + CALLBACK:
            return self._callback(request, app, external, query, request_id)
        if path == prefix + SIGNOUT:
            return self._signout(request, app, external, request_id)
        if path == prefix + SIGNED_OUT:
            return succeed(page(200, "Signed out", "You have signed out of this application.", prefix,
                                "Sign in again"))
        identity = self._session(request, app)
        if identity is None:
            return self._sign_in(request, app, external, prefix, request_id)
        if not is_assigned(identity, app):
            log.info("request {request_id}: user {user} is not assigned to app {app}: 403",
                     request_id=request_id, user=identity.subject, app=app.name)
            who = identity.email or identity.name or identity.subject
            return succeed(page(403, "Access denied",
                                f"You are signed in as {who}, but you have not been given access to this "
                                "application. Ask your administrator to assign you to it.",
                                prefix + SIGNOUT, "Sign out"))
        added: Headers = []
        if app.options.get("jwt_assertion") and self.signer is not None:
            token = self.signer.mint(identity, external.url, external.url + prefix, self.reactor.seconds())
            added.append((ASSERTION_HEADER, token.encode("ascii")))
        return succeed(Allow(identity, None, added))

    # -- the session --

    def _session(self, request: Any, app: Any) -> Identity | None:
        name = sessions.session_cookie_name(app.name)
        now = self.reactor.seconds()
        for cookie, value in sessions.parse_cookies(request.headers):
            if cookie != name:
                continue
            doc = self.sealer.open("session:" + app.name, value, now)
            if doc is None:
                continue
            try:
                return Identity(subject=str(doc["sub"]), name=str(doc.get("name", "")), email=str(doc.get("email", "")),
                                groups=tuple(str(g) for g in doc.get("groups", [])),
                                email_verified=doc.get("ev") is True,   # sessions from before "ev": unverified
                                claims={str(k): str(v) for k, v in (doc.get("c") or {}).items()})
            except (KeyError, TypeError):
                continue
        return None

    def _session_cookie(self, identity: Identity, app: Any, secure: bool, now: float) -> bytes:
        """The sealed session; groups that do not fit a cookie are dropped (the app's allowed_groups kept first)."""
        wanted = set(app.options.get("allowed_groups") or [])
        groups = sorted(identity.groups, key=lambda g: g not in wanted)
        lifetime = self.settings.session_lifetime
        while True:
            doc = {"sub": identity.subject, "name": identity.name, "email": identity.email,
                   "ev": identity.email_verified, "groups": groups, "iat": int(now), "exp": int(now) + lifetime}
            if identity.claims:
                doc["c"] = identity.claims
            value = self.sealer.seal("session:" + app.name, doc)
            if len(value) <= sessions.MAX_COOKIE_VALUE or not groups:
                break
            groups = groups[: len(groups) * 3 // 4]
        if len(groups) < len(identity.groups):
            log.warn("oidc: user {user} has {total} groups; only {kept} fit in the session cookie of app {app}",
                     user=identity.subject, total=len(identity.groups), kept=len(groups), app=app.name)
        return sessions.set_cookie(sessions.session_cookie_name(app.name), value, app_prefix(app), secure,
                                   lifetime if self.settings.persistent_session else None)

    # -- sign-in --

    def _redirect_uri(self, external: Any, app: Any) -> str:
        return external.url + app_prefix(app) + CALLBACK

    @inlineCallbacks
    def _sign_in(self, request: Any, app: Any, external: Any, prefix: str, request_id: str) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            # A redirect would lose the body: tell the client to sign in (a page reload does it).
            return page(401, "Sign-in required", "Your session has ended or you have not signed in. "
                        "Reload the page to sign in.", prefix, "Sign in")
        try:
            metadata = yield self.provider.ready()
        except Exception as e:
            log.warn("request {request_id}: cannot start a sign-in to app {app}: {why}",
                     request_id=request_id, app=app.name, why=e)
            return page(503, "Sign-in unavailable", "Signing in is not possible right now. Try again later.")
        state, nonce = oidc.random_token(), oidc.random_token()
        verifier, challenge = oidc.pkce_pair()
        path, query = split_target(request.target)
        target = safe_return(path + ("?" + query if query else ""), prefix)
        now = self.reactor.seconds()
        pending = self.sealer.seal("signin:" + app.name, {
            "state": state, "nonce": nonce, "verifier": verifier, "return": target,
            "exp": int(now) + SIGNIN_LIFETIME})
        secure = external.scheme == "https"
        cookie = sessions.set_cookie(sessions.signin_cookie_name(state), pending, prefix + CALLBACK, secure,
                                     SIGNIN_LIFETIME)
        url = oidc.authorization_url(metadata, self.settings, self._redirect_uri(external, app), state, nonce,
                                     challenge)
        log.info("request {request_id}: sign-in to app {app} started; sent to the provider",
                 request_id=request_id, app=app.name)
        return redirect(url, [(b"Set-Cookie", cookie)])

    @inlineCallbacks
    def _callback(self, request: Any, app: Any, external: Any, query: str, request_id: str) -> Any:
        prefix = app_prefix(app)
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        state = params.get("state", "")
        secure = external.scheme == "https"
        pending, cookie_name = None, sessions.signin_cookie_name(state)
        now = self.reactor.seconds()
        if state:
            for name, value in sessions.parse_cookies(request.headers):
                if name == cookie_name:
                    doc = self.sealer.open("signin:" + app.name, value, now)
                    if doc is not None and secrets.compare_digest(str(doc.get("state", "")), state):
                        pending = doc
                        break
        clear = [(b"Set-Cookie", sessions.clear_cookie(cookie_name, prefix + CALLBACK, secure))] if state else []
        again = "Start again"
        if pending is None:
            log.warn("request {request_id}: sign-in to app {app} failed: unknown or expired state "
                     "(no matching sign-in in progress in this browser)", request_id=request_id, app=app.name)
            return page(400, "Sign-in failed", "This sign-in is not valid or has expired.", prefix, again, clear)
        if "error" in params:
            error = params["error"][:100]
            log.warn("request {request_id}: sign-in to app {app} failed: the provider answered {error}",
                     request_id=request_id, app=app.name, error=error)
            return page(403, "Sign-in failed", f"The identity provider did not sign you in ({error}).",
                        prefix, again, clear)
        code = params.get("code", "")
        if not code:
            log.warn("request {request_id}: sign-in to app {app} failed: the callback has no code",
                     request_id=request_id, app=app.name)
            return page(400, "Sign-in failed", "The sign-in answer is incomplete.", prefix, again, clear)
        try:
            yield self.provider.ready()
            tokens = yield self.provider.exchange(code, pending["verifier"], self._redirect_uri(external, app))
            key = yield self.provider.key_for(tokens["id_token"])
            claims = oidc.verify_id_token(tokens["id_token"], key, self.settings.issuer, self.settings.client_id,
                                          pending["nonce"], self.reactor.seconds())
            extra = {}
            if isinstance(tokens.get("access_token"), str):
                try:
                    extra = yield self.provider.userinfo(tokens["access_token"])
                except oidc.SignInError as e:
                    log.warn("request {request_id}: userinfo for app {app} failed, using the id_token's "
                             "claims only: {why}", request_id=request_id, app=app.name, why=e)
            if extra.get("sub") == claims["sub"]:
                claims = {**extra, **{k: v for k, v in claims.items() if k not in extra or k in
                                      ("sub", "iss", "aud", "exp", "iat", "nonce")}}
        except oidc.SignInError as e:
            log.warn("request {request_id}: sign-in to app {app} failed: {why}",
                     request_id=request_id, app=app.name, why=e)
            return page(401, "Sign-in failed", "The sign-in could not be completed.", prefix, again, clear)
        identity = identity_from_claims(claims, self.settings.groups_claim, self.settings.emails_verified,
                                        app.options.get("sso_claims", ()))
        log.info("request {request_id}: user {user} ({email}) signed in to app {app}",
                 request_id=request_id, user=identity.subject, email=identity.email or "-", app=app.name)
        target = safe_return(str(pending.get("return", prefix)), prefix)
        return redirect(external.url + target,
                        [*clear, (b"Set-Cookie", self._session_cookie(identity, app, secure, self.reactor.seconds()))])

    # -- sign-out --

    @inlineCallbacks
    def _signout(self, request: Any, app: Any, external: Any, request_id: str) -> Any:
        prefix = app_prefix(app)
        identity = self._session(request, app)
        clear = [(b"Set-Cookie", sessions.clear_cookie(sessions.session_cookie_name(app.name), prefix,
                                                       external.scheme == "https"))]
        log.info("request {request_id}: user {user} signed out of app {app}",
                 request_id=request_id, user=identity.subject if identity else "-", app=app.name)
        signed_out = external.url + prefix + SIGNED_OUT
        try:
            metadata = yield self.provider.ready()
        except Exception:
            return redirect(signed_out, clear)
        end = metadata.get("end_session_endpoint")
        if not isinstance(end, str) or not end:
            return redirect(signed_out, clear)
        query = urlencode({"client_id": self.settings.client_id, "post_logout_redirect_uri": signed_out})
        return redirect(end + ("&" if "?" in end else "?") + query, clear)


def build_gate(section: dict, apps: list[Any], config: Any, reactor: Any) -> Any:
    """The gate of one front door: passthrough when no app signs users in."""
    oidc_apps = [a for a in apps if preauth(a) == "oidc"]
    if not oidc_apps:
        return PassthroughGate()
    settings = section.get("oidc")
    path = config.path
    if settings is None:
        raise ConfigError(path, "http.oidc", f'expected a [http.oidc] table: app {oidc_apps[0].name} has '
                                             'options.preauth = "oidc"')
    base = Path(path).parent
    secret_path = Path(settings.client_secret_file)
    secret_path = secret_path if secret_path.is_absolute() else base / secret_path
    try:
        secret = oidc.load_secret(secret_path)
    except (OSError, ValueError) as e:
        raise ConfigError(path, "http.oidc.client_secret_file",
                          f"expected a readable file holding the client secret, got {str(secret_path)!r} "
                          f"({getattr(e, 'strerror', None) or e})") from None
    try:
        agent = oidc.make_agent(reactor, settings, base)
    except Exception as e:
        raise ConfigError(path, "http.oidc.ca_file",
                          f"expected a PEM file of CA certificates, got {settings.ca_file!r} ({e})") from None
    state_dir = config.service.state_dir
    sealer = sessions.Sealer.from_state_dir(state_dir)
    signer = Signer.from_state_dir(state_dir) if any(a.options.get("jwt_assertion") for a in apps) else None
    for app in oidc_apps:
        if urlsplit(app.external_url).scheme != "https":
            log.warn("app {app}: signs users in over plain http ({url}): session cookies are not Secure; "
                     "use an https external_url outside tests", app=app.name, url=app.external_url)
    provider = oidc.Provider(settings, secret, reactor, agent)

    def unavailable(failure: Any) -> None:
        log.warn("oidc: provider {issuer} not reachable yet (tried again at the next sign-in): {why}",
                 issuer=settings.issuer, why=failure.getErrorMessage())

    provider.ready().addErrback(unavailable)
    log.info("oidc: apps {apps} sign users in with {issuer}", apps=", ".join(a.name for a in oidc_apps),
             issuer=settings.issuer)
    return OIDCGate(settings, provider, sealer, signer, reactor)


__all__ = ["Allow", "Identity", "OIDCGate", "PassthroughGate", "Respond", "SECTION_KEYS", "build_gate",
           "check_app_options", "parse_section"]

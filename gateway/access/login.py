"""`gateway login`: a short-lived user certificate from the service, for a credential.

Two ways in (docs/operations.md, *Private Access for users*):

- a browser sign-in: a loopback listener on 127.0.0.1 (RFC 8252), the service's sign-in page
  opened in the browser with a state and a PKCE challenge, and the one-time code the page
  redirects back with traded, with the verifier, for a certificate and a refresh secret;
- a personal token an admin issued (``gwu1.<id>.<secret>.<CA fingerprint>``), traded as is.

Either way the trade is one ``user_login`` stream on a tunnel-port connection without a client
certificate, once the service proved it holds the pinned CA (the same exchange a connector
enrols with, :func:`gateway.connector.register.pinned_request`). The result goes to the
credential cache; :func:`renew` trades the cached token or refresh secret for the next
certificate when the current one runs low.
"""

from __future__ import annotations

import html
import secrets
import sys
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway.access.credentials import Credentials, normalise_service
from gateway.connector.register import parse_service, pinned_request
from gateway.errors import EnrolmentError, GatewayError
from gateway.pki import keys
from gateway.pkce import pkce_pair

__all__ = ["LOGIN_TIMEOUT", "LoginError", "login_in_browser", "login_with_token", "renew", "request_certificate"]

LOGIN_TIMEOUT = 300.0
USER_CERTIFICATE_REQUEST = "user_certificate_request"
USER_CERTIFICATE = "user_certificate"
_CSR_NAME = "gateway user"   # the service names the certificate itself (user:<credential id>)


class LoginError(GatewayError):
    """The sign-in did not give a certificate; the message says why and what to do."""


def is_url(service: str) -> bool:
    return service.startswith(("http://", "https://"))


def login_url(service: str, port: int, state: str, challenge: str) -> str:
    query = urlencode({"port": port, "state": state, "code_challenge": challenge, "code_challenge_method": "S256"})
    return f"{normalise_service(service)}/.gateway/login?{query}"


def check_service_url(service: str) -> None:
    """A sign-in URL: https, or http only to a loopback host (the page carries a sign-in code)."""
    parts = urlsplit(service)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoginError(f"--service must be the service's sign-in URL (https://HOST) or, with --token-file, "
                         f"its tunnel address HOST:PORT; got {service!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise LoginError(f"refusing to sign in over plain http to {parts.hostname}: use the https:// URL of the "
                         "service (plain http is only for a service on this machine)")


# -- the certificate exchange -------------------------------------------------------------------


async def request_certificate(
    reactor: Any, tunnel: str, server_name: str, ca_fingerprint: str, credential: dict[str, Any],
) -> tuple[Any, dict[str, Any], Any]:
    """Trade ``credential`` for a certificate of a fresh key: (key, the service's answer, CA certificate)."""
    host, port = _tunnel_address(tunnel)
    key = keys.generate_key()
    request = {"type": USER_CERTIFICATE_REQUEST, "csr": keys.make_csr(key, _CSR_NAME).decode(),
               "credential": credential}
    try:
        reply, ca_cert = await pinned_request(reactor, host, port, server_name, ca_fingerprint,
                                              {"kind": "user_login"}, request)
    except EnrolmentError as e:
        if str(e).startswith("could not reach"):
            raise LoginError(f"{e}: check the address and that the service is running, then try again") from None
        raise LoginError(str(e).replace("get a new token from the service you mean to join",
                                        "check --service, or ask the service's admin")) from None
    if reply.get("type") != USER_CERTIFICATE:
        raise LoginError(_refusal(reply, credential["kind"]))
    try:
        cert = keys.load_cert(str(reply["certificate"]).encode())
        served_ca = keys.load_cert(str(reply["ca"]).encode())
    except (KeyError, ValueError):
        raise LoginError("the service's answer holds no readable certificate: ask its admin to check its log") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise LoginError("the service returned a certificate for another key; refusing it")
    if keys.fingerprint(served_ca) != keys.fingerprint(ca_cert):
        raise LoginError("the service returned a CA that differs from the one pinned; refusing it")
    return key, reply, ca_cert


def _refusal(reply: dict[str, Any], kind: str) -> str:
    code = reply.get("code", "unknown")
    message = str(reply.get("message") or "no reason given")
    if code == "rate_limited":
        return f"the service is rate limiting sign-ins from this address: {message} (wait a minute and try again)"
    if kind == "token" and code in ("unknown", "expired", "revoked"):
        return f"the service refused the personal token ({code}): {message}; ask your administrator for a new one"
    if "gateway login" in message:
        return f"the service refused the sign-in ({code}): {message}"
    return f"the service refused the sign-in ({code}): {message}; run gateway login again"


def _tunnel_address(tunnel: str) -> tuple[str, int]:
    try:
        return parse_service(tunnel)
    except EnrolmentError:
        raise LoginError(f"the tunnel address must be HOST:PORT, got {tunnel!r}") from None


def _credentials(service: str, tunnel: str, server_name: str, key: Any, reply: dict[str, Any], ca_cert: Any,
                 token: str | None = None, refresh: dict[str, Any] | None = None) -> Credentials:
    return Credentials(
        service=normalise_service(service), tunnel=tunnel, server_name=server_name,
        ca_pem=keys.cert_pem(ca_cert).decode(), key_pem=keys.key_pem(key).decode(),
        certificate_pem=str(reply["certificate"]), user=dict(reply.get("user") or {}),
        refresh=refresh, token=token,
    )


# -- personal tokens ----------------------------------------------------------------------------


async def login_with_token(reactor: Any, service: str, token_text: str, server_name: str | None = None) -> Credentials:
    """Sign in with a personal token at the tunnel address ``service`` (HOST:PORT)."""
    from gateway.pki.tokens import UserToken

    if is_url(service):
        raise LoginError("with --token-file, --service is the service's tunnel address HOST:PORT (for example "
                         f"gateway.example.com:8443), not a URL; got {service!r}")
    token = UserToken.parse(token_text)
    host, _ = _tunnel_address(service)
    server_name = server_name or host
    key, reply, ca_cert = await request_certificate(
        reactor, service, server_name, token.ca_fingerprint, {"kind": "token", "token": token.encode()})
    return _credentials(service, service, server_name, key, reply, ca_cert, token=token.encode())


# -- renewal ------------------------------------------------------------------------------------


async def renew(reactor: Any, creds: Credentials) -> Credentials:
    """A new certificate (and key) for cached credentials, bought with their token or refresh secret."""
    credential = creds.renewal()
    if credential is None:
        raise LoginError(f"the credentials for {creds.service} cannot be renewed: run gateway login --service "
                         f"{creds.service}")
    key, reply, ca_cert = await request_certificate(reactor, creds.tunnel, creds.server_name,
                                                    creds.ca_fingerprint, credential)
    return _credentials(creds.service, creds.tunnel, creds.server_name, key, reply, ca_cert,
                        token=creds.token, refresh=creds.refresh)


# -- browser sign-in ----------------------------------------------------------------------------


_PAGE = ("<!doctype html><html><head><meta charset=utf-8><title>gateway login</title></head>"
         "<body><h1>{title}</h1><p>{text}</p></body></html>")


def _page(title: str, text: str) -> bytes:
    return _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()


class CallbackResource(Resource):
    """/callback on the loopback listener: takes the redirect whose state matches, once."""

    isLeaf = True

    def __init__(self, state: str, done: Deferred) -> None:
        super().__init__()
        self.state = state
        self.done = done

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")
        if request.path != b"/callback":
            request.setResponseCode(404)
            return _page("Not found", "This is gateway login's sign-in listener; it only takes /callback.")
        args = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        if self.done.called:
            request.setResponseCode(409)
            return _page("Already signed in", "This sign-in is already finished. You can close this tab.")
        if not secrets.compare_digest(args.get("state", ""), self.state):
            # Not ours (another tab, or a forged link): ignore it and keep waiting for the real one.
            request.setResponseCode(400)
            return _page("Sign-in not accepted", "This link does not belong to the gateway login that is "
                                                 "waiting (its state does not match). Run gateway login again.")
        missing = [k for k in ("code", "tunnel", "server_name", "ca") if not args.get(k)]
        if missing:
            request.setResponseCode(400)
            error = args.get("error_description") or args.get("error") or f"the redirect lacks {', '.join(missing)}"
            self.done.errback(LoginError(f"the sign-in page came back without a code: {error}; run gateway login "
                                         "again, or ask the service's admin to check its [access] settings"))
            return _page("Sign-in failed", f"{error}. Run gateway login again.")
        self.done.callback(args)
        return _page("Signed in", "gateway login has your sign-in. You can close this tab.")


async def login_in_browser(
    reactor: Any, service: str, open_browser: Callable[[str], Any] | None = None,
    timeout: float = LOGIN_TIMEOUT, err: Any = None,
) -> Credentials:
    """Sign in through the browser at the sign-in URL ``service``; returns the new credentials."""
    err = sys.stderr if err is None else err
    check_service_url(service)
    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair()
    redirected: Deferred = Deferred()
    site = Site(CallbackResource(state, redirected))
    site.noisy = False
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    timer = reactor.callLater(timeout, lambda: redirected.called or redirected.errback(LoginError(
        f"no sign-in came back within {timeout:g}s: finish signing in in the browser, or run gateway login "
        "again (--timeout SECONDS waits longer)")))
    try:
        url = login_url(service, port.getHost().port, state, challenge)
        print(f"Opening the sign-in page in your browser. If it does not open, visit:\n  {url}", file=err, flush=True)
        if open_browser is None:
            _open_in_thread(url)
        else:
            open_browser(url)
        args = await redirected
    finally:
        if timer.active():
            timer.cancel()
        await maybeDeferred(port.stopListening)
    tunnel, server_name = args["tunnel"], args["server_name"]
    key, reply, ca_cert = await request_certificate(
        reactor, tunnel, server_name, args["ca"], {"kind": "code", "code": args["code"], "verifier": verifier})
    credential = reply.get("credential")
    if not isinstance(credential, dict) or not {"id", "secret"} <= credential.keys():
        raise LoginError("the service answered the sign-in without a refresh credential: ask its admin to check "
                         "its log")
    return _credentials(service, tunnel, server_name, key, reply, ca_cert,
                        refresh={k: credential.get(k) for k in ("id", "secret", "expires_at")})


def _open_in_thread(url: str) -> None:
    """webbrowser.open may wait for the browser command ($BROWSER) to exit: never in the reactor
    thread, and in a daemon thread so a browser left open does not hold the command's exit."""
    import threading
    import webbrowser

    threading.Thread(target=webbrowser.open, args=(url,), name="gateway-login-browser", daemon=True).start()

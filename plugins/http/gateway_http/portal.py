"""The sign-in page of `gateway login`: the front door signs the user in, the loopback client gets a code.

``gateway login --service URL`` (RFC 8252: a native app, its redirect on 127.0.0.1, PKCE) opens
``URL/.gateway/login?port=P&state=S&code_challenge=C&code_challenge_method=S256`` in the
user's browser. ``URL`` is the service's ``[access] url``, which the front door serves as an app
of its own that signs users in with ``[http.oidc]`` like any web app. Once signed in, the front
door asks the core for a one-time code bound to the challenge and redirects the browser to
``http://127.0.0.1:P/callback`` with it, the state, and where the client's tunnel goes (address,
server name, CA fingerprint). Only the client holding the PKCE verifier can trade the code for
a certificate, on the tunnel port.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlencode

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from gateway.config import AppConfig, web_origin
from gateway.errors import ConfigError

from . import auth

log = Logger(namespace="gateway_http")

# The app the portal is routed as; names of published apps never start with "." (config checks).
PORTAL_APP = ".gateway-login"
LOGIN_PATH = ".gateway/login"
_STATE_RE = re.compile(r"[A-Za-z0-9_-]{8,256}\Z")
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}\Z")


def portal_app(access: Any) -> AppConfig:
    """The front door's route for ``[access] url``: signs users in, never opens a stream."""
    return AppConfig(name=PORTAL_APP, listen="", destination="127.0.0.1:9", host="127.0.0.1", port=9,
                     protocol="http", external_url=access.url, internal_url="http://127.0.0.1:9/",
                     options={"preauth": "oidc"})


def check_portal(access: Any, apps: list[Any], config_path: Any) -> None:
    """``[access] url`` must be a front-door address of its own, not one of a published app."""
    origin = web_origin(access.url)
    for app in apps:
        if web_origin(app.external_url) == origin:
            raise ConfigError(config_path, "access.url",
                              f"expected an address no web app uses, got {access.url!r} (app {app.name} has"
                              f" external_url {app.external_url!r}); give gateway login a host of its own")


def login_redirect(query: str, identity: auth.Identity, access: Any) -> auth.Respond | Deferred:
    """The redirect to the user's loopback client with a fresh code (a Deferred: the code is
    stored first), or a page saying what is wrong."""
    params = parse_qs(query, keep_blank_values=True)

    def one(name: str) -> str:
        values = params.get(name, [])
        return values[0] if len(values) == 1 else ""

    port, state, challenge = one("port"), one("state"), one("code_challenge")
    problem = None
    if not port.isdigit() or not 1024 <= int(port) <= 65535:
        problem = "the port of the gateway login program is missing or not a port number"
    elif not _STATE_RE.match(state):
        problem = "the state parameter is missing or malformed"
    elif one("code_challenge_method") != "S256" or not _CHALLENGE_RE.match(challenge):
        problem = "the PKCE code challenge (S256) is missing or malformed"
    if problem is not None:
        return auth.page(400, "Sign-in link not valid",
                         f"This sign-in link was not made by gateway login: {problem}. Run gateway login again.")
    d = maybeDeferred(access.issue_code, identity.to_metadata(), challenge)
    d.addCallback(_redirect_with_code, identity, access, port, state)
    return d.addErrback(_no_code, identity)


def _redirect_with_code(code: str, identity: auth.Identity, access: Any, port: str, state: str) -> auth.Respond:
    log.info("gateway login: {user} signed in; code handed to the loopback client on port {port}",
             user=identity.email or identity.subject, port=port)
    location = f"http://127.0.0.1:{port}/callback?" + urlencode({
        "code": code, "state": state, "tunnel": access.tunnel, "server_name": access.server_name,
        "ca": access.ca_fingerprint,
    })
    return auth.redirect(location)


def _no_code(failure: Any, identity: auth.Identity) -> auth.Respond:
    # The code lives in the store every node shares; without it there is no code to hand out.
    log.error("gateway login: no sign-in code for {user}: {error}", user=identity.email or identity.subject,
              error=failure.getErrorMessage())
    return auth.page(503, "Sign-in not available",
                     "The service could not record your sign-in code (its store is unavailable). Try gateway"
                     " login again in a minute; tell your administrator if it goes on.")


class PortalGate:
    """The front door's gate with the portal app on top: sign-in as for any app, then the redirect."""

    def __init__(self, inner: Any, access: Any) -> None:
        self.inner = inner
        self.access = access

    def check(self, request: Any, app: Any, external: Any, client_host: str, request_id: str = "") -> Any:
        decision = self.inner.check(request, app, external, client_host, request_id=request_id)
        if app.name != PORTAL_APP:
            return decision
        if isinstance(decision, Deferred):
            return decision.addCallback(self._portal, request)
        return self._portal(decision, request)

    def _portal(self, decision: Any, request: Any) -> auth.Respond | Deferred:
        if isinstance(decision, auth.Respond):
            return decision   # signing in, the callback, signing out: the OIDC gate's pages
        path, query = auth.split_target(request.target)
        if path != auth.app_prefix(portal_app(self.access)) + LOGIN_PATH or decision.identity is None:
            return auth.page(404, "gateway login",
                             "This address is where gateway login signs you in. Run: gateway login --service "
                             + self.access.url)
        return login_redirect(query, decision.identity, self.access)

"""Interfaces plugins implement, and the values hooks receive."""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from zope.interface import Attribute, Interface


class IProtocolHandler(Interface):
    """Carries one kind of app traffic between a service listener and a connector stream."""

    name = Attribute("The name apps use in their `protocol` key, e.g. 'tcp'.")

    def service_factory(app, open_stream, reactor):
        """Return an IProtocolFactory for the app's listen endpoint on the service.

        ``open_stream(extra_metadata: dict) -> Deferred[Stream]`` opens a stream to a
        connector of the app's group with the app's metadata plus ``extra_metadata`` (for
        example the user identity); it fails with a GatewayError saying why (no connector
        connected, destination refused, ...).
        """

    def connector_stream(stream, app, reactor):
        """Handle a new stream on the connector for ``app`` (an AppConfig).

        Dial ``app.host``/``app.port`` (only that: the core already checked it is the app's
        destination), then ``stream.accept()`` and splice, or ``stream.reset(code, reason)``.
        """

    # Optional, on the connector: a handler may also have
    #   use_sso_providers(providers: dict[str, ISSOProvider]) -> None, called once at start with
    #     the providers plugins registered, and
    #   check_connector_app(app) -> str | None, called when an app's config arrives: a sentence
    #     saying why the app cannot work on this connector (logged as an error), or None.


class ISSOProvider(Interface):
    """Obtains back-end credentials for a pre-authenticated user (see gateway_register_sso_providers)."""

    def credentials(app, identity, request):
        """Headers to set on the back-end request: a list of ``(name, value)`` byte pairs, or a
        Deferred firing with one. ``app`` is the AppConfig, ``identity`` the user's dict
        (``sub``, ``name``, ``email``, ``email_verified``, ``groups``), ``request`` a
        ``gateway_http.rules.Request``. A failure (raised, or the Deferred's) ends the request
        with a 502 page saying single sign-on failed, with the correlation id and nothing of the
        error: log the cause for the admin yourself (a GatewayError is logged in one line, anything
        else with its traceback)."""

    # Optional, all of them:
    #   strip_headers: tuple[bytes, ...], lower-case names of request headers the back end never
    #     gets from the client for this provider's apps (kerberos: b"authorization"), whether or
    #     not credentials() sets them.
    #   on_response(app, identity, request, sent, response) -> None | pairs | Deferred: called
    #     with the final response head (gateway_http.rules.Response; not 1xx) of a request sent
    #     with ``sent`` (the very object credentials() gave), before any of it is relayed. None:
    #     relay it. Header pairs (or a Deferred firing with them): send the request again with
    #     those instead, on a new connection (a 401 challenge; at most twice per request, and
    #     only for a request without a body; the rest of that answer is dropped). Raising: the
    #     response is not relayed, the user gets the 502 page (a mutual-auth reply that does
    #     not verify). Runs on the reactor thread: no blocking calls.
    #   check_app(app) -> str | None: on the connector, when an app naming this provider
    #     arrives: a sentence saying why it cannot work (logged as a config error), or None.
    #   start(config, reactor): on the connector, once, before any request: the connector's
    #     GatewayConfig (plugin tables in config.sections) and the reactor.


@frozen
class StreamInfo:
    """What lifecycle hooks learn about a stream."""

    stream_id: int
    tunnel_id: str
    connector_id: str
    app: str
    protocol: str
    request_id: str
    user: Any = None
    # Private Access streams: what the user asked for and which segment allowed it.
    transport: str = "tcp"
    destination: str = ""
    segment: str = ""
    client: str = ""
    opened_at: float = 0.0
    # Set on the record gateway_stream_closed receives: bytes user → app (up) and app → user
    # (down) through the service, seconds open, and how it ended ("done" or the reason).
    bytes_up: int = 0
    bytes_down: int = 0
    duration: float | None = None
    result: str = ""
    # What the app's protocol plugin read on the connector (SMB dialect, signing, user, share;
    # RDP cookie user and protocol...), when it reported any (control message session_facts).
    facts: dict[str, Any] = field(factory=dict, hash=False)

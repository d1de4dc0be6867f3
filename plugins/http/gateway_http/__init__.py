"""The HTTP protocol plugin: internal web apps published at external URLs.

Loaded through the ``gateway`` entry point exactly as a third-party plugin would be.

- **Service**: one front door (``[http] listen``) for every web app (``[[apps]]`` with
  ``external_url`` and ``internal_url``), routing each request by its Host header
  (``gateway_service_listeners``). Each request travels in its own tunnel stream; see
  ``frontdoor.py`` for the proxying, ``rules.py`` for the header rules.
- **Connector**: serves each stream as one HTTP/1.1 exchange with the app's back end over a
  keep-alive pool of connections (TLS for ``https`` internal URLs), adding credentials from an
  SSO provider when the app names one; see ``backend.py`` and ``pool.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.hookspecs import hookimpl
from gateway.protocols import IProtocolHandler
from gateway.tunnel.splice import QuietFactory

from . import auth, backend, https, limits, links, pool, portal, routing, rules
from . import metrics as request_metrics
from .frontdoor import BACKEND_TIMEOUTS, DEFAULT_TIMEOUTS, FrontDoor, Timeouts, balance_per_request
from .streampool import StreamPool

log = Logger(namespace="gateway_http")

NAME = "http"
DEFAULT_LISTEN = "tcp:80"
BASE_KEYS = ("listen", "header_timeout", "idle_timeout", "body_timeout", "send_timeout", "max_connections",
             "max_connections_per_address")
# Every front-door listener of this service process counts against one set of limits (the
# per-app listeners are made apart from the shared ones); the config sets them at start and reload.
CONNECTIONS = limits.ConnectionLimits()
SECTION_KEYS = BASE_KEYS + https.SECTION_KEYS + auth.SECTION_KEYS


@implementer(IProtocolHandler)
class HTTPHandler:
    name = NAME

    def service_factory(self, app: Any, open_stream: Any, reactor: Any) -> Factory:
        """An app with a ``listen`` of its own (no external_url): a front door serving only it."""
        return limits.LimitedFactory(QuietFactory.forProtocol(lambda: FrontDoor(
            lambda host, target: app, lambda _app, extra: open_stream(extra), reactor=reactor)), CONNECTIONS)

    def __init__(self) -> None:
        self.sso_providers: dict[str, Any] = {}
        self._backends: backend.Backends | None = None

    def use_sso_providers(self, providers: dict[str, Any]) -> None:
        """The connector's SSO providers by name (apps pick one with ``options.sso``)."""
        self.sso_providers = providers
        if self._backends is not None:
            self._backends.sso_providers = providers

    def check_connector_app(self, app: Any) -> str | None:
        """Why ``app`` cannot work on this connector (read when its config arrives), or None."""
        try:
            pool.check_options(app)
        except GatewayError as e:
            return str(e)
        return backend.check_sso(app, self.sso_providers)

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        # One pool of back-end connections for every web app of this connector.
        if self._backends is None:
            self._backends = backend.Backends(reactor, self.sso_providers)
        self._backends.serve(stream, app)


def web_apps(config: Any) -> list[Any]:
    """The apps the shared front door serves: protocol http with an external_url."""
    return [a for a in config.apps if a.protocol == NAME and a.external_url]


def own_listener_apps(config: Any) -> list[Any]:
    """The http apps with a ``listen`` of their own (a front door each, no external_url)."""
    return [a for a in config.apps if a.protocol == NAME and not a.external_url]


# Options that need a sign-in: an app with its own listener has none (see check_own_listener_apps).
SIGN_IN_KEYS = ("preauth", "allowed_users", "allowed_groups", "jwt_assertion", "sso")


def check_own_listener_apps(apps: list[Any]) -> None:
    """Refuse sign-in options on apps with a listener of their own, then check the rest as for web apps.

    Such an app's external origin is whatever Host a client sends, so no sign-in redirect URI can
    be registered at the provider for it, and its front door has no gate: accepting the options
    would serve the app to anyone while the config says otherwise."""
    for app in apps:
        if app.options.get("balance", "connection") != "connection":
            raise GatewayError(f"app {app.name}: options.balance = {app.options['balance']!r} needs the [http] "
                               f"front door (publish the app with external_url and internal_url), not a listen "
                               f"of its own; or remove options.balance")
        for key in SIGN_IN_KEYS:
            if key in app.options and not (key == "preauth" and app.options[key] in ("passthrough", "none")):
                raise GatewayError(
                    f"app {app.name}: options.{key} cannot apply to an http app with a listen of its own (nobody "
                    f"signs in there, so it would be served to anyone): publish the app with external_url and "
                    f"internal_url behind the [http] front door instead, or remove options.{key}")
    check_options(apps)


def check_options(apps: list[Any]) -> None:
    for app in apps:
        for key, default in (("translate_host", True), ("translate_links", False), ("allow_connect", False),
                             ("allow_trace", False)):
            value = app.options.get(key, default)
            if not isinstance(value, bool):
                raise GatewayError(f"app {app.name}: options.{key}: expected true or false, got {value!r}")
        balance = app.options.get("balance", "connection")
        if balance not in ("connection", "request"):
            raise GatewayError(f"app {app.name}: options.balance: expected \"connection\" (a client connection's "
                               f"requests go to one connector) or \"request\" (each request to the connector "
                               f"the node chooses for it), got {balance!r}")
        upgrades = app.options.get("upgrade_protocols", ["websocket"])
        if not isinstance(upgrades, list) or not all(isinstance(p, str) and rules.is_token(p) for p in upgrades):
            raise GatewayError(f"app {app.name}: options.upgrade_protocols: expected a list of protocol names "
                               f"such as [\"websocket\"], got {upgrades!r}")
        timeout = app.options.get("backend_timeout", "default")
        if isinstance(timeout, bool) or not (timeout in BACKEND_TIMEOUTS or (
                isinstance(timeout, (int, float)) and 0 < timeout <= 3600)):
            raise GatewayError(f"app {app.name}: options.backend_timeout: expected \"default\" (85 s), \"long\" "
                               f"(180 s) or a number of seconds up to 3600, got {timeout!r}")
        headers = app.options.get("request_headers", {})
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and rules.is_token(k) and isinstance(v, str) and rules.is_field_value(v)
                for k, v in headers.items()):
            raise GatewayError(f"app {app.name}: options.request_headers: expected a table of header names to "
                               f"values (printable ASCII, no line breaks), got {headers!r}")
        hop = sorted(k for k in headers if k.lower().encode() in rules.HOP_BY_HOP | rules.FRAMING | {b"host"})
        owned = sorted(k for k in headers if k.lower().encode().startswith(rules.GATEWAY_HEADER_PREFIX))
        if hop or owned:
            raise GatewayError(f"app {app.name}: options.request_headers: {(hop or owned)[0]} is set by the front "
                               f"door itself; remove it")
        try:
            pool.Target.from_app(app)   # the back-end options' types; the connector reads the CA file
        except GatewayError as e:
            raise GatewayError(str(e)) from None
        sso = app.options.get("sso")
        if sso is not None and (not isinstance(sso, str) or not sso):
            raise GatewayError(f"app {app.name}: options.sso: expected the name of an SSO provider, got {sso!r}")
        if sso and app.options.get("preauth", "passthrough") != "oidc":
            raise GatewayError(f"app {app.name}: options.sso = {sso!r} needs a signed-in user: "
                               f"set options.preauth = \"oidc\" too")
        auth.check_app_options(app)


def front_door_factory(apps: list[Any], open_stream: Any, reactor: Any = None,
                       timeouts: Timeouts | None = None, scheme: str = "http", gate: Any = None,
                       redirect_to_https: bool = False, choose_connector: Any = None) -> Factory:
    """The front door of one listener: ``scheme`` is the listener's (routing.py says what it serves).
    With ``choose_connector`` (the node's), apps with ``balance = "request"`` share a pool of idle streams."""
    table = routing.routing_table(apps)
    redirect = redirect_to_https and scheme == "http"
    link_map = links.LinkMap.from_apps(apps)   # bodies may link to any published app
    pool = None
    if choose_connector is not None and any(balance_per_request(a) for a in apps):
        pool = StreamPool(reactor, (timeouts or DEFAULT_TIMEOUTS).idle)
    factory = FrontDoorFactory.forProtocol(lambda: FrontDoor(
        lambda host, target: routing.route(table, host, target, scheme, redirect), open_stream, scheme=scheme,
        reactor=reactor, timeouts=timeouts, gate=gate, link_map=link_map, choose_connector=choose_connector,
        pool=pool))
    factory.pool = pool
    return factory


class FrontDoorFactory(QuietFactory):
    """A front door listener's factory: when the listener stops (a reload replaced it, the node
    stops), the streams its pool keeps idle are closed, not left to the idle sweep."""

    pool: StreamPool | None = None

    def stopFactory(self) -> None:
        if self.pool is not None:
            self.pool.close()


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(HTTPHandler())


@hookimpl
def gateway_register_metrics(metrics: Any) -> None:
    request_metrics.register(metrics)


@hookimpl
def gateway_config_sections(register: Any) -> None:
    def parse(table: dict, error: Any) -> dict:
        return {**parse_base(table, error), **https.parse_section(table, error), **auth.parse_section(table, error)}

    def parse_base(table: dict, error: Any) -> dict:
        unknown = sorted(set(table) - set(SECTION_KEYS))
        if unknown:
            raise error(unknown[0], f"unknown key; expected one of {', '.join(SECTION_KEYS)}")
        listen = table.get("listen", DEFAULT_LISTEN)
        if not isinstance(listen, str) or not listen:
            raise error("listen", f'expected a Twisted server endpoint string such as "tcp:8080", got {listen!r}')
        try:
            from twisted.internet.endpoints import serverFromString
            from twisted.internet.testing import MemoryReactor

            serverFromString(MemoryReactor(), listen)
        except Exception as e:
            raise error("listen", f"expected a Twisted server endpoint string such as \"tcp:8080\", got {listen!r} ({e})")
        timeouts = {}
        for key, default in (("header_timeout", DEFAULT_TIMEOUTS.header), ("idle_timeout", DEFAULT_TIMEOUTS.idle),
                             ("body_timeout", DEFAULT_TIMEOUTS.body), ("send_timeout", DEFAULT_TIMEOUTS.send)):
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise error(key, f"expected a number of seconds > 0, got {value!r}")
            timeouts[key] = float(value)
        caps = {}
        for key, default in (("max_connections", limits.DEFAULT_MAX_CONNECTIONS),
                             ("max_connections_per_address", limits.DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)):
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10_000_000:
                raise error(key, f"expected a number of connections from 1 to 10000000, got {value!r}")
            caps[key] = value
        return {"listen": listen, **timeouts, **caps}

    register(NAME, parse)


@hookimpl
def gateway_service_listeners(register: Any, config: Any, open_stream: Any, reactor: Any, access: Any = None,
                              choose_connector: Any = None) -> None:
    check_own_listener_apps(own_listener_apps(config))   # served by service_factory, checked here as twistd starts
    section = config.sections.get(NAME) or {}
    CONNECTIONS.configure(section.get("max_connections", limits.DEFAULT_MAX_CONNECTIONS),
                          section.get("max_connections_per_address", limits.DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
                          reactor)   # apps with a listen of their own count too
    apps = web_apps(config)
    if access is not None:
        # gateway login's sign-in page is served like an app that signs users in
        portal.check_portal(access, apps, config.path)
        apps = [*apps, portal.portal_app(access)]
    if not apps:
        return  # no web app: no front door to bind
    check_options(apps)
    listen = section.get("listen", DEFAULT_LISTEN)
    timeouts = Timeouts(header=section.get("header_timeout", DEFAULT_TIMEOUTS.header),
                        idle=section.get("idle_timeout", DEFAULT_TIMEOUTS.idle),
                        body=section.get("body_timeout", DEFAULT_TIMEOUTS.body),
                        send=section.get("send_timeout", DEFAULT_TIMEOUTS.send))
    gate = auth.build_gate(section, apps, config, reactor)
    if access is not None:
        gate = portal.PortalGate(gate, access)

    def factory_for(scheme: str) -> Factory:
        return front_door_factory(apps, open_stream, reactor, timeouts, scheme=scheme, gate=gate,
                                  redirect_to_https=section.get("redirect_to_https", False),
                                  choose_connector=choose_connector)

    def register_limited(name: str, endpoint: str, factory: Factory) -> None:
        register(name, endpoint, limits.LimitedFactory(factory, CONNECTIONS))   # refused before TLS, if over

    register_limited("http", listen, factory_for("http"))
    https.register_listeners(register_limited, section, factory_for, reactor, apps)
    log.info("http front door on {listen} for {apps}", listen=listen,
             apps=", ".join(f"{a.name} ({a.external_url})" for a in apps))

"""Every hook a gateway plugin can implement: the contract for plugin authors.

Plugins are found through the ``gateway`` entry-point group (the built-in ones too) and
implement hooks with ``@gateway.hookimpl`` (``from gateway import hookimpl``). Hooks are synchronous. Registration hooks receive
a ``register`` callable instead of returning values, so one plugin may register several things.
Lifecycle hooks are observers: an exception in one is logged and does not stop the others,
nor the stream or tunnel they observe. docs/plugins.md documents each hook; a test fails when
one is missing there.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration: called once when the node or connector starts ------------------------


@hookspec
def gateway_register_protocols(register: Callable[[Any], None]) -> None:
    """Register protocol handlers with ``register(handler)``.

    ``handler`` provides :class:`gateway.protocols.IProtocolHandler`: a ``name`` that apps
    name in their ``protocol`` key, a ``service_factory(app, open_stream, reactor)`` serving the
    app's listen endpoint on the service, and ``connector_stream(stream, app, reactor)``
    handling a stream on the connector. Two plugins registering one name is an error at start.
    """


@hookspec
def gateway_register_sso_providers(register: Callable[[str, Any], None]) -> None:
    """Register single sign-on providers with ``register(name, provider)``; on the connector.

    ``provider`` provides :class:`gateway.protocols.ISSOProvider`. An app selects one with
    ``options.sso = "<name>"``; for each request to that app the connector calls
    ``provider.credentials(app, identity, request)`` (``identity`` is the signed-in user's
    ``{sub, name, email, groups}``, ``request`` the parsed head as the back end will get it) and
    sets the ``(name, value)`` byte pairs it returns (or a Deferred fires with) as headers on the
    back-end request, for example ``Authorization: Negotiate ...`` for Kerberos constrained
    delegation. A failure costs that request (the user gets a 502 page with the correlation id;
    the connector logs the cause). Two plugins registering one name is an error at start.
    Optional provider methods (``start``, ``check_app``, ``on_response``, ``strip_headers``) are
    listed with ISSOProvider.
    """


@hookspec
def gateway_config_sections(register: Callable[[str, Callable[[dict, Any], Any]], None]) -> None:
    """Add top-level tables to the TOML config with ``register(name, parse)``.

    ``parse(table, error)`` validates the table and returns the value plugins will read from
    ``config.sections[name]``; it raises ``error(key, expected)`` (a ConfigError naming the
    file) for bad input. Unknown top-level tables are still an error.
    """


@hookspec
def gateway_service_listeners(register: Callable[[str, str, Any], None], config: Any,
                              open_stream: Callable[[Any, dict], Any], reactor: Any, access: Any,
                              choose_connector: Callable[[Any], str]) -> None:
    """Add listeners a service node serves for several apps at once, such as an HTTP front door.

    Called on the service when the node starts, and again after each SIGHUP reload (the
    listeners registered before are closed first, then the new ones bound). ``config`` is the
    node's :class:`gateway.config.GatewayConfig` (plugin tables in ``config.sections``);
    ``open_stream(app, extra) -> Deferred[Stream]`` opens a stream for ``app`` (one of
    ``config.apps``) exactly like the per-app ``open_stream`` of ``service_factory``.
    Register with ``register(name, endpoint, factory)``: a unique ``name`` for logs, a Twisted
    server endpoint string, and the protocol factory to serve on it. Apps without a ``listen``
    of their own (web apps) are reached only through such listeners.

    ``access`` is a :class:`gateway.service.users.LoginPortal` when the service has an
    ``[access]`` table (else None): the URL users sign in at with ``gateway login``, and
    ``issue_code(identity, code_challenge)``, which a listener that signed a user in calls for
    the one-time code it hands the user's loopback client (the http plugin does this); it
    returns a Deferred firing with the code once the store (shared by every node) holds it.
    Implementations may leave the argument out of their signature.

    ``choose_connector(app) -> str`` names the connector a new stream of ``app`` would go to now
    (least loaded, least recently chosen among equals), or raises NoConnector; pass it back as
    ``open_stream(app, extra, connector=...)``. For a listener that keeps idle streams per
    connector and takes one of the chosen connector's instead of opening a stream (the http
    front door's ``balance = "request"``). Implementations may leave it out too.
    """


@hookspec
def gateway_register_metrics(metrics: Any) -> None:
    """Add metrics to this process's Prometheus endpoint; called once at start, only with ``[metrics] enabled``.

    ``metrics`` is a :class:`gateway.metrics.PluginMetrics`: ``counter``, ``gauge`` and
    ``histogram(name, documentation, labelnames)`` return prometheus-client instruments in the
    process's registry; ``collect(function)`` has ``function()`` called at each scrape for
    metric families built from numbers the plugin keeps anyway (no cost per event).
    ``metrics.roles`` says which roles this process runs (``"node"``, ``"connector"``). Names
    start with ``gateway_``; labels are limited to ``gateway.metrics.ALLOWED_LABELS``, whose
    values come from the config or a closed set (never a user or an address). Without the call
    (metrics off) a plugin's instruments do not exist: check before using them.
    """


@hookspec
def gateway_diagnose_checks(register: Callable[[str, Callable[[Any], Any]], None], config: Any) -> None:
    """Add checks to ``gateway diagnose`` on a connector with ``register(name, check)``.

    ``config`` is the connector's :class:`gateway.config.GatewayConfig` (plugin tables in
    ``config.sections``). ``check(reactor)`` returns (or a Deferred / coroutine gives) a list of
    :class:`gateway.diagnose.Check` (``Check.ok(name, detail)``, ``Check.fail(name, detail,
    fix)``, ``Check.skip(name, detail)``), one line each; an exception is reported as that
    check failing. Register nothing when the plugin is not configured on this connector (the
    Kerberos plugin checks its KDC and keytab only with a ``[kerberos]`` table).
    """


# -- lifecycle observers -----------------------------------------------------------------


@hookspec
def gateway_connector_up(connector: Any) -> None:
    """A connector's tunnel completed its hello: on the service and on the connector.

    ``connector`` always has ``connector_id`` and ``tunnel_id``. On the service it is the
    routing entry (also ``group``, ``address``, ``software_version``, ``load``); on the
    connector it is the tunnel client (also ``welcome``, the service's welcome message).
    """


@hookspec
def gateway_connector_lost(connector: Any, reason: str) -> None:
    """A connector's tunnel ended; ``reason`` says why in a sentence."""


@hookspec
def gateway_stream_opened(stream: Any) -> None:
    """A stream for an app was opened; ``stream`` is a :class:`gateway.protocols.StreamInfo`."""


@hookspec
def gateway_stream_closed(stream: Any, reason: str) -> None:
    """A stream for an app ended; ``reason`` is ``"done"`` or what went wrong."""

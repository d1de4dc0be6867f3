"""Prometheus metrics of a node or connector (``[metrics]``), and what plugins add to them.

One :class:`Metrics` per process holds a registry of its own (never prometheus-client's
global one) and the core's instruments per role: ``gateway_node_*`` on a service node,
``gateway_connector_*`` on a connector (a process with both roles has both). Labels are the
app, its group, the protocol and a result from a closed set (:func:`result_of`), never a user,
an address or a port, so the number of series is bounded by the apps the admin published.

Cost per request and stream: the instruments (:class:`Family`) are plain numbers kept on the
reactor thread, turned into Prometheus' metric families only when scraped: an increment is an
attribute add, a histogram observation a bisect and two adds (a quarter of a microsecond,
against several for prometheus-client's locked values). The labelled children of an (app,
group, protocol) are looked up once and kept (:class:`Series`); a stream holds its series and
its close is a few adds, with no label lookup. Gauges that describe state (tunnels, config
versions) are read only when scraped (:meth:`Metrics.collect`), so they cost nothing between
scrapes. Everything here is used from the reactor thread only (the scrape too).

Plugins add metrics through the ``gateway_register_metrics`` hook, which receives a
:class:`PluginMetrics` (docs/plugins.md).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway import __version__
from gateway.errors import GatewayError
from gateway.service.registry import NoConnector
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.session import TunnelClosed

log = Logger(namespace="gateway.metrics")

ROLES = ("node", "connector")

# Label names a metric may have: each takes its values from the admin's config or a closed set
# in the code. A user, a client address or a port as a label would make a series per user.
ALLOWED_LABELS = frozenset({"app", "group", "protocol", "result", "direction", "cause", "code_class", "kind"})

# Stream setup on a tunnel is a LAN dial behind a WAN hop: most take milliseconds, a slow
# back end or a retry on another connector seconds.
SETUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# HTTP requests through the front door: the same span, longer for slow back ends.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)

_NAME = re.compile(r"gateway_[a-zA-Z0-9_]+")

_RESET_RESULTS = {int(code): code.name.lower() for code in ResetCode}


class MetricsError(GatewayError):
    """A plugin asked for a metric the gateway will not make (name or labels)."""


def result_of(failure: Any) -> str:
    """How a stream (or an attempt to open one) ended, as one word from a closed set.

    ``done``, a reset code's name (``connect_failed``, ``unknown_app``, ``timeout``, ...),
    ``no_connector``, ``tunnel_lost``, ``aborted`` or ``error``: never the free text of a reason.
    """
    if failure is None or failure.check(ConnectionDone):
        return "done"
    code = getattr(failure.value, "code", None)
    if failure.check(GatewayError) and isinstance(code, int):
        return _RESET_RESULTS.get(code, "reset")
    if failure.check(NoConnector):
        return "no_connector"
    if failure.check(ConnectionLost, TunnelClosed):
        return "tunnel_lost"
    if failure.check(ConnectionAborted):
        return "aborted"
    return "error"


class CounterChild:
    """One series' value: ``inc`` (a counter only goes up), ``dec`` and ``set`` for gauges."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    """One series' buckets (``counts[i]``: observations in (bounds[i-1], bounds[i]], the last +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Family:
    """A counter, gauge or histogram with its labelled children; collected when scraped.

    ``labels(*values)`` returns the child of those label values (made on first use; keep it);
    ``family.inc()`` / ``observe()`` / ``set()`` act on the child without labels."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = ()) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(b for b in buckets if not math.isinf(b))
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"metric {self.name}: expected values for {self.labelnames}, got {values!r}")
            child = self.children[values] = (HistogramChild(self.bounds) if self.kind == "histogram"
                                              else CounterChild())
        return child

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Metric:
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        else:
            family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            if self.kind == "histogram":
                family.add_metric(values, _cumulative(child), child.sum)
            else:
                family.add_metric(values, child.value)
        return family


def _cumulative(child: HistogramChild) -> list[tuple[str, float]]:
    total, buckets = 0, []
    for bound, count in zip((*child.bounds, math.inf), child.counts):
        total += count
        buckets.append((floatToGoString(bound), total))
    return buckets


class Families:
    """The registry's view of every Family made in one process (a prometheus-client collector)."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def add(self, family: Family) -> Family:
        if family.name in self.families:
            raise ValueError(f"the metric name {family.name!r} is taken")
        self.families[family.name] = family
        return family

    def collect(self) -> Iterable[Metric]:
        return [family.collect() for family in self.families.values()]

    def describe(self) -> list:
        return []


class _NullSeries:
    """What a stream holds when metrics are off: every call does nothing."""

    def closed(self, result: str, up: int, down: int) -> None:
        pass

    def setup(self, seconds: float) -> None:
        pass


NULL_SERIES = _NullSeries()


class Series:
    """The labelled children of one (app, group, protocol): looked up once, then only incremented."""

    def __init__(self, role: RoleMetrics, app: str, group: str, protocol: str) -> None:
        labels = (app, group, protocol)
        self._labels = labels
        self._role = role
        self.open = role.streams_open.labels(*labels)
        self.opened_ok = role.streams_opened.labels(*labels, "ok")
        self.bytes_up = role.stream_bytes.labels(*labels, "up")
        self.bytes_down = role.stream_bytes.labels(*labels, "down")
        self._setup = role.stream_setup.labels(*labels) if role.stream_setup is not None else None
        self._closed: dict[str, Any] = {}

    def opened(self) -> Series:
        self.opened_ok.inc()
        self.open.inc()
        return self

    def setup(self, seconds: float) -> None:
        if self._setup is not None:
            self._setup.observe(seconds)

    def closed(self, result: str, up: int, down: int) -> None:
        child = self._closed.get(result)
        if child is None:
            child = self._closed[result] = self._role.streams_closed.labels(*self._labels, result)
        child.inc()
        self.open.dec()
        if up:
            self.bytes_up.inc(up)
        if down:
            self.bytes_down.inc(down)

    def refused(self, result: str) -> None:
        self._role.streams_opened.labels(*self._labels, result).inc()


class RoleMetrics:
    """Streams and tunnel handshakes of one role (``node`` or ``connector``)."""

    def __init__(self, families: Families, role: str) -> None:
        p = f"gateway_{role}"
        who = "this node routed to connectors" if role == "node" else "the service opened on this connector"
        labels = ("app", "group", "protocol")
        self.streams_open = families.add(Family("gauge", f"{p}_streams_open", f"Streams {who}, open now.", labels))
        self.streams_opened = families.add(Family(
            "counter", f"{p}_streams_opened", f"Streams {who}, by result: ok, or why none was opened.",
            (*labels, "result")))
        self.streams_closed = families.add(Family(
            "counter", f"{p}_streams_closed", f"Streams {who} that ended, by how (done, a reset code,"
            " tunnel_lost...).", (*labels, "result")))
        self.stream_bytes = families.add(Family(
            "counter", f"{p}_stream_bytes", f"Bytes of streams {who} once they ended; up is user to app, down"
            " app to user.", (*labels, "direction")))
        self.stream_setup = families.add(Family(
            "histogram", f"{p}_stream_setup_seconds", "From the SYN sent to a connector to its ACK (back end"
            " reached), per attempt.", labels, buckets=SETUP_BUCKETS)) if role == "node" else None
        self.handshakes = families.add(Family(
            "counter", f"{p}_tunnel_handshakes", "Tunnel connections by how their TLS handshake and hello ended.",
            ("result",)))
        self._series: dict[tuple[str, str, str], Series] = {}
        self._handshakes: dict[str, Any] = {}

    def series(self, app: str, group: str, protocol: str) -> Series:
        key = (app, group, protocol)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, app, group, protocol)
        return found

    def opened(self, app: str, group: str, protocol: str) -> Series:
        """Count a stream opened; keep what this returns on the stream for its close."""
        return self.series(app, group, protocol).opened()

    def refused(self, app: str, group: str, protocol: str, result: str) -> None:
        self.series(app, group, protocol).refused(result)

    def handshake(self, result: str) -> None:
        child = self._handshakes.get(result)
        if child is None:
            child = self._handshakes[result] = self.handshakes.labels(result)
        child.inc()


class NullRoleMetrics:
    """A role's metrics when ``[metrics]`` is off: the same calls, doing nothing."""

    def opened(self, app: str, group: str, protocol: str) -> _NullSeries:
        return NULL_SERIES

    def refused(self, app: str, group: str, protocol: str, result: str) -> None:
        pass

    def handshake(self, result: str) -> None:
        pass


NULL_ROLE = NullRoleMetrics()


class _FunctionCollector:
    """A prometheus-client collector calling ``function`` at each scrape; its failure costs only its metrics."""

    def __init__(self, function: Callable[[], Iterable[Metric]], owner: str) -> None:
        self.function = function
        self.owner = owner

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self.function())
        except Exception:
            log.failure("metrics of {owner} could not be collected; scraped without them", owner=self.owner)
            return []

    def describe(self) -> list:
        return []   # not described: the registry must not call collect() when it is registered


class PluginMetrics:
    """What ``gateway_register_metrics`` gives a plugin: instruments in the process's registry.

    Names must start with ``gateway_``; label names must be in :data:`ALLOWED_LABELS` (values
    from the config or a closed set of the plugin's, never a user or an address). A name taken
    twice is refused at start.
    """

    def __init__(self, metrics: Metrics, owner: str) -> None:
        self._metrics = metrics
        self.owner = owner
        self.roles = metrics.roles

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Family:
        return self._make("counter", name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Family:
        return self._make("gauge", name, documentation, labelnames)

    def histogram(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = REQUEST_BUCKETS) -> Family:
        return self._make("histogram", name, documentation, labelnames, buckets=buckets)

    def collect(self, function: Callable[[], Iterable[Metric]]) -> None:
        """Call ``function`` at each scrape for metric families (``prometheus_client.core.CounterMetricFamily``,
        ...) built from counters the plugin keeps anyway: nothing to do per event."""
        self._metrics.registry.register(_FunctionCollector(function, self.owner))

    def _make(self, kind: str, name: str, documentation: str, labelnames: tuple[str, ...], **kwargs: Any) -> Family:
        check_metric(name, labelnames, self.owner)
        try:
            return self._metrics.families.add(Family(kind, name, documentation, tuple(labelnames), **kwargs))
        except ValueError as e:
            raise MetricsError(f"plugin {self.owner}: metric {name!r} refused: {e}") from None


def check_metric(name: str, labelnames: Iterable[str], owner: str) -> None:
    """Refuse a metric name outside ``gateway_`` or a label that could take a value per user or address."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MetricsError(f"plugin {owner}: metric {name!r} refused: names start with 'gateway_'"
                           f" (then the plugin's name, e.g. 'gateway_{owner}_...'), in letters, digits and _")
    unknown = sorted(set(labelnames) - ALLOWED_LABELS)
    if unknown:
        raise MetricsError(f"plugin {owner}: metric {name!r} refused: label {unknown[0]!r} is not one of"
                           f" {', '.join(sorted(ALLOWED_LABELS))} (labels must have a bounded set of values:"
                           f" never a user, an address or a port)")


class Metrics:
    """The process's registry: process and platform metrics, ``gateway_info``, each role's instruments."""

    def __init__(self, roles: Iterable[str]) -> None:
        self.roles = frozenset(roles)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.families = Families()
        self.registry.register(self.families)
        info = self.families.add(Family("gauge", "gateway_info", "Always 1: the software version and the roles"
                                        " this process runs.", ("version", "kind")))
        for role in sorted(self.roles):
            info.labels(__version__, role).set(1)
        self.node = RoleMetrics(self.families, "node") if "node" in self.roles else NULL_ROLE
        self.connector = RoleMetrics(self.families, "connector") if "connector" in self.roles else NULL_ROLE

    def collect(self, function: Callable[[], Iterable[Metric]], owner: str) -> None:
        """Read state (tunnels up, config versions) only when scraped."""
        self.registry.register(_FunctionCollector(function, owner))

    def for_plugin(self, owner: str) -> PluginMetrics:
        return PluginMetrics(self, owner)


def role_metrics(metrics: Metrics | None, role: str) -> RoleMetrics | NullRoleMetrics:
    """The instruments of ``role``, or ones doing nothing when metrics are off."""
    if metrics is None:
        return NULL_ROLE
    return metrics.node if role == "node" else metrics.connector


PATH = b"/metrics"


class MetricsPage(Resource):
    """``GET /metrics``: the registry in Prometheus' text format, written on the reactor thread
    (collectors read the node's state, which only that thread may touch). Anything else: 404."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        if request.path != PATH:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Not found: the metrics are at /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)

    def render_HEAD(self, request: Any) -> bytes:
        return self.render_GET(request)


def metrics_site(metrics: Metrics) -> Site:
    site = Site(MetricsPage(metrics.registry))
    site.displayTracebacks = False
    site.noisy = False
    site.log = lambda request: None   # a scrape every few seconds is not worth a log line each
    return site


class MetricsListener(StreamServerEndpointService):
    """The ``/metrics`` listener; a port it cannot bind stops the start with the key to change."""

    def __init__(self, reactor: Any, listen: str, metrics: Metrics) -> None:
        super().__init__(serverFromString(reactor, listen), metrics_site(metrics))
        self.listen = listen
        self._raiseSynchronously = True
        self.setName("metrics")

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise GatewayError(f"metrics.listen: cannot listen on {self.listen} ({e.socketError}): choose a free"
                               f" port there, or set metrics.enabled = false") from None

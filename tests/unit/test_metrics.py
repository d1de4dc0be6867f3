"""Prometheus metrics: bounded label sets, results from a closed set, the plugin API's refusals, the page."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.metrics import Metrics, MetricsError, MetricsPage, result_of
from gateway.service.node import ServiceNode
from gateway.service.registry import NoConnector
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import StreamReset
from test_connector import _NoPlugins, tunnel_to
from test_routing import node_with, open_web


def samples(metrics: Metrics, prefix: str = "gateway_") -> dict[tuple, float]:
    """Every sample of the registry whose name starts with ``prefix``, by (name, sorted labels)."""
    found = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name.startswith(prefix):
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def node_with_metrics(behaviour):
    """A service node with metrics on and one in-memory tunnel to a connector doing behaviour(stream)."""
    metrics = Metrics(["node"])
    node, pumps = node_with(behaviour, metrics=metrics)
    return node, metrics, pumps


def test_fifty_users_and_source_ports_make_no_new_series(monkeypatch):
    """After one stream of an app, 50 more from other users and client ports, ending in various ways, add no series."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    node, metrics, pumps = node_with_metrics(lambda stream: stream.accept())
    first = open_web(node, pumps, monkeypatch, {"user": "alice@example.test", "client": "192.0.2.1:40000"})
    first.write(b"hello")
    first.loseConnection()
    pumps[0].flush()
    node.stream_closed(first, Failure(ConnectionDone()))   # the peer's FIN never comes here: end it as done
    after_one = set(samples(metrics))
    for i in range(50):
        stream = open_web(node, pumps, monkeypatch,
                          {"user": f"user{i}@example.test", "client": f"198.51.100.{i}:{50000 + i}"})
        stream.write(b"x" * i)
        node.stream_closed(stream, Failure(ConnectionDone()))
    assert set(samples(metrics)) == after_one, "users or client addresses became series"
    values = samples(metrics)
    labels = (("app", "web"), ("group", "default"), ("protocol", "tcp"))
    assert values[("gateway_node_streams_opened_total", (*labels, ("result", "ok")))] == 51
    assert values[("gateway_node_streams_closed_total", (*labels, ("result", "done")))] == 51
    assert values[("gateway_node_stream_bytes_total", (("app", "web"), ("direction", "up"), ("group", "default"),
                                                       ("protocol", "tcp")))] == 5 + sum(range(50))
    assert values[("gateway_node_stream_setup_seconds_count", labels)] == 51
    every_label = {name for (_, items) in values for name, _ in items}
    assert every_label <= {"app", "group", "protocol", "result", "direction", "le", "version", "kind"}


def test_failure_reasons_with_free_text_map_to_one_result_each(monkeypatch):
    """Resets whose reasons name users and addresses count under the code's name: 20 of them, one series."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    seen = []

    def refuse(stream):
        seen.append(stream)
        n = len(seen)
        stream.reset(ResetCode.REFUSED, f"user{n} may not reach 10.0.{n}.1:{n}")

    node, metrics, pumps = node_with_metrics(refuse)
    assert open_web(node, pumps, monkeypatch, {"user": "user0", "client": "192.0.2.1:1000"}).check(StreamReset)
    after_one = set(samples(metrics))
    for i in range(1, 20):
        assert open_web(node, pumps, monkeypatch, {"user": f"user{i}", "client": f"192.0.2.{i}:1{i}"}).check(StreamReset)
    values = samples(metrics)
    assert set(values) == after_one
    assert values[("gateway_node_streams_opened_total", (("app", "web"), ("group", "default"), ("protocol", "tcp"),
                                                         ("result", "refused")))] == 20


def test_no_connector_is_counted_as_a_result():
    """An app whose group has no connector counts one stream not opened, result no_connector."""
    config = parse_config({
        "service": {"state_dir": "/tmp/unused"},
        "apps": [{"name": "web", "listen": "tcp:0", "destination": "10.0.0.5:80", "options": {"preauth": "none"}}],
    }, "svc.toml")
    metrics = Metrics(["node"])
    node = ServiceNode(config, Clock(), pm=None, handlers={}, metrics=metrics)
    failures = []
    node.open_app_stream(node.apps["web"], {}).addErrback(failures.append)
    assert failures and failures[0].check(NoConnector)
    key = ("gateway_node_streams_opened_total", (("app", "web"), ("group", "default"), ("protocol", "tcp"),
                                                 ("result", "no_connector")))
    assert samples(metrics)[key] == 1


@pytest.mark.parametrize("failure, result", [
    (None, "done"),
    (Failure(ConnectionDone()), "done"),
    (Failure(StreamReset(ResetCode.CONNECT_FAILED, "10.0.0.5:80 refused alice's connection")), "connect_failed"),
    (Failure(StreamReset(99, "a code from a newer peer")), "reset"),
    (Failure(NoConnector("no connector of group g")), "no_connector"),
    (Failure(ConnectionLost("tunnel gone")), "tunnel_lost"),
    (Failure(ValueError("anything at all")), "error"),
])
def test_results_come_from_a_closed_set(failure, result):
    """result_of names how a stream ended by code or kind, never with the reason's text."""
    assert result_of(failure) == result


def test_a_plugin_metric_labelled_by_user_or_address_is_refused():
    """A plugin asking for a 'user' or 'client' label, or a name outside gateway_, is refused naming the rule."""
    plugin = Metrics(["connector"]).for_plugin("example")
    for label in ("user", "client", "address", "port"):
        with pytest.raises(MetricsError, match=f"label '{label}' is not one of .*never a user, an address"):
            plugin.counter("gateway_example_things", "Things.", ("app", label))
    with pytest.raises(MetricsError, match="names start with 'gateway_'"):
        plugin.counter("things_total", "Things.")
    plugin.counter("gateway_example_things", "Things.", ("app", "result"))
    with pytest.raises(MetricsError, match="plugin example: metric 'gateway_example_things' refused"):
        plugin.gauge("gateway_example_things", "Again.")


def test_a_plugin_collector_that_fails_costs_only_its_metrics():
    """A plugin's collect function raising leaves the rest of the scrape intact."""
    metrics = Metrics(["connector"])
    metrics.for_plugin("broken").collect(lambda: 1 / 0)
    request = DummyRequest([b"metrics"])
    request.path = b"/metrics"
    text = MetricsPage(metrics.registry).render_GET(request).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "gateway_connector_streams_opened" in names and "gateway_info" in names


def test_the_page_serves_metrics_only_at_its_path():
    """GET /metrics is Prometheus text; any other path is a 404 saying where the metrics are."""
    metrics = Metrics(["node"])
    page = MetricsPage(metrics.registry)
    request = DummyRequest([b"metrics"])
    request.path = b"/metrics"
    body = page.render_GET(request).decode()
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
    info = [s for f in text_string_to_metric_families(body) if f.name == "gateway_info" for s in f.samples]
    assert info and info[0].labels["kind"] == "node"
    other = DummyRequest([b"secret"])
    other.path = b"/secret"
    assert b"/metrics" in page.render_GET(other) and other.responseCode == 404


def test_kerberos_counters_become_metric_families():
    """The kerberos plugin reads its provider's counters at scrape time: KDC round trips, cache hits, causes."""
    from gateway_kerberos_sso import counter_families

    provider = SimpleNamespace(counters={"kdc_exchanges": 3, "cache_hits": 40, "shared_exchanges": 2,
                                         "cached_entries": 3, "failures": {"KDC_UNREACHABLE": 1}})
    families = {f.name: f for f in counter_families([provider])}
    assert families["gateway_kerberos_kdc_round_trips"].samples[0].value == 3
    assert families["gateway_kerberos_cache_hits"].samples[0].value == 40
    assert families["gateway_kerberos_failures"].samples[0].labels == {"cause": "kdc_unreachable"}


def test_metrics_config_defaults_to_off_and_loopback():
    """Without [metrics] nothing is served; enabled alone listens on 127.0.0.1:9464."""
    base = {"connector": {"state_dir": "/tmp/unused"}}
    assert parse_config(base, "c.toml").metrics.enabled is False
    on = parse_config({**base, "metrics": {"enabled": True}}, "c.toml").metrics
    assert on.enabled and on.listen == "tcp:9464:interface=127.0.0.1"


@pytest.mark.parametrize("table, key, expected", [
    ({"enabled": "yes"}, "metrics.enabled", "true or false"),
    ({"enabled": True, "listen": "ssl:9464"}, "metrics.listen", "not \"ssl:\""),
    ({"enabled": True, "listen": "tcp:7000:interface=127.0.0.1"}, "metrics.listen", "other than service.listen"),
    ({"enabled": True, "user": "x"}, "metrics.user", "unknown key"),
])
def test_bad_metrics_keys_are_refused_naming_them(table, key, expected):
    """A bad [metrics] key is refused with the key and what was expected."""
    data = {"service": {"state_dir": "/tmp/unused", "listen": "tcp:7000:interface=127.0.0.1"}, "metrics": table}
    with pytest.raises(ConfigError) as e:
        parse_config(data, "svc.toml")
    assert e.value.key == key and expected in str(e.value)


def test_connector_counts_refusals_with_its_own_labels_only():
    """Streams naming unknown apps count under app "" (never the name the peer sent); accepted ones per app."""
    from gateway.connector.node import ConnectorNode

    class Accept:
        name = "tcp"

        def connector_stream(self, stream, app, reactor):
            stream.accept()

    config = parse_config({"connector": {"state_dir": "/tmp/unused"}}, "connector.toml")
    identity = SimpleNamespace(connector_id="c0ffee", group="default", name="test", service_host="127.0.0.1",
                               service_port=1)
    metrics = Metrics(["connector"])
    node = ConnectorNode(config, Clock(), pm=_NoPlugins(), handlers={"tcp": Accept()}, identity=identity,
                         metrics=metrics)
    node.apply_config({"type": "config", "version": "v1", "group": "default", "apps": [
        {"name": "web", "protocol": "tcp", "destination": "10.1.2.3:80", "host": "10.1.2.3", "port": 80}]})
    service, pump = tunnel_to(node)
    pump.client.on_stream_closed = node.stream_closed   # as ConnectorNode._build_session does
    refused = []
    for i in range(30):
        service.open_stream({"kind": "app", "app": f"guess-{i}", "destination": "10.1.2.3:80"}).addErrback(
            refused.append)
        service.open_stream({"kind": "app", "app": "web", "destination": "10.1.2.3:80"})
    pump.flush()
    assert len(refused) == 30
    values = {k: v for k, v in samples(metrics, "gateway_connector_streams").items() if v}
    assert values == {
        ("gateway_connector_streams_opened_total", (("app", ""), ("group", "default"), ("protocol", ""),
                                                    ("result", "unknown_app"))): 30,
        ("gateway_connector_streams_opened_total", (("app", "web"), ("group", "default"), ("protocol", "tcp"),
                                                    ("result", "ok"))): 30,
        ("gateway_connector_streams_open", (("app", "web"), ("group", "default"), ("protocol", "tcp"))): 30,
    }


def test_histogram_buckets_are_cumulative_with_bounds_inclusive():
    """A value equal to a bound counts in that bucket; buckets add up to +Inf; count and sum are exposed."""
    metrics = Metrics(["node"])
    h = metrics.for_plugin("example").histogram("gateway_example_seconds", "Seconds.", ("app",),
                                                 buckets=(0.001, 0.0025, 0.005))
    child = h.labels("web")
    for v in (0.001, 0.003, 100.0):
        child.observe(v)
    values = samples(metrics, "gateway_example_seconds")
    le = {dict(k[1])["le"]: v for k, v in values.items() if k[0].endswith("_bucket")}
    assert le == {"0.001": 1, "0.0025": 1, "0.005": 2, "+Inf": 3}
    assert values[("gateway_example_seconds_count", (("app", "web"),))] == 3
    assert values[("gateway_example_seconds_sum", (("app", "web"),))] == pytest.approx(100.004)


def test_udp_drops_are_counted_per_app_when_a_flow_ends(monkeypatch):
    """The tcp plugin's metric adds a flow's drops both ways to its app's series when the flow closes."""
    import gateway_tcp

    monkeypatch.setattr(gateway_tcp, "UDP_DROPPED", None)
    metrics = Metrics(["connector"])
    gateway_tcp.gateway_register_metrics(metrics.for_plugin("tcp"))
    app = SimpleNamespace(name="dns", group="dc1", destination="10.0.0.53:53", host="10.0.0.53", port=53)
    stream = SimpleNamespace(metadata={"request_id": "r1"}, closed=False, loseConnection=lambda: None)
    for _ in range(2):
        flow = gateway_tcp.UDPFlow(stream, app, Clock(), idle=30)
        flow.queue.dropped, flow.unsent = 3, 1
        flow.close("the test ended it")
    values = {k: v for k, v in samples(metrics, "gateway_udp").items()}
    assert values == {
        ("gateway_udp_datagrams_dropped_total", (("app", "dns"), ("direction", "to_user"), ("group", "dc1"))): 6,
        ("gateway_udp_datagrams_dropped_total", (("app", "dns"), ("direction", "to_app"), ("group", "dc1"))): 2,
    }

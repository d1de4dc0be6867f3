"""/metrics of a real node and connector after real traffic, parsed with prometheus_client.parser."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from gateway_harness import HOST, echo_handler, free_port, toml_table, wait_until
from gateway_harness import http_request as get
from loadgen import HttpBackend
from prometheus_client.parser import text_string_to_metric_families

WEB = "web.apps.example.test"


def scrape(port: int) -> dict[tuple, float]:
    """Every sample at 127.0.0.1:port/metrics by (name, sorted labels), parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def echo_once(port: int, payload: bytes) -> None:
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == payload


def ours(samples: dict) -> set:
    """The gateway's series (not the process collector's), without their values."""
    return {key for key in samples if key[0].startswith("gateway_")}


def test_metrics_of_node_and_connector_count_the_traffic_made(gw, backends):
    """TCP connections and HTTP requests show on both endpoints with matching counts; new client ports add no series."""
    echo = backends(echo_handler)
    web = HttpBackend()
    try:
        node_metrics, conn_metrics, front = free_port(), free_port(), free_port()
        svc = gw.service([{"name": "echo", "destination": echo.destination}], start=False)
        svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                    "internal_url": web.url}])
        svc.config_path.write_text(svc.config_path.read_text() + "\n" + toml_table(
            "metrics", {"enabled": True, "listen": f"tcp:{node_metrics}:interface={HOST}"}))
        svc.start()
        conn = gw.connector(svc, start=False)
        conn.config_path.write_text(conn.config_path.read_text() + "\n" + toml_table(
            "metrics", {"enabled": True, "listen": f"tcp:{conn_metrics}:interface={HOST}"}))
        conn.start()
        wait_until(lambda: get(front, f"{WEB}:{front}", "/")[0].status == 200, 30, "the web app to answer")
        before = scrape(node_metrics)
        http_before = value(before, "gateway_http_responses_total", app="web", group="default", code_class="2xx")

        payload = b"m" * 1000
        for _ in range(7):
            echo_once(svc.app_port("echo"), payload)
        for _ in range(5):
            assert get(front, f"{WEB}:{front}", "/page")[0].status == 200
        assert get(front, f"nowhere.example.test:{front}", "/")[0].status == 404

        echo_labels = {"app": "echo", "group": "default", "protocol": "tcp"}
        wait_until(lambda: value(scrape(node_metrics), "gateway_node_streams_closed_total", **echo_labels,
                                 result="done") == 7, 30, "the node to count 7 echo streams closed")
        wait_until(lambda: value(scrape(conn_metrics), "gateway_connector_streams_closed_total", **echo_labels,
                                 result="done") == 7, 30, "the connector to count 7 echo streams closed")
        node, connector = scrape(node_metrics), scrape(conn_metrics)

        assert value(node, "gateway_node_streams_opened_total", **echo_labels, result="ok") == 7
        assert value(node, "gateway_node_streams_open", **echo_labels) == 0
        assert value(node, "gateway_node_stream_bytes_total", **echo_labels, direction="up") == 7000
        assert value(node, "gateway_node_stream_bytes_total", **echo_labels, direction="down") == 7000
        assert value(node, "gateway_node_stream_setup_seconds_count", **echo_labels) == 7
        assert value(node, "gateway_http_responses_total", app="web", group="default",
                     code_class="2xx") - http_before == 5
        assert value(node, "gateway_http_responses_total", app="", group="", code_class="4xx") == 1
        assert value(node, "gateway_node_tunnels", group="default") == conn.tunnels
        assert value(node, "gateway_node_connectors", group="default") == 1
        assert value(node, "gateway_node_tunnel_handshakes_total", result="ok") == conn.tunnels

        assert value(connector, "gateway_connector_streams_opened_total", **echo_labels, result="ok") == 7
        assert value(connector, "gateway_connector_stream_bytes_total", **echo_labels, direction="up") == 7000
        assert value(connector, "gateway_connector_tunnels") == conn.tunnels
        assert value(connector, "gateway_connector_tunnel_handshakes_total", result="ok") == conn.tunnels
        node_version = [dict(k[1])["version"] for k in node if k[0] == "gateway_node_config_info"]
        conn_version = [dict(k[1])["version"] for k in connector if k[0] == "gateway_connector_config_info"]
        assert node_version and node_version == conn_version, (node_version, conn_version)

        # Twenty more connections from other source ports: counts move, the series stay the same.
        node_series, conn_series = ours(node), ours(connector)
        for _ in range(20):
            echo_once(svc.app_port("echo"), payload)
        wait_until(lambda: value(scrape(node_metrics), "gateway_node_streams_closed_total", **echo_labels,
                                 result="done") == 27, 30, "the node to count 27 echo streams closed")
        wait_until(lambda: value(scrape(conn_metrics), "gateway_connector_streams_closed_total", **echo_labels,
                                 result="done") == 27, 30, "the connector to count 27 echo streams closed")
        assert ours(scrape(node_metrics)) == node_series
        assert ours(scrape(conn_metrics)) == conn_series

        try:
            urllib.request.urlopen(f"http://{HOST}:{node_metrics}/other", timeout=10)
            raise AssertionError("a path other than /metrics was served")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        web.close()


def test_metrics_are_off_by_default(gw, backends):
    """Without [metrics] neither the node nor the connector starts a metrics endpoint."""
    echo = backends(echo_handler)
    svc = gw.service([{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc)
    echo_once(svc.app_port("echo"), b"x")
    assert "metrics endpoint" not in svc.log() and "metrics endpoint" not in conn.log()

"""Per-request load balancing (issue 13 item 3) through real processes: the requests of one
keep-alive client connection spread over the group's connectors with options.balance = "request",
and stay on one connector without it."""

from __future__ import annotations

import http.client

import pytest

from gateway_harness import HOST, free_port, wait_until
from gateway_harness import http_request as get
from loadgen import ID_HEADER, HttpBackend

WEB = "web.apps.example.test"
REQUESTS = 20


def served(connector) -> int:
    """Requests this connector passed to the web app's back end (its log says so for each)."""
    return connector.proc.log().count("for app web to")


def two_connectors(gw, backend: HttpBackend, **options):
    front = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                "internal_url": backend.url, "options": options}])
    svc.start()
    connectors = [gw.connector(svc, name=f"c{i}") for i in range(2)]
    wait_until(lambda: sum(1 for line in svc.proc.log().splitlines() if " up on tunnel " in line) >= 2, 30,
               "both connectors' tunnels")
    wait_until(lambda: get(front, f"{WEB}:{front}", "/")[0].status == 200, 30, "the web app to answer")
    return front, connectors


def one_connection(front: int, count: int) -> list[bytes]:
    """``count`` GETs on one keep-alive connection (checked: the socket is never replaced); the bodies."""
    conn = http.client.HTTPConnection(HOST, front, timeout=30)
    conn.connect()
    sock = conn.sock
    bodies = []
    try:
        for i in range(count):
            conn.request("GET", f"/r{i}", headers={"Host": f"{WEB}:{front}", ID_HEADER: f"r{i}"})
            response = conn.getresponse()
            bodies.append(response.read())
            assert response.status == 200 and not response.will_close, (response.status, response.headers)
            assert conn.sock is sock, "the client connection was replaced: not one keep-alive connection"
    finally:
        conn.close()
    return bodies


@pytest.mark.timeout(120)
def test_requests_of_one_keep_alive_connection_spread_over_the_connectors_with_balance_request(gw):
    with HttpBackend() as backend:
        front, connectors = two_connectors(gw, backend, balance="request")
        before = [served(c) for c in connectors]
        bodies = one_connection(front, REQUESTS)
        wait_until(lambda: sum(served(c) for c in connectors) - sum(before) >= REQUESTS, 10, "the connectors' log lines")
    assert all(body.startswith(b"GET ") for body in bodies), bodies[:3]
    counts = [served(c) - b for c, b in zip(connectors, before)]
    # The node chooses per request (least loaded, then least recently chosen): they take turns.
    assert sum(counts) == REQUESTS and min(counts) >= REQUESTS // 2 - 2, counts
    assert backend.seen.twice() == [] and all(f"r{i}" in backend.seen for i in range(REQUESTS))


@pytest.mark.timeout(120)
def test_without_it_one_keep_alive_connection_stays_on_one_connector(gw):
    with HttpBackend() as backend:
        front, connectors = two_connectors(gw, backend)
        before = [served(c) for c in connectors]
        one_connection(front, REQUESTS)
        wait_until(lambda: sum(served(c) for c in connectors) - sum(before) >= REQUESTS, 10, "the connectors' log lines")
    counts = sorted(served(c) - b for c, b in zip(connectors, before))
    assert counts == [0, REQUESTS], counts

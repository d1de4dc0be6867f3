"""Lossless drain (issue 14, part E): connectors restarted in turn under load fail no request."""

from __future__ import annotations

import signal

import pytest

from gateway_harness import free_port, wait_until
from gateway_harness import http_request as get
from loadgen import HttpBackend, LoadGen, Seen, tcp_handler

WEB = "web.apps.example.test"
RESTARTS = 3   # of each connector, in turn
DRAIN_TIMEOUT = 3.0
# Clients that think this long between requests keep idle kept-alive streams open across a
# whole drain (longer than DRAIN_TIMEOUT): the drain must not wait for them.
THINK = DRAIN_TIMEOUT + 1


def group_of(n, gw, backends, web_backend, tcp_seen, **connector_options):
    """A service with a web app (front door) and a TCP app, both in one group of `n` connectors."""
    tcp_backend = backends(tcp_handler(tcp_seen, delay=0.005))
    front = free_port()
    svc = gw.service(apps=[{"name": "tcp", "destination": tcp_backend.destination}], start=False)
    svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                "internal_url": web_backend.url}])
    svc.start()
    connectors = [gw.connector(svc, name=f"c{i}", tunnels=2, **connector_options) for i in range(n)]
    wait_until(lambda: get(front, f"{WEB}:{front}", "/")[0].status == 200, 30, "the web app to answer")
    return svc, front, connectors


def served(connector) -> int:
    """Web requests this run of the connector passed to the back end."""
    return connector.proc.log().count("for app web to")


def restart(connector, drain_timeout: float) -> str:
    """SIGTERM (drain), wait for the exit, start again, wait for its tunnels; the drained run's log."""
    proc = connector.proc
    proc.signal(signal.SIGTERM)
    assert proc.wait(drain_timeout + 15) == 0, proc.tail()
    connector.start()
    return proc.log()


@pytest.mark.timeout(300)
def test_connectors_restarted_in_turn_under_load_fail_no_request(gw, backends):
    """A group of two connectors, each restarted in turn (SIGTERM, exit, start) three times under HTTP
    keep-alive and TCP load: not one request fails, none reaches the back end twice, no drain cuts a stream."""
    web_backend = HttpBackend(delay=0.005)
    tcp_seen = Seen()
    svc, front, connectors = group_of(2, gw, backends, web_backend, tcp_seen, drain_timeout=DRAIN_TIMEOUT)
    busy = LoadGen(http_port=front, http_host=f"{WEB}:{front}", tcp_port=svc.app_port("tcp"),
                   http_workers=4, tcp_workers=2, max_requests=200_000, max_seconds=240)
    idle = LoadGen(http_port=front, http_host=f"{WEB}:{front}", http_workers=8, max_requests=200_000,
                   max_seconds=240, pause=THINK)
    drained_logs = []
    try:
        with busy, idle:
            wait_until(lambda: all(served(c) > 20 for c in connectors), 30, "load on both connectors")
            for _ in range(RESTARTS):
                for connector in connectors:
                    drained_logs.append(restart(connector, DRAIN_TIMEOUT))
                    # Kept-alive clients stay on the connector they are on: the TCP app's new
                    # connections spread, and the next restart moves the HTTP clients over.
                    wait_until(lambda c=connector: "config " in c.proc.log(), 30, f"{connector.name}'s config")
                    done = busy.done
                    wait_until(lambda d=done: busy.done > d + 200, 30, "load to carry on")
    finally:
        web_backend.close()
    failures = busy.failures + idle.failures
    assert failures == [], f"{busy.summary()} | {idle.summary()}; first: {failures[:5]}"
    assert busy.succeeded("http-post") > 100 and busy.succeeded("tcp") > 100, busy.summary()
    assert idle.succeeded() > 20, idle.summary()
    assert web_backend.seen.twice() == [] and tcp_seen.twice() == []
    cut = [line for log in drained_logs for line in log.splitlines() if "drain deadline passed" in line]
    assert cut == [], f"{len(cut)} of {len(drained_logs)} drains ran out of time (idle kept-alive streams held them): {cut[:2]}"


@pytest.mark.timeout(300)
def test_a_group_of_one_restarted_under_load_holds_new_requests_until_it_is_back(gw, backends):
    """The only connector of a group restarted three times under HTTP and TCP load: requests made while it
    is away wait for it (up to the app's connect_timeout) instead of failing; none fails."""
    web_backend = HttpBackend(delay=0.005)
    tcp_seen = Seen()
    svc, front, (connector,) = group_of(1, gw, backends, web_backend, tcp_seen, drain_timeout=DRAIN_TIMEOUT)
    load = LoadGen(http_port=front, http_host=f"{WEB}:{front}", tcp_port=svc.app_port("tcp"),
                   http_workers=3, tcp_workers=3, max_requests=100_000, max_seconds=200)
    try:
        with load:
            for _ in range(RESTARTS):
                done = load.done
                wait_until(lambda d=done: load.done > d + 100, 30, "load through the connector")
                restart(connector, DRAIN_TIMEOUT)
            done = load.done
            wait_until(lambda d=done: load.done > d + 100, 30, "load through the connector")
    finally:
        web_backend.close()
    assert load.failures == [], f"{load.summary()}; first: {load.failures[:5]}"
    assert load.succeeded("tcp") > 50 and load.succeeded("http-post") > 30, load.summary()
    assert web_backend.seen.twice() == [] and tcp_seen.twice() == []

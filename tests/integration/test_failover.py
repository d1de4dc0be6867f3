"""A connector group under load: failover on kill -9, drain on SIGTERM, even spread (issue 4)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from gateway_harness import connect, wait_echo, wait_until
from loadgen import read_line


class RequestLog:
    """What the back end saw: ids of complete requests, and connections that broke first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.broken = 0

    def handler(self, conn: socket.socket, backend) -> None:
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = conn.recv(100)
            except OSError:
                chunk = b""
            if not chunk:
                with self.lock:
                    self.broken += 1
                return
            data += chunk
        if data.startswith(b"ping"):
            conn.sendall(data)
            return
        number = int(data.split(b"-")[1])
        with self.lock:
            self.seen.add(number)
        time.sleep(0.005)  # a little service time, so streams overlap
        conn.sendall(b"ok-%d\n" % number)


class Load:
    """Worker threads, each doing request after request on a new connection until stopped."""

    def __init__(self, port: int, workers: int = 6, limit: int = 20000) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next = 0
        self.limit = limit
        self.ok: list[tuple[int, float]] = []
        self.failed: list[tuple[int, float, str]] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(workers)]

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                number = self.next
                self.next += 1
            if number >= self.limit:
                return
            started = time.monotonic()
            try:
                with connect(self.port, timeout=10) as s:
                    s.sendall(b"req-%d\n" % number)
                    reply = read_line(s)
                if reply != b"ok-%d\n" % number:
                    raise OSError(f"reply {reply!r}")
                with self.lock:
                    self.ok.append((number, started))
            except OSError as e:
                with self.lock:
                    self.failed.append((number, started, str(e)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def group_of_three(gw, backends, app_options=None, **connector_options):
    requests = RequestLog()
    backend = backends(requests.handler)
    svc = gw.service(apps=[{"name": "app", "destination": backend.destination, **(app_options or {})}])
    connectors = [gw.connector(svc, name=f"c{i}", tunnels=1, log_level="debug", **connector_options)
                  for i in range(3)]
    wait_echo(svc.app_port("app"), payload=b"ping\n")
    return requests, svc, connectors


def streams_served(connector) -> int:
    return connector.proc.log().count("for app app")


@pytest.mark.timeout(120)
def test_kill_9_of_one_connector_loses_no_request_that_had_not_reached_the_back_end(gw, backends):
    """Under load, kill -9 of one of three connectors fails only requests the back end had already seen;
    requests started two PING intervals after the kill all succeed on the survivors."""
    requests, svc, (victim, *survivors) = group_of_three(gw, backends, ping_interval=1.0)
    with Load(svc.app_port("app")) as load:
        wait_until(lambda: len(load.ok) > 200 and streams_served(victim) > 20, 30, "load on every connector")
        victim.kill9()
        killed_at = time.monotonic()
        wait_until(lambda: len([1 for _, t in load.ok if t > killed_at + 2.0]) > 300, 30,
                   "load to carry on after the kill")
    assert len(load.ok) > 500
    with requests.lock:
        reached = [n for n, _, _ in load.failed if n in requests.seen]
        broken = requests.broken
    lost_before_back_end = len(load.failed) - len(reached)
    assert lost_before_back_end <= broken, (
        f"{lost_before_back_end} requests failed that the back end never saw complete"
        f" (only {broken} connections broke there): {load.failed[:5]}")
    late_failures = [f for f in load.failed if f[1] > killed_at + 2.0]
    assert late_failures == [], f"requests failed two PING intervals after the kill: {late_failures[:5]}"


@pytest.mark.timeout(120)
def test_sigterm_of_one_connector_under_load_fails_nothing(gw, backends):
    """Under load, SIGTERM on one of three connectors drains it: not one request fails."""
    requests, svc, (leaving, *staying) = group_of_three(gw, backends, drain_timeout=10)
    with Load(svc.app_port("app")) as load:
        wait_until(lambda: len(load.ok) > 200 and streams_served(leaving) > 20, 30, "load on every connector")
        leaving.proc.signal(signal.SIGTERM)
        assert leaving.proc.wait(20) == 0
        done = len(load.ok)
        wait_until(lambda: len(load.ok) > done + 300, 30, "load to carry on after the drain")
    assert load.failed == [], load.failed[:5]
    assert all(streams_served(c) > 0 for c in staying)


@pytest.mark.timeout(120)
def test_spread_over_three_equal_connectors_is_even(gw, backends):
    """300 sequential connections spread over three equal connectors within ±15 % of even."""
    requests, svc, connectors = group_of_three(gw, backends)
    before = [streams_served(c) for c in connectors]
    port = svc.app_port("app")
    for number in range(300):
        with connect(port, timeout=10) as s:
            s.sendall(b"req-%d\n" % number)
            assert s.recv(100) == b"ok-%d\n" % number
    wait_until(lambda: sum(streams_served(c) for c in connectors) - sum(before) >= 300, 10, "the logs")
    counts = [streams_served(c) - b for c, b in zip(connectors, before)]
    assert all(85 <= n <= 115 for n in counts), counts


def one_request(port: int, number: int) -> None:
    with connect(port, timeout=10) as s:
        s.sendall(b"req-%d\n" % number)
        assert s.recv(100) == b"ok-%d\n" % number


@pytest.mark.timeout(120)
def test_client_affinity_keeps_a_client_on_one_connector_until_it_dies(gw, backends):
    """With affinity = "client", one client's connections all use one connector; when it dies they move to one other."""
    requests, svc, connectors = group_of_three(gw, backends, app_options={"affinity": "client"}, ping_interval=1.0)
    port = svc.app_port("app")
    before = [streams_served(c) for c in connectors]
    for number in range(30):
        one_request(port, number)
    wait_until(lambda: sum(streams_served(c) for c in connectors) - sum(before) >= 30, 10, "the logs")
    counts = [streams_served(c) - b for c, b in zip(connectors, before)]
    assert sorted(counts) == [0, 0, 30], counts
    chosen = connectors[counts.index(30)]
    chosen.kill9()
    others = [c for c in connectors if c is not chosen]
    before = [streams_served(c) for c in others]
    for number in range(30, 60):
        one_request(port, number)
    wait_until(lambda: sum(streams_served(c) for c in others) - sum(before) >= 30, 10, "the logs")
    assert sorted(streams_served(c) - b for c, b in zip(others, before)) == [0, 30]

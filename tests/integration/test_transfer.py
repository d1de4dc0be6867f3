"""Bulk data, many streams, and a slow reader: bytes arrive complete and in order."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import threading
import time

import pytest

from components import by_nature
from gateway_harness import (
    chunks,
    connect,
    echo_handler,
    read_exact,
    upload_to_sink,
    read_to_eof,
    sink_handler,
    sized_sink_handler,
    stalled_sink_handler,
    source_handler,
    wait_echo,
    wait_until,
)

MiB = 1024 * 1024


def raise_nofile(need: int) -> None:
    """Raise this process's open-file limit (children inherit it) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            by_nature(f"RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs")


@pytest.mark.timeout(180)
def test_enrol_connect_and_move_200_mib_each_way(gw, backends):
    """A freshly enrolled connector carries 200 MiB up to a sink and 200 MiB down from a source, byte-exact."""
    total = 200 * MiB
    # Sized reads on both ends: the half-close is tested on its own below.
    sink = backends(sized_sink_handler(total))
    source = backends(source_handler(total))
    svc = gw.service(apps=[
        {"name": "up", "destination": sink.destination},
        {"name": "down", "destination": source.destination},
    ])
    gw.connector(svc, tunnels=1)
    # Upload.
    upload_to_sink(svc.app_port("up"), total, 3, sink, 120)

    # Download.
    with connect(svc.app_port("down"), timeout=60) as s:
        got = read_exact(s, total)
    [sent] = source.wait_results(1, 30)
    assert sent[0] == total
    assert got == sent


@pytest.mark.timeout(120)
def test_half_close_after_bulk_transfer_reaches_the_far_end(gw, backends):
    """After each of several bulk uploads (downloads) the sender's half-close reaches the back end (client) as EOF."""
    size = 32 * MiB
    sink = backends(sink_handler)
    source = backends(source_handler(size))
    svc = gw.service(apps=[
        {"name": "up", "destination": sink.destination},
        {"name": "down", "destination": source.destination},
    ])
    gw.connector(svc, tunnels=1)
    wait_until(lambda: _probe(svc.app_port("up")), 30, "the sink app to work")
    sink.wait_results(1, 10)
    for attempt in range(8):
        sink.results.clear()
        h = hashlib.sha256()
        with connect(svc.app_port("up"), timeout=60) as s:
            for chunk in chunks(size, seed=attempt):
                s.sendall(chunk)
                h.update(chunk)
            s.shutdown(socket.SHUT_WR)
            [(n, digest)] = sink.wait_results(1, 10)  # the sink records only at EOF
        assert (n, digest) == (size, h.hexdigest())

        with connect(svc.app_port("down"), timeout=10) as s:
            got = read_exact(s, size)
            s.settimeout(10)
            assert s.recv(1) == b"", "the client should see EOF after the download"
        assert got == source.wait_results(attempt + 1, 10)[-1]


def _probe(port: int) -> bool:
    """Open and half-close one connection; True once the app echoed the EOF back (a clean close)."""
    with connect(port, timeout=5) as s:
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        return s.recv(1) == b""


@pytest.mark.timeout(180)
def test_500_concurrent_streams_on_one_tunnel(gw, backends):
    """500 streams open at once on a single tunnel each echo their own payload back intact."""
    n = 500
    raise_nofile(4 * n + 256)
    echo = backends(echo_handler)
    # 500 simultaneous connects also need the app listener's accept queue to hold them
    # (the default endpoint backlog is 1024).
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=1)
    port = svc.app_port("echo")
    wait_echo(port)
    baseline = echo.accepted

    go = threading.Event()
    connected = threading.Semaphore(0)
    results: dict[int, object] = {}

    def client(i: int) -> None:
        payload = os.urandom(32 * 1024) + i.to_bytes(4, "big")
        try:
            with connect(port, timeout=60) as s:
                connected.release()
                if not go.wait(90):
                    results[i] = "never released"
                    return
                sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
                sender.start()
                back = read_to_eof(s)
                sender.join(30)
                results[i] = bytes(back) == payload or f"mismatch: {len(back)} bytes back of {len(payload)}"
        except Exception as e:  # noqa: BLE001
            connected.release()
            results[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        # Every client connected and its stream reached the back end before anyone sends.
        wait_until(lambda: echo.accepted - baseline >= n, 120, f"{n} streams to reach the back end")
    finally:
        go.set()
    for t in threads:
        t.join(120)
    failures = {i: r for i, r in results.items() if r is not True}
    assert len(results) == n and not failures, f"{len(failures)} failed, e.g. {list(failures.items())[:5]}"
    assert len([1 for line in svc.log().splitlines() if f"connector {conn.connector_id}" in line
                and " up on tunnel " in line]) == 1, "the connector should have used exactly one tunnel"


@pytest.mark.timeout(240)
def test_slow_reader_does_not_stall_a_fast_stream(gw, backends):
    """A stalled reader on a tunnel neither blocks another stream on it nor grows memory; both finish intact."""
    big, fast_size = 100 * MiB, 20 * MiB
    stalled_src = backends(source_handler(big))
    fast_src = backends(source_handler(fast_size))
    svc = gw.service(apps=[
        {"name": "stalled", "destination": stalled_src.destination},
        {"name": "fast", "destination": fast_src.destination},
    ])
    conn = gw.connector(svc, tunnels=1)

    progress = {"sent": 0}
    orig = stalled_src.handler

    def counting_handler(c: socket.socket, backend) -> None:
        real_sendall = c.sendall

        class Counting:
            def __getattr__(self, name):
                return getattr(c, name)

            def sendall(self, data):
                real_sendall(data)
                progress["sent"] += len(data)

        orig(Counting(), backend)

    stalled_src.handler = counting_handler

    slow = connect(svc.app_port("stalled"), timeout=120)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        # Wait until the source cannot send any more: backpressure reached it.
        samples: list[int] = []

        def settled() -> bool:
            samples.append(progress["sent"])
            return len(samples) > 10 and samples[-1] > 0 and samples[-1] == samples[-11]

        wait_until(settled, 60, "the stalled stream's source to be blocked", interval=0.1)
        stalled_at = progress["sent"]
        assert stalled_at < big, "the whole download was buffered: no backpressure to the source"

        rss = {"connector": 0, "service": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    rss["connector"] = max(rss["connector"], conn.proc.rss_bytes())
                    rss["service"] = max(rss["service"], svc.proc.rss_bytes())
                except (OSError, AssertionError):
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with connect(svc.app_port("fast"), timeout=60) as s:
                got = read_exact(s, fast_size)
            [sent] = fast_src.wait_results(1, 30)
            assert got == sent and got[0] == fast_size
            assert progress["sent"] - stalled_at < 4 * MiB, "the stalled stream moved while nobody read it"
        finally:
            done.set()
            sampler.join(5)
        assert rss["connector"] < 300 * MiB, f"connector RSS {rss['connector'] / MiB:.0f} MiB"
        assert rss["service"] < 300 * MiB, f"service RSS {rss['service'] / MiB:.0f} MiB"

        # Now read the stalled stream to its end: nothing was lost or reordered.
        slow.settimeout(120)
        got = read_exact(slow, big)
    finally:
        slow.close()
    [sent] = stalled_src.wait_results(1, 30)
    assert sent[0] == big
    assert got == sent


@pytest.mark.timeout(180)
def test_stalled_back_end_does_not_stall_another_upload(gw, backends):
    """A back end that stops reading holds up only its own upload: another upload on the tunnel completes; then both do."""
    big, fast_size = 100 * MiB, 20 * MiB
    release = threading.Event()
    stalled = backends(stalled_sink_handler(big, release))
    fast = backends(sized_sink_handler(fast_size))
    svc = gw.service(apps=[
        {"name": "stalled", "destination": stalled.destination},
        {"name": "fast", "destination": fast.destination},
    ])
    conn = gw.connector(svc, tunnels=1)
    progress = {"sent": 0}
    digest = hashlib.sha256()
    errors: list[str] = []

    def upload_to_stalled() -> None:
        try:
            with connect(svc.app_port("stalled"), timeout=120) as s:
                for chunk in chunks(big, seed=11):
                    s.sendall(chunk)
                    digest.update(chunk)
                    progress["sent"] += len(chunk)
                stalled.wait_results(1, 120)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    thread = threading.Thread(target=upload_to_stalled, daemon=True)
    thread.start()
    try:
        samples: list[int] = []

        def settled() -> bool:
            samples.append(progress["sent"])
            return len(samples) > 10 and samples[-1] > 0 and samples[-1] == samples[-11]

        wait_until(settled, 60, "the upload to the stalled back end to block", interval=0.1)
        assert progress["sent"] < big, "the whole upload was buffered somewhere: no backpressure"

        h = hashlib.sha256()
        with connect(svc.app_port("fast"), timeout=60) as s:
            for chunk in chunks(fast_size, seed=12):
                s.sendall(chunk)
                h.update(chunk)
            [(n, got)] = fast.wait_results(1, 60)
        assert (n, got) == (fast_size, h.hexdigest())
        assert conn.proc.rss_bytes() < 300 * MiB, f"connector RSS {conn.proc.rss_bytes() / MiB:.0f} MiB"
    finally:
        release.set()
    thread.join(120)
    assert not errors, errors
    [(n, got)] = stalled.wait_results(1, 30)
    assert (n, got) == (big, digest.hexdigest())

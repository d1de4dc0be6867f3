"""Resources a service holds for long: idle TCP app connections end, the open-files limit is raised (issue 9)."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import pytest

from gateway_harness import TWISTD, FrameReader, connect, echo_handler, wait_echo, wait_until


@pytest.mark.timeout(90)
def test_an_idle_tcp_connection_is_closed_and_a_busy_one_is_kept(gw, backends):
    """With options.idle_timeout = 1, a connection silent for it is closed by the service; one with traffic is not."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination, "options": {"idle_timeout": 1}}])
    gw.connector(svc, tunnels=1)
    port = svc.app_port("echo")
    wait_echo(port)
    with connect(port, timeout=10) as idle, connect(port, timeout=10) as busy:
        for s in (idle, busy):
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
        # The busy one talks every 0.2 s until the idle one was closed (or for 20 s at most).
        for _ in range(100):
            if "idle for" in svc.proc.log():
                break
            busy.sendall(b"x")
            assert busy.recv(10) == b"x", "the busy connection was closed"
            time.sleep(0.2)
        assert FrameReader(idle).wait_closed(10), "the idle connection is still open"
        for _ in range(10):
            busy.sendall(b"y")
            assert busy.recv(10) == b"y"
            time.sleep(0.2)
    line = next(line for line in svc.proc.log().splitlines() if "idle for" in line)
    assert "app echo: connection from 127.0.0.1:" in line and "(options.idle_timeout = 1)" in line, line


@pytest.mark.timeout(60)
def test_a_bad_idle_timeout_stops_the_service_before_it_starts(gw, tmp_path):
    """options.idle_timeout = -5 on a tcp app: twistd refuses the config, naming the app and the option."""
    svc = gw.service(apps=[{"name": "db", "destination": "127.0.0.1:5432", "options": {"idle_timeout": -5}}],
                     start=False)
    result = gw.twistd(svc.config_path, timeout=30)
    assert result.returncode != 0
    assert "app db: options.idle_timeout: expected a number of seconds >= 0" in result.stdout + result.stderr


def _soft_nofile(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    return int(re.search(r"Max open files\s+(\d+)", text).group(1))


@pytest.mark.timeout(60)
def test_the_service_raises_its_open_files_limit_at_start(gw):
    """Started with a soft RLIMIT_NOFILE of 512, the service runs with the hard limit and logs from what to what."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.fail(f"this test needs a hard open-files limit above 512, the machine has {hard}")
    expected = 1_048_576 if hard == resource.RLIM_INFINITY else min(hard, 1_048_576)
    svc = gw.service(start=False)
    svc.proc = gw.spawn("svc-1", ["prlimit", f"--nofile=512:{'unlimited' if hard == resource.RLIM_INFINITY else hard}",
                                  TWISTD, "-n", "--pidfile=", "gateway", "--config", str(svc.config_path)])
    svc.wait_listening()
    assert _soft_nofile(svc.proc.pid) == expected
    assert f"open files limit (RLIMIT_NOFILE) raised from 512 to {expected}" in svc.proc.log()

"""Ports for the processes tests start: outside the kernel's ephemeral range, never handed out twice
in one test run (the integration harness and the PostgreSQL cluster take theirs from here)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"

_handed_out: set[int] = set()


def _ports_below_the_ephemeral_range() -> range:
    """Ports no outgoing connection is given: below the kernel's ip_local_port_range. A port the
    kernel picks for bind(0) is in that range, and any client socket of any process (a connector
    dialling, an HTTP client) may take it as its source port before the process the test starts
    binds it (CI failed once so: "Address already in use" on a free_port() port)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_PORTS = _ports_below_the_ephemeral_range()


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, and that this test run has not
    handed out before."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range ({_PORTS.start}-{_PORTS.stop - 1})")

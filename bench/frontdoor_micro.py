"""CPU per request of the HTTP front door alone: no sockets, no tunnel, no connector.

Drives the front door of tests/unit/test_http_frontdoor.py (a StringTransport client and an
in-memory stream) with wrk's keep-alive GET and nginx's 1 KiB answer, and prints microseconds of
the service's Python per request. What bench/run's httpGateway figure cannot tell apart: the
front door's own cost, against syscalls, TLS and the connector.

    .venv/bin/python bench/frontdoor_micro.py [--requests N] [--log-level warn] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT / "tests" / "support"), str(ROOT / "plugins" / "http")]

from twisted.internet.task import Clock  # noqa: E402

from gateway import logs  # noqa: E402
from test_http_frontdoor import Harness  # noqa: E402

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: wiki.example.test\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 23:00:00 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 1024\r\nLast-Modified: Thu, 26 Nov 2026 22:00:00 GMT\r\n"
    b"Connection: keep-alive\r\nETag: \"abc\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024
)


def arguments(doc: str) -> argparse.Namespace:
    """--requests, --log-level (logging configured with it), --profile."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--log-level", default="warn", help="the process's level (info logs every request)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more loop, top 25 by own time")
    args = parser.parse_args()
    logs.configure("text", args.log_level)
    return args


def measure(what: str, loop: Callable[[int], None], args: argparse.Namespace) -> None:
    """Print the CPU time per request of ``loop(args.requests)`` (not wall time: what other
    processes take of a busy machine is not counted), then its profile if asked."""
    started = time.process_time()
    loop(args.requests)
    elapsed = time.process_time() - started
    print(f"{what}: {elapsed / args.requests * 1e6:.1f} µs of CPU per request "
          f"({args.requests} keep-alive GETs, log level {args.log_level})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(loop, args.requests)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def main() -> None:
    args = arguments(__doc__)

    harness = Harness(clock=Clock())
    harness.send(REQUEST)
    stream = harness.accept()
    stream.answer(RESPONSE)
    if not harness.transport.value().endswith(b"x" * 1024):
        raise SystemExit("the front door did not answer the warm-up request; the harness has changed")

    def loop(n: int) -> None:
        for _ in range(n):
            harness.transport.clear()
            stream.data = b""
            harness.send(REQUEST)
            stream.answer(RESPONSE)
        if not harness.transport.value().endswith(b"x" * 1024):
            raise SystemExit("the last request got no answer")

    measure("front door", loop, args)


if __name__ == "__main__":
    main()

"""CPU per request of the connector's half of a web app alone: no sockets, no tunnel, no service.

Drives ``gateway_http.backend`` (one web-app stream, the back-end connection it keeps) with the
request head the front door sends for wrk's keep-alive GET and nginx's 1 KiB answer, and prints
microseconds of the connector's Python per request: the twin of frontdoor_micro.py for the
other process a request crosses (docs/PERFORMANCE.md, issue #13: the two take turns, so both
costs are on the path).

    .venv/bin/python bench/connector_micro.py [--requests N] [--log-level warn] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "plugins" / "http")]

from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from frontdoor_micro import RESPONSE  # noqa: E402
from gateway import logs  # noqa: E402
from gateway.config import AppConfig  # noqa: E402
from gateway_http import rules  # noqa: E402
from gateway_http.backend import Backends  # noqa: E402

# what the front door sends for wrk's GET (rules.backend_request_head's output for it)
REQUEST = (b"GET /1k.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
           b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: bench.apps.example.test\r\n"
           b"Forwarded: for=127.0.0.1;host=\"bench.apps.example.test\";proto=http\r\n"
           b"X-Gateway-Request-Id: 0123456789abcdef\r\n\r\n")


class Stream:
    """The web-app stream as backend.Exchange uses it, keeping what it is sent."""

    def __init__(self) -> None:
        self.metadata = {"request_id": "0123456789abcdef", "kind": "app", "app": "bench-web"}
        self.closed = self.disconnecting = False
        self.sent: list[bytes] = []

    def attach(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def accept(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class Connection:
    """A pooled back-end connection that is always usable."""

    usable, lost, reused = True, False, True

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.user = None


class Pool:
    """A pool of one connection, always handed out at once."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def acquire(self, target, owner):
        return succeed(self.conn)

    def release(self, conn) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--log-level", default="warn", help="the connector's level (info logs every request)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more loop, top 25 by own time")
    args = parser.parse_args()
    logs.configure("text", args.log_level)

    app = AppConfig(name="bench-web", listen="", destination="127.0.0.1:8080", host="127.0.0.1", port=8080,
                    protocol="http", options={"preauth": "passthrough"}, internal_url="http://127.0.0.1:8080/")
    backends = Backends(Clock())
    conn = Connection()
    backends.pool = Pool(conn)
    stream = Stream()
    backends.serve(stream, app)
    exchange = stream.protocol
    rules.parse_response_head(RESPONSE.split(b"\r\n\r\n")[0])   # the parser's caches warm

    def loop(n: int) -> None:
        for _ in range(n):
            conn.transport.clear()
            stream.sent.clear()
            exchange.dataReceived(REQUEST)
            exchange.backend_data(RESPONSE)
        if not conn.transport.value().startswith(b"GET /1k.html") or b"".join(stream.sent) != RESPONSE:
            raise SystemExit("the connector did not relay the last exchange; the module has changed")

    loop(10)
    started = time.process_time()   # CPU time: what other processes take of a busy machine is not counted
    loop(args.requests)
    elapsed = time.process_time() - started
    print(f"connector: {elapsed / args.requests * 1e6:.1f} µs of CPU per request "
          f"({args.requests} keep-alive GETs, log level {args.log_level})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(loop, args.requests)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

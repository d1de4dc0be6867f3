"""CPU per request of the connector's half of a web app alone: no sockets, no tunnel, no service.

Drives ``gateway_http.backend`` (one web-app stream, the back-end connection it keeps) with the
request head the front door sends for wrk's keep-alive GET and nginx's 1 KiB answer, and prints
microseconds of the connector's Python per request: the twin of frontdoor_micro.py for the
other process a request crosses (docs/PERFORMANCE.md, issue #13: the two take turns, so both
costs are on the path).

    .venv/bin/python bench/connector_micro.py [--requests N] [--log-level warn] [--profile]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "plugins" / "http")]

from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from frontdoor_micro import RESPONSE, arguments, measure  # noqa: E402
from gateway.config import AppConfig  # noqa: E402
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
    args = arguments(__doc__)

    app = AppConfig(name="bench-web", listen="", destination="127.0.0.1:8080", host="127.0.0.1", port=8080,
                    protocol="http", options={"preauth": "passthrough"}, internal_url="http://127.0.0.1:8080/")
    backends = Backends(Clock())
    conn = Connection()
    backends.pool = Pool(conn)
    stream = Stream()
    backends.serve(stream, app)
    exchange = stream.protocol

    def loop(n: int) -> None:
        for _ in range(n):
            conn.transport.clear()
            stream.sent.clear()
            exchange.dataReceived(REQUEST)
            exchange.backend_data(RESPONSE)
        if not conn.transport.value().startswith(b"GET /1k.html") or b"".join(stream.sent) != RESPONSE:
            raise SystemExit("the connector did not relay the last exchange; the module has changed")

    loop(10)
    measure("connector", loop, args)


if __name__ == "__main__":
    main()

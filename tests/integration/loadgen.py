"""A bounded load generator for the zero-loss tests: HTTP keep-alive requests through the front
door and short TCP connections through a TCP app, every failure counted with its reason.

Both sides are here, so a test needs nothing else:

- ``HttpBackend``: a threaded HTTP/1.1 back end (keep-alive) answering ``<method> <id>`` for the
  request's ``X-Loadgen-Id``; it records every id it was sent, so a test can check that each
  request reached the back end exactly once (a retried request that had reached it shows twice).
- ``tcp_handler``: a handler for ``gateway_harness.Backend``: reads ``req-<id>\\n``, answers
  ``ok-<id>\\n``, records the id.
- ``LoadGen``: worker threads. HTTP workers each keep one client connection alive for as long
  as the front door keeps it (a GET, then a POST with a small body, in turn: a POST must never
  be sent twice), with ``pause`` seconds between requests if asked (an idle keep-alive
  connection across a drain); TCP workers open a new connection per request. A request counts as failed
  for any error (refused, reset, closed with no answer, a wrong status or body, a timeout),
  including a keep-alive connection closed under a request: a browser would retry that, this
  client does not, so the front door must not do it.

The load stops by itself after ``max_requests`` requests or ``max_seconds``, whichever comes
first, and only ever talks to loopback addresses.

As a command (to watch a running gateway by hand)::

    python tests/integration/loadgen.py --http 127.0.0.1:8080 --host app.example.test \\
        --tcp 127.0.0.1:9000 --seconds 30

prints a summary and exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import itertools
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ID_HEADER = "X-Loadgen-Id"
_generators = itertools.count(1)


def _loopback(host: str) -> str:
    """`host` if it is a loopback address; the load generator sends to nothing else."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address: the load generator only sends to 127.0.0.0/8 or ::1")
    return host


class Seen:
    """Ids a back end was sent, with how many times each: a thread-safe counter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, request_id: str) -> None:
        with self.lock:
            self.counts[request_id] += 1

    def twice(self) -> list[str]:
        """Ids sent to the back end more than once (a request retried after it had reached it)."""
        with self.lock:
            return sorted(i for i, n in self.counts.items() if n > 1)

    def __contains__(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.counts

    def __len__(self) -> int:
        with self.lock:
            return len(self.counts)


# -- the back ends ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: the connector pools its back-end connections

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request_id = self.headers.get(ID_HEADER, "-")
        self.server.seen.add(request_id)   # type: ignore[attr-defined]
        delay = self.server.delay   # type: ignore[attr-defined]
        if delay:
            time.sleep(delay)
        reply = f"{self.command} {request_id} {len(body)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpBackend:
    """A threaded HTTP/1.1 back end on 127.0.0.1 answering ``<method> <id> <body length>``
    (``delay`` seconds of service time per request, so requests overlap a drain)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.seen = Seen()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.seen = self.seen   # type: ignore[attr-defined]
        self.server.delay = delay      # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HttpBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to and with a newline, or what came before the peer closed."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


def tcp_handler(seen: Seen, delay: float = 0.0) -> Any:
    """A ``gateway_harness.Backend`` handler: ``req-<id>\\n`` in, ``ok-<id>\\n`` out, the id recorded."""

    def handler(conn: socket.socket, backend: Any) -> None:
        data = read_line(conn)
        if not data.endswith(b"\n"):
            return
        request_id = data.strip().decode("ascii", "replace").removeprefix("req-")
        seen.add(request_id)
        if delay:
            time.sleep(delay)
        conn.sendall(f"ok-{request_id}\n".encode())

    return handler


# -- the load -----------------------------------------------------------------------------------


class Failed:
    """One failed request: which kind, its id, when (monotonic) and why."""

    __slots__ = ("kind", "request_id", "at", "reason")

    def __init__(self, kind: str, request_id: str, at: float, reason: str) -> None:
        self.kind, self.request_id, self.at, self.reason = kind, request_id, at, reason

    def __repr__(self) -> str:
        return f"{self.kind} {self.request_id}: {self.reason}"


class LoadGen:
    """Worker threads sending requests until ``max_requests`` or ``max_seconds``, or stop()."""

    def __init__(self, *, http_port: int | None = None, http_host: str = "", tcp_port: int | None = None,
                 host: str = "127.0.0.1", http_workers: int = 4, tcp_workers: int = 2,
                 max_requests: int = 20_000, max_seconds: float = 120.0, timeout: float = 15.0,
                 post_body: bytes = b"x" * 100, pause: float = 0.0) -> None:
        if http_port is None and tcp_port is None:
            raise ValueError("give http_port, tcp_port or both")
        self.host = _loopback(host)
        self.http_port, self.http_host, self.tcp_port = http_port, http_host, tcp_port
        self.max_requests, self.max_seconds, self.timeout = max_requests, max_seconds, timeout
        self.post_body = post_body
        self.pause = pause   # an HTTP worker's think time between requests: its connection sits idle
        self.label = f"g{next(_generators)}"   # in every id, so two generators' ids never meet
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ok: Counter[str] = Counter()
        self.failures: list[Failed] = []
        self.reasons: Counter[str] = Counter()
        self.connections = 0   # HTTP client connections opened (more than the workers: the server closed some)
        self._issued = 0
        self._deadline = 0.0
        self.threads = ([threading.Thread(target=self._http_worker, args=(i,), daemon=True)
                         for i in range(http_workers if http_port is not None else 0)]
                        + [threading.Thread(target=self._tcp_worker, args=(i,), daemon=True)
                           for i in range(tcp_workers if tcp_port is not None else 0)])

    # -- control --

    def start(self) -> LoadGen:
        self._deadline = time.monotonic() + self.max_seconds
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> LoadGen:
        """Stop sending; wait for the requests in flight (each bounded by ``timeout``)."""
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        return self

    def __enter__(self) -> LoadGen:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def done(self) -> int:
        with self.lock:
            return sum(self.ok.values()) + len(self.failures)

    def succeeded(self, kind: str | None = None) -> int:
        with self.lock:
            return self.ok[kind] if kind else sum(self.ok.values())

    def summary(self) -> str:
        with self.lock:
            ok = ", ".join(f"{k} {n}" for k, n in sorted(self.ok.items())) or "none"
            reasons = "; ".join(f"{n} x {r}" for r, n in self.reasons.most_common(8))
            return (f"{sum(self.ok.values())} ok ({ok}), {len(self.failures)} failed"
                    + (f": {reasons}" if reasons else "") + f"; {self.connections} HTTP connections")

    # -- workers --

    def _next_id(self, kind: str) -> str | None:
        with self.lock:
            if self.stopping.is_set() or self._issued >= self.max_requests or time.monotonic() >= self._deadline:
                return None
            self._issued += 1
            return f"{self.label}{kind}{self._issued}"

    def _record(self, kind: str, request_id: str, started: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok[kind] += 1
            else:
                self.failures.append(Failed(kind, request_id, started, error))
                self.reasons[f"{kind}: {error[:120]}"] += 1

    def _http_worker(self, worker: int) -> None:
        conn: http.client.HTTPConnection | None = None
        turn = worker
        while True:
            request_id = self._next_id("h")
            if request_id is None:
                break
            turn += 1
            method = "POST" if turn % 2 else "GET"
            kind = f"http-{method.lower()}"
            started = time.monotonic()
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.http_port, timeout=self.timeout)
                with self.lock:
                    self.connections += 1
            error = None
            try:
                body = self.post_body if method == "POST" else None
                conn.request(method, f"/loadgen/{request_id}", body=body,
                             headers={"Host": self.http_host, ID_HEADER: request_id})
                response = conn.getresponse()
                data = response.read()
                expected = f"{method} {request_id} {len(body or b'')}\n".encode()
                if response.status != 200 or data != expected:
                    error = f"{response.status} {data[:80]!r}"
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
            if error is not None and conn is not None:
                conn.close()
                conn = None
            self._record(kind, request_id, started, error)
            if self.pause:
                self.stopping.wait(self.pause)
        if conn is not None:
            conn.close()

    def _tcp_worker(self, worker: int) -> None:
        while True:
            request_id = self._next_id("t")
            if request_id is None:
                return
            started = time.monotonic()
            error = None
            try:
                with socket.create_connection((self.host, self.tcp_port), timeout=self.timeout) as s:
                    s.sendall(f"req-{request_id}\n".encode())
                    reply = read_line(s)
                if reply != f"ok-{request_id}\n".encode():
                    error = f"reply {reply[:80]!r}"
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            self._record("tcp", request_id, started, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", metavar="HOST:PORT", help="the HTTP front door")
    parser.add_argument("--host", default="", help="the Host header of the HTTP requests (the app's external host)")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="a TCP app whose back end runs tcp_handler")
    parser.add_argument("--requests", type=int, default=20_000, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    parser.add_argument("--http-workers", type=int, default=4)
    parser.add_argument("--tcp-workers", type=int, default=2)
    args = parser.parse_args(argv)
    address = args.http or args.tcp
    if address is None:
        parser.error("give --http, --tcp or both")
    host = address.rsplit(":", 1)[0]
    load = LoadGen(http_port=int(args.http.rsplit(":", 1)[1]) if args.http else None, http_host=args.host,
                   tcp_port=int(args.tcp.rsplit(":", 1)[1]) if args.tcp else None, host=host,
                   http_workers=args.http_workers, tcp_workers=args.tcp_workers,
                   max_requests=args.requests, max_seconds=args.seconds)
    load.start()
    try:
        for t in load.threads:
            t.join()
    except KeyboardInterrupt:
        load.stop()
    print(load.summary())
    return 1 if load.failures else 0


if __name__ == "__main__":
    sys.exit(main())

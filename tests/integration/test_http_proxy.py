"""The http plugin's proxying rules through real processes: WebSocket, back-end timeouts,
Expect: 100-continue, path prefixes and custom request headers."""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
import threading
import time

from gateway_harness import HOST, connect, free_port, read_head, wait_until
from gateway_harness import http_request as get
from test_http import WIKI, start_wiki
from websocket_harness import ws_accept, ws_frame, ws_read, ws_switch


def websocket_echo(conn: socket.socket, backend) -> None:
    """A WebSocket server that echoes text and binary frames and answers a close with a close."""
    head, rest = read_head(conn)
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    backend.record(headers)
    ws_switch(conn, headers[b"sec-websocket-key"])
    buf = rest
    while True:
        opcode, payload, buf = ws_read(conn, buf)
        if opcode == 8:
            conn.sendall(ws_frame(payload, 8))
            return
        conn.sendall(ws_frame(payload, opcode))


def start_app(gw, destination: str, **app) -> tuple[int, str]:
    """A service with one web app at http://WIKI:port/ (plus `app` keys) and a connector."""
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, [{"name": "wiki", "external_url": f"http://{WIKI}:{port}/",
                               "internal_url": f"http://{destination}/", **app}])
    svc.start()
    svc.connector = gw.connector(svc)
    return port, svc


def test_websocket_echo_through_the_tunnel(gw, backends):
    """A WebSocket handshake is passed through (101), then frames flow both ways until a clean close."""
    backend = backends(websocket_echo)
    port, svc = start_app(gw, backend.destination)
    key = base64.b64encode(os.urandom(16))

    def handshake() -> tuple[socket.socket, bytes, bytes]:
        s = connect(port)
        s.sendall(b"GET /chat HTTP/1.1\r\nHost: " + f"{WIKI}:{port}".encode() + b"\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
        head, rest = read_head(s)
        return s, head, rest

    s, head, rest = wait_until(lambda: (lambda r: r if r[1].startswith(b"HTTP/1.1 101") else None)(handshake()),
                               30, "a 101 through the front door")
    assert b"Sec-WebSocket-Accept: " + ws_accept(key) in head
    big = os.urandom(300_000)
    for payload, opcode in ((b"hello", 1), (big, 2), (b"again", 1)):
        s.sendall(ws_frame(payload, opcode, mask=os.urandom(4)))
        got_opcode, got, rest = ws_read(s, rest)
        assert (got_opcode, got) == (opcode, payload)
    s.sendall(ws_frame(struct.pack("!H", 1000), 8, mask=os.urandom(4)))
    opcode, payload, rest = ws_read(s, rest)
    assert opcode == 8 and payload == struct.pack("!H", 1000)
    seen = backend.results[-1]
    assert seen[b"upgrade"] == b"websocket" and seen[b"connection"].lower() == b"upgrade"
    s.close()


def test_silent_back_end_gets_504_with_the_id_in_both_logs(gw, backends):
    """A back end that accepts and never answers: 504 after options.backend_timeout; the page's
    correlation id is in the service and the connector log, and the back-end connection is closed."""
    closed = []

    def silent(conn: socket.socket, backend) -> None:
        read_head(conn)
        backend.record("request")
        conn.settimeout(60)
        try:
            closed.append(conn.recv(1) == b"")   # the gateway hangs up once it gave up
        except ConnectionResetError:
            closed.append(True)

    backend = backends(silent)
    port, svc = start_app(gw, backend.destination, options={"backend_timeout": 1.5})

    def attempt():
        r, body = get(port, f"{WIKI}:{port}", "/slow")
        return (r, body) if r.status == 504 else None

    r, body = wait_until(attempt, 30, "a 504 from the front door")
    request_id = r.getheader("X-Request-Id")
    assert request_id and request_id.encode() in body and b"took too long" in body
    wait_until(lambda: request_id in svc.log(), 10, "the request id in the service log")
    wait_until(lambda: request_id in svc.connector.proc.log(), 10, "the request id in the connector log")
    wait_until(lambda: closed, 10, "the back-end connection to be closed")
    assert closed[0] is True


def test_back_end_that_stops_reading_an_upload_gets_504(gw, backends):
    """A back end that takes the request head and then none of the body: once the tunnel is full
    the client is held back, and after options.backend_timeout it gets 504 (not a hang), and the
    back-end connection is closed."""
    closed = []

    def not_reading(conn: socket.socket, backend) -> None:
        read_head(conn)
        backend.record("head")
        time.sleep(8)               # reads nothing more, answers nothing (the 504 comes after 2 s)
        conn.settimeout(1)
        try:
            while conn.recv(1 << 20):
                pass
            closed.append(True)
        except ConnectionResetError:
            closed.append(True)
        except socket.timeout:
            closed.append(False)

    backend = backends(not_reading)
    port, svc = start_app(gw, backend.destination, options={"backend_timeout": 2})
    wait_until(lambda: re.search(r"config \S+: apps wiki", svc.connector.proc.log()), 30,
               "the connector to get the app")
    size = 256 * 1024 * 1024
    s = connect(port)
    s.sendall(f"PUT /up HTTP/1.1\r\nHost: {WIKI}:{port}\r\nContent-Length: {size}\r\n\r\n".encode())
    sender = threading.Thread(target=_send_until_refused, args=(s, size), daemon=True)
    sender.start()
    s.settimeout(30)
    head, _ = read_head(s)
    assert head.startswith(b"HTTP/1.1 504 "), head[:200]
    assert b"X-Request-Id: " in head
    s.close()
    sender.join(10)
    wait_until(lambda: "took none of the request body for 2 s" in svc.log(), 10, "the service to say why")
    wait_until(lambda: closed, 30, "the back end to see its connection end")
    assert closed[0] is True


def _send_until_refused(s: socket.socket, size: int) -> None:
    piece = b"u" * (1 << 20)
    try:
        for _ in range(size // len(piece)):
            s.sendall(piece)
    except OSError:
        pass   # the front door answered 504 and closed: the rest is not wanted


def test_expect_100_continue_is_answered_by_the_back_end(gw, nginx):
    """The client waits for 100 Continue before its body; nginx sends it through the tunnel; a body
    over nginx's limit is refused before it is sent."""
    svc, conn, front = start_wiki(gw, nginx)
    body = os.urandom(100_000)
    s = connect(front)
    s.sendall(f"PUT /up/expect.bin HTTP/1.1\r\nHost: {WIKI}:{front}\r\nContent-Length: {len(body)}\r\n"
              f"Expect: 100-continue\r\n\r\n".encode())
    head, rest = read_head(s)
    assert head.startswith(b"HTTP/1.1 100 Continue"), head
    s.sendall(body)
    head, rest = read_head(s)
    assert head.split(b" ")[1] in (b"201", b"204"), head
    assert (nginx.www / "up" / "expect.bin").read_bytes() == body
    s.close()


def test_path_prefix_app_and_custom_headers(gw, nginx):
    """An app at /wiki/ on the external host reaches nginx under /, with its custom header set;
    /wiki redirects to /wiki/; a redirect from nginx comes back under the prefix."""
    (nginx.www / "page.txt").write_text("page\n")
    (nginx.www / "dir").mkdir()
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, [{
        "name": "wiki", "external_url": f"http://{WIKI}:{port}/wiki/", "internal_url": f"http://{HOST}:{nginx.port}/",
        "options": {"request_headers": {"X-Secret": "from-gateway"}},
    }])
    svc.start()
    gw.connector(svc)
    host = f"{WIKI}:{port}"
    r, body = wait_until(lambda: (lambda rb: rb if rb[0].status == 200 else None)(get(port, host, "/wiki/page.txt")),
                         30, "the prefixed app to answer")
    assert body == b"page\n"
    r, body = get(port, host, "/wiki/headers", headers={"X-Secret": "from-client"})
    assert b"secret=from-gateway\n" in body
    r, _ = get(port, host, "/wiki")
    assert r.status in (301, 308) and r.getheader("Location").endswith("/wiki/")
    r, _ = get(port, host, "/wiki/dir")   # nginx adds the slash with an absolute redirect
    assert r.status == 301 and r.getheader("Location") == f"http://{host}/wiki/dir/"
    r, _ = get(port, host, "/page.txt")
    assert r.status == 404


def test_links_in_pages_are_translated(gw, nginx):
    """options.translate_links: a page from nginx naming its internal URL reaches the client naming
    the external one (sent chunked: the length changed); a text file is left alone."""
    internal = f"http://{HOST}:{nginx.port}"
    page = "".join(f'<a href="{internal}/p{i}">{i}</a>\n' for i in range(5000)).encode()
    (nginx.www / "page.html").write_bytes(page)
    (nginx.www / "note.txt").write_text(f"{internal}/\n")
    svc, conn, front = start_wiki(gw, nginx, options={"translate_links": True})
    external = f"http://{WIKI}:{front}"
    r, body = get(front, f"{WIKI}:{front}", "/page.html")
    assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked"
    assert body == page.replace(internal.encode(), external.encode())
    r, body = get(front, f"{WIKI}:{front}", "/note.txt")
    assert body == f"{internal}/\n".encode()

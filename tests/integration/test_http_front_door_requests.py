"""The front door's refusals through real processes: path spellings that would escape an app's
prefix, forged Host values, CONNECT and TRACE, bare-LF heads, unasked upgrades and the
connection limits. Each test fails without the refusal it proves."""

from __future__ import annotations

import re
import socket
from urllib.parse import unquote

from gateway_harness import HOST, connect, free_port, read_head, wait_until
from gateway_harness import http_request as get

SITE = "apps.example.test"


def recording(name: str, answer: bytes | None = None):
    """A back end that records each request line and head, and answers 200 with its ``name``
    (or the raw ``answer``), keeping the connection for more."""
    def handler(conn: socket.socket, backend) -> None:
        buf = b""
        while True:
            head, buf = read_head(conn, buf)
            line, *fields = head.split(b"\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(b":") for f in fields)}
            length = int(headers.get(b"content-length", b"0"))
            while len(buf) < length:
                buf += conn.recv(65536)
            buf = buf[length:]
            backend.record((line.decode("latin-1"), headers))
            if answer is not None:
                conn.sendall(answer)
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name.encode()))
    return handler


def raw(port: int, data: bytes) -> tuple[int, bytes, bytes]:
    """Send ``data`` on a connection of its own: (status, head, what came after the head)."""
    with connect(port) as s:
        s.sendall(data)
        head, rest = read_head(s)
    return int(head.split(b" ", 2)[1]), head, rest


def paths(backend) -> list[str]:
    return [line.split(" ")[1] for line, _ in backend.results]


def start(gw, port: int, apps: list[dict], http: dict | None = None, more_apps: list[dict] = ()):
    """A service with a front door on ``port`` for ``apps`` (and ``more_apps`` with listeners of
    their own) and a connector; returns (service, port) once the first app answers."""
    svc = gw.service(start=False)
    for app in more_apps:
        svc.add_app(app["name"], app["destination"], protocol="http", **app.get("extra", {}))
    svc.add_front_door(port, apps, http=http)
    svc.start()
    gw.connector(svc)
    host = apps[0]["external_url"].split("/")[2].replace("*", "a")
    wait_until(lambda: get(port, host, "/ready")[0].status == 200, 30, "the first app to answer")
    return svc, port


def test_no_spelling_of_a_protected_prefix_reaches_the_root_app(gw, backends):
    """Encoded, doubled, ;-parametered, upper-case and relative spellings of /admin/x reach the
    /admin/ app's back end with the normalised path, or are a 400; never the / app's back end."""
    root, admin = backends(recording("root")), backends(recording("admin"))
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, [
        {"name": "root", "external_url": f"http://{SITE}:{port}/", "internal_url": f"http://{root.destination}/"},
        {"name": "admin", "external_url": f"http://{SITE}:{port}/admin/",
         "internal_url": f"http://{admin.destination}/admin/"},
    ])
    svc.start()
    gw.connector(svc)
    wait_until(lambda: get(port, f"{SITE}:{port}", "/ready")[0].status == 200, 30, "the root app to answer")
    host = f"Host: {SITE}:{port}\r\n".encode()
    expected = {b"//admin/x": "/admin/x", b"/%61dmin/x": "/admin/x", b"/ADMIN/x": "/ADMIN/x",
                b"/%41dmin//x": "/Admin/x", b"http://" + f"{SITE}:{port}".encode() + b"//admin/x": "/admin/x"}
    refused = [b"/%2fadmin/x", b"/admin%2fx", b"/..%2fadmin/x", b"/admin;x/x", b"admin/x", b"/x/../admin/x",
               b"/x/%2e%2e/admin/x", b"/;/admin/x", b"/admin%5cx", b"/x/..;/admin/x", b"/admin%00/x"]
    for target, path in expected.items():
        status, head, body = raw(port, b"GET " + target + b" HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
        assert (status, body) == (200, b"admin"), (target, head)
        assert paths(admin)[-1] == path, target
    for target in refused:
        status, head, _ = raw(port, b"GET " + target + b" HTTP/1.1\r\n" + host + b"\r\n")
        assert status == 400, (target, head)

    def as_a_lenient_back_end_sees_it(path: str) -> str:
        path = re.sub(r";[^/]*", "", unquote(path).lower().replace("\\", "/"))
        return re.sub(r"/+", "/", path)

    assert all(not as_a_lenient_back_end_sees_it(p).startswith("/admin") for p in paths(root)), paths(root)


def test_a_forged_host_is_refused_before_it_becomes_an_origin(gw, backends):
    """A Host with a quote, ?, / or a bad port is a 400 on a wildcard app and on an app with a
    listener of its own, so it never reaches Forwarded or X-Forwarded-Host at the back end."""
    star, own = backends(recording("star")), backends(recording("own"))
    port = free_port()
    svc, port = start(gw, port, [{"name": "star", "external_url": f"http://*.{SITE}:{port}/",
                            "internal_url": f"http://{star.destination}/"}],
                      more_apps=[{"name": "own", "destination": own.destination}])
    own_port = svc.app_port("own")
    wait_until(lambda: get(own_port, "own.example.test", "/ready")[0].status == 200, 30, "the own-listener app")
    assert get(port, f"a.{SITE}:{port}", "/x")[0].status == 200
    forged = [f'x";for=10.0.0.1;host="a.{SITE}:{port}', f"x?y.{SITE}:{port}", f"x/y.{SITE}:{port}",
              f"a.{SITE}:{port}0000", f"a.{SITE}:http", f"x,evil.test.{SITE}:{port}"]
    for value in forged:
        for target_port in (port, own_port):
            status, head, _ = raw(target_port, f"GET /x HTTP/1.1\r\nHost: {value}\r\n\r\n".encode())
            assert status == 400, (value, head)
    status, _, _ = raw(port, f"GET http://a\"b.{SITE}:{port}/x HTTP/1.1\r\nHost: a.{SITE}:{port}\r\n\r\n".encode())
    assert status == 400
    seen = [headers for _, headers in star.results + own.results]
    assert all(b'"' not in h.get(b"x-forwarded-host", b"") and b"?" not in h.get(b"x-forwarded-host", b"")
               for h in seen)
    assert not any(b"10.0.0.1" in h.get(b"forwarded", b"") for h in seen)


def test_absolute_form_forwards_the_routed_host_with_translate_host_off(gw, backends):
    """GET http://a/ with Host: b reaches app a's back end with Host: a, the host it was routed by."""
    a, b = backends(recording("a")), backends(recording("b"))
    port = free_port()
    svc, port = start(gw, port, [
        {"name": "a", "external_url": f"http://a.{SITE}:{port}/", "internal_url": f"http://{a.destination}/",
         "options": {"translate_host": False}},
        {"name": "b", "external_url": f"http://b.{SITE}:{port}/", "internal_url": f"http://{b.destination}/",
         "options": {"translate_host": False}},
    ])
    status, head, body = raw(port, f"GET http://a.{SITE}:{port}/x HTTP/1.1\r\nHost: b.{SITE}:{port}\r\n"
                                   "Connection: close\r\n\r\n".encode())
    assert (status, body) == (200, b"a"), head
    line, headers = a.results[-1]
    assert line.startswith("GET /x ") and headers[b"host"] == f"a.{SITE}:{port}".encode()


def test_connect_and_trace_are_refused_unless_the_app_opts_in(gw, backends):
    """CONNECT and TRACE get 405 with an Allow header and never reach the back end; an app with
    allow_connect / allow_trace gets them forwarded."""
    closed, opened = backends(recording("closed")), backends(recording("opened"))
    port = free_port()
    svc, port = start(gw, port, [
        {"name": "closed", "external_url": f"http://closed.{SITE}:{port}/",
         "internal_url": f"http://{closed.destination}/"},
        {"name": "opened", "external_url": f"http://opened.{SITE}:{port}/",
         "internal_url": f"http://{opened.destination}/", "options": {"allow_connect": True, "allow_trace": True}},
    ])
    before = len(closed.results)
    for request in (f"CONNECT {HOST}:22 HTTP/1.1\r\nHost: closed.{SITE}:{port}\r\n\r\n",
                    f"TRACE / HTTP/1.1\r\nHost: closed.{SITE}:{port}\r\n\r\n"):
        status, head, _ = raw(port, request.encode())
        assert status == 405, head
        allow = re.search(rb"\r\nAllow: ([^\r]*)", head).group(1)
        assert b"CONNECT" not in allow and b"TRACE" not in allow and b"GET" in allow
    assert len(closed.results) == before
    status, _, body = raw(port, f"TRACE / HTTP/1.1\r\nHost: opened.{SITE}:{port}\r\nConnection: close\r\n\r\n"
                          .encode())
    assert (status, body) == (200, b"opened")
    status, _, body = raw(port, f"CONNECT {HOST}:22 HTTP/1.1\r\nHost: opened.{SITE}:{port}\r\n\r\n".encode())
    assert (status, body) == (200, b"opened")
    assert opened.results[-1][0] == f"CONNECT {HOST}:22 HTTP/1.1"


def test_a_bare_lf_request_is_refused_at_once(gw, backends):
    """A request with bare-LF line ends is a 400 at once (not a 408 after header_timeout)."""
    good = backends(recording("good"))
    port = free_port()
    svc, port = start(gw, port, [{"name": "good", "external_url": f"http://good.{SITE}:{port}/",
                                  "internal_url": f"http://{good.destination}/"}], http={"header_timeout": 1})
    status, head, _ = raw(port, f"GET / HTTP/1.1\nHost: good.{SITE}:{port}\n\n".encode())
    assert status == 400, head
    assert [line for line, _ in good.results] == ["GET /ready HTTP/1.1"]


def test_a_bare_lf_response_is_a_502_at_once(gw, backends):
    """A back end answering with bare-LF line ends is a 502 (not a 504 after backend_timeout),
    logged as such by the connector."""
    good = backends(recording("good"))
    lf = backends(recording("lf", answer=b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"))
    port = free_port()
    svc, port = start(gw, port, [
        {"name": "good", "external_url": f"http://good.{SITE}:{port}/", "internal_url": f"http://{good.destination}/"},
        {"name": "lf", "external_url": f"http://lf.{SITE}:{port}/", "internal_url": f"http://{lf.destination}/",
         "options": {"backend_timeout": 1}},
    ])
    status, head, _ = raw(port, f"GET / HTTP/1.1\r\nHost: lf.{SITE}:{port}\r\n\r\n".encode())
    assert status == 502, head
    wait_until(lambda: "line ending in LF alone" in gw.all_logs(), 10, "the bare-LF log line")


def test_an_h2c_upgrade_reaches_the_back_end_as_a_plain_request(gw, backends):
    """Upgrade: h2c is dropped with its Connection token (the back end sees a plain GET); an
    app listing h2c in upgrade_protocols gets it forwarded; an app listing none
    (upgrade_protocols = []) gets even a WebSocket upgrade as a plain request."""
    plain, h2c, none = backends(recording("plain")), backends(recording("h2c")), backends(recording("none"))
    port = free_port()
    svc, port = start(gw, port, [
        {"name": "plain", "external_url": f"http://plain.{SITE}:{port}/",
         "internal_url": f"http://{plain.destination}/"},
        {"name": "h2c", "external_url": f"http://h2c.{SITE}:{port}/", "internal_url": f"http://{h2c.destination}/",
         "options": {"upgrade_protocols": ["websocket", "h2c"]}},
        {"name": "none", "external_url": f"http://none.{SITE}:{port}/",
         "internal_url": f"http://{none.destination}/", "options": {"upgrade_protocols": []}},
    ])
    websocket = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    status, head, body = raw(port, f"GET /ws HTTP/1.1\r\nHost: none.{SITE}:{port}\r\n{websocket}\r\n".encode())
    assert (status, body) == (200, b"none"), head
    line, headers = none.results[-1]
    assert b"upgrade" not in headers and b"connection" not in headers
    upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    status, head, body = raw(port, f"GET /x HTTP/1.1\r\nHost: plain.{SITE}:{port}\r\n{upgrade}\r\n".encode())
    assert (status, body) == (200, b"plain"), head
    line, headers = plain.results[-1]
    assert b"upgrade" not in headers and b"http2-settings" not in headers and b"connection" not in headers
    with connect(port) as s:
        s.sendall(f"GET /x HTTP/1.1\r\nHost: h2c.{SITE}:{port}\r\n{upgrade}\r\n".encode())
        read_head(s)
    wait_until(lambda: h2c.results, 10, "the h2c app's back end to see the request")
    assert h2c.results[-1][1].get(b"upgrade") == b"h2c"


def test_connection_limits_per_address(gw, backends):
    """With max_connections_per_address = 3, a 4th connection from 127.0.0.1 is closed at once
    while the first 3 are served; once one closes, a new one is served."""
    app = backends(recording("app"))
    port = free_port()
    svc, port = start(gw, port, [{"name": "app", "external_url": f"http://{SITE}:{port}/",
                            "internal_url": f"http://{app.destination}/"}],
                      http={"max_connections_per_address": 3, "max_connections": 100})
    request = f"GET /x HTTP/1.1\r\nHost: {SITE}:{port}\r\n\r\n".encode()

    def served(s: socket.socket) -> bool:
        s.sendall(request)
        head, rest = read_head(s)
        while len(rest) < 3:
            rest += s.recv(100)
        return head.startswith(b"HTTP/1.1 200") and rest == b"app"

    def fresh() -> socket.socket | None:
        s = connect(port)
        return s if _serves(s, served) else None

    # one at a time: the readiness probe's connection may not be released yet when the first opens
    held = [wait_until(fresh, 10, "a connection within the limit") for _ in range(3)]
    extra = connect(port)
    try:
        extra.sendall(request)
        refused = extra.recv(100) == b""
    except ConnectionError:
        refused = True
    extra.close()
    assert refused
    assert all(served(s) for s in held)
    held.pop().close()
    again = wait_until(fresh, 10, "a new connection once one closed")
    again.close()
    for s in held:
        s.close()
    assert "max_connections_per_address" in svc.log()


def _serves(s: socket.socket, served) -> bool:
    try:
        return served(s)
    except ConnectionError:
        s.close()
        return False

"""What a web app's back end may see of other users, other apps and the gateway itself, through
real processes: headers and cookies the gateway owns never come from the client, back-end
connections are never shared across apps (nor across users where the app asks), a back end's
stray bytes cost only its connection, and an app whose own listener cannot sign users in is
refused instead of served open."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from gateway_harness import HOST, Backend, free_port, wait_until
from gateway_harness import http_request as get

SITE = "site.apps.example.test"
OTHER = "other.apps.example.test"


def read_request(conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
    """One request head (no body expected) from ``conn``: (head or None at EOF, the bytes after it)."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def reporting_handler(conn: socket.socket, backend: Backend) -> None:
    """A keep-alive back end answering each request with JSON: which of its connections (a number
    in accept order) served it, the request's headers and how many requests that connection served."""
    with backend.lock:
        number = backend.accepted
    buf, served = b"", 0
    while True:
        head, buf = read_request(conn, buf)
        if head is None:
            return
        served += 1
        lines = head.decode("latin-1").split("\r\n")
        headers = [line.split(":", 1) for line in lines[1:]]
        body = json.dumps({"conn": number, "served": served, "target": lines[0].split(" ")[1],
                           "headers": [[k, v.strip()] for k, v in headers]}).encode()
        backend.record((number, lines[0]))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))


@pytest.fixture
def reporting():
    backend = Backend(reporting_handler)
    yield backend
    backend.close()


def web_app(name, host, port, backend, **options):
    return {"name": name, "external_url": f"http://{host}:{port}/",
            "internal_url": f"http://{backend.destination}/", "options": options}


def start_front_door(gw, apps_for, http=None):
    """A service with a front door for the apps ``apps_for(port)`` returns, and one connector;
    returns (service, connector, front door port)."""
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, apps_for(port), http=http)
    svc.start()
    conn = gw.connector(svc)
    return svc, conn, port


def answers(port, host):
    wait_until(lambda: get(port, f"{host}:{port}", "/")[0].status == 200, 30, f"{host} to answer")


def seen(port, host, path="/", headers=None, conn=None) -> dict:
    """What the reporting back end saw of one request sent through the front door."""
    r, body = get(port, host, path, headers=headers, conn=conn)
    assert r.status == 200, body
    return json.loads(body)


def header(report: dict, name: str) -> list[str]:
    return [v for k, v in report["headers"] if k.lower() == name.lower()]


# -- headers and cookies the gateway owns --------------------------------------------------------


def test_gateway_headers_and_cookies_from_the_client_never_reach_a_passthrough_back_end(gw, reporting):
    """A client's X-Gateway-* headers and the gateway's session and sign-in cookies are taken out
    before a passthrough app's request leaves the front door; other cookies pass byte for byte."""
    svc, conn, front = start_front_door(gw, lambda port: [web_app("site", SITE, port, reporting)])
    answers(front, SITE)
    report = seen(front, f"{SITE}:{front}", "/", headers={
        "X-Gateway-Jwt-Assertion": "forged.jwt.token",
        "X-Gateway-Request-Id": "forged-id",
        "x-gateway-user": "admin",
        "Cookie": "a=1; gateway_session_0123abcd=forged;b=\"two\"; GATEWAY_SIGNIN_00aa=s;  c=3",
    })
    assert header(report, "X-Gateway-Jwt-Assertion") == []
    assert header(report, "X-Gateway-User") == []
    ids = header(report, "X-Gateway-Request-Id")
    assert len(ids) == 1 and ids[0] != "forged-id"
    assert header(report, "Cookie") == ['a=1;b="two";  c=3']
    only_ours = seen(front, f"{SITE}:{front}", "/", headers={"Cookie": "gateway_session_0123abcd=forged"})
    assert header(only_ours, "Cookie") == []


# -- back-end connections: never shared across apps ----------------------------------------------


def test_two_apps_on_one_back_end_never_share_a_connection(gw, reporting):
    """Requests to two apps with the same back end, alternating (each on a new client connection,
    so each back-end connection goes back to the pool in between), are never served on one
    back-end connection."""
    svc, conn, front = start_front_door(gw, lambda port: [web_app("site", SITE, port, reporting),
                                                          web_app("other", OTHER, port, reporting)])
    answers(front, SITE)
    answers(front, OTHER)
    used: dict[str, set[int]] = {SITE: set(), OTHER: set()}
    for _ in range(6):
        for host in (SITE, OTHER):
            used[host].add(seen(front, f"{host}:{front}")["conn"])
    assert used[SITE] and used[OTHER] and not used[SITE] & used[OTHER], used


# -- a back end's stray bytes cost only its connection -------------------------------------------

NODE_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class StrayBackend(Backend):
    """Answers each request with a 5-byte body; on its first connection, once told to, it then
    sends ``stray`` bytes nobody asked for (and closes, when they are Node's unsolicited 408)."""

    def __init__(self, stray: bytes) -> None:
        self.stray = stray
        self.send_stray = threading.Event()
        self.closed_by_peer: list[int] = []
        super().__init__(self.handle)

    def handle(self, conn: socket.socket, backend: Backend) -> None:
        with self.lock:
            number = self.accepted
        buf = b""
        while True:
            try:
                head, buf = read_request(conn, buf)
            except OSError:   # reset by the connector
                head = None
            if head is None:
                self.record(("closed", number))
                return
            self.record(("request", number))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Conn: %d\r\n\r\nhello" % number)
            if number == 1 and self.send_stray.wait(30):
                self.send_stray.clear()
                conn.sendall(self.stray)
                if self.stray == NODE_408:
                    conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("stray, keep_client", [
    (b"EXTRA", True), (NODE_408, True), (b"EXTRA", False),
], ids=["garbage-on-a-kept-stream", "node-408-on-a-kept-stream", "garbage-after-the-client-left"])
def test_stray_bytes_from_an_idle_back_end_close_only_that_connection(gw, stray, keep_client):
    """Bytes a back end sends on a connection with no request pending (a response longer than its
    Content-Length, Node's unsolicited 408) make the connector close that connection, with no error,
    whether the client's connection is still open or gone; the next request is served correctly on
    a new one."""
    backend = StrayBackend(stray)
    try:
        svc, conn, front = start_front_door(gw, lambda port: [web_app("site", SITE, port, backend)])
        client = http.client.HTTPConnection(HOST, front, timeout=30)
        wait_until(lambda: get(front, f"{SITE}:{front}", "/", conn=client)[0].status == 200, 30, "site to answer")
        if not keep_client:
            client.close()
            wait_until(lambda: "request" in conn.log() and "site" in conn.log(), 10, "the connector's access line")
        backend.send_stray.set()
        wait_until(lambda: ("closed", 1) in backend.results, 10, "the connector to close the polluted connection")
        if not keep_client:
            client = http.client.HTTPConnection(HOST, front, timeout=30)
        r, body = get(front, f"{SITE}:{front}", "/", conn=client)
        assert (r.status, body, r.getheader("X-Conn")) == (200, b"hello", "2")
        assert "Traceback" not in conn.log() and "Unhandled" not in conn.log(), conn.log()[-3000:]
        client.close()
    finally:
        backend.close()


# -- an app with its own listener cannot sign users in: refused, never served open ---------------


@pytest.mark.parametrize("options, key", [
    ({"preauth": "oidc"}, "options.preauth"),
    ({"preauth": "oidc", "allowed_groups": ["staff"]}, "options.preauth"),
    ({"allowed_users": ["alice"]}, "options.allowed_users"),
    ({"jwt_assertion": True}, "options.jwt_assertion"),
])
def test_sign_in_options_on_an_app_with_its_own_listener_are_refused(gw, reporting, options, key):
    """An http app with a listen of its own and sign-in options is refused by check-config and by
    twistd at start (exit non-zero, the app, the key and the fix named), instead of served with no sign-in."""
    svc = gw.service(start=False)
    svc.add_app("site", reporting.destination, protocol="http", options=options)
    checked = gw.cli("check-config", str(svc.config_path))
    assert checked.returncode != 0, checked.stdout + checked.stderr
    for words in ("app site", key, "external_url"):
        assert words in checked.stderr, checked.stderr
    started = gw.twistd(svc.config_path)
    assert started.returncode != 0 and key in started.stdout + started.stderr, started.stdout + started.stderr
    assert "listening for tunnels" not in started.stdout + started.stderr
    assert reporting.accepted == 0

"""The http plugin through real processes: front door on the service, a connector, a real nginx."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import socket
import time

from gateway_harness import HOST, free_port, reset_after_request, toml_table, wait_until
from gateway_harness import http_request as get

WIKI = "wiki.apps.example.test"
TEN_MIB = 10 * 1024 * 1024


def start_wiki(gw, nginx, extra_apps=(), http=None, **extra):
    """Publish nginx as the wiki app (more [http] keys in `http`); return (service, connector, front door port)."""
    port = free_port()
    app = {"name": "wiki", "external_url": f"http://{WIKI}:{port}/",
           "internal_url": f"http://{HOST}:{nginx.port}/", **extra}
    svc = gw.service(start=False)
    svc.add_front_door(port, [app, *extra_apps], http=http)
    svc.start()
    conn = gw.connector(svc)
    wait_until(lambda: get(port, f"{WIKI}:{port}", "/headers")[0].status == 200, 30,
               "the wiki app to answer through the front door")
    return svc, conn, port


def test_get_by_host_translates_headers(gw, nginx):
    """A GET by Host reaches nginx with the internal Host, forwarding headers and no hop-by-hop ones."""
    svc, conn, front = start_wiki(gw, nginx)
    r, body = get(front, f"{WIKI}:{front}", "/headers",
                  headers={"X-Forwarded-For": "10.9.9.9", "Connection": "keep-alive, X-Secret", "X-Secret": "s"})
    text = body.decode()
    assert r.status == 200, text
    assert f"host={HOST}:{nginx.port}|" in text
    assert f"xff=10.9.9.9, {HOST}|" in text
    assert "proto=http|" in text and f"xhost={WIKI}:{front}|" in text
    assert f'fwd=for={HOST};host="{WIKI}:{front}";proto=http|' in text
    assert "conn=|" in text and text.endswith("secret=\n")


def test_translate_host_off_keeps_the_external_host(gw, nginx):
    """With options.translate_host = false nginx sees the Host the client sent."""
    svc, conn, front = start_wiki(gw, nginx, options={"translate_host": False})
    r, body = get(front, f"{WIKI}:{front}", "/headers")
    assert r.status == 200 and f"host={WIKI}:{front}|" in body.decode()


def test_download_and_upload_10_mib(gw, nginx):
    """10 MiB down and up (length-framed and chunked) arrive with the same sha256."""
    data = os.urandom(TEN_MIB)
    digest = hashlib.sha256(data).hexdigest()
    (nginx.www / "big.bin").write_bytes(data)
    svc, conn, front = start_wiki(gw, nginx)
    r, body = get(front, f"{WIKI}:{front}", "/big.bin")
    assert r.status == 200 and len(body) == TEN_MIB and hashlib.sha256(body).hexdigest() == digest

    up = os.urandom(TEN_MIB)
    r, _ = get(front, f"{WIKI}:{front}", "/up/a.bin", method="PUT", body=up)
    assert r.status in (201, 204), r.status
    assert hashlib.sha256((nginx.www / "up" / "a.bin").read_bytes()).hexdigest() == hashlib.sha256(up).hexdigest()

    def pieces():
        for i in range(0, TEN_MIB, 1 << 20):
            yield up[i:i + (1 << 20)]

    c = http.client.HTTPConnection(HOST, front, timeout=30)
    c.request("PUT", "/up/b.bin", body=pieces(), headers={"Host": f"{WIKI}:{front}"}, encode_chunked=True)
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status in (201, 204), r.status
    assert (nginx.www / "up" / "b.bin").read_bytes() == up


def test_keep_alive_serves_several_requests_on_one_connection(gw, nginx):
    """Five requests on one client connection all succeed over the same socket."""
    (nginx.www / "small.txt").write_text("hello\n")
    svc, conn, front = start_wiki(gw, nginx)
    c = http.client.HTTPConnection(HOST, front, timeout=30)
    sockets = set()
    for i in range(5):
        r, body = get(front, f"{WIKI}:{front}", "/small.txt" if i % 2 else "/headers", conn=c)
        assert r.status == 200
        assert r.getheader("Connection") == "keep-alive"
        sockets.add(c.sock.getsockname())
    c.close()
    assert len(sockets) == 1
    # the service and the connector each write an access line per request, with the same id
    lines = wait_until(lambda: (lambda found: found if len(found) >= 5 else None)(re.findall(
        rf"request (\w+) GET (/small.txt|/headers) for app wiki to http://{HOST}:{nginx.port}: 200", conn.proc.log())),
        10, "five access lines in the connector's log")
    assert len({request_id for request_id, _ in lines}) == len(lines)
    wait_until(lambda: all(f"request {request_id} GET " in svc.proc.log() for request_id, _ in lines), 10,
               "the service's access lines with the same ids")


def test_location_is_rewritten_to_the_external_url(gw, nginx):
    """Redirects, Content-Location, Refresh and cookie domains of the internal URL come out external."""
    (nginx.www / "dir").mkdir()
    (nginx.www / "dir" / "index.html").write_text("in dir\n")
    svc, conn, front = start_wiki(gw, nginx)
    r, _ = get(front, f"{WIKI}:{front}", "/redir")
    assert r.status == 302
    assert r.getheader("Location") == f"http://{WIKI}:{front}/x"
    r, _ = get(front, f"{WIKI}:{front}", "/dir")
    assert r.status == 301
    assert r.getheader("Location") == f"http://{WIKI}:{front}/dir/"
    r, _ = get(front, f"{WIKI}:{front}", "/cookie")
    assert r.status == 200
    assert r.getheader("Set-Cookie") == f"s=1; Domain={WIKI}; Path=/"
    assert r.getheader("Refresh") == f"0; url=http://{WIKI}:{front}/y"
    assert r.getheader("Content-Location") == f"http://{WIKI}:{front}/cookie"


def test_unknown_host_gets_404_naming_nothing_internal(gw, nginx):
    """A Host no app has gets a 404 page with a correlation id and no internal detail."""
    svc, conn, front = start_wiki(gw, nginx)
    r, body = get(front, f"other.apps.example.test:{front}", "/headers")
    page = body.decode()
    assert r.status == 404
    request_id = r.getheader("X-Request-Id")
    assert request_id and request_id in page
    for secret in (str(nginx.port), "wiki", "default", conn.connector_id[:12]):
        assert secret not in page
    wait_until(lambda: request_id in svc.log(), 10, "the 404's id in the service log")


def test_no_connector_gives_502_with_correlation_id(gw, nginx):
    """An app whose group has no connector answers 502; the id is on the page and in the service log."""
    svc, conn, front = start_wiki(gw, nginx, extra_apps=[{
        "name": "lonely", "group": "nobody", "external_url": "http://lonely.apps.example.test/",
        "internal_url": f"http://{HOST}:{nginx.port}/"}])
    r, body = get(front, "lonely.apps.example.test", "/headers")
    assert r.status == 502
    request_id = r.getheader("X-Request-Id")
    assert re.fullmatch(r"[0-9a-f]{16}", request_id) and request_id in body.decode()
    assert str(nginx.port) not in body.decode()
    wait_until(lambda: request_id in svc.log(), 10, "the 502's id in the service log")


def test_refused_back_end_gives_502_logged_on_both_sides(gw, nginx):
    """A back end that refuses connections answers 502; the id is in the service and connector logs."""
    dead = free_port()
    svc, conn, front = start_wiki(gw, nginx, extra_apps=[{
        "name": "dead", "external_url": "http://dead.apps.example.test/",
        "internal_url": f"http://{HOST}:{dead}/", "connect_timeout": 2}])
    r, body = get(front, "dead.apps.example.test", "/")
    assert r.status == 502
    request_id = r.getheader("X-Request-Id")
    assert request_id in body.decode() and str(dead) not in body.decode()
    wait_until(lambda: request_id in svc.log(), 10, "the 502's id in the service log")
    wait_until(lambda: request_id in conn.proc.log(), 10, "the 502's id in the connector log")


def test_reload_adds_a_web_app_to_the_front_door(gw, nginx):
    """After SIGHUP a web app added to the file is served by the front door; the old one still is.
    The front door's socket stays bound across the reload: no connection is refused meanwhile,
    and a kept-alive connection from before goes on working."""
    svc, conn, front = start_wiki(gw, nginx)
    before = http.client.HTTPConnection(HOST, front, timeout=30)
    assert get(front, f"{WIKI}:{front}", "/headers", conn=before)[0].status == 200
    with open(svc.config_path, "a") as f:
        f.write("\n" + toml_table("apps", {"name": "blog", "external_url": f"http://blog.apps.example.test:{front}/",
                                           "internal_url": f"http://{HOST}:{nginx.port}/"}, array=True))
    refused = []

    def blog_answers() -> bool:
        try:
            return get(front, f"blog.apps.example.test:{front}", "/headers")[0].status == 200
        except ConnectionRefusedError as e:
            refused.append(e)
            return False

    svc.proc.signal(signal.SIGHUP)
    wait_until(blog_answers, 30, "the blog app to answer after the reload", interval=0.01)
    assert not refused, "the front door refused connections during the reload"
    assert get(front, f"{WIKI}:{front}", "/headers")[0].status == 200
    assert get(front, f"{WIKI}:{front}", "/headers", conn=before)[0].status == 200
    before.close()


def test_http_app_with_its_own_listen(gw, nginx):
    """An http app with listen and destination gets its own front door; Location follows the client's Host."""
    svc = gw.service(apps=[{"name": "site", "protocol": "http", "destination": f"{HOST}:{nginx.port}"}])
    gw.connector(svc)
    port = svc.app_port("site")
    wait_until(lambda: get(port, f"site.example.test:{port}", "/headers")[0].status == 200, 30,
               "the site app to answer")
    r, body = get(port, f"site.example.test:{port}", "/headers")
    assert f"host={HOST}:{nginx.port}|" in body.decode()
    r, _ = get(port, f"site.example.test:{port}", "/redir")
    assert r.status == 302 and r.getheader("Location") == f"http://site.example.test:{port}/x"


def test_two_gib_each_way_in_bounded_memory(gw, nginx):
    """2 GiB down and up go through with the same sha256 while service and connector RSS stay bounded
    (the figures are printed, and recorded in docs/PERFORMANCE.md)."""
    size = 2 * 1024 * 1024 * 1024
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with open(nginx.www / "huge.bin", "wb") as f:
        for i in range(size >> 20):
            piece = block[i % 7:] + block[:i % 7]
            f.write(piece)
            h.update(piece)
    digest = h.hexdigest()
    svc, conn, front = start_wiki(gw, nginx)
    before = max(svc.proc.rss_bytes(), conn.proc.rss_bytes())
    peak = [0]

    c = http.client.HTTPConnection(HOST, front, timeout=120)
    c.request("GET", "/huge.bin", headers={"Host": f"{WIKI}:{front}"})
    r = c.getresponse()
    got = hashlib.sha256()
    n = 0
    while True:
        data = r.read(1 << 20)
        if not data:
            break
        got.update(data)
        n += len(data)
        if n % (32 << 20) < (1 << 20):
            peak[0] = max(peak[0], svc.proc.rss_bytes(), conn.proc.rss_bytes())
    assert r.status == 200 and n == size and got.hexdigest() == digest

    def body():
        for i in range(size >> 20):
            if i % 32 == 0:
                peak[0] = max(peak[0], svc.proc.rss_bytes(), conn.proc.rss_bytes())
            yield block[i % 7:] + block[:i % 7]

    c.request("PUT", "/up/huge.bin", body=body(), headers={"Host": f"{WIKI}:{front}", "Content-Length": str(size)})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status in (201, 204), r.status
    (nginx.www / "huge.bin").unlink()
    up = hashlib.sha256()
    with open(nginx.www / "up" / "huge.bin", "rb") as f:
        while chunk := f.read(1 << 20):
            up.update(chunk)
    (nginx.www / "up" / "huge.bin").unlink()
    assert up.hexdigest() == digest
    print(f"2 GiB each way: service RSS {svc.proc.rss_bytes() >> 20} MiB, connector RSS "
          f"{conn.proc.rss_bytes() >> 20} MiB; before {before >> 20} MiB, peak {peak[0] >> 20} MiB")
    assert peak[0] - before < 64 * 1024 * 1024, f"RSS grew from {before >> 20} MiB to {peak[0] >> 20} MiB"


def test_back_end_reset_gives_502_with_correlation_id(gw, nginx, backends):
    """A back end that resets the connection instead of answering gives a 502 whose id both logs have."""
    rude = backends(reset_after_request)
    svc, conn, front = start_wiki(gw, nginx, extra_apps=[{
        "name": "rude", "external_url": "http://rude.apps.example.test/",
        "internal_url": f"http://{HOST}:{rude.port}/"}])
    r, body = get(front, "rude.apps.example.test", "/x")
    assert r.status == 502
    request_id = r.getheader("X-Request-Id")
    assert request_id in body.decode() and str(rude.port) not in body.decode()
    assert rude.wait_results(1, 10)[0].startswith(b"GET /x HTTP/1.1\r\n")
    wait_until(lambda: request_id in svc.log(), 10, "the 502's id in the service log")
    wait_until(lambda: request_id in conn.proc.log(), 10, "the 502's id in the connector log")


def _exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the front door and read until it closes the connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received


def test_oversized_heads_and_slow_clients_are_refused_before_the_back_end(gw, nginx):
    """414 for a long request line, 431 for too many or too large header fields, 408 for a head
    or a body that trickles in too slowly: each answered by the front door, which closes the
    connection, and none of them reaches nginx."""
    svc, conn, front = start_wiki(gw, nginx, http={"header_timeout": 1, "body_timeout": 1})
    access_log = nginx.root / "access.log"
    served = access_log.read_text().count("\n")
    host = f"Host: {WIKI}:{front}\r\n".encode()

    reply = _exchange(front, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + host + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]
    many = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
    reply = _exchange(front, b"GET / HTTP/1.1\r\n" + host + many + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    reply = _exchange(front, b"GET / HTTP/1.1\r\n" + host + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]

    # slowloris: a head that never ends, then a body that stops after 10 of 100 bytes
    reply = _exchange(front, b"GET / HTTP/1.1\r\n" + host + b"X-Slow: ")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    reply = _exchange(front, b"PUT /up/slow HTTP/1.1\r\n" + host + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
    assert b"408 Request Timeout" in reply, reply[:300]

    # the front door still serves, and nginx saw only this request (and the stopped PUT, which it did get)
    assert get(front, f"{WIKI}:{front}", "/headers")[0].status == 200
    logged = access_log.read_text().splitlines()[served:]
    assert not any("GET / " in line or "X-Slow" in line or "aaaa" in line for line in logged), logged
    assert svc.proc.running and conn.proc.running


def test_client_that_stops_reading_is_cut_off_and_the_back_end_freed(gw, nginx):
    """Slow read: a client that reads slowly keeps its download; once it takes nothing for
    [http] send_timeout, the front door closes the connection, says so in its log, and the
    connector closes the back-end connection (nginx logs the request as ended, short)."""
    size = 48 * 1024 * 1024
    with open(nginx.www / "big.bin", "wb") as f:
        f.truncate(size)
    svc, conn, front = start_wiki(gw, nginx, http={"send_timeout": 1})
    access_log = nginx.root / "access.log"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(10)
    s.connect((HOST, front))
    s.sendall(f"GET /big.bin HTTP/1.1\r\nHost: {WIKI}:{front}\r\n\r\n".encode())
    received = 0
    for _ in range(15):             # 3 s of slow but steady reading: longer than send_timeout
        received += len(s.recv(64 * 1024))
        time.sleep(0.2)
    cut = f"from {HOST}:{s.getsockname()[1]}: the client took no response bytes for 1 s"
    assert cut not in svc.proc.log()
    time.sleep(4)                   # now nothing at all
    wait_until(lambda: cut in svc.proc.log(), 10, "the service to log that it cut the stalled client off")
    try:
        while chunk := s.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    finally:
        s.close()
    assert received < size
    wait_until(lambda: "GET /big.bin" in access_log.read_text(), 10,
               "nginx to log the request as ended (the connector closed the back-end connection)")
    line = next(x for x in access_log.read_text().splitlines() if "GET /big.bin" in x)
    assert int(line.split('" ')[1].split()[1]) < size, line
    assert get(front, f"{WIKI}:{front}", "/headers")[0].status == 200

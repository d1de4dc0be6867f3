"""`gateway access socks` and `gateway access tcp` through real processes against real servers: a
real nginx (a 256 MiB PUT and GET through access tcp, a page through SOCKS CONNECT), 256 MiB each
way echoed through SOCKS CONNECT, UDP datagrams through SOCKS UDP ASSOCIATE to a real UDP echo
(boundaries kept, one flow per destination, a destination outside the segments refused), and a
name outside every segment refused with its reply code and its sentence."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading

import pytest

from gateway_harness import HOST, chunks, echo_handler, wait_until
from gateway.access.socks5 import decode_udp, encode_udp
from test_access_private import CONNECT, UDP_ASSOCIATE, publish, sign_in_with_token, socks_open
from test_access_user_client import access, private

MiB = 1024 * 1024


def start_private(gw, tmp_path, *apps: dict) -> dict:
    """A service publishing ``apps`` with [access], a connector, and alice signed in; her env."""
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, *apps)
    svc.start()
    gw.connector(svc)
    return svc, sign_in_with_token(gw, svc, tmp_path / "home")


# Every reply here is whole: both UDP sockets on the path (the client's relay, the connector's
# flow) read datagrams up to 64 KiB, not Twisted's default 8 KiB.
ECHO_WHOLE = 65000


def udp_answer(data: bytes) -> bytes:
    """What udp_echo answers: 'echo:' + a small datagram, the length and sha256 of a large one."""
    if len(data) <= ECHO_WHOLE:
        return b"echo:" + data
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()}".encode()


def udp_echo() -> tuple[socket.socket, threading.Thread]:
    """A UDP echo on 127.0.0.1 answering every datagram with udp_answer(datagram), until closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
                sock.sendto(udp_answer(data), peer)
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def echo_both_ways(sock: socket.socket, total: int) -> tuple[str, str]:
    """Send ``total`` bytes while reading the echo in a thread: (sha256 sent, sha256 received)."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    got = [0]

    def read() -> None:
        while got[0] < total:
            data = sock.recv(1024 * 1024)
            if not data:
                return
            received.update(data)
            got[0] += len(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for chunk in chunks(total, seed=11):
        sock.sendall(chunk)
        sent.update(chunk)
    reader.join(300)
    assert got[0] == total, f"echoed {got[0]} of {total} bytes"
    return sent.hexdigest(), received.hexdigest()


@pytest.mark.timeout(600)
def test_nginx_through_access_tcp_takes_and_serves_256_mib(gw, tmp_path, nginx):
    """A 256 MiB PUT to a real nginx through access tcp lands intact; its GET comes back with the same sha256."""
    total = 256 * MiB
    svc, env = start_private(gw, tmp_path, private("web", HOST, str(nginx.port)))
    port, _ = access(gw, svc, env, "tcp", "--app", "web")
    digest = hashlib.sha256()

    def body():
        for chunk in chunks(total, seed=3):
            digest.update(chunk)
            yield chunk

    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    conn.request("PUT", "/up/big.bin", body=body(), headers={"Content-Length": str(total)})
    response = conn.getresponse()
    response.read()
    assert response.status in (201, 204), response.status
    assert hashlib.sha256((nginx.www / "up" / "big.bin").read_bytes()).hexdigest() == digest.hexdigest()

    conn.request("GET", "/up/big.bin")
    response = conn.getresponse()
    assert response.status == 200
    back, n = hashlib.sha256(), 0
    while data := response.read(1024 * 1024):
        back.update(data)
        n += len(data)
    conn.close()
    assert (n, back.hexdigest()) == (total, digest.hexdigest())


@pytest.mark.timeout(600)
def test_socks_connect_echoes_256_mib_each_way_and_serves_nginx(gw, tmp_path, backends, nginx):
    """Through SOCKS CONNECT 256 MiB go up and come back from a real echo (sha256 equal); nginx answers a GET."""
    echo = backends(echo_handler)
    svc, env = start_private(gw, tmp_path, private("echo", HOST, str(echo.port)), private("web", HOST, str(nginx.port)))
    port, _ = access(gw, svc, env, "socks")

    sock, code, _, _ = socks_open(port, CONNECT, HOST, echo.port)
    assert code == 0
    sock.settimeout(120)
    sent, received = echo_both_ways(sock, 256 * MiB)
    assert sent == received
    sock.close()

    sock, code, _, _ = socks_open(port, CONNECT, HOST, nginx.port)
    assert code == 0
    sock.sendall(f"GET /headers HTTP/1.1\r\nHost: {HOST}:{nginx.port}\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while data := sock.recv(65536):
        answer += data
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and f"host={HOST}:{nginx.port}".encode() in answer


def test_socks_udp_associate_reaches_a_udp_echo_one_flow_per_destination(gw, tmp_path):
    """Datagrams through UDP ASSOCIATE reach a real UDP echo whole; replies name their source; a port outside is dropped and said."""
    first, _ = udp_echo()
    second, _ = udp_echo()
    try:
        ports = [first.getsockname()[1], second.getsockname()[1]]
        svc, env = start_private(gw, tmp_path, {
            "name": "udp-echo", "options": {"allowed_users": ["alice"]},
            "segments": [{"destination": HOST, "ports": f"{ports[0]},{ports[1]}", "protocol": "udp"}]})
        port, proc = access(gw, svc, env, "socks")
        control, code, relay_host, relay_port = socks_open(port, UDP_ASSOCIATE, "0.0.0.0", 0)
        assert code == 0
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(20)
        sizes = [1, 100, 1400, 8000, 30000, 65000]   # 65000: near the largest a SOCKS datagram can carry
        replies = {}
        for dest in ports:   # one destination at a time: both bursts at once could overrun a socket buffer
            for size in sizes:
                udp.sendto(encode_udp(HOST, dest, bytes([size % 251]) * size), (relay_host, relay_port))
            for _ in sizes:
                reply = decode_udp(udp.recv(65535))
                replies.setdefault(reply.port, []).append(reply.data)
        for dest in ports:
            assert sorted(replies[dest]) == sorted(udp_answer(bytes([s % 251]) * s) for s in sizes)

        outside = ports[0] + 1 if ports[0] + 1 not in ports else ports[0] + 2
        for _ in range(3):
            udp.sendto(encode_udp(HOST, outside, b"nope"), (relay_host, relay_port))
        wait_until(lambda: f"{HOST}:{outside}/udp" in proc.log(), 20, "the client to say the flow was refused")
        assert proc.log().count(f"{HOST}:{outside}/udp refused") == 1
        assert f"no app segment covers {HOST}:{outside}/udp" in proc.log()
        control.close()
        udp.close()
    finally:
        first.close()
        second.close()


def test_a_name_outside_every_segment_is_refused_before_any_connector(gw, tmp_path, backends):
    """SOCKS CONNECT and access tcp --to a name no segment covers: reply 2 / a clean close, the reason said once."""
    echo = backends(echo_handler)
    svc, env = start_private(gw, tmp_path, private("echo", HOST, str(echo.port)))
    port, proc = access(gw, svc, env, "socks")
    for _ in range(2):
        sock, code, _, _ = socks_open(port, CONNECT, "db.nowhere.test", echo.port)
        assert code == 2 and sock.recv(16) == b""
        sock.close()
    wait_until(lambda: "no app segment covers db.nowhere.test" in proc.log(), 20, "the SOCKS client's reason")
    assert proc.log().count("no app segment covers db.nowhere.test") == 1

    tcp_port, tcp_proc = access(gw, svc, env, "tcp", "--app", "echo", "--to", f"db.nowhere.test:{echo.port}",
                                name="tcp")
    with socket.create_connection((HOST, tcp_port), timeout=30) as s:
        s.sendall(b"hello")
        assert s.recv(16) == b""
    wait_until(lambda: "no segment of app echo covers db.nowhere.test" in tcp_proc.log(), 20, "the tcp client's reason")
    assert echo.accepted == 0   # refused on the service: nothing reached a connector or the echo

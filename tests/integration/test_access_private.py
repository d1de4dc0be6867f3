"""Private Access through real processes: a real dnsmasq queried over SOCKS5 UDP ASSOCIATE, a
name resolved on the connector's side, an open stream cut when its user is revoked, and a UDP
flood that leaves the client's and the connector's memory bounded."""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest

from components import require
from gateway.access.socks5 import decode_reply, decode_udp, encode_greeting, encode_request, encode_udp
from gateway_harness import (GATEWAY, HOST, connection_ends, echo_handler, free_port, stop_process, subprocess_env, toml_table,
                             wait_until)

CONNECT, UDP_ASSOCIATE = 1, 3


def publish(svc, *apps: dict, **access) -> None:
    """Append [access] (with ``access`` keys) and private apps to the service's config file."""
    text = svc.config_path.read_text() + "\n" + toml_table("access", {"tunnel": svc.address, **access})
    for app in apps:
        text += "\n" + toml_table("apps", app, array=True)
    svc.config_path.write_text(text)


def sign_in_with_token(gw, svc, home, user="alice") -> dict:
    """A personal token for `user`, traded for a certificate by gateway login; the client's env."""
    token = gw.tmp / f"token-{user}.txt"
    made = gw.cli("users", "token", "create", "--config", str(svc.config_path), "--user", user,
                  "--expires", "1d", "--output", str(token))
    assert made.returncode == 0, made.stderr
    gw.secrets.append(token.read_text().strip().split(".")[2])
    env = subprocess_env(XDG_CONFIG_HOME=str(home))
    login = gw.cli("login", "--service", svc.address, "--token-file", str(token), env=env)
    assert login.returncode == 0, login.stderr
    return env


def socks_client(gw, svc, env) -> int:
    port = free_port()
    gw.spawn("socks", [GATEWAY, "access", "socks", "--service", svc.address, "--listen", f"{HOST}:{port}"], env=env)
    wait_until(lambda: _accepts(port), 30, "gateway access socks to listen")
    return port


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def socks_open(port: int, command: int, host: str, dest_port: int) -> tuple[socket.socket, int, str, int]:
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(encode_greeting())
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(encode_request(command, host, dest_port))
    data = b""
    while True:
        chunk = sock.recv(512)
        assert chunk, "the SOCKS server closed before replying"
        data += chunk
        try:
            code, bound_host, bound_port = decode_reply(data)
            return sock, code, bound_host, bound_port
        except ValueError:
            continue


def dns_query(name: str, qid: int = 0x4242) -> bytes:
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)


def dns_answer_address(reply: bytes) -> str:
    qid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", reply[:12])
    assert an >= 1, f"no answer (flags {flags:#x})"
    offset = 12
    while reply[offset]:
        offset += reply[offset] + 1
    offset += 5   # the question's end, type and class
    offset += 2 + 2 + 2 + 4   # name pointer, type, class, ttl
    length = struct.unpack("!H", reply[offset:offset + 2])[0]
    return socket.inet_ntoa(reply[offset + 2:offset + 2 + length])


@pytest.fixture
def dnsmasq(tmp_path):
    binary = require("dnsmasq")
    port = free_port()
    proc = subprocess.Popen([binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                             f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
                             "--pid-file=", "--address=/db.corp.test/10.7.7.7", "--log-facility=-"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "dnsmasq.log", "wb"))
    try:
        yield port
    finally:
        stop_process(proc)


def test_dns_over_socks_udp_associate_reaches_a_real_dnsmasq(gw, tmp_path, dnsmasq):
    """A DNS query over SOCKS UDP ASSOCIATE goes through the tunnel to dnsmasq and its answer comes back."""
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "dns", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": HOST, "ports": str(dnsmasq), "protocol": "udp"}]})
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = socks_client(gw, svc, env)
    control, code, relay_host, relay_port = socks_open(port, UDP_ASSOCIATE, "0.0.0.0", 0)
    assert code == 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(2)
    answer = None
    for attempt in range(10):   # UDP: the first datagram may be lost while the flow opens
        udp.sendto(encode_udp(HOST, dnsmasq, dns_query("db.corp.test", 0x4200 + attempt)), (relay_host, relay_port))
        try:
            datagram = decode_udp(udp.recv(2048))
        except socket.timeout:
            continue
        answer = datagram
        break
    assert answer is not None, svc.log()[-3000:]
    assert (answer.host, answer.port) == (HOST, dnsmasq)
    assert dns_answer_address(answer.data) == "10.7.7.7"
    control.close()
    wait_until(lambda: "session: user alice app dns udp" in svc.log(), 90, "the UDP flow's session record")


def test_a_name_travels_as_a_name_and_resolves_on_the_connector(gw, tmp_path, backends):
    """SOCKS CONNECT to "localhost" reaches the echo app: the service matched the name, the connector resolved it."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "local", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": "localhost", "ports": str(echo.port)},
                               {"destination": HOST, "ports": str(echo.port)}]})
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = socks_client(gw, svc, env)
    sock, code, _, _ = socks_open(port, CONNECT, "localhost", echo.port)
    assert code == 0
    sock.sendall(b"hello by name")
    assert sock.recv(64) == b"hello by name"
    sock.close()
    wait_until(lambda: f"localhost:{echo.port}" in svc.log(), 20, "the service to log the name it matched")
    # a name outside every segment is refused before any stream reaches a connector
    sock, code, _, _ = socks_open(port, CONNECT, "db.corp.test", echo.port)
    assert code == 2   # connection not allowed by ruleset
    sock.close()


def test_revoking_the_user_cuts_an_open_stream_within_a_config_interval(gw, tmp_path, backends):
    """An open connection through gateway access tcp ends once the user's credentials are revoked."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "echo", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": HOST, "ports": str(echo.port)}]})
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = free_port()
    client = gw.spawn("access", [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "echo",
                                 "--listen", f"{HOST}:{port}"], env=env)
    wait_until(lambda: _accepts(port), 30, "gateway access tcp to listen")
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(b"before")
    assert sock.recv(64) == b"before"
    revoked = gw.cli("users", "revoke", "--config", str(svc.config_path), "--user", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert connection_ends(sock, 15)
    assert "revoked" in svc.log()
    wait_until(lambda: "revoked" in client.log(), 15, "the client to say why")


def test_a_udp_flood_keeps_client_and_connector_memory_bounded(gw, tmp_path):
    """100,000 datagrams of 1 KiB at a UDP sink: RSS of the client and the connector grows by far less."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    sink_port = sink.getsockname()[1]
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "sink", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": HOST, "ports": str(sink_port), "protocol": "udp"}]})
    svc.start()
    conn = gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = socks_client(gw, svc, env)
    client = next(p for p in gw.procs if p.name == "socks")
    control, code, relay_host, relay_port = socks_open(port, UDP_ASSOCIATE, "0.0.0.0", 0)
    assert code == 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram = encode_udp(HOST, sink_port, b"x" * 1024)
    udp.sendto(datagram, (relay_host, relay_port))
    sink.settimeout(20)
    sink.recv(2048)   # the flow is open
    before = (client.rss_bytes(), conn.proc.rss_bytes())
    for _ in range(100_000):
        udp.sendto(datagram, (relay_host, relay_port))
    time.sleep(1)   # let the processes take what the kernel buffered (a behaviour check, not a timing one)
    after = (client.rss_bytes(), conn.proc.rss_bytes())
    # 100 MiB were sent; each process may keep its bounded queues (a few MiB), never the flood
    assert after[0] - before[0] < 48 * 1024 * 1024, (before, after)
    assert after[1] - before[1] < 48 * 1024 * 1024, (before, after)
    control.close()


def test_a_user_over_max_tunnels_per_user_is_refused_with_the_reason(gw, tmp_path, backends):
    """With max_tunnels_per_user = 1 a second gateway access of the same user gets no tunnel (and says
    why) while the first keeps working."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "echo", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": HOST, "ports": str(echo.port)}]}, max_tunnels_per_user=1)
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    def start(name: str) -> int:
        port = free_port()
        gw.spawn(name, [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "echo",
                        "--listen", f"{HOST}:{port}"], env=env)
        wait_until(lambda: _accepts(port), 30, f"gateway access ({name}) to listen")
        return port

    sock = socket.create_connection((HOST, start("first")), timeout=20)
    sock.sendall(b"one")
    assert sock.recv(64) == b"one"   # the first client's tunnel is up before the second starts
    second_port = start("second")
    second = next(p for p in gw.procs if p.name == "second")
    other = socket.create_connection((HOST, second_port), timeout=20)
    other.sendall(b"two")
    wait_until(lambda: "max_tunnels_per_user" in second.log(), 30, "the second client to say why it has no tunnel")
    assert connection_ends(other, 40)
    sock.sendall(b"still")
    assert sock.recv(64) == b"still"


def test_a_stream_waits_for_a_connector_that_is_coming_up(gw, tmp_path, backends):
    """A user's connection made while the app's group has no connector yet is carried once one comes
    up within the app's connect_timeout (as after a node restart, when users are back first)."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, {"name": "echo", "options": {"allowed_users": ["alice"]}, "connect_timeout": 20,
                  "segments": [{"destination": HOST, "ports": str(echo.port)}]})
    svc.start()
    conn = gw.connector(svc, start=False)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = free_port()
    gw.spawn("access", [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "echo",
                        "--listen", f"{HOST}:{port}"], env=env)
    wait_until(lambda: _accepts(port), 30, "gateway access tcp to listen")
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"early")
    wait_until(lambda: "user alice connected" in svc.log(), 20, "the user's tunnel")
    conn.start()
    assert sock.recv(64) == b"early"
    sock.close()

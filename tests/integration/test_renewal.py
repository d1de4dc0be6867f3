"""Certificate renewal end to end: a connector renews over its tunnel while a stream stays open."""

from __future__ import annotations

import re
import socket
import stat
import threading

import pytest
from cryptography import x509

from gateway_harness import HOST, connect, echo_handler, echo_once, wait_echo, wait_until

LIFETIME = 60  # the minimum certificate_lifetime_seconds; renewal comes after about 44 s


class CuttableProxy:
    """A TCP relay in front of the service's tunnel port that counts bytes and can cut one connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.links: list[dict] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection((HOST, self.upstream_port))
            link = {"down": down, "up": up, "bytes": 0, "open": True}
            with self.lock:
                self.links.append(link)
            threading.Thread(target=self._pump, args=(link, down, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, up, down), daemon=True).start()

    def _pump(self, link: dict, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self.lock:
                    link["bytes"] += len(data)
        except OSError:
            pass
        self.cut(link)

    def open_links(self) -> list[dict]:
        with self.lock:
            return [link for link in self.links if link["open"]]

    def cut(self, link: dict) -> None:
        link["open"] = False
        for s in (link["down"], link["up"]):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        for link in self.open_links():
            self.cut(link)


def client_cert(conn) -> x509.Certificate:
    return x509.load_pem_x509_certificate((conn.state_dir / "client.pem").read_bytes())


def echo_on(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    out = bytearray()
    while len(out) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return bytes(out)


@pytest.mark.timeout(150)
def test_connector_renews_its_certificate_and_keeps_open_streams(gw, backends):
    """At two thirds of a 60 s certificate the connector renews it; the open stream survives, new tunnels use the new one."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}],
                     service={"certificate_lifetime_seconds": LIFETIME, "config_interval": 2})
    conn = gw.connector(svc, tunnels=2, start=False, backoff_initial=0.2, backoff_max=0.5)
    old = client_cert(conn)
    proxy = CuttableProxy(svc.port)
    try:
        settings = conn.state_dir / "connection.toml"
        settings.write_text(re.sub(r"service_port = \d+", f"service_port = {proxy.port}", settings.read_text()))
        conn.start()
        port = svc.app_port("echo")
        wait_echo(port)

        # A long-lived stream, used before the renewal; find the proxied tunnel that carries it.
        stream = connect(port, timeout=10)
        before = {id(link): link["bytes"] for link in proxy.open_links()}
        payload = b"before renewal " * 4000
        assert echo_on(stream, payload) == payload
        carrier = max(proxy.open_links(), key=lambda link: link["bytes"] - before.get(id(link), 0))

        log = wait_until(lambda: re.search(r"certificate renewed: serial (\w+) -> (\w+)", conn.proc.log()),
                         LIFETIME, "the connector to renew its certificate")
        new = client_cert(conn)
        assert log.group(1) == format(old.serial_number, "x") and log.group(2) == format(new.serial_number, "x")
        assert new.serial_number != old.serial_number
        assert new.not_valid_after_utc > old.not_valid_after_utc
        assert stat.S_IMODE((conn.state_dir / "client.key").stat().st_mode) == 0o600
        assert re.search(rf"renewed the certificate of connector \w+: serial {log.group(2)}", svc.proc.log())

        # The open stream still works on its tunnel, which keeps the old certificate.
        assert echo_on(stream, b"after renewal") == b"after renewal"

        # Cut the other tunnel: its replacement is dialled with the new certificate.
        others = [link for link in proxy.open_links() if link is not carrier]
        assert others, "expected a second tunnel besides the one carrying the stream"
        for link in others:
            proxy.cut(link)
        wait_until(lambda: re.search(rf"up on tunnel \S+ from \S+ with certificate {log.group(2)}", svc.proc.log()),
                   30, "a tunnel with the new certificate")
        assert echo_on(stream, b"still there" * 1000) == b"still there" * 1000
        assert carrier["open"], "the tunnel carrying the stream was closed"
        assert echo_once(port, b"fresh stream") == b"fresh stream"
        stream.close()
        assert "certificate renewal failed" not in conn.proc.log()
    finally:
        proxy.close()



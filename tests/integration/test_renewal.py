"""Certificate renewal end to end: a connector renews over its tunnel while a stream stays open."""

from __future__ import annotations

import re
import socket
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from gateway.pki import keys
from gateway_harness import (
    DATA,
    GO_AWAY,
    HOST,
    SYN,
    FrameReader,
    connect,
    control_message,
    control_messages,
    echo_handler,
    echo_once,
    raw_frame,
    tls_client,
    wait_echo,
    wait_until,
)

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




# -- limits: renewals are rate-limited per connector, older certificates revoked ----------------

PROTOCOL_VERSION_HELLO = {"type": "hello", "protocol_version": 1, "software_version": "test", "capabilities": []}


class RawTunnel:
    """A hand-made tunnel with a client certificate: hello, then control messages one at a time."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.sock = tls_client(port, cert, key)
        self.reader = FrameReader(self.sock)
        self.frames: list[tuple] = []
        self.seen = 0
        self.sock.sendall(raw_frame(DATA, SYN, 1, b'{"kind":"control"}')
                          + raw_frame(DATA, 0, 1, control_message(PROTOCOL_VERSION_HELLO)))
        assert self.next_message({"welcome"})["type"] == "welcome"

    def next_message(self, kinds: set[str]) -> dict:
        """The next control message of one of `kinds`; a GO_AWAY or EOF first is a failure."""
        while True:
            messages = control_messages(self.frames)
            for message in messages[self.seen:]:
                self.seen += 1
                if message["type"] in kinds:
                    return message
            f = self.reader.next()
            assert f is not None and f[1] != GO_AWAY, f"tunnel ended: {f}"
            self.frames.append(f)

    def renew(self, tmp: Path, name: str) -> dict:
        key = keys.generate_key()
        keys.write_private(tmp / f"{name}.key", keys.key_pem(key))
        self.sock.sendall(raw_frame(DATA, 0, 1, control_message(
            {"type": "renew_request", "csr": keys.make_csr(key, name).decode()})))
        reply = self.next_message({"renew_result", "error"})
        if reply["type"] == "renew_result":
            (tmp / f"{name}.pem").write_text(reply["certificate"])
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(90)
def test_a_second_renewal_within_renewal_min_interval_is_refused(gw, tmp_path):
    """A connector whose certificate is not due renews once; a second renew_request is refused with the wait."""
    svc = gw.service()
    conn = gw.connector(svc, start=False)
    st = conn.state_dir
    tunnel = RawTunnel(svc.port, st / "client.pem", st / "client.key")
    try:
        assert tunnel.renew(tmp_path, "first")["type"] == "renew_result"
        refused = tunnel.renew(tmp_path, "second")
    finally:
        tunnel.close()
    assert refused["type"] == "error" and refused["code"] == "renewal_refused", refused
    assert "renewal_min_interval = 3600 s" in refused["message"] and "try again in" in refused["message"]
    wait_until(lambda: "certificate renewal for connector" in svc.proc.log(), 10, "the refusal in the log")
    assert not (tmp_path / "second.pem").exists()


@pytest.mark.timeout(90)
def test_renewal_revokes_the_connectors_other_certificates(gw, tmp_path):
    """Renewing twice from one certificate revokes the first new one: a tunnel with it is refused as revoked."""
    svc = gw.service(service={"renewal_min_interval": 0})
    conn = gw.connector(svc, start=False)
    st = conn.state_dir
    tunnel = RawTunnel(svc.port, st / "client.pem", st / "client.key")
    try:
        assert tunnel.renew(tmp_path, "first")["type"] == "renew_result"
        assert tunnel.renew(tmp_path, "second")["type"] == "renew_result"
    finally:
        tunnel.close()
    with tls_client(svc.port, tmp_path / "first.pem", tmp_path / "first.key") as s:
        s.sendall(raw_frame(DATA, SYN, 1, b'{"kind":"control"}'))
        _, go_away = FrameReader(s).until_go_away()
    assert go_away is not None and go_away[0] == 4 and "revoked" in go_away[1], go_away
    # The certificate it renewed with and the newest one still work.
    RawTunnel(svc.port, tmp_path / "second.pem", tmp_path / "second.key").close()
    RawTunnel(svc.port, st / "client.pem", st / "client.key").close()

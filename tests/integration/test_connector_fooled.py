"""A real connector checks private apps' destinations itself, as if the service had been fooled.

The service end here is the test: after the connector registered with a real service, that
service stops and the test listens on its port with a node certificate from the same CA,
speaks the tunnel protocol frame by frame, sends the connector a config with one private app,
and opens app streams asking for whatever it likes. The connector must refuse what its
segments do not allow (after its own DNS resolution), and serve what they do.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from datetime import UTC, datetime

import pytest

from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway_harness import (
    ACK,
    DATA,
    FIN,
    HOST,
    PING,
    RST,
    SYN,
    WINDOW_UPDATE,
    FrameReader,
    control_message,
    echo_handler,
    raw_frame,
    wait_until,
)

DESTINATION_REFUSED = 13
MIB = 1024 * 1024


class FakeService:
    """The service's end of one tunnel, driven by the test: mTLS with the service's CA, frames by hand."""

    def __init__(self, svc, tmp) -> None:
        ca = CertificateAuthority.load_or_create(svc.state_dir)
        cert, key = ca.issue_node_certificate(["localhost", HOST], datetime.now(UTC))
        (tmp / "fake-node.pem").write_bytes(keys.cert_pem(cert))
        (tmp / "fake-node.key").write_bytes(keys.key_pem(key))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(tmp / "fake-node.pem"), str(tmp / "fake-node.key"))
        self.ctx.load_verify_locations(str(svc.state_dir / "ca.pem"))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, svc.port))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.sock: ssl.SSLSocket | None = None
        self.reader: FrameReader | None = None
        self.next_id = 2

    def accept(self, apps: list[dict]) -> None:
        """Take the connector's tunnel: ACK its control stream, welcome it, send it `apps`."""
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        self.sock = self.ctx.wrap_socket(conn, server_side=True)
        self.reader = FrameReader(self.sock)
        syn = self.frame_for(1)
        assert syn[2] & SYN and json.loads(syn[5])["kind"] == "control", syn
        welcome = {"type": "welcome", "protocol_version": 1, "software_version": "test", "node_id": "fake",
                   "connector_id": "?", "group": "default", "config_interval": 3600, "heartbeat_interval": 3600,
                   "capabilities": []}
        config = {"type": "config", "version": "fooled-1", "group": "default", "apps": apps}
        self.send(raw_frame(WINDOW_UPDATE, ACK, 1, value=0)
                  + raw_frame(DATA, 0, 1, control_message(welcome) + control_message(config)))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame_for(self, sid: int) -> tuple:
        """The next frame of stream `sid`; PINGs are answered and other streams' frames skipped."""
        while True:
            f = self.reader.next()
            assert f is not None, "the connector closed the tunnel"
            _, ftype, flags, fsid, value, _ = f
            if ftype == PING and not flags & ACK:
                self.send(raw_frame(PING, ACK, 0, value=value))
            elif fsid == sid and ftype in (DATA, WINDOW_UPDATE):
                return f

    def open(self, metadata: dict) -> tuple[int, tuple]:
        """Open an app stream; returns its id and the connector's answer (ACK or RST frame)."""
        sid, self.next_id = self.next_id, self.next_id + 2
        self.send(raw_frame(DATA, SYN, sid, json.dumps(metadata).encode()))
        return sid, self.frame_for(sid)

    def read_data(self, sid: int, n: int) -> bytes:
        got = b""
        while len(got) < n:
            f = self.frame_for(sid)
            assert f[1] == DATA and not f[2] & (RST | FIN), f
            got += f[5]
        return got

    def close(self) -> None:
        for s in (self.sock, self.listener):
            if s is not None:
                s.close()


def refusal(answer: tuple) -> tuple[int, str]:
    assert answer[1] == DATA and answer[2] & RST, f"expected RST, got {answer}"
    code, = struct.unpack_from("!I", answer[5])
    return code, answer[5][4:].decode()


def refusal_reasons(log: str, text: str) -> str:
    return "\n".join(line for line in log.splitlines() if text in line)


def meta(destination: str, transport: str = "tcp") -> dict:
    return {"kind": "app", "app": "corp", "protocol": "udp" if transport == "udp" else "tcp", "transport": transport,
            "destination": destination, "segment": "whatever the service said", "request_id": f"req-{destination}",
            "user": "mallory@example.test", "client": "access:0123"}


class UDPServer:
    """A UDP server on 127.0.0.1: echoes each datagram, or answers b"flood N" with N datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.flooded = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            if data.startswith(b"flood "):
                for i in range(int(data.split()[1])):
                    self.sock.sendto(i.to_bytes(4, "big") + bytes(1396), peer)
                self.flooded.set()
            else:
                self.sock.sendto(data, peer)

    def close(self) -> None:
        self.sock.close()


def datagram(payload: bytes) -> bytes:
    return struct.pack("!H", len(payload)) + payload


@pytest.fixture
def fooled(gw, backends, tmp_path):
    """A real connector whose 'service' is the test, with a private app's segments covering an echo
    server on 127.0.0.1 (TCP), a UDP server on 127.0.0.1, a CIDR and a name."""
    echo = backends(echo_handler)
    udp = UDPServer()
    svc = gw.service(apps=[])
    conn = gw.connector(svc, start=False, tunnels=1)
    svc.stop()
    fake = FakeService(svc, tmp_path)
    segments = [
        {"destination": "127.0.0.1", "ports": str(echo.port), "protocol": "tcp"},
        {"destination": "127.0.0.1", "ports": str(udp.port), "protocol": "udp"},
        {"destination": "10.77.0.0/16", "ports": "22", "protocol": "tcp"},
        {"destination": "localhost", "ports": "1-65535", "protocol": "tcp"},
        {"destination": "*.invalid", "ports": "80", "protocol": "tcp"},
    ]
    conn.start(wait=False)
    fake.accept([{"name": "corp", "protocol": "tcp", "destination": "", "host": "", "port": 0,
                  "connect_timeout": 5, "options": {"allowed_users": ["alice@example.test"]},
                  "segments": segments}])
    conn.wait_up(1)
    yield fake, conn, echo, udp
    fake.close()
    udp.close()


# name -> (destination, transport, what the reason must say)
OUTSIDE = {
    "address outside the CIDR": ("10.78.0.1:22", "tcp", "10.78.0.1:22/tcp is outside the segments of app corp"),
    "port outside the segment": ("10.77.1.1:23", "tcp", "10.77.1.1:23/tcp is outside the segments"),
    "udp to a tcp segment": ("10.77.1.1:22", "udp", "10.77.1.1:22/udp is outside the segments"),
    "name in no segment": ("db.corp.example:22", "tcp", "db.corp.example:22/tcp is outside the segments"),
    "loopback port not listed": ("127.0.0.1:1", "tcp", "127.0.0.1:1/tcp is outside the segments"),
    "name resolving to loopback": ("localhost:22", "tcp", "localhost:22/tcp resolved to "),
    "malformed destination": ("10.77.1.1", "tcp", "destination '10.77.1.1' of app corp"),
}


@pytest.mark.timeout(90)
def test_connector_refuses_destinations_outside_its_segments(fooled):
    """Every stream asking outside the app's segments, as asked or after the connector's DNS, is RST
    DESTINATION_REFUSED with a reason naming it, and logged as destination_refused."""
    fake, conn, echo, udp = fooled
    for case, (destination, transport, text) in OUTSIDE.items():
        _, answer = fake.open(meta(destination, transport))
        code, reason = refusal(answer)
        assert code == DESTINATION_REFUSED and text in reason, (case, code, reason)
        assert case == "malformed destination" or "tcp 10.77.0.0/16:22" in reason, (case, reason)
    wait_until(lambda: conn.log().count("refused:") >= len(OUTSIDE), 10, "the connector to log every refusal")
    assert "user mallory@example.test, request req-localhost:22" in conn.log()
    assert "127.0.0.1" in refusal_reasons(conn.log(), "localhost:22/tcp resolved to")
    assert echo.accepted == 0, "the connector dialled something it refused"


@pytest.mark.timeout(90)
def test_connector_serves_an_allowed_tcp_destination(fooled):
    """A TCP destination the segments list (by address, or by a name resolving to it) reaches the real echo server."""
    fake, conn, echo, udp = fooled
    sid, answer = fake.open(meta(f"127.0.0.1:{echo.port}"))
    assert answer[1] == WINDOW_UPDATE and answer[2] & ACK, answer
    fake.send(raw_frame(DATA, 0, sid, b"hello private app"))
    assert fake.read_data(sid, 17) == b"hello private app"
    # A name reaches loopback when an address segment lists that address and port.
    sid, answer = fake.open(meta(f"localhost:{echo.port}"))
    assert answer[1] == WINDOW_UPDATE and answer[2] & ACK, answer
    fake.send(raw_frame(DATA, 0, sid, b"by name"))
    assert fake.read_data(sid, 7) == b"by name"
    assert echo.accepted == 2


@pytest.mark.timeout(90)
def test_connector_carries_a_udp_flow_keeping_datagram_boundaries(fooled):
    """A UDP flow reaches the real UDP echo server and comes back datagram by datagram."""
    fake, conn, echo, udp = fooled
    sid, answer = fake.open(meta(f"127.0.0.1:{udp.port}", "udp"))
    assert answer[1] == WINDOW_UPDATE and answer[2] & ACK, answer
    sent = [b"one", b"", b"three" * 300, bytes(range(256))]
    wire = b"".join(datagram(d) for d in sent)
    # Split across frames mid-prefix and mid-datagram: boundaries come from the framing.
    fake.send(raw_frame(DATA, 0, sid, wire[:4]) + raw_frame(DATA, 0, sid, wire[4:1001])
              + raw_frame(DATA, 0, sid, wire[1001:]))
    back = fake.read_data(sid, len(wire))
    got, offset = [], 0
    while offset < len(back):
        n, = struct.unpack_from("!H", back, offset)
        got.append(back[offset + 2:offset + 2 + n])
        offset += 2 + n
    assert sorted(got) == sorted(sent) and len(got) == 4  # UDP may reorder; never merge or split


@pytest.mark.timeout(120)
def test_udp_flood_to_a_stream_that_reads_nothing_keeps_the_connector_bounded(fooled):
    """A flood of datagrams to a flow whose stream gets no window is dropped oldest-first and counted;
    the connector's memory stays bounded."""
    fake, conn, echo, udp = fooled
    sid, answer = fake.open(meta(f"127.0.0.1:{udp.port}", "udp"))
    assert answer[2] & ACK, answer
    before = conn.proc.rss_bytes()
    count = 60000  # 60000 x 1400 bytes: 84 MB, far over what the stream and the queue may hold
    fake.send(raw_frame(DATA, 0, sid, datagram(f"flood {count}".encode())))
    assert udp.flooded.wait(60), "the UDP server did not finish its flood"
    fake.send(raw_frame(DATA, FIN, sid))  # the user's end closes: the flow logs what it dropped
    wait_until(lambda: "udp flow to 127.0.0.1" in conn.log(), 30, "the flow's close line")
    line = next(line for line in conn.log().splitlines() if "udp flow to 127.0.0.1" in line)
    dropped = int(line.split(" dropped (")[0].rsplit(" ", 1)[1])
    assert dropped > 0, line
    grown = conn.proc.rss_bytes() - before
    assert grown < 32 * MIB, f"connector RSS grew by {grown / MIB:.1f} MiB during the flood"

"""Hostile or incompatible peers on the tunnel port: they are turned away, the service keeps serving."""

from __future__ import annotations

import json
import ssl

import pytest

from gateway_harness import (
    DATA,
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

PROTOCOL_ERROR, UNSUPPORTED_VERSION = 1, 3

# name -> (bytes sent after the TLS handshake, expected GO_AWAY code, text in its reason and the log)
BAD_FRAMES = {
    "unknown frame type": (raw_frame(9, 0, 0, value=0), PROTOCOL_ERROR, "unknown frame type 9"),
    "oversized frame": (raw_frame(DATA, 0, 1, value=64 * 1024 * 1024), PROTOCOL_ERROR,
                        "frame of 67108864 bytes exceeds the limit"),
    "bad version byte": (raw_frame(DATA, SYN, 1, b"{}", version=7), UNSUPPORTED_VERSION,
                         "frame version 7 is not supported"),
    "metadata not JSON": (raw_frame(DATA, SYN, 1, b"\xff\xfe garbage"), PROTOCOL_ERROR,
                          "SYN metadata is not a JSON object"),
    "deeply nested metadata": (raw_frame(DATA, SYN, 1, b'{"kind":' + b"[" * 15000), PROTOCOL_ERROR,
                               "SYN metadata is nested more than 32 levels deep"),
}


@pytest.fixture
def served(gw, backends):
    """A service with an echo app and a connector serving it."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    return svc, conn


@pytest.mark.timeout(60)
def test_plain_tcp_garbage_is_closed_and_service_keeps_serving(served):
    """Non-TLS bytes on the tunnel port get the connection closed, the reason logged, and service goes on."""
    svc, _ = served
    with connect(svc.port, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
        assert FrameReader(s).wait_closed(10), "the service kept a non-TLS connection open"
    wait_until(lambda: "ended before the TLS handshake completed" in svc.proc.log(), 10,
               "the service to log why it dropped the connection")
    assert echo_once(svc.app_port("echo"), b"still serving") == b"still serving"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
@pytest.mark.parametrize("with_cert", [False, True], ids=["enrolment-tls", "client-cert"])
def test_bad_frames_get_go_away_with_reason(served, case, with_cert):
    """Malformed frames after TLS get a GO_AWAY naming the problem, which the service also logs; it keeps serving."""
    svc, conn = served
    data, code, text = BAD_FRAMES[case]
    st = conn.state_dir
    cert = dict(cert=st / "client.pem", key=st / "client.key") if with_cert else {}
    with tls_client(svc.port, ca=svc.state_dir / "ca.pem", **cert) as s:
        s.sendall(data)
        _, go_away = FrameReader(s).until_go_away()
    assert go_away is not None, "no GO_AWAY before the connection ended"
    assert go_away[0] == code and text in go_away[1], go_away
    wait_until(lambda: f"protocol error, closing: {text}" in svc.proc.log(), 10, "the reason in the service log")
    assert echo_once(svc.app_port("echo"), b"still serving") == b"still serving"
    assert conn.up_count() == 1, "the real connector's tunnel was disturbed"


def _version_mismatch(s: ssl.SSLSocket) -> tuple[list, tuple[int, str] | None]:
    hello = {"type": "hello", "protocol_version": 999, "software_version": "9.9.9", "capabilities": []}
    s.sendall(raw_frame(DATA, SYN, 1, json.dumps({"kind": "control"}).encode())
              + raw_frame(DATA, 0, 1, control_message(hello)))
    return FrameReader(s).until_go_away()


@pytest.mark.timeout(60)
def test_protocol_version_mismatch_is_refused_with_both_versions(served):
    """A hello with protocol_version 999 gets an error message and GO_AWAY UNSUPPORTED_VERSION naming both versions."""
    svc, conn = served
    st = conn.state_dir
    with tls_client(svc.port, st / "client.pem", st / "client.key", st / "ca.pem") as s:
        frames, go_away = _version_mismatch(s)
    messages = control_messages(frames)
    errors = [m for m in messages if m["type"] == "error"]
    assert errors and errors[0]["code"] == "unsupported_version", messages
    assert not any(m["type"] == "welcome" for m in messages)
    assert go_away is not None and go_away[0] == UNSUPPORTED_VERSION, go_away
    for text in (errors[0]["message"], go_away[1]):
        assert "999" in text and "speaks 1" in text, text
    wait_until(lambda: "protocol version mismatch" in svc.proc.log(), 10, "the service to log the mismatch")
    line = next(line for line in svc.proc.log().splitlines() if "protocol version mismatch" in line)
    assert "999" in line and "speaks 1" in line, line
    assert echo_once(svc.app_port("echo"), b"still serving") == b"still serving"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["unknown frame type", "version mismatch"])
def test_connection_is_closed_after_go_away(served, case):
    """After sending GO_AWAY for a protocol error or a refused hello, the service closes the connection."""
    svc, conn = served
    st = conn.state_dir
    with tls_client(svc.port, st / "client.pem", st / "client.key", st / "ca.pem") as s:
        if case == "version mismatch":
            _, go_away = _version_mismatch(s)
        else:
            s.sendall(BAD_FRAMES[case][0])
            _, go_away = FrameReader(s).until_go_away()
        assert go_away is not None
        assert FrameReader(s).wait_closed(10), "the connection is still open 10 s after GO_AWAY"

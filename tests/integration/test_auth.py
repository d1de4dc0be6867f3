"""Who may connect: client certificates, deleted connectors, enrolment tokens."""

from __future__ import annotations

import json
import re
import secrets
import ssl
import time
from datetime import UTC, datetime, timedelta

import pytest

from gateway_harness import (
    ACK,
    DATA,
    GO_AWAY,
    SYN,
    WINDOW_UPDATE,
    FrameReader,
    control_message,
    control_messages,
    echo_handler,
    echo_once,
    raw_frame,
    tls_client,
    wait_echo,
    wait_until,
)

GO_AWAY_NOT_AUTHORIZED = 4


def _hello() -> dict:
    return {"type": "hello", "protocol_version": 1, "software_version": "test", "capabilities": []}


@pytest.mark.timeout(90)
def test_client_certificate_from_another_ca_is_refused(gw, backends, tmp_path):
    """A client certificate issued by another CA (even naming a real connector) never gets a tunnel."""
    from gateway.pki import keys
    from gateway.pki.ca import CertificateAuthority

    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    real = gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))

    now = datetime.now(UTC)
    rogue_ca = CertificateAuthority.create(now, common_name="rogue CA")
    key = keys.generate_key()
    cert = rogue_ca.issue_client_certificate(keys.make_csr(key, "x"), real.connector_id, now, timedelta(days=1))
    keys.write_private(tmp_path / "rogue.key", keys.key_pem(key))
    keys.write_public(tmp_path / "rogue.pem", keys.cert_pem(cert))

    outcome = None
    try:
        with tls_client(svc.port, tmp_path / "rogue.pem", tmp_path / "rogue.key", svc.state_dir / "ca.pem") as s:
            s.sendall(raw_frame(DATA, SYN, 1, json.dumps({"kind": "control"}).encode())
                      + raw_frame(DATA, 0, 1, control_message(_hello())))
            frames, go_away = FrameReader(s).until_go_away()
            outcome = ("frames", frames, go_away)
    except (ssl.SSLError, ConnectionError) as e:
        outcome = ("tls refused", str(e))
    if outcome[0] == "frames":
        _, frames, go_away = outcome
        assert not any(m.get("type") == "welcome" for m in control_messages(frames)), "a rogue certificate got in"
        assert go_away is None or go_away[0] == GO_AWAY_NOT_AUTHORIZED, go_away
    else:
        assert re.search(r"unknown ca|certificate verify failed|alert", outcome[1], re.I), outcome

    # The service is unharmed and the real connector still serves.
    assert echo_once(svc.app_port("echo"), b"still here") == b"still here"
    assert svc.proc.running


@pytest.mark.timeout(90)
def test_deleted_connector_new_tunnels_are_refused(gw, backends):
    """After `gateway connectors delete`, the connector's new tunnels are refused and its log says it was deleted."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=1, backoff_initial=0.2, backoff_max=0.5)
    wait_echo(svc.app_port("echo"))

    result = svc.delete_connector(conn.connector_id)
    assert result.returncode == 0, result.stderr
    assert "deleted" in result.stdout

    conn.kill9()
    conn.start(wait=False)
    wait_until(lambda: re.search(r"refused the tunnel|closed the tunnel", conn.proc.log()), 30,
               "the connector to log the refusal")
    refusals = [line for line in conn.proc.log().splitlines()
                if re.search(r"refused the tunnel|closed the tunnel", line)]
    assert all(re.search(r"deleted|revoked", line) for line in refusals), refusals[:3]
    assert "up to node" not in conn.proc.log()
    assert re.search(r"refused: this connector (was deleted|'s certificate was revoked)", svc.log())
    listed = gw.cli("connectors", "list", "--all", "--wide", "--config", str(svc.config_path))
    assert re.search(rf"{conn.connector_id}.*deleted", listed.stdout), listed.stdout
    with pytest.raises(OSError):
        echo_once(svc.app_port("echo"), timeout=3)


@pytest.mark.timeout(90)
def test_bad_tokens_are_refused_clearly(gw):
    """A reused, expired, unknown or garbled token is refused with a clear message and leaves no certificate."""
    svc = gw.service()

    def register_fails(token_path, name: str) -> str:
        state = gw.tmp / name / "state"
        result = gw.register(svc, name=name, token=token_path, state_dir=state)
        assert result.returncode != 0, f"{name}: registration should have failed: {result.stdout}"
        assert not (state / "client.pem").exists() and not (state / "client.key").exists()
        assert "Traceback" not in result.stderr, result.stderr
        return result.stderr

    used = svc.token()
    assert gw.register(svc, name="first", token=used).returncode == 0
    assert "already used" in register_fails(used, "reuse")

    short = svc.token(lifetime=1)
    time.sleep(2.1)  # the token's whole lifetime, plus a margin
    assert "expired" in register_fails(short, "late")

    # Well-formed, right CA, but no such token on the service.
    fingerprint = used.read_text().strip().split(".")[3]
    unknown = gw.tmp / "unknown.txt"
    unknown.write_text(f"gw1.{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}.{fingerprint}\n")
    assert "unknown token" in register_fails(unknown, "unknown")

    # A right id with a wrong secret looks the same as an unknown token.
    right_id = svc.token().read_text().strip().split(".")
    wrong_secret = gw.tmp / "wrong-secret.txt"
    wrong_secret.write_text(".".join([right_id[0], right_id[1], secrets.token_urlsafe(32), right_id[3]]))
    assert "unknown token" in register_fails(wrong_secret, "guess")

    garbled = gw.tmp / "garbled.txt"
    garbled.write_text("gw1.this-is-not.a-token\n")
    err = register_fails(garbled, "garbled")
    assert "malformed enrolment token" in err

    assert "refused" in svc.proc.log()
    gw.assert_no_secret_in_logs()


@pytest.mark.timeout(90)
def test_token_pinned_to_another_ca_is_refused_before_the_secret_is_sent(gw):
    """A token whose CA fingerprint is not the service's is refused by register, which never sends the secret."""
    svc = gw.service()
    token = svc.token()
    parts = token.read_text().strip().split(".")
    forged = gw.tmp / "forged.txt"
    forged.write_text(".".join([*parts[:3], secrets.token_hex(32)]) + "\n")

    state = gw.tmp / "pinned" / "state"
    result = gw.register(svc, name="pinned", token=forged, state_dir=state)
    assert result.returncode != 0
    assert "fingerprint" in result.stderr, result.stderr
    assert not (state / "client.pem").exists()
    # The service never saw an enrolment request, so the token is still unused.
    assert "enrol" not in svc.proc.log().replace("enrolled", "")
    assert gw.register(svc, name="honest", token=token).returncode == 0
    gw.assert_no_secret_in_logs()


def test_hand_written_client_with_a_real_certificate_is_welcomed(gw):
    """Sanity check of the hand-written client: a real connector certificate gets ACK and welcome."""
    svc = gw.service()
    conn = gw.connector(svc, start=False)
    st = conn.state_dir
    with tls_client(svc.port, st / "client.pem", st / "client.key", st / "ca.pem") as s:
        s.sendall(raw_frame(DATA, SYN, 1, json.dumps({"kind": "control"}).encode())
                  + raw_frame(DATA, 0, 1, control_message(_hello())))
        reader = FrameReader(s)
        frames = []
        while not any(m.get("type") == "config" for m in control_messages(frames)):
            f = reader.next()
            assert f is not None, frames
            assert f[1] != GO_AWAY, f
            frames.append(f)
    assert any(f[1] == WINDOW_UPDATE and f[2] & ACK and f[3] == 1 for f in frames)
    welcome = control_messages(frames)[0]
    assert welcome["type"] == "welcome" and welcome["connector_id"] == conn.connector_id

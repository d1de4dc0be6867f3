"""The user's client through real processes: `gateway login` with a personal token, `gateway access
tcp` carrying 256 MiB each way, and every refusal the user can meet (not assigned, outside the
segments, revoked or foreign token, unreachable service, a forged sign-in redirect, a listen
address off loopback, signed out), each with its sentence."""

from __future__ import annotations

import json
import socket
import stat
import sys
import textwrap

import pytest

from gateway_harness import (GATEWAY, HOST, connect, free_port, port_is_free, read_exact, sized_sink_handler,
                             source_handler, subprocess_env, echo_handler, upload_to_sink, wait_echo, wait_until)
from test_access_private import CONNECT, publish, sign_in_with_token, socks_open

MiB = 1024 * 1024


def private(name: str, destination: str, ports: str, users=("alice",), protocol="tcp") -> dict:
    return {"name": name, "options": {"allowed_users": list(users)},
            "segments": [{"destination": destination, "ports": ports, "protocol": protocol}]}


def make_token(gw, svc, user="alice") -> tuple:
    path = gw.tmp / f"token-{user}-{next(gw.counter)}.txt"
    made = gw.cli("users", "token", "create", "--config", str(svc.config_path), "--user", user,
                  "--expires", "1d", "--output", str(path))
    assert made.returncode == 0, made.stderr
    text = path.read_text().strip()
    gw.secrets.append(text.split(".")[2])
    return path, text


def access(gw, svc, env, *args, name="access"):
    port = free_port()
    proc = gw.spawn(name, [GATEWAY, "access", *args, "--service", svc.address, "--listen", f"{HOST}:{port}"],
                    env=env)
    wait_until(lambda: not port_is_free(port), 30, f"gateway access {args[0]} to listen")
    return port, proc


@pytest.mark.timeout(300)
def test_token_login_then_access_tcp_carries_256_mib_each_way(gw, backends, tmp_path):
    """gateway login --token-file caches 0600 credentials; access tcp (no --to) moves 256 MiB up and down, sha256 equal."""
    total = 256 * MiB
    sink = backends(sized_sink_handler(total))
    source = backends(source_handler(total))
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, private("up", HOST, str(sink.port)), private("down", HOST, str(source.port)))
    svc.start()
    gw.connector(svc)
    home = tmp_path / "home"
    env = sign_in_with_token(gw, svc, home)
    cached, = (home / "gateway" / "credentials").glob("*.json")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    assert json.loads(cached.read_text())["user"]["sub"] == "alice"

    up, _ = access(gw, svc, env, "tcp", "--app", "up", name="up")
    down, _ = access(gw, svc, env, "tcp", "--app", "down", name="down")
    upload_to_sink(up, total, 5, sink, 240)
    with connect(down, timeout=60) as s:
        got = read_exact(s, total)
    [sent] = source.wait_results(1, 60)
    assert got == sent and sent[0] == total
    gw.assert_no_secret_in_logs()


def test_an_unassigned_user_gets_a_clean_close_and_one_message(gw, backends, tmp_path):
    """bob is not assigned to app echo: each local connection is closed (EOF, nothing sent), the reason printed once."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, private("echo", HOST, str(echo.port), users=("alice",)))
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home", user="bob")
    port, proc = access(gw, svc, env, "tcp", "--app", "echo")
    for _ in range(3):
        with connect(port, timeout=30) as s:
            s.sendall(b"hello")
            assert s.recv(64) == b""
    wait_until(lambda: "not assigned to app echo" in proc.log(), 20, "the client to say why")
    assert proc.log().count("not assigned to app echo") == 1
    assert not echo.results


def test_socks_destinations_outside_the_segments_are_refused_with_their_reply_codes(gw, backends, tmp_path):
    """SOCKS CONNECT to an address outside the CIDR and to a port outside the list get reply 2; inside gets 0."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, private("echo", "127.0.0.0/30", str(echo.port)))
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port, proc = access(gw, svc, env, "socks")
    sock, code, _, _ = socks_open(port, CONNECT, "127.0.0.9", echo.port)        # outside 127.0.0.0/30
    assert code == 2 and sock.recv(16) == b""
    sock, code, _, _ = socks_open(port, CONNECT, HOST, echo.port + 1 if echo.port < 65535 else 1)   # port outside
    assert code == 2 and sock.recv(16) == b""
    sock, code, _, _ = socks_open(port, CONNECT, HOST, echo.port)
    assert code == 0
    sock.sendall(b"inside")
    assert sock.recv(16) == b"inside"
    sock.close()
    wait_until(lambda: "127.0.0.9" in proc.log(), 20, "the client to name the refused destination")


def test_a_revoked_token_and_a_token_for_another_service_are_refused_at_login(gw, tmp_path):
    """gateway login with a revoked personal token, or one pinning another CA, fails saying what to do."""
    svc = gw.service(start=False)
    publish(svc)
    svc.start()
    token, text = make_token(gw, svc)
    token_id = text.split(".")[1]
    revoked = gw.cli("users", "token", "revoke", "--config", str(svc.config_path), token_id)
    assert revoked.returncode == 0, revoked.stderr
    env = subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home"))
    result = gw.cli("login", "--service", svc.address, "--token-file", str(token), env=env)
    assert result.returncode == 1
    assert "revoked" in result.stderr and "ask your administrator for a new one" in result.stderr

    _, good = make_token(gw, svc)
    parts = good.split(".")
    foreign = tmp_path / "foreign.txt"
    foreign.write_text(".".join(parts[:3] + ["0" * 64]) + "\n")
    result = gw.cli("login", "--service", svc.address, "--token-file", str(foreign), env=env)
    assert result.returncode == 1
    assert "no CA with fingerprint" in result.stderr and "check --service" in result.stderr
    assert not (tmp_path / "home" / "gateway" / "credentials").exists() or \
        not list((tmp_path / "home" / "gateway" / "credentials").glob("*.json"))
    gw.assert_no_secret_in_logs()


def test_login_to_an_unreachable_service_says_to_check_the_address(gw, tmp_path):
    """A tunnel address where nothing listens: login fails naming the address and what to check."""
    svc = gw.service(start=False)
    publish(svc)
    svc.start()
    token, _ = make_token(gw, svc)
    nowhere = f"{HOST}:{free_port()}"
    result = gw.cli("login", "--service", nowhere, "--token-file", str(token),
                    env=subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home")))
    assert result.returncode == 1
    assert f"could not reach the service at {nowhere}" in result.stderr
    assert "check the address and that the service is running" in result.stderr


def test_a_sign_in_redirect_with_the_wrong_state_is_refused_and_login_waits_for_its_own(gw, tmp_path):
    """The loopback listener answers a redirect whose state is not its own with 400, takes no code from it,
    and the login ends only by its timeout, with a sentence saying what to do."""
    report = tmp_path / "browser.json"
    browser = tmp_path / "browser.py"
    browser.write_text(textwrap.dedent(f"""\
        import json, sys, urllib.error, urllib.parse, urllib.request
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(sys.argv[1]).query)
        port = query["port"][0]
        forged = urllib.parse.urlencode({{"code": "stolen", "state": "not-" + query["state"][0],
                                          "tunnel": "127.0.0.1:1", "server_name": "x", "ca": "sha256:" + "0" * 64}})
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{{port}}/callback?{{forged}}", timeout=10)
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        json.dump({{"status": status, "challenge_method": query["code_challenge_method"][0],
                   "has_challenge": bool(query["code_challenge"][0])}}, open({str(report)!r}, "w"))
        """))
    env = subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home"), BROWSER=f"{sys.executable} {browser} %s")
    result = gw.cli("login", "--service", f"http://{HOST}:{free_port()}", "--timeout", "5", env=env)
    seen = json.loads(report.read_text())
    assert seen == {"status": 400, "challenge_method": "S256", "has_challenge": True}
    assert result.returncode == 1
    assert "no sign-in came back within 5s" in result.stderr and "run gateway login again" in result.stderr
    assert "/.gateway/login?port=" in result.stderr   # the URL is printed for a browser that did not open


def test_plain_http_sign_in_off_loopback_is_refused(gw, tmp_path):
    """gateway login --service http://HOST for a host that is not this machine is refused before anything."""
    result = gw.cli("login", "--service", "http://gateway.example.com", "--no-browser",
                    env=subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home")))
    assert result.returncode == 1 and "use the https:// URL" in result.stderr


def test_a_listen_address_off_loopback_is_refused(gw, tmp_path):
    """gateway access socks --listen 0.0.0.0:P exits with the reason and nothing listens on P."""
    port = free_port()
    result = gw.cli("access", "socks", "--listen", f"0.0.0.0:{port}",
                    env=subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home")))
    assert result.returncode == 1 and "not a loopback address" in result.stderr
    assert port_is_free(port)
    with pytest.raises(OSError):
        socket.create_connection((HOST, port), timeout=2)


def test_after_logout_access_says_to_sign_in(gw, backends, tmp_path):
    """gateway logout deletes the cache file; gateway access then exits saying to run gateway login."""
    echo = backends(echo_handler)
    svc = gw.service(start=False)
    publish(svc, private("echo", HOST, str(echo.port)))
    svc.start()
    gw.connector(svc)
    home = tmp_path / "home"
    env = sign_in_with_token(gw, svc, home)
    port, proc = access(gw, svc, env, "tcp", "--app", "echo")
    wait_echo(port)
    proc.stop()
    out = gw.cli("logout", "--service", svc.address, env=env)
    assert out.returncode == 0 and "signed out" in out.stderr
    assert not list((home / "gateway" / "credentials").glob("*.json"))
    again = gw.cli("access", "tcp", "--app", "echo", "--listen", f"{HOST}:{free_port()}", "--service", svc.address,
                   env=env)
    assert again.returncode == 1 and f"run gateway login --service {svc.address}" in again.stderr


def test_a_local_connection_made_while_the_service_is_down_is_served_when_it_returns(gw, backends, tmp_path):
    """The tunnel reconnects with backoff: a connection made while the service is down is carried once it is back."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc, private("echo", HOST, str(echo.port)))
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port, proc = access(gw, svc, env, "tcp", "--app", "echo")
    wait_echo(port)
    svc.stop()
    wait_until(lambda: "reach the service's tunnel" in proc.log() or "lost" in proc.log(), 30,
               "the client to notice the service is gone")
    with connect(port, timeout=60) as s:
        s.sendall(b"while down")
        svc.start()
        assert s.recv(64) == b"while down"


def test_a_tunnel_port_that_drops_connections_is_retried_quietly(gw, backends, tmp_path):
    """A tunnel address that closes every connection before TLS: the client says so once and retries
    with backoff, without a traceback."""
    import threading

    svc = gw.service(start=False)
    publish(svc)
    svc.start()
    home = tmp_path / "home"
    env = sign_in_with_token(gw, svc, home)
    dropper = socket.socket()
    dropper.bind((HOST, 0))
    dropper.listen(16)
    accepted = []

    def drop() -> None:
        while True:
            try:
                conn, _ = dropper.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    cached, = (home / "gateway" / "credentials").glob("*.json")
    document = json.loads(cached.read_text())
    document["tunnel"] = f"{HOST}:{dropper.getsockname()[1]}"
    cached.write_text(json.dumps(document))
    try:
        _, proc = access(gw, svc, env, "tcp", "--app", "x")
        wait_until(lambda: len(accepted) >= 3, 30, "three connection attempts")
        log = proc.log()
        assert log.count("failed") == 1 and "retrying" in log
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        dropper.close()

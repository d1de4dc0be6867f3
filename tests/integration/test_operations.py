"""Operating the processes: config reload, bad config files, plugins, JSON logs and secrets."""

from __future__ import annotations

import json
import re
import signal

import pytest

from gateway_harness import (
    HOST,
    echo_handler,
    echo_once,
    free_port,
    port_is_free,
    subprocess_env,
    wait_echo,
    wait_until,
)


@pytest.mark.timeout(90)
def test_sighup_adds_an_app_without_restart(gw, backends):
    """SIGHUP after adding an app to svc.toml opens its listener and pushes it to the connector; nothing restarts."""
    first, second = backends(echo_handler), backends(echo_handler)
    svc = gw.service(apps=[{"name": "first", "destination": first.destination}])
    conn = gw.connector(svc, tunnels=2)
    wait_echo(svc.app_port("first"))
    service_pid, connector_pid = svc.proc.pid, conn.proc.pid

    port = svc.add_app("second", second.destination)
    svc.proc.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in svc.proc.log(), 15, "the service to reload")
    # config_interval is 300 s by default, so only a push can deliver the new app this soon.
    wait_until(lambda: re.search(r"config \w+: apps .*second→", conn.proc.log()), 15,
               "the connector to receive the new config")
    wait_echo(port, timeout=15, payload=b"new app")
    assert second.accepted >= 1, "the new app's traffic went elsewhere"
    assert echo_once(svc.app_port("first"), b"old app") == b"old app"
    assert (svc.proc.pid, conn.proc.pid) == (service_pid, connector_pid)
    assert svc.proc.running and conn.proc.running and svc.starts == 1 and conn.starts == 1


@pytest.mark.timeout(60)
def test_sighup_with_a_bad_file_keeps_the_running_config(gw, backends):
    """SIGHUP with a broken svc.toml logs the error (file and key) and keeps serving the old apps."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    gw.connector(svc, tunnels=1)
    wait_echo(svc.app_port("echo"))
    svc.config_path.write_text(svc.config_path.read_text().replace("[service]", "[service]\nlisten_typo = 1"))
    svc.proc.signal(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in svc.proc.log(), 15, "the refusal in the log")
    line = next(line for line in svc.proc.log().splitlines() if "config reload refused" in line)
    assert str(svc.config_path) in line and "service.listen_typo" in line, line
    assert echo_once(svc.app_port("echo")) == b"ping"


@pytest.mark.timeout(60)
def test_unknown_config_key_exits_before_binding(gw):
    """twistd with an unknown key exits non-zero naming file, key and expectation, binding nothing, writing nothing."""
    port, app_port = free_port(), free_port()
    bad = gw.tmp / "bad.toml"
    state = gw.tmp / "bad-state"
    bad.write_text(
        f'[service]\nstate_dir = "{state}"\nlisten = "tcp:{port}:interface={HOST}"\ntunels = 2\n\n'
        f'[[apps]]\nname = "web"\nlisten = "tcp:{app_port}:interface={HOST}"\ndestination = "{HOST}:9"\n'
        f'options.preauth = "none"\n'
    )
    result = gw.twistd(bad)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert str(bad) in out, out
    assert "service.tunels" in out and 'unknown key "tunels"' in out, out
    assert "Traceback" not in out, out
    assert port_is_free(port) and port_is_free(app_port)
    assert not state.exists(), "state_dir was touched"
    assert "starting on" not in out


@pytest.mark.timeout(60)
def test_plugins_listed_and_disabled(gw, backends):
    """`gateway plugins` shows tcp with version and hook; GATEWAY_DISABLE_PLUGINS=tcp hides it and a tcp app fails to start."""
    import gateway

    result = gw.cli("plugins")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    tcp = [r for r in rows if r and r[0] == "tcp"]
    assert tcp, result.stdout
    assert gateway.__version__ in tcp[0] and "gateway_register_protocols" in " ".join(tcp[0]), result.stdout
    assert re.search(r"^protocols: .*\btcp\b", result.stdout, re.M), result.stdout

    disabled = subprocess_env(GATEWAY_DISABLE_PLUGINS="tcp")
    result = gw.cli("plugins", env=disabled)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stdout.splitlines() if line.split()[:1] == ["tcp"]], result.stdout
    # other plugins (http) still register their protocols; tcp is gone from the list
    assert re.search(r"^protocols: ", result.stdout, re.M) and not re.search(
        r"^protocols: .*\btcp\b", result.stdout, re.M), result.stdout

    svc = gw.service(apps=[{"name": "web", "destination": f"{HOST}:9"}], start=False)
    result = gw.twistd(svc.config_path, env=disabled)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert str(svc.config_path) in out and "apps[0].protocol" in out and "'tcp'" in out, out
    assert "Traceback" not in out, out
    assert port_is_free(svc.port) and port_is_free(svc.app_port("web"))


def _json_service_and_connector(gw, backends):
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}],
                     logging={"format": "json", "level": "debug"})
    conn = gw.connector(svc, tunnels=2, log_format="json", log_level="debug")
    wait_echo(svc.app_port("echo"))
    return svc, conn


@pytest.mark.timeout(90)
def test_json_logs_carry_ids_and_no_log_has_a_token_secret(gw, backends):
    """JSON logging gives records with connector_id and tunnel_id fields; no output ever contains a token secret."""
    svc, conn = _json_service_and_connector(gw, backends)
    # Failed enrolments too: a reused token, and one with a wrong secret.
    used = svc.token()
    assert gw.register(svc, token=used).returncode == 0
    assert gw.register(svc, token=used).returncode != 0
    parts = used.read_text().strip().split(".")
    wrong = gw.tmp / "wrong.txt"
    wrong.write_text(".".join([parts[0], parts[1], "A" * 43, parts[3]]))
    gw.secrets.append("A" * 43)
    assert gw.register(svc, token=wrong).returncode != 0
    wait_until(lambda: svc.proc.log().count("refused") >= 2, 10, "the refusals in the service log")

    # Records, however they are separated (newline, or RS + newline as in RFC 7464).
    records = [json.loads(chunk) for chunk in re.split(r"[\n\x1e]+", conn.proc.log()) if chunk.strip()]
    assert records
    with_ids = [r for r in records if r.get("connector_id") == conn.connector_id and r.get("tunnel_id")]
    assert with_ids, "no connector log record carries both connector_id and tunnel_id"
    assert any("up to node" in r.get("log_format", "") for r in with_ids)
    svc_records = [json.loads(chunk) for chunk in re.split(r"[\n\x1e]+", svc.proc.log()) if chunk.strip()]
    assert any(r.get("connector_id") == conn.connector_id and r.get("tunnel_id") for r in svc_records)

    gw.assert_no_secret_in_logs()


@pytest.mark.timeout(90)
def test_json_log_lines_are_each_one_json_object(gw, backends):
    """With format = "json", every line the connector prints parses on its own as one JSON object."""
    _, conn = _json_service_and_connector(gw, backends)
    with open(conn.proc.log_path, encoding="utf-8", newline="\n") as f:
        lines = [line for line in f if line.strip()]
    assert lines
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"connector log line is not one JSON object: {line[:80]!r}")
        assert isinstance(record, dict)

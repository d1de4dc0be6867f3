"""The service on PostgreSQL ([service] store): a real twistd node keeps its state in the database."""

from __future__ import annotations

import pytest

from gateway_harness import HOST, echo_handler, echo_once, free_port, port_is_free, wait_echo, wait_until


@pytest.mark.timeout(180)
def test_a_service_on_postgresql_enrols_carries_and_carries_again_after_a_restart(gw, backends, postgres_cluster):
    """A twistd service on PostgreSQL (password from store_password_file) enrols a connector and carries
    its app; restarted, it knows the connector from the database and carries the app again."""
    import psycopg

    postgres_cluster.sql("CREATE ROLE gateway_it LOGIN PASSWORD 'it-pass'")
    postgres_cluster.sql("CREATE DATABASE gateway_it OWNER gateway_it")
    postgres_cluster.require_passwords_for("gateway_it")
    url = f"postgresql://gateway_it@127.0.0.1:{postgres_cluster.port}/gateway_it"
    password_file = gw.tmp / "pg.pass"
    password_file.write_text("it-pass\n")
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}],
                     service={"store": url, "store_password_file": str(password_file)})
    conn = gw.connector(svc, tunnels=2, backoff_initial=0.2, backoff_max=1.0)
    port = svc.app_port("echo")
    wait_echo(port)
    assert echo_once(port, b"first" * 1000) == b"first" * 1000

    assert not (svc.state_dir / "gateway.db").exists(), "the state went to SQLite, not PostgreSQL"
    assert f"store {url} at schema version" in svc.log()
    with psycopg.connect(url, password="it-pass") as db:
        rows = db.execute("SELECT connector_id, name, deleted_at FROM connectors").fetchall()
        [(used_by,)] = db.execute("SELECT used_by FROM tokens WHERE used_at IS NOT NULL").fetchall()
    assert rows == [(conn.connector_id, conn.name, None)] and used_by == conn.connector_id

    before = conn.up_count()
    svc.restart()
    wait_until(lambda: conn.up_count() >= before + 2, 60, "both tunnels to come back to the restarted service")
    wait_echo(port)
    assert echo_once(port, b"after restart" * 1000) == b"after restart" * 1000
    listed = gw.cli("connectors", "list", "--config", str(svc.config_path))
    assert listed.returncode == 0 and conn.name in listed.stdout, listed.stderr
    gw.assert_no_secret_in_logs()
    assert "it-pass" not in svc.log()


@pytest.mark.timeout(60)
def test_a_postgresql_store_that_refuses_stops_twistd_before_binding_with_the_reason(gw, postgres_cluster):
    """twistd with a PostgreSQL store that refuses the login exits non-zero with the reason and what to
    check, no traceback, binding nothing."""
    port = free_port()
    config = gw.tmp / "svc.toml"
    url = f"postgresql://no_such_role@127.0.0.1:{postgres_cluster.port}/postgres"
    config.write_text(f'[service]\nstate_dir = "{gw.tmp / "state"}"\nlisten = "tcp:{port}:interface={HOST}"\n'
                      f'store = "{url}"\n')
    result = gw.twistd(config)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"cannot open the store {url}" in out and 'role "no_such_role" does not exist' in out, out
    assert "check the URL in [service] store" in out and "Traceback" not in out, out
    assert port_is_free(port)


@pytest.mark.timeout(180)
def test_a_service_moved_from_sqlite_to_postgresql_keeps_its_connector_apps_and_tokens(gw, backends,
                                                                                      postgres_cluster):
    """`gateway store copy` after the SQLite service stopped; the node started again on PostgreSQL: its
    connector comes back with the certificate it had, the app carries, a token made before still
    enrols, and a second copy into the now used database is refused."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=1, backoff_initial=0.2, backoff_max=1.0)
    port = svc.app_port("echo")
    wait_echo(port)
    token = svc.token()
    svc.stop()

    sqlite_config = svc.config_path.with_name("sqlite.toml")
    sqlite_config.write_text(svc.config_path.read_text())
    svc.service_extra["store"] = postgres_cluster.new_database()
    svc.write_config()
    copied = gw.cli("store", "copy", "--config", str(sqlite_config), "--to-config", str(svc.config_path))
    assert copied.returncode == 0, copied.stderr
    assert "1 connectors" in copied.stdout and "1 certificates" in copied.stdout, copied.stdout
    assert "ca.pem, ca.key" in copied.stdout

    before = conn.up_count()
    svc.start()
    assert f"store {svc.service_extra['store']} at schema version" in svc.proc.log()
    wait_until(lambda: conn.up_count() > before, 60, "the connector's tunnel to the node on PostgreSQL")
    assert echo_once(port, b"moved") == b"moved"
    enrolled = gw.register(svc, name="after-move", token=token)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    listed = gw.cli("connectors", "list", "--config", str(svc.config_path))
    assert conn.name in listed.stdout and "after-move" in listed.stdout, listed.stdout

    again = gw.cli("store", "copy", "--config", str(sqlite_config), "--to-config", str(svc.config_path))
    assert again.returncode != 0 and "already holds rows" in again.stderr and "Traceback" not in again.stderr

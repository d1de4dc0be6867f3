"""The service on PostgreSQL ([service] store): a real twistd node keeps its state in the database."""

from __future__ import annotations

import pytest

from gateway_harness import echo_handler, echo_once, wait_echo, wait_until


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

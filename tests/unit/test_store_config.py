"""Tests for choosing the store: [service] store / store_password_file, open_store, the missing
psycopg extra, and `gateway store migrate` on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError, GatewayError, StoreUnavailable
from gateway.service.node import open_store
from gateway.store import postgresql
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore

from test_cli_apps import run

FILE = "/etc/gateway/svc.toml"


def service_config(**keys):
    """The ServiceConfig of a [service] table with state_dir and `keys`."""
    return parse_config({"service": {"state_dir": "/srv/gw", **keys}}, FILE).service


def config_error(**keys) -> str:
    """The message of the ConfigError the [service] table with `keys` raises."""
    with pytest.raises(ConfigError) as info:
        service_config(**keys)
    return str(info.value)


def test_the_default_store_is_sqlite_in_state_dir(tmp_path):
    """Without `store`, the node opens the SQLite file in its state_dir and needs no password."""
    config = parse_config({"service": {"state_dir": str(tmp_path / "state")}}, FILE).service
    assert (config.store, config.store_password_file) == ("", None)
    store = open_store(config)
    try:
        assert isinstance(store, SQLiteStore) and store.path == tmp_path / "state" / "gateway.db"
    finally:
        store.close()


def test_a_postgresql_url_and_a_relative_password_file_are_taken():
    """A postgresql:// URL is kept as written; the password file is relative to the config file."""
    config = service_config(store="postgresql://gateway@db.internal:5432/gateway", store_password_file="pg.pass")
    assert config.store == "postgresql://gateway@db.internal:5432/gateway"
    assert str(config.store_password_file) == "/etc/gateway/pg.pass"


@pytest.mark.parametrize("url, expected", [
    ("postgresql://gateway:hunter2@db/gateway", "without a password"),
    ("postgresql://gateway@db/gateway?password=hunter2", "without a password"),
    ("mysql://gateway@db/gateway", "postgresql://user@host:port/database"),
    ("postgresql://gateway@db", "names the database"),
    ("postgresql://gateway@db:99999/gateway", "Port out of range"),
])
def test_a_bad_store_url_is_refused_naming_the_key(url, expected):
    """A URL with a password, of another database, without a database or port is refused, naming the key."""
    message = config_error(store=url)
    assert "service.store" in message and expected in message
    assert "hunter2" not in message  # the error never repeats the password


def test_a_password_file_without_a_postgresql_store_is_refused():
    """store_password_file alone (the SQLite store has no password) is an error naming the key."""
    assert "service.store_password_file" in config_error(store_password_file="/etc/gateway/pg.pass")


def test_a_missing_psycopg_names_the_extra(monkeypatch):
    """With psycopg not installed, a postgresql:// store fails with the extra to install."""
    monkeypatch.setattr(postgresql, "psycopg", None)
    with pytest.raises(GatewayError, match=r"pip install 'gateway\[postgresql\]'"):
        open_store(service_config(store="postgresql://gateway@127.0.0.1:1/gateway"))


@pytest.mark.parametrize("content, problem", [(None, "cannot read it"), ("", "the file is empty")])
def test_an_unusable_password_file_is_refused(tmp_path, content, problem):
    """A missing or empty password file is an error naming the file and what to do."""
    path = tmp_path / "pg.pass"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GatewayError, match=f"store_password_file {path}: {problem}"):
        postgresql.read_password_file(path)


def test_the_password_file_first_line_is_the_password(tmp_path):
    """The first line of the password file, without its line break, is the password."""
    path = tmp_path / "pg.pass"
    path.write_text("s3cret pass\n")
    assert postgresql.read_password_file(path) == "s3cret pass"


def test_an_unreachable_postgresql_says_where_and_what_to_check(postgres_cluster):
    """A PostgreSQL store that refuses the connection fails at open, naming the URL and what to check."""
    url = postgres_cluster.url("no_such_database")
    with pytest.raises(StoreUnavailable, match=r"cannot open the store postgresql://.*no_such_database.*"
                                               r"check the URL in \[service\] store"):
        postgresql.PostgreSQLStore(url)


def test_the_password_file_reaches_postgresql(postgres_cluster, tmp_path):
    """The password from store_password_file is the one PostgreSQL checks (a wrong one is refused)."""
    postgres_cluster.sql("CREATE ROLE pw_user LOGIN PASSWORD 'right-one'")
    postgres_cluster.sql("GRANT CREATE ON SCHEMA public TO pw_user", "postgres")
    url = postgres_cluster.url("postgres").replace("gateway_test@", "pw_user@")
    postgres_cluster.require_passwords_for("pw_user")
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text("right-one\n")
    wrong.write_text("wrong-one\n")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        postgresql.open_postgresql(url, wrong)
    store = postgresql.open_postgresql(url, right)
    try:
        assert store.migrated[1] == SCHEMA_VERSION
    finally:
        store.close()


def test_store_migrate_brings_the_schema_up_and_then_says_up_to_date(store_backend, tmp_path, capsys):
    """`gateway store migrate` applies the migrations once, then reports the store up to date."""
    config = tmp_path / "svc.toml"
    store_line = "" if store_backend.name == "sqlite" else f'store = "{store_backend.target}"\n'
    config.write_text(f'[service]\nstate_dir = "state"\n{store_line}')
    code, out, err = run(capsys, "store", "migrate", "--config", str(config))
    assert code == 0, err
    assert f"schema version 0 -> {SCHEMA_VERSION}" in out
    code, out, err = run(capsys, "store", "migrate", "--config", str(config))
    assert code == 0 and f"schema version {SCHEMA_VERSION}, up to date" in out
    store = store_backend.open() if store_backend.name != "sqlite" else SQLiteStore(tmp_path / "state" / "gateway.db")
    try:
        assert store.ensure_group("default", datetime.now(UTC)).name == "default"
    finally:
        store.close()

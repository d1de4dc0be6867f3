"""Tests for `gateway users token create|list|revoke` and `gateway users revoke`."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta

import pytest

from gateway.pki.ca import CertificateAuthority
from gateway.pki.tokens import UserToken, hash_secret
from gateway.store.records import UserCredentialRecord
from gateway.store.sqlite import SQLiteStore

from test_cli_apps import run

NOW = datetime.now(UTC)


@pytest.fixture
def service(tmp_path):
    """A service config with an [access] table and an empty state directory."""
    config = tmp_path / "svc.toml"
    config.write_text('[service]\nstate_dir = "state"\nconfig_interval = 30\n\n[access]\n')
    (tmp_path / "state").mkdir()
    return config


def users(service, capsys, *argv):
    return run(capsys, "users", *argv, "--config", str(service))


def credentials(service, user=None):
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    try:
        return store.list_user_credentials(user)
    finally:
        store.close()


def add_login(service, credential_id="1" * 16, user="alice-sub"):
    """A browser sign-in's credential, as the service stores it."""
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    try:
        store.create_user_credential(UserCredentialRecord(
            credential_id, user, "login", {"sub": user}, hash_secret("refresh"), NOW, NOW + timedelta(hours=12)))
    finally:
        store.close()


def test_token_create_prints_the_token_once_and_stores_its_hash(service, capsys):
    """The token goes to stdout only; the store keeps the identity and the secret's hash, never the secret."""
    code, out, err = users(service, capsys, "token", "create", "--user", "alice-sub", "--name", "Alice",
                           "--email", "alice@example.test", "--group", "admins", "--group", "ops", "--expires", "30d")
    assert code == 0, err
    token = UserToken.parse(out.strip())
    assert token.secret not in err and "personal token" in err and "--token-file" in err
    (record,) = credentials(service)
    assert record.credential_id == token.token_id and record.kind == "token" and record.user == "alice-sub"
    assert record.identity == {"sub": "alice-sub", "name": "Alice", "email": "alice@example.test",
                               "email_verified": True, "groups": ["admins", "ops"]}
    assert record.secret_hash == hash_secret(token.secret)
    assert timedelta(days=29, hours=23) < record.expires_at - record.created_at <= timedelta(days=30)
    ca = CertificateAuthority.load_or_create(service.parent / "state")
    assert token.ca_fingerprint == ca.fingerprint


def test_token_create_writes_a_0600_file_with_output(service, capsys, tmp_path):
    """--output writes the token to a file of mode 0600 and prints nothing secret."""
    target = tmp_path / "alice.token"
    code, out, err = users(service, capsys, "token", "create", "--user", "alice-sub", "--expires", "12h",
                           "--output", str(target))
    assert code == 0, err
    token = UserToken.parse(target.read_text())
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert out == "" and token.secret not in err and str(target) in err
    (record,) = credentials(service)
    assert record.expires_at - record.created_at == timedelta(hours=12)


@pytest.mark.parametrize("expires", ["30", "0d", "-1d", "1w", "d", "1.5h", "367d", "３d"])
def test_token_create_refuses_a_bad_duration(service, capsys, expires):
    """--expires takes a whole number of days, hours or minutes up to a year; anything else stores nothing."""
    code, out, err = users(service, capsys, "token", "create", "--user", "alice-sub", f"--expires={expires}")
    assert code == 1 and "--expires: expected" in err and out == ""
    assert credentials(service) == []


@pytest.mark.parametrize("flags, problem", [
    (["--user", "  "], "--user: expected a non-empty printable text"),
    (["--user", "alice\x1b"], "--user: expected a non-empty printable text"),
    (["--user", "a", "--email", "not-an-address"], "--email: expected an email address"),
    (["--user", "a", "--group", ""], "--group: expected a non-empty printable text"),
])
def test_token_create_refuses_bad_identity(service, capsys, flags, problem):
    """A blank or unprintable subject, a malformed email or an empty group is refused by its flag."""
    code, out, err = users(service, capsys, "token", "create", *flags, "--expires", "1d")
    assert code == 1 and problem in err and out == ""
    assert credentials(service) == []


def test_token_create_warns_without_access_table(tmp_path, capsys):
    """Without [access] the token is made, with a warning that the service will not accept it yet."""
    config = tmp_path / "svc.toml"
    config.write_text('[service]\nstate_dir = "state"\n')
    (tmp_path / "state").mkdir()
    code, out, err = users(config, capsys, "token", "create", "--user", "bob", "--expires", "90m")
    assert code == 0 and UserToken.parse(out.strip())
    assert "warning" in err and "no [access] table" in err


def test_token_list_shows_credentials_without_secrets(service, capsys):
    """list shows id, user, kind, expiry and revocation of tokens and sign-ins, filtered by --user."""
    _, out, _ = users(service, capsys, "token", "create", "--user", "alice-sub", "--expires", "1d")
    token = UserToken.parse(out.strip())
    add_login(service, user="bob-sub")
    code, out, err = users(service, capsys, "token", "list")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["ID", "USER", "KIND", "NAME", "CREATED", "EXPIRES", "REVOKED"]
    assert token.token_id in out and "1" * 16 in out and "login" in out and "token" in out
    assert token.secret not in out and hash_secret(token.secret) not in out
    code, out, _ = users(service, capsys, "token", "list", "--user", "bob-sub")
    assert "1" * 16 in out and token.token_id not in out


def test_token_revoke_revokes_one_credential(service, capsys):
    """revoke ID marks that credential revoked, says when the service acts, and is idempotent."""
    _, out, _ = users(service, capsys, "token", "create", "--user", "alice-sub", "--expires", "1d")
    token = UserToken.parse(out.strip())
    add_login(service)
    code, out, err = users(service, capsys, "token", "revoke", token.token_id)
    assert code == 0, err
    assert "revoked" in out and "within config_interval (30 s)" in out
    revoked = {c.credential_id: c.revoked_at for c in credentials(service)}
    assert revoked[token.token_id] is not None and revoked["1" * 16] is None
    code, out, _ = users(service, capsys, "token", "revoke", token.token_id)
    assert code == 0 and "revoked already" in out


def test_token_revoke_of_an_unknown_id_fails(service, capsys):
    """An id that is not in the store is an error pointing at the list."""
    code, out, err = users(service, capsys, "token", "revoke", "f" * 16)
    assert code == 1 and "no user credential" in err and "gateway users token list" in err


def test_users_revoke_revokes_tokens_and_sign_ins_of_that_user(service, capsys):
    """users revoke --user revokes all of the user's credentials, both kinds, and nobody else's."""
    users(service, capsys, "token", "create", "--user", "alice-sub", "--expires", "1d")
    add_login(service)
    add_login(service, credential_id="2" * 16, user="bob-sub")
    code, out, err = users(service, capsys, "revoke", "--user", "alice-sub")
    assert code == 0, err
    assert "2 credentials of user 'alice-sub' revoked" in out
    assert all(c.revoked_at is not None for c in credentials(service, "alice-sub"))
    assert credentials(service, "bob-sub")[0].revoked_at is None
    code, out, _ = users(service, capsys, "revoke", "--user", "alice-sub")
    assert code == 0 and "no credential left to revoke" in out


def test_users_revoke_of_an_unknown_user_fails(service, capsys):
    """A user with no credentials at all is an error (likely a typo), naming the flag."""
    code, _, err = users(service, capsys, "revoke", "--user", "nobody")
    assert code == 1 and "--user: no credentials of user 'nobody'" in err

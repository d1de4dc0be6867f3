"""Personal tokens through a real service: `gateway login --token-file` with an expired token, or
one whose secret is wrong, is refused by the service's store check with a sentence saying what to
do, and the client caches nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.pki.ca import CertificateAuthority
from gateway.pki.tokens import UserToken, hash_secret
from gateway.store.records import UserCredentialRecord
from gateway.store.sqlite import SQLiteStore
from gateway_harness import subprocess_env
from test_access_private import publish


def stored_token(svc, expires_at: datetime) -> UserToken:
    """A personal token written to the service's store as `gateway users token create` does."""
    ca = CertificateAuthority.load_or_create(svc.state_dir)
    token = UserToken.generate(ca.fingerprint)
    now = datetime.now(UTC)
    store = SQLiteStore(svc.state_dir / "gateway.db")
    try:
        store.create_user_credential(UserCredentialRecord(
            token.token_id, "alice", "token", {"sub": "alice", "groups": []}, hash_secret(token.secret),
            min(now, expires_at) - timedelta(days=1), expires_at))
    finally:
        store.close()
    return token


def login(gw, svc, tmp_path, text: str):
    path = tmp_path / "token.txt"
    path.write_text(text + "\n")
    env = subprocess_env(XDG_CONFIG_HOME=str(tmp_path / "home"))
    return gw.cli("login", "--service", svc.address, "--token-file", str(path), env=env)


def test_an_expired_token_is_refused_at_login(gw, tmp_path):
    """A token past its expiry gets "expired" from the service, and no credential is cached."""
    svc = gw.service(start=False)
    publish(svc)
    svc.start()
    token = stored_token(svc, datetime.now(UTC) - timedelta(minutes=1))
    gw.secrets.append(token.secret)
    result = login(gw, svc, tmp_path, token.encode())
    assert result.returncode == 1, result.stdout
    assert "this credential expired at" in result.stderr
    assert "ask your administrator for a new personal token" in result.stderr
    assert "expired" in svc.log()
    assert not list((tmp_path / "home").rglob("*.json"))


def test_a_token_with_a_wrong_secret_is_refused_like_an_unknown_one(gw, tmp_path):
    """The right id with another secret is refused as "unknown credential", exactly like an id the store lacks."""
    svc = gw.service(start=False)
    publish(svc)
    svc.start()
    token = stored_token(svc, datetime.now(UTC) + timedelta(days=1))
    gw.secrets.append(token.secret)
    wrong = UserToken(token.token_id, UserToken.generate(token.ca_fingerprint).secret, token.ca_fingerprint)
    missing = UserToken.generate(token.ca_fingerprint)
    for attempt in (wrong, missing):
        result = login(gw, svc, tmp_path, attempt.encode())
        assert result.returncode == 1, result.stdout
        assert "unknown credential: run gateway login again, or ask your administrator" in result.stderr
        assert attempt.secret not in result.stderr
    assert token.secret not in svc.log()
    assert not list((tmp_path / "home").rglob("*.json"))
    good = login(gw, svc, tmp_path, token.encode())
    assert good.returncode == 0, good.stderr

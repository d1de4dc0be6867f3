"""Tests for Private Access user credentials in the store and the personal token format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import EnrolmentError, UserCredentialError
from gateway.pki.tokens import EnrolmentToken, UserToken, hash_secret
from gateway.store.records import UserCredentialRecord
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore
from gateway.store.threaded import ThreadedStore

from test_store import FakeReactor, database_at_version

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "user-secret"
FINGERPRINT = "sha256:" + "ab" * 32
ALICE = {"sub": "alice-sub", "name": "Alice", "email": "alice@example.test", "email_verified": True,
         "groups": ["admins"]}


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    yield s
    s.close()


def credential(credential_id="c" * 16, user="alice-sub", kind="token", expires=NOW + timedelta(days=30),
               **kwargs) -> UserCredentialRecord:
    return UserCredentialRecord(credential_id, user, kind, dict(ALICE), hash_secret(SECRET), NOW, expires,
                                name=kwargs.pop("name", "laptop"), **kwargs)


def test_credential_round_trips_with_its_identity(store):
    """A stored credential reads back equal, identity (a JSON column) included."""
    store.create_user_credential(credential())
    found = store.get_user_credential("c" * 16)
    assert found == credential() and found.identity == ALICE and found.name == "laptop"
    assert store.get_user_credential("d" * 16) is None


def test_only_the_hash_of_the_secret_is_stored(store):
    """The secret's text is nowhere in the database file's rows."""
    store.create_user_credential(credential())
    rows = store._db.execute("SELECT * FROM user_credentials").fetchall()
    assert SECRET not in repr(rows) and hash_secret(SECRET) in repr(rows)


def test_list_filters_by_user_oldest_first(store):
    """list_user_credentials lists all, or only one user's, in creation order."""
    store.create_user_credential(credential("b" * 16))
    store.create_user_credential(credential("a" * 16, user="bob-sub"))
    store.create_user_credential(credential("c" * 16, kind="login"))
    assert [c.credential_id for c in store.list_user_credentials()] == ["a" * 16, "b" * 16, "c" * 16]
    assert [c.credential_id for c in store.list_user_credentials("alice-sub")] == ["b" * 16, "c" * 16]
    assert store.list_user_credentials("nobody") == []


def test_redeem_returns_the_record_for_the_right_secret(store):
    """The right secret of a live credential redeems it."""
    store.create_user_credential(credential())
    assert store.redeem_user_secret("c" * 16, SECRET, NOW).user == "alice-sub"


@pytest.mark.parametrize("credential_id, secret", [("c" * 16, "wrong"), ("d" * 16, SECRET)])
def test_wrong_secret_and_unknown_id_are_the_same_refusal(store, credential_id, secret):
    """A wrong secret is refused exactly like an id that does not exist (code "unknown")."""
    store.create_user_credential(credential())
    with pytest.raises(UserCredentialError, match="unknown credential: run gateway login") as e:
        store.redeem_user_secret(credential_id, secret, NOW)
    assert e.value.code == "unknown"


def test_expired_credential_is_refused(store):
    """At or after expires_at the credential is refused with code "expired" and the time."""
    store.create_user_credential(credential(expires=NOW + timedelta(hours=1)))
    with pytest.raises(UserCredentialError, match="expired at 2025-03-01T13:00") as e:
        store.redeem_user_secret("c" * 16, SECRET, NOW + timedelta(hours=1))
    assert e.value.code == "expired"


def test_revoked_credential_is_refused_once_revoked(store):
    """revoke_user_credential marks it once; redeeming it then fails with code "revoked"."""
    store.create_user_credential(credential())
    assert store.revoke_user_credential("c" * 16, NOW) is True
    assert store.revoke_user_credential("c" * 16, NOW) is False
    assert store.revoke_user_credential("d" * 16, NOW) is False
    with pytest.raises(UserCredentialError, match="revoked at") as e:
        store.redeem_user_secret("c" * 16, SECRET, NOW)
    assert e.value.code == "revoked"


def test_revoke_user_revokes_tokens_and_logins_of_that_user_only(store):
    """revoke_user counts and revokes every live credential of the user, both kinds, nobody else's."""
    store.create_user_credential(credential("a" * 16))
    store.create_user_credential(credential("b" * 16, kind="login"))
    store.create_user_credential(credential("e" * 16, user="bob-sub"))
    assert store.revoke_user("alice-sub", NOW) == 2
    assert store.revoke_user("alice-sub", NOW) == 0
    assert [c.revoked_at for c in store.list_user_credentials("alice-sub")] == [NOW, NOW]
    assert store.get_user_credential("e" * 16).revoked_at is None


def test_version_3_database_gains_user_credentials(tmp_path):
    """A database at schema version 3 is upgraded in place; its groups stay."""
    store = SQLiteStore(database_at_version(tmp_path / "old.db", 3))
    try:
        assert store._db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION >= 4
        assert [g.name for g in store.list_groups()] == ["lab"]
        store.create_user_credential(credential())
        assert store.list_user_credentials() == [credential()]
    finally:
        store.close()


def test_threaded_store_has_the_user_credential_methods(tmp_path):
    """ThreadedStore forwards every user credential method and delivers their errors as failures."""
    reactor = FakeReactor()
    threaded = ThreadedStore(SQLiteStore(tmp_path / "gateway.db"), reactor)
    try:
        reactor.result_of(threaded.create_user_credential(credential()))
        assert reactor.result_of(threaded.get_user_credential("c" * 16)) == credential()
        assert len(reactor.result_of(threaded.list_user_credentials("alice-sub"))) == 1
        assert reactor.result_of(threaded.redeem_user_secret("c" * 16, SECRET, NOW)).kind == "token"
        assert reactor.result_of(threaded.revoke_user_credential("c" * 16, NOW)) is True
        assert reactor.result_of(threaded.revoke_user("alice-sub", NOW)) == 0
        with pytest.raises(UserCredentialError):
            reactor.result_of(threaded.redeem_user_secret("c" * 16, SECRET, NOW))
    finally:
        reactor.result_of(threaded.close())


# -- personal tokens -------------------------------------------------------------------------------


def test_user_token_round_trips():
    """generate -> encode -> parse gives the same token, with the gwu1 prefix."""
    token = UserToken.generate(FINGERPRINT)
    text = token.encode()
    assert text.startswith("gwu1.") and UserToken.parse(text) == token
    assert token.secret not in repr(token)


@pytest.mark.parametrize("text, problem", [
    ("gwu1.abc", "expected 4 parts"),
    ("gwx1.0123456789abcdef." + "s" * 43 + "." + "ab" * 32, "does not start with 'gwu1.'"),
    ("gwu1.0123456789ABCDEG." + "s" * 43 + "." + "ab" * 32, "the id (second part)"),
    ("gwu1.0123456789abcdef.short." + "ab" * 32, "the secret (third part)"),
    ("gwu1.0123456789abcdef." + "s" * 43 + ".abc", "the CA fingerprint (fourth part)"),
])
def test_malformed_user_token_says_what_is_wrong(text, problem):
    """Each malformed part is named, with advice, and the error code is "unknown"."""
    with pytest.raises(UserCredentialError, match="malformed personal token: .*" + problem.replace("(", r"\(")
                       .replace(")", r"\)")) as e:
        UserToken.parse(text)
    assert e.value.code == "unknown" and "ask your administrator" in str(e.value)


def test_a_token_of_the_other_kind_is_named():
    """A connector's gw1 token given as a personal token says what it is, and the other way round."""
    with pytest.raises(UserCredentialError, match="that is a connector enrolment token"):
        UserToken.parse(EnrolmentToken.generate(FINGERPRINT).encode())
    with pytest.raises(EnrolmentError, match="that is a Private Access personal token, for gateway login"):
        EnrolmentToken.parse(UserToken.generate(FINGERPRINT).encode())

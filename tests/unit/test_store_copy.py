"""`gateway store copy`: the lasting state of an SQLite store copied into an empty store of each
backend, read back through the store's own methods; a target holding rows is refused."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from gateway.errors import GatewayError
from gateway.pki.tokens import hash_secret
from gateway.store import schema
from gateway.store.copy import SKIPPED, TABLES, copy_store
from gateway.store.records import AdminTokenRecord, AppRecord, UpdateLease, UserCredentialRecord
from gateway.store.sqlite import SQLiteStore
from test_store import NOW, enrolled


@pytest.fixture
def source(tmp_path):
    """An SQLite store with a row in every table that holds lasting state (and in the skipped ones)."""
    store = SQLiteStore(tmp_path / "source.db")
    enrolled(store)   # group office, token tok1 used by conn-1, certificate ABC1
    store.add_app(AppRecord("wiki", "office", {"external_url": "https://wiki.example.test/",
                                               "internal_url": "http://10.0.0.5/"}, NOW, NOW))
    store.create_user_credential(UserCredentialRecord("cred1", "ann", "token", {"sub": "ann", "groups": ["x"]},
                                                      hash_secret("s1"), NOW, NOW + timedelta(days=1)))
    store.create_admin_token(AdminTokenRecord("adm1", "ops", hash_secret("s2"), NOW, NOW + timedelta(days=90)))
    store.set_session_log("group", "office", True, NOW)
    store.acquire_update_lease("office", "conn-1", "1.2.2", NOW + timedelta(minutes=10), NOW, lambda *_: None)
    store.release_update_lease("office", "conn-1", "1.2.2", NOW)   # 1.2.2 halted for the group
    store.acquire_update_lease("office", "conn-1", "1.2.3", NOW + timedelta(minutes=10), NOW, lambda *_: None)
    store.claim_ca("ab" * 32, "-----BEGIN CERTIFICATE-----\n...", NOW)
    store.record_node("node1", "127.0.0.1:8443", NOW, NOW)
    yield store
    store.close()


def test_every_table_of_the_schema_is_copied_or_left_out_by_name():
    """A table added by a migration must be put in TABLES or SKIPPED: the copy would miss it silently."""
    created = set(re.findall(r"CREATE TABLE (\w+)", "".join(schema.MIGRATIONS)))
    assert created == set(TABLES) | set(SKIPPED)


def test_lasting_state_is_copied_to_an_empty_store_of_each_backend(source, store_backend):
    target = store_backend.open()
    try:
        copied = copy_store(source, target)
        assert copied["connectors"] == 1 and copied["certificates"] == 1 and copied["apps"] == 1
        assert target.list_groups() == source.list_groups()
        assert target.list_tokens() == source.list_tokens()
        assert target.list_connectors() == source.list_connectors()
        assert target.certificate_status("ABC1", "conn-1") == source.certificate_status("ABC1", "conn-1")
        assert target.list_apps() == source.list_apps()
        assert target.list_user_credentials() == source.list_user_credentials()
        assert target.check_admin_token("adm1", "s2", NOW) == source.check_admin_token("adm1", "s2", NOW)
        assert target.session_log_switches() == {("group", "office"): True}
        seen = []
        target.acquire_update_lease("office", "conn-2", "1.2.3", NOW + timedelta(minutes=5), NOW,
                                    lambda lease, halted: seen.append((lease, halted)) or "refused")
        assert seen == [(UpdateLease("conn-1", "1.2.3", NOW + timedelta(minutes=10)), "1.2.2")], seen
        assert target.recorded_ca() == source.recorded_ca() == "ab" * 32
        assert target.list_nodes() == [], "a node writes its own row"
    finally:
        target.close()


def test_a_target_that_holds_rows_is_refused_and_left_as_it_was(source, tmp_path):
    target = SQLiteStore(tmp_path / "target.db")
    try:
        target.ensure_group("lab", NOW)
        with pytest.raises(GatewayError, match=r"already holds rows \(1 in groups\).*new, empty database"):
            copy_store(source, target)
        assert [g.name for g in target.list_groups()] == ["lab"] and target.list_connectors() == []
    finally:
        target.close()


def test_a_store_is_not_copied_onto_itself(source):
    with pytest.raises(GatewayError, match="the same store"):
        copy_store(source, source)

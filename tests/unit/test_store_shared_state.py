"""Tests for the state every node shares through the store (issue 15): a group's update lease and
halt, the browser sign-in's one-time codes and the status page's sessions, on both backends, with
two store objects racing as two nodes would."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from gateway.pki.tokens import hash_secret
from gateway.service.updates import lease_refusal
from gateway.store.records import AdminSession, AdminTokenRecord, LoginCode, UpdateLease

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(minutes=10)
ALICE = {"sub": "alice-sub", "groups": ["staff"]}


@pytest.fixture
def store(store_backend):
    s = store_backend.open()
    yield s
    s.close()


def grant_all(lease, halted):
    return None


def acquire(store, connector_id, version="2.0", now=T0, group="lab", others_up=("x",)):
    """The lease decision the service makes, with the other connectors of the group up."""
    return store.acquire_update_lease(
        group, connector_id, version, now + timedelta(minutes=10), now,
        lambda lease, halted: lease_refusal(group, connector_id, version, lease, halted, ["x"], list(others_up)))


def race(stores, work):
    """Run work(store, i) for each store on a thread of its own, all starting at once; the outcomes."""
    barrier = threading.Barrier(len(stores))
    outcomes: list[object] = [None] * len(stores)

    def run(i, store):
        barrier.wait()
        try:
            outcomes[i] = work(store, i)
        except Exception as e:  # recorded, then asserted on by the test
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


# the update lease and halt


def test_one_connector_per_group_holds_the_lease_until_it_expires_or_is_released(store):
    """A second connector of the group is refused naming the holder; the holder may ask again;
    after the expiry or the release the other gets it."""
    assert acquire(store, "c1") is None
    assert "connector c1 of group 'lab' is updating to 2.0" in acquire(store, "c2")
    assert acquire(store, "c1") is None
    assert acquire(store, "c2", now=T0 + timedelta(minutes=10)) is None   # c1's lease expired
    store.release_update_lease("lab", "c2", None, LATER)
    assert acquire(store, "c1", now=LATER) is None
    assert acquire(store, "c3", group="other", now=LATER) is None   # another group: its own lease


def test_the_last_healthy_connector_is_refused_and_holds_nothing(store):
    """With every other connector down the lease is refused, and nothing is written."""
    assert "last healthy one of group 'lab'" in acquire(store, "c1", others_up=())
    assert acquire(store, "c2") is None


def test_a_failed_update_halts_its_version_until_resumed_or_another_is_published(store):
    """A failed release halts that version for the group (not another version); lifting it lets it go on."""
    assert acquire(store, "c1") is None
    store.release_update_lease("lab", "c1", "2.0", T0)
    assert store.update_halt("lab") == "2.0" and store.update_halt("other") is None
    assert "gateway update resume --group lab" in acquire(store, "c2")
    assert acquire(store, "c2", version="2.1") is None
    store.release_update_lease("lab", "c2", None, T0)
    assert store.lift_update_halt("lab") == "2.0"
    assert store.lift_update_halt("lab") is None and store.update_halt("lab") is None
    assert acquire(store, "c2") is None


def test_the_decision_sees_the_live_lease_and_the_halt(store):
    """decide is called with the group's unexpired lease and its halted version."""
    seen = []
    store.acquire_update_lease("lab", "c1", "2.0", LATER, T0, grant_all)
    store.acquire_update_lease("lab", "c2", "2.0", LATER, T0,
                               lambda lease, halted: seen.append((lease, halted)) or "no")
    assert seen == [(UpdateLease("c1", "2.0", LATER), None)]


def test_two_nodes_deciding_a_groups_lease_at_once_grant_it_once(store_backend):
    """Two stores (two nodes) asking for one group's lease for two connectors at once: one is granted,
    the other refused naming it (the group's row is locked while the first decides)."""
    stores = [store_backend.open(), store_backend.open()]
    # The group's row exists already (an earlier update), as it does but for a group's first one.
    stores[0].acquire_update_lease("lab", "c9", "1.9", LATER, T0, grant_all)
    stores[0].release_update_lease("lab", "c9", None, T0)

    def ask(store, i):
        connector_id = f"c{i}"

        def slow_decide(lease, halted):
            time.sleep(0.3)  # hold the decision open so the other node's overlaps it
            return lease_refusal("lab", connector_id, "2.0", lease, halted, ["x"], ["x"])

        return store.acquire_update_lease("lab", connector_id, "2.0", LATER, T0, slow_decide)

    try:
        outcomes = race(stores, ask)
    finally:
        for s in stores:
            s.close()
    assert sorted(outcomes, key=lambda o: o is not None)[0] is None
    refusals = [o for o in outcomes if o is not None]
    assert len(refusals) == 1 and "is updating to 2.0" in refusals[0], outcomes


# the browser sign-in's one-time codes


def code(expires=T0 + timedelta(seconds=120)):
    return LoginCode(ALICE, "challenge", expires)


def test_a_login_code_is_taken_once_and_only_before_it_expires(store):
    """take_login_code answers once per code; an expired one is None (and spent)."""
    store.add_login_code(hash_secret("one"), code(), T0, 10)
    assert store.take_login_code(hash_secret("one"), T0) == code()
    assert store.take_login_code(hash_secret("one"), T0) is None
    store.add_login_code(hash_secret("two"), code(), T0, 10)
    assert store.take_login_code(hash_secret("two"), T0 + timedelta(seconds=120)) is None
    assert store.take_login_code(hash_secret("unknown"), T0) is None


def test_login_codes_are_bounded_oldest_first_and_expired_ones_go(store):
    """Past the limit the code expiring first is dropped; an expired code is removed by the next add."""
    for i in range(3):
        store.add_login_code(hash_secret(f"c{i}"), code(T0 + timedelta(seconds=120 + i)), T0, 3)
    store.add_login_code(hash_secret("c3"), code(T0 + timedelta(seconds=200)), T0, 3)
    assert store.take_login_code(hash_secret("c0"), T0) is None
    assert store.take_login_code(hash_secret("c1"), T0) is not None
    store.add_login_code(hash_secret("c4"), code(T0 + timedelta(seconds=400)), T0 + timedelta(seconds=130), 3)
    count = store._db.execute("SELECT count(*) FROM login_codes").fetchone()[0]
    assert count == 2   # c2 expired and went; c3 and c4 are left


def test_a_login_code_redeemed_at_two_nodes_at_once_is_accepted_once(store_backend):
    """Two stores (two nodes) taking the same 40 codes in the same order at once: each code is
    handed out exactly once."""
    stores = [store_backend.open(), store_backend.open()]
    names = [f"code-{i}" for i in range(40)]
    for name in names:
        stores[0].add_login_code(hash_secret(name), code(), T0, 100)

    def take_all(store, i):
        return [store.take_login_code(hash_secret(name), T0) is not None for name in names]

    try:
        first, second = race(stores, take_all)
    finally:
        for s in stores:
            s.close()
    assert not isinstance(first, Exception) and not isinstance(second, Exception), (first, second)
    assert [a + b for a, b in zip(first, second)] == [1] * len(names)


# the status page's sessions


def session(token_id="t1", expires=T0 + timedelta(hours=1)):
    return AdminSession(token_id, T0, expires)


def test_an_admin_session_lives_until_it_expires_or_ends(store):
    """get answers a live session by its hash, None once expired or ended; ending twice says so."""
    store.add_admin_session("h1", session(), T0, 10)
    assert store.get_admin_session("h1", T0) == session()
    assert store.get_admin_session("h1", T0 + timedelta(hours=1)) is None
    assert store.end_admin_session("h1") is True and store.end_admin_session("h1") is False
    assert store.get_admin_session("h1", T0) is None


def test_revoking_an_admin_token_ends_its_sessions_only(store):
    """revoke_admin_token deletes that token's sessions in its own transaction; others stay."""
    for token_id in ("t1", "t2"):
        store.create_admin_token(AdminTokenRecord(token_id, "ops", hash_secret("s"), T0, T0 + timedelta(days=1)))
    store.add_admin_session("a", session("t1"), T0, 10)
    store.add_admin_session("b", session("t1"), T0, 10)
    store.add_admin_session("c", session("t2"), T0, 10)
    assert store.revoke_admin_token("t1", T0) is True
    assert store.get_admin_session("a", T0) is None and store.get_admin_session("b", T0) is None
    assert store.get_admin_session("c", T0) == session("t2")
    assert store.end_admin_sessions_of("t2") == 1


def test_admin_sessions_are_bounded_oldest_first(store):
    """Past the limit the session ending first is dropped."""
    store.add_admin_session("a", session(expires=T0 + timedelta(hours=1)), T0, 2)
    store.add_admin_session("b", session(expires=T0 + timedelta(hours=2)), T0, 2)
    store.add_admin_session("c", session(expires=T0 + timedelta(hours=3)), T0, 2)
    assert store.get_admin_session("a", T0) is None
    assert store.get_admin_session("b", T0) is not None and store.get_admin_session("c", T0) is not None


def test_an_admin_tokens_role_is_kept_and_tokens_from_before_roles_are_admins(store_backend):
    """`--role read` round-trips on both backends; a token stored at schema version 9 (no role
    column yet) comes out of the migration as an admin, as it was."""
    from test_store import backend_at_version

    backend_at_version(store_backend, 9)
    insert = ("INSERT INTO admin_tokens (token_id, name, secret_hash, created_at, expires_at) VALUES"
              " ('old', 'ops', 'x', '2026-01-01T00:00:00.000000+00:00', '2027-01-01T00:00:00.000000+00:00')")
    if store_backend.name == "sqlite":
        import sqlite3

        with sqlite3.connect(store_backend.target) as raw:
            raw.execute(insert)
    else:
        import psycopg

        with psycopg.connect(store_backend.target, autocommit=True) as raw:
            raw.execute(insert)
    store = store_backend.open()
    try:
        assert store.get_admin_token("old").role == "admin"
        store.create_admin_token(AdminTokenRecord("ro", "wall", hash_secret("s"), T0, T0 + timedelta(days=1),
                                                  role="read"))
        assert store.check_admin_token("ro", "s", T0).role == "read"
        assert [t.role for t in store.list_admin_tokens()] == ["admin", "read"]
    finally:
        store.close()

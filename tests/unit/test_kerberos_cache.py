"""gateway_kerberos_sso.cache.CredentialCache with a Clock: expiry, shared exchanges, the bound, failures."""

from __future__ import annotations

import pytest
from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway_kerberos_sso.cache import CredentialCache, in_thread_pool

SPN = "HTTP/wiki.corp"


@frozen
class Ticket:
    user: str
    spn: str
    expires_at: float | None
    serial: int


class FakeKDC:
    """An exchange whose answers the test gives: each call waits until ``answer`` or ``fail``."""

    def __init__(self, clock: Clock, lifetime: float | None = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[tuple[str, str, Deferred]] = []

    def __call__(self, user: str, spn: str) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((user, spn, d))
        return d

    def answer(self, index: int = -1, lifetime: float | None = None) -> Ticket:
        user, spn, d = self.calls[index]
        life = self.lifetime if lifetime is None else lifetime
        ticket = Ticket(user, spn, None if life is None else self.clock.seconds() + life, len(self.calls))
        d.callback(ticket)
        return ticket

    def fail(self, index: int = -1) -> None:
        self.calls[index][2].errback(RuntimeError("KDC unreachable"))


def make(max_entries: int = 100, margin: float = 300.0, lifetime: float | None = 3600.0):
    clock = Clock()
    clock.advance(1_000_000)  # wall-clock-like seconds, as reactor.seconds() gives
    kdc = FakeKDC(clock, lifetime)
    return clock, kdc, CredentialCache(clock, kdc, max_entries=max_entries, margin=margin)


def result_of(d: Deferred):
    """What `d` fired with (a Failure is taken off the Deferred, so it is not logged as unhandled)."""
    out = []
    d.addBoth(lambda r: out.append(r) or (None if isinstance(r, Failure) else r))
    assert out, "the Deferred has not fired"
    return out[0]


def test_an_entry_is_served_until_the_margin_before_its_ticket_ends():
    """Within the ticket's life less the margin a get is a hit; from then on it asks the KDC again."""
    clock, kdc, cache = make(margin=300)
    d = cache.get("alice", SPN)
    ticket = kdc.answer()
    assert result_of(d) == ticket
    clock.advance(3600 - 300 - 1)
    assert result_of(cache.get("alice", SPN)) == ticket
    assert len(kdc.calls) == 1
    clock.advance(1)
    renewed = cache.get("alice", SPN)
    assert len(kdc.calls) == 2 and not renewed.called
    fresh = kdc.answer()
    assert result_of(renewed) == fresh != ticket


def test_an_unknown_ticket_end_keeps_the_entry_for_unknown_lifetime():
    """A value without expires_at is kept unknown_lifetime seconds, then fetched again."""
    clock, kdc, cache = make()
    cache.unknown_lifetime = 60
    d = cache.get("alice", SPN)
    kdc.calls[-1][2].callback("creds")
    assert result_of(d) == "creds"
    clock.advance(59)
    assert result_of(cache.get("alice", SPN)) == "creds"
    clock.advance(1)
    cache.get("alice", SPN)
    assert len(kdc.calls) == 2


def test_a_ticket_ending_within_the_margin_serves_its_waiters_but_is_not_kept():
    """A value that arrives already inside the margin answers the waiting request; the next one asks again."""
    clock, kdc, cache = make(margin=300, lifetime=200)
    d = cache.get("alice", SPN)
    ticket = kdc.answer()
    assert result_of(d) == ticket
    assert len(cache) == 0
    cache.get("alice", SPN)
    assert len(kdc.calls) == 2


def test_concurrent_requests_for_one_key_share_one_exchange():
    """Three gets for (alice, SPN) before the KDC answers make one exchange and all get its value;
    another user or SPN has its own."""
    clock, kdc, cache = make()
    waiting = [cache.get("alice", SPN) for _ in range(3)]
    other_user = cache.get("bob", SPN)
    other_spn = cache.get("alice", "cifs/files.corp")
    assert [(u, s) for u, s, _ in kdc.calls] == [("alice", SPN), ("bob", SPN), ("alice", "cifs/files.corp")]
    assert not any(d.called for d in waiting)
    ticket = kdc.answer(0)
    assert [result_of(d) for d in waiting] == [ticket] * 3
    assert not other_user.called and not other_spn.called


def test_a_cancelled_request_leaves_the_shared_exchange_to_the_others():
    """Cancelling one waiter's Deferred fails only it; the exchange goes on, feeds the rest, and is cached."""
    clock, kdc, cache = make()
    first, second = cache.get("alice", SPN), cache.get("alice", SPN)
    first.cancel()
    assert result_of(first).check(CancelledError)
    assert not kdc.calls[0][2].called
    ticket = kdc.answer()
    assert result_of(second) == ticket
    assert result_of(cache.get("alice", SPN)) == ticket and len(kdc.calls) == 1


def test_the_cache_is_bounded_and_drops_the_least_recently_used():
    """With max_entries=2, a third user evicts the entry used least recently, not the one just read."""
    clock, kdc, cache = make(max_entries=2)
    for user in ("alice", "bob"):
        cache.get(user, SPN)
        kdc.answer()
    cache.get("alice", SPN)  # alice is now the most recently used
    cache.get("carol", SPN)
    kdc.answer()
    assert len(cache) == 2 and len(kdc.calls) == 3
    cache.get("alice", SPN)
    assert len(kdc.calls) == 3
    cache.get("bob", SPN)
    assert len(kdc.calls) == 4 and kdc.calls[-1][0] == "bob"


def test_a_failed_exchange_reaches_every_waiter_and_is_not_cached():
    """A failing exchange fails all who waited for it; the next request starts a new exchange."""
    clock, kdc, cache = make()
    waiting = [cache.get("alice", SPN) for _ in range(2)]
    kdc.fail()
    assert all(result_of(d).check(RuntimeError) for d in waiting)
    assert len(cache) == 0
    d = cache.get("alice", SPN)
    assert len(kdc.calls) == 2
    ticket = kdc.answer()
    assert result_of(d) == ticket


def test_an_exchange_that_raises_fails_the_request():
    """An exchange function that raises at once gives a failed Deferred, not an exception in get()."""
    cache = CredentialCache(Clock(), lambda user, spn: 1 / 0)
    assert result_of(cache.get("alice", SPN)).check(ZeroDivisionError)


def test_discard_forgets_an_entry():
    """discard(user, spn) makes the next get ask the KDC again."""
    clock, kdc, cache = make()
    cache.get("alice", SPN)
    kdc.answer()
    cache.discard("alice", SPN)
    cache.get("alice", SPN)
    assert len(kdc.calls) == 2


def test_max_entries_must_be_positive():
    """A cache that could hold nothing is refused, naming the setting."""
    with pytest.raises(ValueError, match="max_entries"):
        CredentialCache(Clock(), lambda user, spn: None, max_entries=0)


class RecordingPool:
    """A ThreadPool stand-in that records the work instead of running it."""

    def __init__(self) -> None:
        self.work: list = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: N802 - Twisted's name
        self.work.append((on_result, f, args))


class ImmediateReactor:
    def callFromThread(self, f, *args, **kwargs):  # noqa: N802 - Twisted's name
        f(*args, **kwargs)


def test_in_thread_pool_hands_the_blocking_call_to_the_pool():
    """The exchange from in_thread_pool never runs the blocking function itself: the pool does, and its result fires."""
    calls = []

    def blocking(user, spn):
        calls.append((user, spn))
        return "creds"

    pool = RecordingPool()
    d = in_thread_pool(ImmediateReactor(), pool, blocking)("alice", SPN)
    assert calls == [] and not d.called
    on_result, f, args = pool.work[0]
    on_result(True, f(*args))
    assert calls == [("alice", SPN)] and result_of(d) == "creds"


def test_counters_tell_hits_exchanges_and_joined_waits_apart():
    """hits, exchanges and joined count cache answers, KDC exchanges started and waits on one in flight."""
    clock, kdc, cache = make()
    first, second = cache.get("alice", SPN), cache.get("alice", SPN)
    kdc.answer(0)
    cache.get("alice", SPN)
    cache.get("bob", SPN)
    assert (cache.hits, cache.exchanges, cache.joined) == (1, 2, 1)
    assert result_of(first) == result_of(second)

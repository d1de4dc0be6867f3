"""Delegated credentials per (user, SPN), kept until shortly before their ticket ends.

A KDC exchange (S4U2Self + S4U2Proxy) costs two round trips to the KDC and blocks a thread;
a user's next requests to the same back end need none, since the delegated credentials hold
the service ticket. :class:`CredentialCache` keeps them:

- ``get(user, spn)`` returns a Deferred; a hit fires at once, a miss starts the exchange (the
  function passed in, which runs the blocking work in a bounded thread pool, see
  :func:`in_thread_pool`, never on the reactor thread);
- concurrent requests for the same key share one in-flight exchange; one of them cancelling
  its Deferred does not cancel the exchange for the others;
- an entry expires ``margin`` seconds before its ticket ends (``expires_at`` of the value, in
  the reactor's seconds, which is wall-clock time), or ``unknown_lifetime`` after it arrived
  when the end is not known; a value that arrives already inside the margin serves the
  requests that waited for it and is not kept;
- at most ``max_entries`` entries, the least recently used dropped first;
- **a failed exchange is not cached**: its waiters get the failure and the next request asks
  the KDC again, so a fixed cause (a KDC back up, a delegation target added) works at once.
  What bounds the load on a failing KDC is the sharing of in-flight exchanges and the size of
  the thread pool, not a negative cache.

``hits``, ``exchanges`` and ``joined`` count what ``get`` did (answered from the cache, started
an exchange, waited for one already in flight): the numbers a metrics exporter will read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

Key = tuple[str, str]


def _ticket_end(value: Any) -> float | None:
    return getattr(value, "expires_at", None)


@define
class CredentialCache:
    """Values of ``exchange(user, spn)`` (a Deferred, or a plain value) by (user, SPN); see the module docstring."""

    clock: IReactorTime
    exchange: Callable[[str, str], Any]
    max_entries: int = 10_000
    margin: float = 300.0
    unknown_lifetime: float = 300.0
    expires_at: Callable[[Any], float | None] = _ticket_end
    _entries: OrderedDict[Key, tuple[Any, float]] = field(init=False, factory=OrderedDict)
    _in_flight: dict[Key, list[Deferred]] = field(init=False, factory=dict)
    hits: int = field(init=False, default=0)
    exchanges: int = field(init=False, default=0)
    joined: int = field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries: expected at least 1, got {self.max_entries}")

    def get(self, user: str, spn: str) -> Deferred:
        """A Deferred firing with the cached value for (user, spn), or the one a new or running exchange brings."""
        key = (user, spn)
        value = self._fresh(key)
        if value is not None:
            self.hits += 1
            d: Deferred = Deferred()
            d.callback(value)
            return d
        waiter: Deferred = Deferred(lambda d: self._forget_waiter(key, d))
        if key in self._in_flight:
            self.joined += 1
            self._in_flight[key].append(waiter)
        else:
            self.exchanges += 1
            self._in_flight[key] = [waiter]
            maybeDeferred(self.exchange, user, spn).addBoth(self._arrived, key)
        return waiter

    def discard(self, user: str, spn: str) -> None:
        """Forget (user, spn)'s entry (the back end refused what it gave); an exchange in flight goes on."""
        self._entries.pop((user, spn), None)

    def __len__(self) -> int:
        return len(self._entries)

    def _fresh(self, key: Key) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, keep_until = entry
        if self.clock.seconds() >= keep_until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def _arrived(self, result: Any, key: Key) -> None:
        # Returns None: a failure ends here (its waiters got it), never "unhandled" in the log.
        waiters = self._in_flight.pop(key, [])
        failed = isinstance(result, Failure)
        if not failed:
            self._keep(key, result)
        for waiter in waiters:
            if waiter.called:
                continue
            if failed:
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _keep(self, key: Key, value: Any) -> None:
        now = self.clock.seconds()
        end = self.expires_at(value)
        keep_until = now + self.unknown_lifetime if end is None else end - self.margin
        if keep_until <= now:
            return
        self._entries[key] = (value, keep_until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _forget_waiter(self, key: Key, waiter: Deferred) -> None:
        waiters = self._in_flight.get(key)
        if waiters and waiter in waiters:
            waiters.remove(waiter)


def in_thread_pool(reactor: Any, pool: Any, blocking: Callable[[str, str], Any]) -> Callable[[str, str], Deferred]:
    """An ``exchange`` for CredentialCache that runs ``blocking(user, spn)`` in ``pool`` (a
    ``twisted.python.threadpool.ThreadPool`` whose size bounds the concurrent KDC exchanges)."""
    return lambda user, spn: deferToThreadPool(reactor, pool, blocking, user, spn)

"""How a service node follows the shared store (issue 15): the change feed and store outages.

`ChangeFeed`: on PostgreSQL every write that changes what nodes serve NOTIFYs its topics (see
gateway.store.postgresql); the feed LISTENs on a connection and thread of its own and hands each
notice to the reactor, where the node re-reads what changed (``ServiceNode.apply_changes``) within
a reactor turn, not a config interval. Each time the LISTEN is (re)established the node re-reads
everything, since notices sent while it was away are lost. SQLite (one node) has no feed: the
node re-reads every config_interval as before.

`StoreHealth`: whether the store answers. The first failure that says the store is unreachable
(StoreUnavailable, from any call or from the feed) starts an outage, logged once with what still
works; the first success after it ends the outage, logged once, and the node catches up without
a restart. For ``store_outage_grace`` seconds the node keeps routing new streams to the apps it
knows from its last good config; after that it refuses them (``stale``), since a node cut off
from the store can no longer see a connector deleted or a certificate revoked.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define, field
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import StoreUnavailable
from gateway.store.sqlite import CHANGE_TOPICS

# What a catch-up re-reads: every topic of the feed.
EVERYTHING = frozenset(CHANGE_TOPICS)


@define
class StoreHealth:
    """Whether the store answers, and since when it has not."""

    clock: Any
    location: str
    grace: float
    # Called on the reactor when the store answers again after an outage (catch up).
    on_back: Callable[[], Any] = lambda: None
    down_since: float | None = None
    log: Logger = field(factory=Logger)

    def ok(self) -> None:
        """The store answered."""
        if self.down_since is None:
            return
        lasted = self.clock.seconds() - self.down_since
        self.down_since = None
        self.log.info("store {store} reachable again after {seconds:.0f}s; re-reading what changed meanwhile",
                      event="store_back", store=self.location, seconds=lasted)
        self.on_back()

    def failed(self, why: str) -> None:
        """The store is unreachable (the reason names it); the first call of an outage logs it."""
        if self.down_since is not None:
            return
        self.down_since = self.clock.seconds()
        self.log.error(
            "{why}: store outage; existing tunnels and streams go on and new streams to known apps are routed"
            " from this node's last good config for up to {grace:g}s (store_outage_grace); enrolments,"
            " renewals and admin changes fail until the store is back", event="store_outage", why=why,
            grace=self.grace)

    def quiet(self, failure: Failure) -> Failure | None:
        """An errback: a store outage is taken (and logged once, here) and swallowed; any other
        failure is passed on for its caller to log."""
        if failure.check(StoreUnavailable):
            self.failed(failure.getErrorMessage())
            return None
        return failure

    @property
    def stale(self) -> bool:
        """The outage has lasted longer than the grace: the last config may be out of date."""
        return self.down_since is not None and self.clock.seconds() - self.down_since > self.grace

    def outage_message(self) -> str:
        """What a call refused during the outage says."""
        return (f"the store {self.location} is unreachable (for {self.clock.seconds() - (self.down_since or 0):.0f}s"
                f" now): check that PostgreSQL is up; the change was not made, try again once it is back")

    def stale_reason(self) -> str:
        return (f"the store {self.location} has been unreachable for"
                f" {self.clock.seconds() - (self.down_since or 0):.0f}s, longer than store_outage_grace"
                f" ({self.grace:g}s): this node no longer routes new streams on a config it cannot check;"
                f" bring the store back (the node catches up by itself)")


class ChangeFeed(Service):
    """Runs the store's ChangeListener while the node runs; notices go to `apply(topics)` on the
    reactor, coalesced per reactor turn; a (re)established LISTEN re-reads everything."""

    name = "store-change-feed"

    def __init__(self, store: Any, reactor: Any, health: StoreHealth, apply: Callable[[set[str]], Any]) -> None:
        self.store = store  # the synchronous store: listen() is what PostgreSQL has
        self.reactor = reactor
        self.health = health
        self.apply = apply
        self._listener: Any = None
        self._pending: set[str] = set()
        self._first = True

    def startService(self) -> None:
        super().startService()
        self._listener = self.store.listen(
            lambda topics: self.reactor.callFromThread(self._notice, topics),
            lambda up, why: self.reactor.callFromThread(self._state, up, why))

    def stopService(self) -> None:
        super().stopService()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _notice(self, topics: str) -> None:
        if not self.running:
            return
        if not self._pending:
            self.reactor.callLater(0, self._flush)
        self._pending.update(t for t in topics.split(",") if t)

    def _flush(self) -> None:
        topics, self._pending = self._pending, set()
        if topics and self.running:
            self.apply(topics)

    def _state(self, up: bool, why: str) -> None:
        if not self.running:
            return
        if not up:
            self.health.failed(why)
            return
        first, self._first = self._first, False
        if self.health.down_since is not None:
            self.health.ok()   # its on_back re-reads everything
        elif not first:
            self.apply(set(EVERYTHING))   # reconnected without an outage seen: notices may be lost

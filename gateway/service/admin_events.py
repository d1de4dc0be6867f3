"""The recent admin events a service node keeps: its own and those its connectors send.

Bounded three ways: the newest ``per_source`` events of each source, at most ``max_sources``
sources (the one heard from least recently is forgotten first) and at most ``max_total``
events in all (the oldest go first), so neither a chatty connector nor many connectors can
grow the node's memory past a few megabytes. The status page and the admin API read
them with :meth:`AdminEvents.recent`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from typing import Any

from attrs import define, field, frozen

NODE = "node"
LEVELS = ("info", "warn", "error", "critical")
DEFAULT_PER_SOURCE = 200
DEFAULT_MAX_SOURCES = 1000
DEFAULT_MAX_TOTAL = 20_000


@frozen
class AdminEvent:
    """One admin event: when (epoch seconds), who ("node" or a connector id), how bad, what."""

    time: float
    source: str
    level: str
    text: str


@define
class AdminEvents:
    """The recent admin events per source, newest kept, oldest dropped."""

    per_source: int = DEFAULT_PER_SOURCE
    max_sources: int = DEFAULT_MAX_SOURCES
    max_total: int = DEFAULT_MAX_TOTAL
    _by_source: OrderedDict[str, deque[AdminEvent]] = field(factory=OrderedDict, init=False)
    _total: int = field(default=0, init=False)

    def add(self, event: AdminEvent) -> None:
        events = self._by_source.pop(event.source, None)
        if events is None:
            events = deque(maxlen=self.per_source)
            while len(self._by_source) >= self.max_sources:
                self._total -= len(self._by_source.popitem(last=False)[1])
        self._by_source[event.source] = events   # most recently heard from last
        if len(events) < self.per_source:
            self._total += 1
        events.append(event)
        while self._total > self.max_total:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        source, events = min(self._by_source.items(), key=lambda item: item[1][0].time)
        events.popleft()
        self._total -= 1
        if not events:
            del self._by_source[source]

    def recent(self, limit: int = 100, source: str | None = None) -> list[AdminEvent]:
        """The newest ``limit`` events (of ``source`` only, if given), newest first."""
        if limit <= 0:
            return []
        if source is not None:
            return list(itertools.islice(reversed(self._by_source.get(source, ())), limit))
        newest_first = heapq.merge(*(reversed(events) for events in self._by_source.values()),
                                   key=lambda e: e.time, reverse=True)
        return list(itertools.islice(newest_first, limit))

    def sources(self) -> list[str]:
        """The sources with events kept, the one heard from most recently first."""
        return list(reversed(self._by_source))


# What a connector's admin_event may put in the node's memory: the text cut to this, the
# level one of LEVELS; its source is the connector's certificate identity, never the message.
MAX_TEXT = 1000
MAX_EVENT_NAME = 64


def event_from_message(connector_id: str, message: dict[str, Any], now: float) -> AdminEvent:
    """A connector's admin_event control message as an AdminEvent, bounded and normalised."""
    level = message.get("level")
    text = message.get("text")
    when = message.get("time")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        when = now
    return AdminEvent(
        time=float(min(when, now)),   # a connector's clock ahead of ours must not sort it first forever
        source=connector_id,
        level=level if level in LEVELS else "info",
        text=(text if isinstance(text, str) else repr(text))[:MAX_TEXT],
    )


def handle_admin_event(handler: Any, message: dict[str, Any]) -> None:
    """Control message admin_event from a connector: kept with the node's recent events and
    written to the node's admin log with the connector as its source."""
    node = handler.node
    event = event_from_message(handler.identity.connector_id, message, node.reactor.seconds())
    node.admin_events.add(event)
    name = message.get("event")
    node.connector_admin_event(event, name[:MAX_EVENT_NAME] if isinstance(name, str) else "")

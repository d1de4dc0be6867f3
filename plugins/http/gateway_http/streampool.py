"""Idle streams shared by the client connections of one front door (``options.balance = "request"``).

With per-connection balancing (the default) a client connection keeps the stream of its last
request for its next one, so all its requests go to one connector. With ``balance = "request"``
each request asks the node which connector it goes to (``choose_connector``: least loaded,
least recently chosen among equals), takes an idle stream of that connector from this pool or
opens one there, and gives the stream back when the response is done. The requests of one
client connection then take turns over the group's connectors, and a stream still serves many
requests one after another (the connector keeps its back-end connection with it), so no
stream is opened per request.

A stream is never shared by two requests at once: it is in the pool only between responses.
It is kept per (app, signed-in identity, connector) because the connector reads the user from
the stream's metadata (single sign-on). Bounded: at most ``max_idle`` idle streams per key and
``max_total`` in all (many signed-in users make many keys; each parked stream holds a back-end
connection on its connector); one idle longer than ``idle_timeout`` is closed by a sweep (one
timer per pool, not per stream). The listener's factory closes them all when it stops.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger

log = Logger("gateway_http")

DEFAULT_MAX_IDLE = 64
DEFAULT_MAX_TOTAL = 1024


def identity_key(identity: dict | None) -> str:
    return "" if identity is None else json.dumps(identity, sort_keys=True, separators=(",", ":"))


def usable(stream: Any) -> bool:
    """Open, not closing, and its tunnel still takes new work (a draining connector takes none)."""
    session = getattr(stream, "session", None)
    return (not stream.closed and not getattr(stream, "disconnecting", False)
            and (session is None or session.available))


class StreamPool:
    def __init__(self, reactor: Any, idle_timeout: float, max_idle: int = DEFAULT_MAX_IDLE,
                 max_total: int = DEFAULT_MAX_TOTAL) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_total = max_total
        # (app name, identity key, connector id) -> [(stream, app, parked at)], oldest first
        self._idle: dict[tuple[str, str, str], list[tuple[Any, Any, float]]] = {}
        self._key_of: dict[Any, tuple[str, str, str]] = {}
        self._sweep: Any = None

    def __len__(self) -> int:
        return len(self._key_of)

    def take(self, app: Any, identity: dict | None, connector_id: str) -> Any:
        """The most recently parked usable stream of ``connector_id`` for ``app`` and this identity, or None."""
        entries = self._idle.get((app.name, identity_key(identity), connector_id))
        while entries:
            stream, parked_app, _ = entries.pop()
            del self._key_of[stream]
            # A reload makes new app objects: a stream opened for the old one is not reused.
            if parked_app is app and usable(stream):
                return stream
            _close(stream)
        return None

    def put(self, stream: Any, app: Any, identity: dict | None) -> bool:
        """Park ``stream`` for the next request of this app and identity; False (the caller closes
        it) when it cannot be reused or the pool already holds ``max_idle`` such streams, or
        ``max_total`` streams in all."""
        info = getattr(stream, "log_info", None)
        connector_id = getattr(info, "connector_id", None)
        if (connector_id is None or stream in self._key_of or len(self._key_of) >= self.max_total
                or not usable(stream)):
            return False
        key = (app.name, identity_key(identity), connector_id)
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self.max_idle:
            return False
        entries.append((stream, app, self.reactor.seconds()))
        self._key_of[stream] = key
        if self._sweep is None or not self._sweep.active():
            self._sweep = self.reactor.callLater(self.idle_timeout / 2, self._swept)
        return True

    def discard(self, stream: Any) -> None:
        """``stream`` closed or misbehaved while parked: forget it."""
        key = self._key_of.pop(stream, None)
        if key is None:
            return
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry[0] is stream:
                del entries[i]
                break
        if not entries:
            self._idle.pop(key, None)

    def close(self) -> None:
        """Close every parked stream (the front door's listener stops)."""
        for entries in list(self._idle.values()):
            for stream, _, _ in entries:
                _close(stream)
        self._idle.clear()
        self._key_of.clear()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()

    def _swept(self) -> None:
        self._sweep = None
        oldest = self.reactor.seconds() - self.idle_timeout
        for key, entries in list(self._idle.items()):
            while entries and entries[0][2] <= oldest:
                stream, _, _ = entries.pop(0)
                del self._key_of[stream]
                _close(stream)
            if not entries:
                del self._idle[key]
        if self._key_of:
            self._sweep = self.reactor.callLater(self.idle_timeout / 2, self._swept)


def _close(stream: Any) -> None:
    if not stream.closed:
        stream.loseConnection()

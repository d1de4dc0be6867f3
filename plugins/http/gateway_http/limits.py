"""Caps on client connections to the front door: in total and per source address.

Without them one client could hold every file descriptor of the service. Every front-door
listener (plain, TLS, and the listeners of apps with a ``listen`` of their own) counts against
one ``ConnectionLimits``: ``[http] max_connections`` in all, ``[http]
max_connections_per_address`` from one address, an IPv6 client counted by its /64 (what one
host or home network is usually given). A connection over a limit is closed at once, before
TLS and before a byte is read: cheaper than a 503 (nginx's limit_conn answer), and a client
holding hundreds of connections is no browser waiting for an error page. The refusals are
logged at most once per address (or once for the total) per ``LOG_INTERVAL``, with how many
were refused meanwhile, so a flood cannot flood the log.
"""

from __future__ import annotations

import resource
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides

from gateway.service.admission import AddressCounter, ThrottledLog, address_key

log = Logger(namespace="gateway_http")

DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 256
LOG_INTERVAL = 60.0
# descriptors the service needs besides front-door clients: tunnels, listeners, logs, the store
RESERVED_DESCRIPTORS = 256
_TOTAL = "(total)"


@define
class ConnectionLimits:
    """Counts of open front-door connections, shared by every front-door listener."""

    reactor: Any = None
    total: int = DEFAULT_MAX_CONNECTIONS
    per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    count: int = 0
    by_address: AddressCounter = field(init=False)   # the tunnel port's counter, IPv6 by /64 too
    # one line per address (or for the total) per LOG_INTERVAL; made once the reactor is known
    _refusals: ThrottledLog | None = field(default=None)

    def __attrs_post_init__(self) -> None:
        self.by_address = AddressCounter(self.per_address)
        if self.reactor is not None:
            self._refusals = _refusal_log(self.reactor)

    def configure(self, total: int, per_address: int, reactor: Any) -> None:
        """New limits (at start and on reload); connections open now stay and still count."""
        if reactor is not self.reactor or self._refusals is None:
            self._refusals = _refusal_log(reactor)
        self.total, self.per_address, self.reactor = total, per_address, reactor
        self.by_address.limit = per_address
        hard = descriptor_limit()
        if hard is not None and total > hard - RESERVED_DESCRIPTORS:
            log.warn("[http] max_connections = {total} is more than the service's open-file limit (RLIMIT_NOFILE, "
                     "hard limit {hard}, less {reserved} for tunnels and listeners) allows: beyond that, new "
                     "connections fail for lack of descriptors. Raise the limit (LimitNOFILE= in the systemd unit) "
                     "or lower max_connections.", total=total, hard=hard, reserved=RESERVED_DESCRIPTORS)

    def admit(self, host: str) -> str | None:
        """The key to release the connection by, or None when it is over a limit (and is refused)."""
        key = address_key(host)
        if self.count >= self.total:
            self._refused(_TOTAL, host, "max_connections", self.total)
            return None
        if not self.by_address.acquire(key):
            self._refused(key, host, "max_connections_per_address", self.per_address)
            return None
        self.count += 1
        return key

    def release(self, key: str) -> None:
        self.count -= 1
        self.by_address.release(key)

    def _refused(self, key: str, host: str, limit: str, value: int) -> None:
        address = host if key == host or key == _TOTAL else f"{host} ({key})"
        if self._refusals is None:   # not configured yet (no reactor to time lines by)
            log.warn(_REFUSAL_LINE, address=address, limit=limit, value=value, more=0)
            return
        self._refusals.emit(key, address=address, limit=limit, value=value)


_REFUSAL_LINE = ("http front door: connection from {address} closed at once: [http] {limit} = {value} reached "
                 "({more} more refused since the last such line; at most one a minute per address)")


def _refusal_log(reactor: Any) -> ThrottledLog:
    return ThrottledLog(log, reactor, _REFUSAL_LINE, interval=LOG_INTERVAL)


def descriptor_limit() -> int | None:
    """RLIMIT_NOFILE's hard limit: the service raises its soft limit to it at start (gateway.tap),
    which may come after the config is first checked."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if hard == resource.RLIM_INFINITY else hard


class _Counted(ProtocolWrapper):
    """The wrapper a counted connection's protocol sits in; it passes a half-close on (the front
    door answers what is in flight when the client shuts its side), which ProtocolWrapper does not."""

    limit_key = ""

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            alsoProvides(self, IHalfCloseableProtocol)

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()


class LimitedFactory(WrappingFactory):
    """A front-door listener's factory that admits a connection only within ``limits``."""

    protocol = _Counted
    noisy = False

    def __init__(self, wrapped: Any, limits: ConnectionLimits) -> None:
        super().__init__(wrapped)
        self.limits = limits

    def buildProtocol(self, addr: Any) -> Any:
        key = self.limits.admit(getattr(addr, "host", "") or "")
        if key is None:
            return None   # the port closes the socket at once
        protocol = super().buildProtocol(addr)
        if protocol is None:
            self.limits.release(key)
            return None
        protocol.limit_key = key
        return protocol

    def registerProtocol(self, protocol: Any) -> None:
        pass   # counted in buildProtocol; WrappingFactory's set of every live protocol is not needed

    def unregisterProtocol(self, protocol: Any) -> None:
        self.limits.release(protocol.limit_key)

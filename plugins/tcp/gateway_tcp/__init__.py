"""The generic TCP protocol plugin: any TCP app, spliced byte for byte.

Loaded through the ``gateway`` entry point exactly as a third-party plugin would be.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.hookspecs import hookimpl
from gateway.protocols import IProtocolHandler
from gateway.tunnel.splice import QuietFactory, SocketSide, dial_and_splice

log = Logger(namespace="gateway_tcp")

# Like a typical NAT or firewall: a connection with no byte either way for two hours is gone.
DEFAULT_IDLE_TIMEOUT = 7200.0
# Idleness is checked this many times per idle_timeout (so a connection is closed after
# idle_timeout and at most a quarter more); a check reads two counters, no per-byte cost.
IDLE_CHECKS = 4


def idle_timeout(app: Any) -> float | None:
    """The app's ``options.idle_timeout`` in seconds (None: never); GatewayError if it is not one."""
    value = app.options.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise GatewayError(f"app {app.name}: options.idle_timeout: expected a number of seconds >= 0"
                           f" (0 never closes an idle connection), got {value!r}")
    return float(value) or None


class _ClientSide(SocketSide):
    """A user's connection to the app's listen port on the service."""

    def __init__(self, app: Any, open_stream: Any, reactor: Any = None, idle: float | None = None) -> None:
        super().__init__()
        self.app = app
        self.open_stream = open_stream
        self._gone = False
        self._reactor = reactor
        self._idle = idle
        self._idle_call: Any = None
        self._seen = 0
        self._active_at = 0.0
        self._closing = False

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        d = self.open_stream({"client": f"{peer.host}:{peer.port}"})
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, stream: Any) -> None:
        if self._gone:
            stream.loseConnection()
            return
        self.join(stream)
        if self._idle is not None and self._reactor is not None:
            self._active_at = self._reactor.seconds()
            self._idle_call = self._reactor.callLater(self._idle / IDLE_CHECKS, self._check_idle)

    def _check_idle(self) -> None:
        """Close the connection once no byte went either way for idle_timeout.

        The stream counts bytes both ways already, so a check compares counters instead of
        timing every chunk. A client that stopped reading while data waits for it counts as
        idle too; if the clean close cannot finish (its buffer does not drain), the next check
        aborts the connection.
        """
        now = self._reactor.seconds()
        seen = self.stream.bytes_in + self.stream.bytes_out
        if seen != self._seen:
            self._seen = seen
            self._active_at = now
        elif self._closing:
            self.transport.abortConnection()
            return
        elif now - self._active_at >= self._idle:
            peer = self.transport.getPeer()
            log.info("app {app}: connection from {client} idle for {idle:.0f}s (options.idle_timeout = {timeout:g});"
                     " closing it", app=self.app.name, client=f"{peer.host}:{peer.port}",
                     idle=now - self._active_at, timeout=self._idle)
            self._closing = True
            self.transport.loseConnection()
        self._idle_call = self._reactor.callLater(self._idle / IDLE_CHECKS, self._check_idle)

    def _failed(self, failure: Any) -> None:
        log.warn(
            "app {app}: could not open a stream for {client}: {reason}",
            app=self.app.name, client=str(self.transport.getPeer()), reason=failure.getErrorMessage(),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        super().connectionLost(reason)


@implementer(IProtocolHandler)
class TCPHandler:
    name = "tcp"

    def service_factory(self, app: Any, open_stream: Any, reactor: Any) -> Factory:
        idle = idle_timeout(app)
        return QuietFactory.forProtocol(lambda: _ClientSide(app, open_stream, reactor, idle))

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        dial_and_splice(stream, app, reactor)


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(TCPHandler())


@hookimpl
def gateway_service_listeners(register: Any, config: Any, open_stream: Any, reactor: Any) -> None:
    """Registers no listener: checks the tcp apps' options, so a bad one stops the service
    (and `gateway check-config`) before anything binds."""
    for app in config.apps:
        if app.protocol == "tcp":
            idle_timeout(app)

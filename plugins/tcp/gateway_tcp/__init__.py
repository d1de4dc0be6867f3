"""The generic TCP protocol plugin: any TCP app, spliced byte for byte.

Loaded through the ``gateway`` entry point exactly as a third-party plugin would be.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from gateway.hookspecs import hookimpl
from gateway.protocols import IProtocolHandler
from gateway.tunnel.splice import QuietFactory, SocketSide, dial_and_splice

log = Logger(namespace="gateway_tcp")


class _ClientSide(SocketSide):
    """A user's connection to the app's listen port on the service."""

    def __init__(self, app: Any, open_stream: Any) -> None:
        super().__init__()
        self.app = app
        self.open_stream = open_stream
        self._gone = False

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

    def _failed(self, failure: Any) -> None:
        log.warn(
            "app {app}: could not open a stream for {client}: {reason}",
            app=self.app.name, client=str(self.transport.getPeer()), reason=failure.getErrorMessage(),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        super().connectionLost(reason)


@implementer(IProtocolHandler)
class TCPHandler:
    name = "tcp"

    def service_factory(self, app: Any, open_stream: Any, reactor: Any) -> Factory:
        return QuietFactory.forProtocol(lambda: _ClientSide(app, open_stream))

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        dial_and_splice(stream, app, reactor)


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(TCPHandler())

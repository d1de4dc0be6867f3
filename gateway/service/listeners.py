"""Listening ports whose factory can be replaced while the socket stays bound."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory


class SwappableFactory(Factory):
    """The factory a shared listener is bound with: a reload swaps ``factory`` (new connections
    get the new configuration) instead of closing and rebinding the port, which would refuse
    connections for a moment; connections already open keep the protocol they were built with."""

    noisy = False

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._started = False

    @property
    def factory(self) -> Any:
        return self._factory

    @factory.setter
    def factory(self, new: Any) -> None:
        old, self._factory = self._factory, new
        if self._started and new is not old:
            new.doStart()
            old.doStop()

    def startFactory(self) -> None:
        self._started = True
        self._factory.doStart()

    def stopFactory(self) -> None:
        self._started = False
        self._factory.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        return self._factory.buildProtocol(addr)

"""Service-node helpers that need no network."""

from twisted.internet.testing import MemoryReactor

from gateway.service.node import DEFAULT_BACKLOG, listen_endpoint


def test_tcp_listeners_get_a_deep_accept_queue():
    """A TCP listen string without backlog gets DEFAULT_BACKLOG; an explicit one is kept."""
    assert listen_endpoint(MemoryReactor(), "tcp:8080:interface=127.0.0.1")._backlog == DEFAULT_BACKLOG
    assert listen_endpoint(MemoryReactor(), "tcp:8080:backlog=7")._backlog == 7


def test_other_endpoint_kinds_are_left_alone():
    """Non-TCP endpoints (a UNIX socket here) are built exactly as written."""
    endpoint = listen_endpoint(MemoryReactor(), "unix:/tmp/gw-test.sock")
    assert endpoint._address == "/tmp/gw-test.sock"


def test_swappable_factory_keeps_the_port_and_swaps_what_it_builds():
    """A reload swaps the factory behind a bound listener: new connections get the new one; the
    new factory is started and the old one stopped."""
    from twisted.internet.protocol import Factory, Protocol

    from gateway.service.listeners import SwappableFactory

    class Counting(Factory):
        protocol = Protocol

        def __init__(self) -> None:
            self.events: list[str] = []

        def startFactory(self) -> None:
            self.events.append("start")

        def stopFactory(self) -> None:
            self.events.append("stop")

    old, new = Counting(), Counting()
    holder = SwappableFactory(old)
    holder.doStart()
    assert holder.buildProtocol(None).factory is old
    holder.factory = new
    assert holder.buildProtocol(None).factory is new
    assert old.events == ["start", "stop"] and new.events == ["start"]
    holder.doStop()
    assert new.events == ["start", "stop"]

"""The connector's own check of a private app's destination, after its own DNS resolution.

The service already matched what the user asked for against the app's segments; the connector
does not trust that. For an app stream of a private app it

1. matches the destination as asked (``host:port`` and transport) against the app's segments
   (:func:`requested`), the same rule the service uses;
2. resolves a name with the connector's resolver (an address is taken as it is) and keeps the
   first address :func:`~gateway.segments.allows_address` allows (:func:`choose_address`): a
   name that resolves outside every address segment is refused unless a segment names it, and
   loopback, link-local and the like are reached only through an address segment;
3. hands the plugin the app evolved to that one address (:func:`dial_target`), so what was
   checked is what is dialled: no plugin resolves the name again.

A refusal is :class:`DestinationRefused` with a sentence naming what was asked, what it
resolved to and the app's segments. The checks are pure; :func:`resolve` is the only I/O, through
an ``IHostnameResolver`` (the reactor's ``nameResolver``, getaddrinfo in its thread pool).
"""

from __future__ import annotations

from typing import Any, Iterable

from attrs import evolve
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.segments import DestinationError, Segment, allows_address, host_port, match_destination, normalise_host

__all__ = ["TRANSPORTS", "DestinationRefused", "NoAddress", "choose_address", "dial_target",
           "parse_host_port", "requested", "resolve"]

TRANSPORTS = ("tcp", "udp")


class DestinationRefused(GatewayError):
    """The destination is outside the app's segments (as asked, or after resolution); says which and why."""


class NoAddress(GatewayError):
    """The connector's resolver found no address for a name the segments allow."""


def parse_host_port(text: Any) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` from app stream metadata; DestinationError says what is wrong."""
    if not isinstance(text, str) or not text:
        raise DestinationError(f'expected a destination "host:port" ([address]:port for IPv6), got {text!r}')
    host, colon, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise DestinationError(f"expected an IPv6 address in brackets ([address]:port), got {text!r}")
    if not colon or not host or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise DestinationError(f'expected a destination "host:port" with a port 1..65535, got {text!r}')
    return host, int(port_text)


def _segment_list(segments: Iterable[Segment]) -> str:
    return "; ".join(str(s) for s in segments) or "none"


def requested(app: Any, destination: Any, transport: Any) -> tuple[str, int, Segment]:
    """Step 1: the host, port and segment of the destination as asked; DestinationRefused if no
    segment of ``app`` covers it (or it is malformed)."""
    if transport not in TRANSPORTS:
        raise DestinationRefused(f"transport must be tcp or udp, got {transport!r}")
    try:
        host, port = parse_host_port(destination)
        segment = match_destination(app.segments, host, port, transport)
    except DestinationError as e:
        raise DestinationRefused(f"destination {destination!r} of app {app.name}: {e}") from None
    if segment is None:
        raise DestinationRefused(
            f"{destination}/{transport} is outside the segments of app {app.name} ({_segment_list(app.segments)});"
            " the connector dials only what its apps' segments allow")
    return host, port, segment


def is_address(host: str) -> bool:
    """Whether ``host`` is an IP address literal (taken as it is, never resolved)."""
    try:
        return not isinstance(normalise_host(host), str)
    except DestinationError:
        return False


def choose_address(app: Any, host: str, addresses: Iterable[str], port: int, transport: str) -> tuple[str, Segment]:
    """Step 2: the first of ``addresses`` (what ``host`` resolved to) the app's segments allow, with
    the segment allowing it. DestinationRefused names the host, the addresses and the segments."""
    addresses = list(dict.fromkeys(addresses))
    name = None if is_address(host) else host
    for address in addresses:
        try:
            segment = allows_address(app.segments, name, address, port, transport)
        except DestinationError:
            segment = None  # not an address we would dial (a scope id, say): try the next
        if segment is not None:
            return address, segment
    if not addresses:
        raise NoAddress(f"the connector could not resolve {host}: no address found")
    where = host_port(host, port)
    resolved = "" if name is None else f" resolved to {', '.join(addresses)}, which"
    raise DestinationRefused(
        f"{where}/{transport}{resolved} is outside the segments of app {app.name} ({_segment_list(app.segments)});"
        " a name reaches loopback, link-local or other addresses only when an address segment lists them")


def dial_target(app: Any, address: str, port: int) -> Any:
    """Step 3: the app as a plugin dials it: exactly this address and port."""
    return evolve(app, host=address, port=port, destination=host_port(address, port))


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


def resolve(resolver: Any, host: str, transport: str) -> Deferred:
    """The addresses of ``host`` (a list of strings, maybe empty) from ``resolver``, an
    IHostnameResolver; an address literal comes back as it is without asking.

    The resolver is asked the normalised name (lower case, A-labels, no trailing dot) that the
    segments were matched against, never the raw text: getaddrinfo would encode a non-ASCII name
    with IDNA 2003 ("faß" becomes "fass"), a different host than the one checked."""
    wanted = normalise_host(host)
    if not isinstance(wanted, str):
        return succeed([str(wanted)])
    receiver = _Addresses()
    resolver.resolveHostName(receiver, wanted, 0, [IPv4Address, IPv6Address], transport.upper())
    return receiver.done

"""App segments for Private Access (issue 10): what a private app lets its users reach.

A segment is one destination (a host name, a ``*.`` wildcard domain, or an IPv4/IPv6 address
or CIDR), a set of ports and one protocol (``tcp`` or ``udp``). This module parses segments
from TOML-shaped values with errors that name the key, matches destinations against them, and
tells whether two segments overlap. It does no I/O and resolves no names.

Used by private apps' config (``[[apps.segments]]``), the service's access check and the
connector's own check (gateway/connector/destinations.py).

Two checks use segments, on two sides:

- :func:`match_destination`, on the service, by what the user asked for: a name is matched
  against name segments only (the service never resolves it), an address against address
  segments only.
- :func:`allows_address`, on the connector, after its own DNS resolution, with the address it
  is about to dial: allowed when an address segment contains that address, or when a name
  segment names the host it resolved, so a service that was fooled still cannot make the
  connector dial outside its segments.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping, Union

import idna
from attrs import frozen

from gateway.errors import ConfigError, GatewayError

__all__ = [
    "PROTOCOLS",
    "DestinationError",
    "HostName",
    "Network",
    "PortRange",
    "Segment",
    "Where",
    "Wildcard",
    "allows_address",
    "match_destination",
    "normalise_address",
    "normalise_host",
    "overlapping_pair",
    "overlaps",
    "parse_destination",
    "parse_ports",
    "parse_segment",
    "parse_segments",
    "host_port",
    "segment_table",
]

PROTOCOLS = ("tcp", "udp")
SEGMENT_KEYS = ["destination", "ports", "protocol"]
DESTINATION_EXPECTED = 'a host name, a wildcard such as "*.corp.example", an IP address or a CIDR'
PORTS_EXPECTED = 'a port, a list or a range such as 3389, "80,443", "8000-8100" or [80, "8000-8100"]'

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# Letters, digits, hyphens inside; underscores too, which internal DNS zones do use (_ldap, srv_01).
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
# A last label like these makes a resolver read the whole name as an IPv4 address
# (inet_aton: "10.1", "2130706433", "0x7f.1"), so "a name" would bypass the address segments.
_NUMERIC_LABEL_RE = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


class DestinationError(GatewayError):
    """A destination asked for (a host, a port, a protocol) is malformed; says what was expected."""


# ---------------------------------------------------------------------------
# Values


@frozen
class PortRange:
    """Ports ``first``..``last``, both included."""

    first: int
    last: int

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@frozen
class HostName:
    """Exactly one host name, normalised (lower case, A-labels, no trailing dot)."""

    name: str

    def __str__(self) -> str:
        return self.name


@frozen
class Wildcard:
    """``*.suffix``: every name with one or more labels in front of ``suffix``, never ``suffix`` itself."""

    suffix: str

    def covers(self, name: str) -> bool:
        return name.endswith("." + self.suffix)

    def __str__(self) -> str:
        return "*." + self.suffix


@frozen
class Network:
    """An IPv4 or IPv6 network; a single address is a /32 or /128."""

    network: IPNetwork

    def __str__(self) -> str:
        net = self.network
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


Destination = Union[HostName, Wildcard, Network]


@frozen
class Segment:
    """One destination, its ports (sorted, merged ranges) and one protocol."""

    destination: Destination
    ports: tuple[PortRange, ...]
    protocol: str

    def allows_port(self, port: int) -> bool:
        return any(port in r for r in self.ports)

    def serves(self, port: int, protocol: str) -> bool:
        return protocol == self.protocol and self.allows_port(port)

    def __str__(self) -> str:
        ports = ",".join(str(r) for r in self.ports)
        dest = str(self.destination)
        if ":" in dest:
            dest = f"[{dest}]"
        return f"{self.protocol} {dest}:{ports}"


@frozen
class Where:
    """Where a value sits: the file (or source) and the dotted key, for ConfigError."""

    file: str
    key: str

    def at(self, suffix: str) -> Where:
        sep = "" if suffix.startswith("[") else "."
        return Where(self.file, f"{self.key}{sep}{suffix}" if self.key else suffix)

    def error(self, expected: str, value: Any) -> ConfigError:
        """"expected ..., got ..." for a value that is wrong."""
        return self.fail(f"expected {expected}, got {_describe(value)}")

    def fail(self, message: str) -> ConfigError:
        return ConfigError(self.file, self.key, message)


def _describe(value: Any) -> str:
    # config.py will import this module to parse apps; importing it at the top would be circular.
    from gateway.config import _describe as describe

    return describe(value)


# ---------------------------------------------------------------------------
# Normalising names and addresses (the same code for config and for requests)


def normalise_address(value: str | IPAddress) -> IPAddress:
    """An IP address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes the IPv4 address it carries.

    Raises ValueError for anything that is not a plain address (a scope id ``%eth0`` included).
    """
    if isinstance(value, str):
        if "%" in value:
            raise ValueError(f"{value!r} has a scope id")
        value = ipaddress.ip_address(value)
    if isinstance(value, ipaddress.IPv6Address):
        if value.scope_id:
            raise ValueError(f"{value} has a scope id")
        if value.ipv4_mapped is not None:
            return value.ipv4_mapped
    return value


def _normalise_network(net: IPNetwork) -> IPNetwork:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        low32 = int(net.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((low32, net.prefixlen - 96))
    return net


def _normalise_name(text: str) -> str:
    """Lower case, A-labels (IDNA, UTS 46 mapping), one trailing dot dropped; ValueError says why not."""
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise ValueError(f"not a valid internationalised name: {e}") from None
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("the name is empty")
    labels = name.split(".")
    for i, label in enumerate(labels):
        labels[i] = _normalise_label(label)
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        raise ValueError("its last label is numeric, so resolvers would read it as an IPv4 address; "
                         "write an address as a.b.c.d")
    name = ".".join(labels)
    if len(name) > 253:
        raise ValueError(f"it has {len(name)} characters, more than 253")
    return name


def _normalise_label(label: str) -> str:
    if not label.isascii():
        try:
            return idna.alabel(label).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"label {label!r} is not valid IDNA: {e}") from None
    if not _LABEL_RE.match(label):
        if not label:
            raise ValueError("it has an empty label (two dots in a row, or a leading dot)")
        raise ValueError(f"label {label!r} is not 1..63 letters, digits, '-' and '_' without '-' at either end")
    if label.startswith("xn--"):
        try:
            idna.ulabel(label)
        except idna.IDNAError as e:
            raise ValueError(f"label {label!r} is not valid IDNA: {e}") from None
    return label


def normalise_host(text: str) -> IPAddress | str:
    """What a user asked for: an IP address (normalised) or a host name (normalised).

    Raises DestinationError for anything else, wildcards included.
    """
    if not isinstance(text, str) or not text:
        raise DestinationError("expected a host name or an IP address, got nothing")
    if ":" in text or _looks_like_ipv4(text):
        try:
            return normalise_address(text)
        except ValueError:
            raise DestinationError(f"expected an IP address, got {text!r}") from None
    try:
        return _normalise_name(text)
    except ValueError as e:
        raise DestinationError(f"expected a host name or an IP address, got {text!r} ({e})") from None


def _looks_like_ipv4(text: str) -> bool:
    return all(part.isdigit() for part in text.split("."))


# ---------------------------------------------------------------------------
# Parsing segments from TOML-shaped values


def parse_destination(text: str) -> Destination:
    """A segment's destination; ValueError says what was expected."""
    if "/" in text:
        if "%" in text:
            raise ValueError("a CIDR without a scope id (%...)")
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ValueError(f"a CIDR such as 10.0.0.0/8 or 2001:db8::/32 with no host bits set ({e})") from None
        return Network(_normalise_network(net))
    if ":" in text or _looks_like_ipv4(text):
        try:
            address = normalise_address(text)
        except ValueError as e:
            raise ValueError(f"an IPv4 address a.b.c.d or an IPv6 address without a scope id ({e})") from None
        return Network(ipaddress.ip_network(address))
    if "*" in text and not (text.startswith("*.") and "*" not in text[2:]):
        raise ValueError('a wildcard only as a whole first label, such as "*.corp.example"')
    try:
        if text.startswith("*."):
            return Wildcard(_normalise_name(text[2:]))
        return HostName(_normalise_name(text))
    except ValueError as e:
        raise ValueError(f"{DESTINATION_EXPECTED} ({e})") from None


def parse_ports(value: Any) -> tuple[PortRange, ...]:
    """Ports from an integer, a string like "80,443,8000-8100", or an array of those.

    Returns sorted ranges with overlapping and adjacent ones merged; ValueError when malformed.
    """
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("the array is empty")
    ranges: list[PortRange] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not a port")
        if isinstance(item, int):
            ranges.append(_port_range(item, item))
        elif isinstance(item, str):
            ranges.extend(_parse_port_text(item))
        else:
            raise ValueError(f"{type(item).__name__} is neither an integer nor a string")
    return _merge(ranges)


def _parse_port_text(text: str) -> list[PortRange]:
    ranges = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        first, last = first.strip(), last.strip()
        if not _is_digits(first) or (dash and not _is_digits(last)):
            raise ValueError(f"{part!r} is neither a port nor a range")
        ranges.append(_port_range(int(first), int(last) if dash else int(first)))
    return ranges


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def _port_range(first: int, last: int) -> PortRange:
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"port {first if not 1 <= first <= 65535 else last} is outside 1..65535")
    if first > last:
        raise ValueError(f"range {first}-{last} runs backwards")
    return PortRange(first, last)


def _merge(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for r in sorted(ranges, key=lambda r: r.first):
        if merged and r.first <= merged[-1].last + 1:
            last = merged[-1]
            merged[-1] = PortRange(last.first, max(last.last, r.last))
        else:
            merged.append(r)
    return tuple(merged)


def parse_segment(raw: Any, where: Where) -> Segment:
    """One segment table ``{destination = ..., ports = ..., protocol = "tcp"}``."""
    if not isinstance(raw, Mapping):
        raise where.error('a table such as { destination = "10.0.0.0/8", ports = "80,443", protocol = "tcp" }', raw)
    for key in raw:
        if key not in SEGMENT_KEYS:
            from gateway.config import _unknown_key_message

            raise where.at(key).fail(_unknown_key_message(key, SEGMENT_KEYS))
    destination = _required(raw, "destination", where, DESTINATION_EXPECTED)
    if not isinstance(destination, str) or not destination:
        raise where.at("destination").error(DESTINATION_EXPECTED, destination)
    try:
        parsed = parse_destination(destination)
    except ValueError as e:
        raise where.at("destination").error(str(e), destination) from None
    ports_value = _required(raw, "ports", where, PORTS_EXPECTED)
    try:
        ports = parse_ports(ports_value)
    except ValueError as e:
        raise where.at("ports").error(f"{PORTS_EXPECTED} ({e})", ports_value) from None
    protocol = raw.get("protocol", "tcp")
    if protocol not in PROTOCOLS or not isinstance(protocol, str):
        raise where.at("protocol").error('"tcp" or "udp"', protocol)
    return Segment(parsed, ports, protocol)


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: how a destination is written everywhere."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def segment_table(segment: Segment) -> dict[str, str]:
    """The table :func:`parse_segment` reads back into ``segment``: how the service sends a
    private app's segments to its connectors in the config message."""
    return {"destination": str(segment.destination), "ports": ",".join(str(r) for r in segment.ports),
            "protocol": segment.protocol}


def _required(raw: Mapping[str, Any], key: str, where: Where, what: str) -> Any:
    if key not in raw:
        raise where.at(key).fail(f"expected {what}, got nothing (this key is required)")
    return raw[key]


def parse_segments(raw: Any, where: Where) -> tuple[Segment, ...]:
    """A non-empty array of segment tables, as ``where`` (e.g. ``apps[2].segments``) holds it."""
    if not isinstance(raw, list) or not raw:
        raise where.error("a non-empty array of segment tables", raw)
    return tuple(parse_segment(item, where.at(f"[{i}]")) for i, item in enumerate(raw))


# ---------------------------------------------------------------------------
# Matching


def match_destination(segments: Iterable[Segment], host: str, port: int, protocol: str) -> Segment | None:
    """The first segment that allows ``host:port`` over ``protocol`` as asked for; the service's check.

    A name is matched against name and wildcard segments only, never resolved; an address
    against address segments only. Raises DestinationError for a malformed host or port.
    """
    _check_port(port)
    wanted = normalise_host(host)
    for segment in segments:
        if segment.serves(port, protocol) and _matches(segment.destination, wanted):
            return segment
    return None


def allows_address(segments: Iterable[Segment], name: str | None, resolved_ip: str | IPAddress,
                   port: int, protocol: str) -> Segment | None:
    """The segment that lets the connector dial ``resolved_ip:port``, or None; the connector's check.

    ``name`` is the host the connector resolved to get ``resolved_ip`` (None when it was
    asked for an address). An address segment containing the address allows it. Otherwise a
    name or wildcard segment naming ``name`` allows it, except when the address is loopback,
    unspecified, link-local or multicast: a name never reaches those unless an address segment
    lists them, so a DNS answer cannot turn a name segment into the connector's own services or
    a cloud metadata endpoint. Raises DestinationError for a malformed name, address or port.
    """
    _check_port(port)
    try:
        address = normalise_address(resolved_ip)
    except ValueError as e:
        raise DestinationError(f"expected the IP address the connector resolved, got {resolved_ip!r} ({e})") from None
    segments = [s for s in segments if s.serves(port, protocol)]
    for segment in segments:
        if _matches(segment.destination, address):
            return segment
    if name is None or _special(address):
        return None
    host = normalise_host(name)
    if not isinstance(host, str):
        return None  # an address literal: only an address segment (above) allows it
    for segment in segments:
        if _matches(segment.destination, host):
            return segment
    return None


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DestinationError(f"expected a port 1..65535, got {port!r}")


def _special(address: IPAddress) -> bool:
    return address.is_loopback or address.is_unspecified or address.is_link_local or address.is_multicast


def _matches(destination: Destination, wanted: IPAddress | str) -> bool:
    if isinstance(destination, Network):
        return not isinstance(wanted, str) and wanted in destination.network
    if not isinstance(wanted, str):
        return False
    if isinstance(destination, HostName):
        return wanted == destination.name
    return destination.covers(wanted)


# ---------------------------------------------------------------------------
# Overlaps


def overlaps(a: Segment, b: Segment) -> bool:
    """Whether some (destination, port, protocol) matches both segments.

    A name and an address never overlap here: which addresses a name has is known only on the
    connector when it resolves it, and changes with DNS, so no static check can say; at dial
    time the connector allows whichever segment matches.
    """
    if a.protocol != b.protocol or not _ports_overlap(a.ports, b.ports):
        return False
    return _destinations_overlap(a.destination, b.destination)


def _ports_overlap(a: tuple[PortRange, ...], b: tuple[PortRange, ...]) -> bool:
    return any(x.first <= y.last and y.first <= x.last for x in a for y in b)


def _destinations_overlap(a: Destination, b: Destination) -> bool:
    if isinstance(a, Network) or isinstance(b, Network):
        return isinstance(a, Network) and isinstance(b, Network) and a.network.overlaps(b.network)
    if isinstance(a, HostName) and isinstance(b, HostName):
        return a.name == b.name
    if isinstance(a, Wildcard) and isinstance(b, Wildcard):
        # *.x and *.y share names exactly when one suffix is the other or lies under it.
        return a.suffix == b.suffix or a.covers(b.suffix) or b.covers(a.suffix)
    name, wildcard = (a, b) if isinstance(a, HostName) else (b, a)
    return wildcard.covers(name.name)


def overlapping_pair(a: Iterable[Segment], b: Iterable[Segment]) -> tuple[Segment, Segment] | None:
    """The first segment of ``a`` and of ``b`` that overlap, for an error naming both; else None."""
    b = tuple(b)
    for x in a:
        for y in b:
            if overlaps(x, y):
                return x, y
    return None

"""Where a connector's tunnels go: the service's node list, spread, and the bootstrap address.

Pure: no reactor, no sockets. `gateway.connector.node` turns a plan into ClientServices.

A several-node service sends its live nodes in every config message (``nodes``: node id and the
tunnel address connectors should dial). The connector keeps at least one tunnel to each of up to
``max_nodes`` of them, so any node holds tunnels of every group and serves any user without
forwarding to another node; ``tunnels`` tunnels in all when that is more, spread evenly. It keeps
dialling its configured service address too (the bootstrap: the address it was registered with),
unless a listed node already has that address, so a stale node list never leaves it unable to
reach the service and learn the new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from attrs import field, frozen

# A node list longer than this is refused whole (the config message is the service's; the bound
# keeps a faulty one from making a connector dial thousands of addresses).
MAX_LISTED_NODES = 256


class BadNodeList(ValueError):
    """The config message's ``nodes`` is not a list of {node_id, address}."""


@frozen
class Target:
    """One address tunnels are dialled to; ``node_id`` is "" for the bootstrap address.

    Equal by address: the bootstrap's tunnels to an address a listed node has count as that
    node's, and a node that changes its id at the same address keeps its tunnels."""

    host: str
    port: int
    node_id: str = field(default="", eq=False)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (a port 1-65535)")
    return host, int(port)


def parse_nodes(value: Any) -> tuple[Target, ...]:
    """The config message's ``nodes``, checked; BadNodeList naming the first bad entry."""
    if not isinstance(value, list):
        raise BadNodeList(f"nodes must be a list, got {type(value).__name__}")
    if len(value) > MAX_LISTED_NODES:
        raise BadNodeList(f"nodes lists {len(value)} nodes, more than {MAX_LISTED_NODES}")
    nodes: dict[str, Target] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("node_id"), str) or not entry["node_id"] \
                or not isinstance(entry.get("address"), str):
            raise BadNodeList(f"nodes[{i}] must be {{node_id, address}} strings, got {entry!r}")
        try:
            host, port = split_address(entry["address"])
        except ValueError as e:
            raise BadNodeList(f"nodes[{i}].address: {e}") from None
        nodes[entry["node_id"]] = Target(host, port, entry["node_id"])
    return tuple(sorted(nodes.values(), key=lambda t: t.node_id))


def chosen_nodes(nodes: Sequence[Target], max_nodes: int, connector_id: str) -> list[Target]:
    """The nodes this connector keeps tunnels to: all, or ``max_nodes`` of them.

    Above the bound each connector starts at its own place in the sorted list (from a hash of its
    id), so the connectors of a group together cover more nodes than the same first few.
    """
    if len(nodes) <= max_nodes:
        return list(nodes)
    start = int(hashlib.sha256(connector_id.encode()).hexdigest()[:8], 16) % len(nodes)
    return [nodes[(start + i) % len(nodes)] for i in range(max_nodes)]


def spread(targets: Sequence[Target], total: int) -> dict[Target, int]:
    """``total`` tunnels over ``targets`` as evenly as they go, the first ones taking the remainder."""
    if not targets:
        return {}
    share, extra = divmod(total, len(targets))
    return {t: share + (1 if i < extra else 0) for i, t in enumerate(targets) if share or i < extra}


def plan(tunnels: int, max_nodes: int, nodes: Sequence[Target], bootstrap: Sequence[Target],
         connector_id: str) -> dict[Target, int]:
    """How many tunnels to keep to each address.

    Without a node list (a one-node service that sends none, or before the first config):
    ``tunnels`` tunnels spread over the bootstrap addresses (several when the service's name
    resolves to several: DNS round robin). With one: ``max(tunnels, nodes)`` over the chosen
    nodes, plus one to the bootstrap unless a chosen node is reached at a bootstrap address.
    """
    chosen = chosen_nodes(nodes, max_nodes, connector_id)
    if not chosen:
        return spread(bootstrap, tunnels)
    wanted = spread(chosen, max(tunnels, len(chosen)))
    at = {(t.host, t.port) for t in chosen}
    if bootstrap and not any((b.host, b.port) in at for b in bootstrap):
        wanted[bootstrap[0]] = 1
    return wanted

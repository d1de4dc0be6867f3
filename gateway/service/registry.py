"""Which connectors are connected, through which tunnels, and which one takes the next stream."""

from __future__ import annotations

import hashlib
from typing import Any

from attrs import define, field

from gateway.errors import GatewayError


class NoConnector(GatewayError):
    """No healthy connector of the app's group is connected."""


class ConnectorWaitExpired(NoConnector):
    """A stream waited for a connector of its group to come up, and none did in time."""


def no_connector(group: str) -> NoConnector:
    """The refusal when this node holds no healthy tunnel of ``group``. On a service of several
    nodes that also happens when the group's connectors keep tunnels to other nodes only (more
    nodes than their [connector] max_nodes): the point where node-to-node forwarding would be
    needed, which this design does not do (docs/operations.md "Several nodes")."""
    return NoConnector(
        f"no healthy connector of group {group!r} is connected to this node"
        " (check `gateway connectors list` and the connectors' logs; with several nodes, a connector keeps"
        " tunnels to at most [connector] max_nodes of them)"
    )


@define
class ConnectorTunnel:
    """One authenticated tunnel of a connector, as the service sees it."""

    session: Any
    connector_id: str
    group: str
    address: str
    software_version: str = "?"
    load: dict[str, Any] = field(factory=dict)

    @property
    def healthy(self) -> bool:
        return self.session.available


@define
class Registry:
    """Live tunnels by connector; picks the least-loaded healthy connector of a group."""

    _tunnels: dict[str, list[ConnectorTunnel]] = field(factory=dict)
    _picks: int = 0
    _last_pick: dict[str, int] = field(factory=dict)

    def add(self, tunnel: ConnectorTunnel) -> None:
        self._tunnels.setdefault(tunnel.connector_id, []).append(tunnel)

    def remove(self, session: Any) -> ConnectorTunnel | None:
        for connector_id, tunnels in list(self._tunnels.items()):
            for t in tunnels:
                if t.session is session:
                    tunnels.remove(t)
                    if not tunnels:
                        del self._tunnels[connector_id]
                    return t
        return None

    def connectors(self) -> dict[str, list[ConnectorTunnel]]:
        return {cid: list(ts) for cid, ts in self._tunnels.items()}

    def tunnels_of(self, connector_id: str) -> list[ConnectorTunnel]:
        """The live tunnels of one connector (a copy; empty if it has none)."""
        return list(self._tunnels.get(connector_id, ()))

    def sessions(self) -> list[Any]:
        return [t.session for ts in self._tunnels.values() for t in ts]

    def close_connector(self, connector_id: str, code: int, message: str) -> int:
        """GO_AWAY and close every tunnel of one connector (deleted or revoked)."""
        tunnels = self._tunnels.get(connector_id, [])
        for t in list(tunnels):
            t.session.go_away(code, message)
            t.session.close()
        return len(tunnels)

    def pick(self, group: str, exclude: frozenset[str] = frozenset(), affinity: str | None = None) -> ConnectorTunnel:
        """The healthy tunnel with the fewest open streams, on the least-loaded connector.

        Load is open streams divided by the capacity a connector reports. Among equally loaded
        connectors the one picked least recently wins, so sequential traffic spreads evenly
        instead of always landing on the first.
        """
        if affinity is not None:
            return self._pick_by_affinity(group, exclude, affinity)
        best_score: tuple[float, int, int] | None = None
        best: ConnectorTunnel | None = None
        for connector_id, tunnels in self._tunnels.items():
            if connector_id in exclude:
                continue
            healthy = [t for t in tunnels if t.group == group and t.healthy]
            if not healthy:
                continue
            open_streams = sum(t.session.open_streams for t in healthy)
            capacity = max(float(healthy[0].load.get("capacity", 1.0)), 0.01)
            tunnel = min(healthy, key=lambda t: t.session.open_streams)
            score = (open_streams / capacity, tunnel.session.open_streams, self._last_pick.get(connector_id, 0))
            if best_score is None or score < best_score:
                best_score, best = score, tunnel
        if best is None:
            raise no_connector(group)
        self._picks += 1
        self._last_pick[best.connector_id] = self._picks
        return best

    def tunnel_of(self, connector_id: str, group: str) -> ConnectorTunnel | None:
        """``connector_id``'s healthy tunnel of ``group`` with the fewest open streams, or None."""
        healthy = [t for t in self._tunnels.get(connector_id, ()) if t.group == group and t.healthy]
        return min(healthy, key=lambda t: t.session.open_streams) if healthy else None

    def _pick_by_affinity(self, group: str, exclude: frozenset[str], key: str) -> ConnectorTunnel:
        """Rendezvous hashing: the same key keeps its connector while that one is healthy, and
        only the keys of a connector that leaves move when it does."""
        best: tuple[bytes, ConnectorTunnel] | None = None
        for connector_id, tunnels in self._tunnels.items():
            healthy = [t for t in tunnels if t.group == group and t.healthy]
            if connector_id in exclude or not healthy:
                continue
            weight = hashlib.sha256(f"{key}\0{connector_id}".encode()).digest()
            if best is None or weight > best[0]:
                best = (weight, min(healthy, key=lambda t: t.session.open_streams))
        if best is None:
            raise no_connector(group)
        return best[1]

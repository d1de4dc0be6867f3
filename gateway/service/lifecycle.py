"""The connector lifecycle on a service node: status in the store, group moves, the inactive sweep.

`StatusRecorder` writes what the node sees of each connector (state, version, address,
tunnels, open streams, certificate) to the store on tunnel changes at once and on heartbeats at
most once per heartbeat interval per connector; the store answers with the connector's record,
so a group changed by `gateway connectors move` reaches the live tunnels at that write.

`Sweeper` runs every `service.sweep_interval`: a connector without a tunnel on this node and
not seen for `inactive_after` is tagged inactive; one inactive for `remove_inactive_after` is
deleted (its certificates revoked).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Callable

from attrs import define, evolve, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.errors import StoreUnavailable
from gateway.store.records import ConnectorRecord, ConnectorStatus


def clock_now(clock: Any) -> datetime:
    """The clock's time as an aware UTC datetime (a Clock in tests, the reactor otherwise)."""
    return datetime.fromtimestamp(clock.seconds(), UTC)


@define
class StatusRecorder:
    """Keeps each connector's status in the store; notices group moves.

    `registry` is the node's Registry; its ConnectorTunnel entries carry `session` (whose
    `owner` is the TunnelHandler), `address`, `software_version` and `group`.
    """

    store: Any
    registry: Any
    clock: Any
    node_id: str
    heartbeat_interval: float
    log: Logger = field(factory=Logger)
    _written: dict[str, tuple[float, ConnectorStatus]] = field(factory=dict)

    def status(self, connector_id: str) -> ConnectorStatus | None:
        """What this node sees of a connector now; None if it has no tunnel here."""
        tunnels = self.registry.tunnels_of(connector_id)
        if not tunnels:
            return None
        latest = tunnels[-1]
        identity = getattr(latest.session.owner, "identity", None)
        draining = all(t.session.peer_going_away for t in tunnels)
        return ConnectorStatus(
            state="draining" if draining else "active",
            software_version=latest.software_version,
            address=latest.address,
            tunnels=sum(1 for t in tunnels if t.session.connected),
            open_streams=sum(t.session.open_streams for t in tunnels),
            node_id=self.node_id,
            cert_serial=getattr(identity, "serial_hex", None),
            cert_not_after=getattr(identity, "not_after", None),
        )

    def changed(self, connector_id: str) -> Deferred:
        """A tunnel came, went or said GO_AWAY: write now."""
        status = self.status(connector_id)
        if status is None:
            previous = self._written.pop(connector_id, None)
            if previous is None:
                return succeed(None)
            # No tunnel left: keep the last state (active or draining) until the sweeper's turn.
            return self._write(connector_id, evolve(previous[1], tunnels=0, open_streams=0), remember=False)
        return self._write(connector_id, status)

    def heartbeat(self, connector_id: str) -> Deferred | None:
        """A heartbeat on one of its tunnels: write if the last write is a heartbeat interval old."""
        status = self.status(connector_id)
        if status is None:
            return None
        last = self._written.get(connector_id)
        if last is not None and self.clock.seconds() - last[0] < self.heartbeat_interval:
            return None
        return self._write(connector_id, status)

    def _write(self, connector_id: str, status: ConnectorStatus, remember: bool = True) -> Deferred:
        if getattr(self.store, "closed", False):
            return succeed(None)  # the node is stopping; the connector's next hello writes afresh
        if remember:
            self._written[connector_id] = (self.clock.seconds(), status)
        d = self.store.record_status(connector_id, status, clock_now(self.clock))
        d.addCallback(self._check_group, connector_id)
        d.addErrback(lambda f: None if f.check(StoreUnavailable) else self.log.failure(
            "could not record the status of connector {connector_id}", f, connector_id=connector_id))
        return d

    def _check_group(self, record: ConnectorRecord | None, connector_id: str) -> None:
        if record is None or record.deleted_at is not None:
            return  # the re-check every config_interval closes its tunnels
        tunnels = self.registry.tunnels_of(connector_id)
        stale = [t for t in tunnels if t.group != record.group]
        if not stale:
            return
        self.log.info(
            "connector {connector_id} moved from group {old} to group {new}; sending it {new}'s config",
            connector_id=connector_id, old=stale[0].group, new=record.group,
        )
        for t in stale:
            t.group = record.group
            handler = t.session.owner
            handler.group = record.group
            handler.send_config()


@define
class Sweeper:
    """Tags connectors inactive and removes those inactive too long."""

    store: Any
    clock: Any
    connected: Callable[[str], bool]  # has the connector a live tunnel on this node?
    inactive_after: float
    remove_inactive_after: float
    log: Logger = field(factory=Logger)

    @inlineCallbacks
    def sweep(self):
        """One pass over every connector; fires when the changes are written."""
        now = clock_now(self.clock)
        inactive_after = timedelta(seconds=self.inactive_after)
        remove_after = timedelta(seconds=self.remove_inactive_after)
        connectors = yield self.store.list_connectors()
        for c in connectors:
            if self.connected(c.connector_id):
                continue  # the node keeps its status; a live tunnel is never inactive
            seen = c.last_seen or c.created_at
            if c.state != "inactive":
                if now - seen >= inactive_after:
                    tagged = yield self.store.mark_inactive(c.connector_id, now - inactive_after, now)
                    if tagged:
                        self.log.info(
                            "connector {connector_id} ({name}, group {group}) is inactive: no tunnel since {seen}",
                            connector_id=c.connector_id, name=c.name, group=c.group, seen=_show(seen),
                        )
                continue
            since = c.state_since or seen
            if now - since >= remove_after and not self.connected(c.connector_id):
                deleted = yield self.store.delete_connector(c.connector_id, now)
                if deleted:
                    self.log.warn(
                        "removed connector {connector_id} ({name}, group {group}): inactive since {since}"
                        " (remove_inactive_after); its certificates are revoked",
                        connector_id=c.connector_id, name=c.name, group=c.group, since=_show(since),
                    )


def _show(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class SweeperService(Service):
    """Runs a Sweeper every `interval` seconds on `clock`, the first time one interval after start."""

    name = "lifecycle-sweeper"

    def __init__(self, sweeper: Sweeper, interval: float, clock: Any) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self.clock = clock
        self._call: LoopingCall | None = None
        self._done: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._call = LoopingCall(self._sweep)
        self._call.clock = self.clock
        self._done = self._call.start(self.interval, now=False)

    def _sweep(self) -> Deferred:
        # A failed pass is logged and the next one runs as planned.
        # A store outage is logged once by the node (StoreHealth), not at every pass.
        return self.sweeper.sweep().addErrback(
            lambda f: None if f.check(StoreUnavailable) else self.sweeper.log.failure("connector sweep failed", f))

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._call is not None and self._call.running:
            self._call.stop()
        return self._done

"""The service's nodes sharing one store (issue 15): each node's row, kept fresh, and the live ones.

Every heartbeat interval a node writes its row (node_id, the tunnel address connectors should
dial, when it started, now) and reads back the nodes seen within LIVE_HEARTBEATS intervals:
those are the live nodes (``ServiceNode.nodes()``), which connectors get in their config. A
node that stops cleanly removes its row; one that dies drops out of the list once its row is
that old. Rows are compared across nodes by their wall clocks, which must agree (NTP) to well
within a heartbeat interval.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import GatewayError, StoreUnavailable
from gateway.pki import keys
from gateway.pki.ca import CA_CERT_FILE, CertificateAuthority
from gateway.service.lifecycle import clock_now
from gateway.store.records import NodeRecord

# A node whose row was not refreshed for this many heartbeat intervals is taken for gone.
LIVE_HEARTBEATS = 3


@define
class NodeRoster:
    """This node's row in the store and the live nodes as last read."""

    store: Any  # a ThreadedStore
    clock: Any
    node_id: str
    address: str
    interval: float
    # Called with the new list when the live nodes change (connectors get it in their config).
    on_change: Callable[[list[NodeRecord]], Any] = lambda nodes: None
    started: datetime | None = None
    live: list[NodeRecord] = field(factory=list)
    log: Logger = field(factory=Logger)

    def beat(self) -> Deferred:
        """Write this node's row and read the live nodes; a store failure keeps the last list."""
        if self.store.closed:
            return succeed(None)
        now = clock_now(self.clock)
        if self.started is None:
            self.started = now
        d = self.store.record_node(self.node_id, self.address, self.started, now)
        d.addCallback(lambda _: self.store.list_nodes(now - timedelta(seconds=self.interval * LIVE_HEARTBEATS)))
        return d.addCallbacks(self._take, self._unreadable)

    def leave(self) -> Deferred:
        """Remove this node's row (a clean stop), so connectors stop dialling it at once."""
        if self.store.closed or self.started is None:
            return succeed(None)
        return self.store.remove_node(self.node_id).addErrback(self._unreadable)

    def service(self) -> TimerService:
        """The timer that beats every interval (the first beat at start)."""
        timer = TimerService(self.interval, self.beat)
        timer.clock = self.clock
        timer.setName("node-heartbeat")
        return timer

    def _take(self, nodes: list[NodeRecord]) -> None:
        before = [(n.node_id, n.tunnel_address) for n in self.live]
        self.live = nodes
        if [(n.node_id, n.tunnel_address) for n in nodes] != before:
            self.log.info("service nodes: {nodes}", event="nodes_changed",
                          nodes=", ".join(f"{n.node_id} ({n.tunnel_address})" for n in nodes) or "none")
            self.on_change(nodes)

    def _unreadable(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            return   # a store outage: the node logs it once (StoreHealth)
        self.log.warn("cannot write or read the service nodes in the store ({error}); keeping the last list",
                      error=failure.getErrorMessage())


def check_shared_ca(store: Any, state_dir: Path) -> None:
    """With a store several nodes share: refuse to start with no CA, or another CA, than the one
    the store records (the first node's), since the other nodes would refuse every connector this
    one enrolled and this one theirs."""
    recorded = store.recorded_ca()
    if recorded is None:
        return   # the first node: it records its CA once it has loaded or made it
    cert_path = state_dir / CA_CERT_FILE
    if not cert_path.exists():
        raise GatewayError(
            f"{cert_path} is missing, but the nodes sharing the store {store.location} use the CA {recorded}:"
            f" copy ca.pem and ca.key from another node's state_dir into {state_dir} (ca.key mode 0600, owned"
            f" by the service's user) before starting this node; a CA of its own would refuse every connector"
            f" the other nodes enrolled")
    local = keys.fingerprint(keys.load_cert(cert_path.read_bytes()))
    if local != recorded:
        raise GatewayError(_other_ca(cert_path, local, store.location, recorded))


def claim_shared_ca(store: Any, ca: CertificateAuthority, state_dir: Path, now: datetime) -> None:
    """Record this node's CA as the one every node on the store uses (the first node's wins);
    GatewayError if another node recorded a different one first."""
    recorded = store.claim_ca(ca.fingerprint, keys.cert_pem(ca.cert).decode(), now)
    if recorded != ca.fingerprint:
        raise GatewayError(_other_ca(state_dir / CA_CERT_FILE, ca.fingerprint, store.location, recorded))


def _other_ca(cert_path: Path, local: str, location: str, recorded: str) -> str:
    return (f"this node's CA {cert_path} ({local}) is not the CA of the nodes sharing the store {location}"
            f" ({recorded}): connectors enrolled on one would be refused by the other; copy ca.pem and"
            f" ca.key from another node's state_dir into {cert_path.parent} and start this node again")


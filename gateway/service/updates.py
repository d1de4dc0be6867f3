"""The service's side of connector updates: the published release, its wheel, and the group lease.

`gateway update publish` puts the signed manifest and its wheel in ``<state_dir>/updates/``; this
module serves them to updaters over `update` streams (gateway/updater/exchange.py) on the
tunnel port, authenticated by the connector's own certificate, and hands out the one-per-group
update lease, kept in the store with the group's halt so that every node sharing the store
agrees. The service never signs anything and does not need the public key: the updaters check
the signature themselves.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from gateway.service.admin_events import AdminEvent
from gateway.tunnel.frame import ResetCode
from gateway.updater.exchange import ERROR, MAX_EVENT_TEXT, OPS, REPLY, WHEEL, encode_header
from gateway.updater.manifest import WHEEL_RE

if TYPE_CHECKING:
    from gateway.service.tunnels import TunnelHandler
    from gateway.tunnel.stream import Stream

UPDATES_DIR = "updates"
MANIFEST_FILE = "manifest.json"
WHEELS_DIR = "wheels"
# An updater asks for the lease for as long as its drain, install and health check may take;
# no lease outlives this, so an updater that died mid-update frees its group by itself.
MAX_LEASE = 3600.0
EVENT_LEVELS = ("info", "warn", "error")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}\Z")


def updates_dir(state_dir: Path) -> Path:
    return state_dir / UPDATES_DIR


def lease_refusal(group: str, connector_id: str, version: str, lease: Any, halted: str | None,
                  others: list[str], others_up: list[str]) -> str | None:
    """Why `connector_id` may not take the update lease of `group` now, or None: at most one
    connector per group updating at a time, never the last healthy one, nothing while the
    group's rollout of `version` is halted. `lease` is the group's live lease (or None);
    `others` the group's other connectors, `others_up` those of them up."""
    if halted == version:
        return (f"the update to {version} failed on a connector of group {group!r} and was rolled back;"
                " the rollout is halted until another version is published or an admin runs"
                f" `gateway update resume --group {group}`")
    if lease is not None and lease.connector_id != connector_id:
        return (f"connector {lease.connector_id} of group {group!r} is updating to {lease.version};"
                " one connector per group updates at a time")
    down = sorted(set(others) - set(others_up))
    if others and not others_up:
        return (f"this connector is the last healthy one of group {group!r} while {len(down)} other(s) are"
                f" down ({', '.join(d[:12] for d in down)}): updating it would leave the group dark; bring"
                " them back, or delete the ones gone for good (gateway connectors delete)")
    return None


def lease_expiry(now: datetime, duration: float) -> datetime:
    """When a lease asked for `duration` seconds ends: at least 1 s, at most MAX_LEASE."""
    return now + timedelta(seconds=max(1.0, min(float(duration), MAX_LEASE)))


class UpdateDesk:
    """Answers the `update` streams of authenticated connectors."""

    log = Logger()

    def __init__(self, node: Any) -> None:
        self.node = node

    def _now(self) -> datetime:
        # Leases are shared by the nodes through the store: wall-clock time, as every node reads it.
        return datetime.fromtimestamp(self.node.reactor.seconds(), UTC)

    @property
    def directory(self) -> Path:
        return updates_dir(self.node.config.service.state_dir)

    def published(self) -> dict[str, Any] | None:
        """The signed manifest as published (not checked: the updaters check it), or None."""
        try:
            data = (self.directory / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            self.log.error("{path} is not JSON; publish the release again (gateway update publish)",
                           path=str(self.directory / MANIFEST_FILE))
            return None
        return value if isinstance(value, dict) else None

    def on_stream(self, handler: TunnelHandler, stream: Stream) -> None:
        op = stream.metadata.get("op")
        if op not in OPS:
            stream.reset(ResetCode.REFUSED, f"unknown update request {op!r}; this service knows {', '.join(OPS)}")
            return
        stream.accept()
        stream.attach(_Quiet())
        ctx = {**handler.ctx, "op": op}
        d = maybeDeferred(getattr(self, f"_op_{op}"), handler, stream, stream.metadata)

        def failed(failure: Any) -> None:
            self.log.failure("update request {op} from connector {connector_id} failed", failure, **ctx)
            self._answer(stream, {"type": ERROR, "message": "internal error on the service; see its log"})

        d.addErrback(failed)

    def _answer(self, stream: Stream, message: dict[str, Any]) -> None:
        if not stream.closed:
            stream.write(encode_header(message))
            stream.loseConnection()

    # -- the requests ------------------------------------------------------------------------

    def _op_manifest(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> Deferred:
        return self.node.store.update_halt(handler.group).addCallback(
            lambda halted: self._answer(stream, {"type": REPLY, "manifest": self.published(), "halted": halted}))

    def _op_wheel(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> None:
        name = meta.get("name")
        published = self.published() or {}
        wanted = (published.get("manifest") or {}).get("wheel") if isinstance(published.get("manifest"), dict) else None
        if not isinstance(name, str) or not WHEEL_RE.match(name) or name != wanted:
            self._answer(stream, {"type": ERROR, "message": f"{name!r} is not the published wheel ({wanted!r})"})
            return
        path = self.directory / WHEELS_DIR / name
        try:
            f = open(path, "rb")
        except OSError as e:
            self.log.error("connector {connector_id} asked for the published wheel {name}, which the service"
                           " cannot read: {error}; publish it again (gateway update publish)",
                           name=name, error=e.strerror or str(e), **handler.ctx)
            self._answer(stream, {"type": ERROR, "message": f"the service cannot read the wheel {name}"
                                                            f" ({e.strerror or e}); publish it again"})
            return
        size = path.stat().st_size
        self.log.info("sending wheel {name} ({size} bytes) to connector {connector_id}", name=name, size=size,
                      **handler.ctx)
        stream.write(encode_header({"type": WHEEL, "name": name, "size": size}))
        _FileProducer(f, stream).start()

    def _op_lease(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> Deferred:
        version = str(meta.get("version", ""))
        duration = meta.get("duration", 600)
        if not _VERSION_RE.match(version) or isinstance(duration, bool) or not isinstance(duration, (int, float)):
            self._answer(stream, {"type": ERROR, "message": "a lease request needs a version and a duration"})
            return None
        group, connector_id = handler.group, handler.identity.connector_id

        def decide(records: list[Any]) -> Deferred:
            others = [r.connector_id for r in records
                      if r.group == group and r.deleted_at is None and r.connector_id != connector_id]
            up = [c for c in others if any(t.healthy for t in self.node.registry.tunnels_of(c))]
            now = self._now()
            return self.node.store.acquire_update_lease(
                group, connector_id, version, lease_expiry(now, duration), now,
                lambda lease, halted: lease_refusal(group, connector_id, version, lease, halted, others, up))

        def answer(refusal: str | None) -> None:
            if refusal is None:
                self.log.info("connector {connector_id} (group {group}) may update to {version} now",
                              group=group, version=version, **handler.ctx)
            else:
                self.log.info("update lease for connector {connector_id} refused: {reason}", reason=refusal,
                              **handler.ctx)
            self._answer(stream, {"type": REPLY, "granted": refusal is None, "reason": refusal})

        return self.node.store.list_connectors().addCallback(decide).addCallback(answer)

    def _op_release(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> Deferred:
        failed = meta.get("outcome") == "failed"
        version = str(meta.get("version", ""))
        if failed and not _VERSION_RE.match(version):
            self._answer(stream, {"type": ERROR, "message": "a failed update's release needs its version"})
            return None

        def released(_: Any) -> None:
            if failed:
                self.log.warn("update of connector {connector_id} to {version} failed and was rolled back; the"
                              " rollout of {version} to group {group} is halted (on every node) until another"
                              " version is published or an admin runs gateway update resume --group {group}",
                              version=version, group=handler.group, **handler.ctx)
            self._answer(stream, {"type": REPLY, "released": True})

        d = self.node.store.release_update_lease(handler.group, handler.identity.connector_id,
                                                 version if failed else None, self._now())
        return d.addCallback(released)

    def _op_health(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> None:
        tunnels = [t for t in self.node.registry.tunnels_of(handler.identity.connector_id) if t.healthy]
        versions = sorted({t.software_version for t in tunnels})
        self._answer(stream, {"type": REPLY, "active": bool(tunnels), "tunnels": len(tunnels),
                              "versions": versions})

    def _op_event(self, handler: TunnelHandler, stream: Stream, meta: dict[str, Any]) -> None:
        level = meta.get("level") if meta.get("level") in EVENT_LEVELS else "info"
        text = str(meta.get("text", ""))[:MAX_EVENT_TEXT]
        event = AdminEvent(time=time.time(), source=handler.identity.connector_id, level=level,
                           text=f"updater: {text}")
        events = getattr(self.node, "admin_events", None)
        if events is not None:
            events.add(event)
        if hasattr(self.node, "connector_admin_event"):
            # the node's own admin log, with the connector as the source
            self.node.connector_admin_event(event, handler.identity.connector_id)
        self.log.info("updater of connector {connector_id} ({event_level}): {text}", event_level=level, text=text,
                      **handler.ctx)
        self._answer(stream, {"type": REPLY, "recorded": True})


class _FileProducer:
    """Writes a file to a stream as fast as the stream's flow control lets it (a push producer:
    the stream pauses it while 256 KiB wait to be sent), then FIN."""

    CHUNK = 64 * 1024

    def __init__(self, f: Any, stream: Stream) -> None:
        self.f = f
        self.stream = stream
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.stream.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done:
            if self.stream.closed:
                self.stopProducing()
                return
            chunk = self.f.read(self.CHUNK)
            if not chunk:
                self.stopProducing()
                self.stream.loseConnection()
                return
            self.stream.write(chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        if not self.done:
            self.done = True
            self.f.close()
            self.stream.unregisterProducer()


class _Quiet:
    """The service reads nothing on an update stream: the request is in the SYN metadata."""

    transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        pass

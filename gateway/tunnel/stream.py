"""One stream on a tunnel, shaped like any Twisted transport.

A Stream is an ITransport for the protocol attached to it, an IPushProducer for whoever
consumes what it receives (pausing it withholds window credit from the peer, so the peer
stops sending: memory per stream stays bounded by the window), and an IConsumer for whoever
produces what it sends (they are paused while data waits for window or for the tunnel).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.tunnel import frame
from gateway.tunnel.frame import BASE_WINDOW, ResetCode

if TYPE_CHECKING:
    from gateway.tunnel.session import TunnelSession


class StreamReset(GatewayError):
    """The peer (or we) reset the stream; `code` is a ResetCode, `reason` a sentence."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        try:
            name = ResetCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"stream reset ({name}): {reason}")


# A stream pauses its producer when this much waits to be sent, and resumes it below the
# low mark; together with the window this bounds a stream's memory on both ends.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


@implementer(ITransport, IPushProducer, IConsumer)
class Stream:
    def __init__(self, session: TunnelSession, stream_id: int, metadata: dict[str, Any]) -> None:
        self.session = session
        self.id = stream_id
        self.metadata = metadata
        self.protocol: Any = None
        self.disconnecting = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.close_reason: Failure | None = None

        self.send_window = BASE_WINDOW
        self._pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self._fin_wanted = False
        self.fin_sent = False
        self.fin_received = False
        self._producer: Any = None
        self._producer_streaming = True
        self._producer_paused = False

        self._recv_credit = BASE_WINDOW  # bytes the peer may still send us
        self.target_window = BASE_WINDOW
        self._consumed = 0  # delivered to our protocol, not yet credited back
        self._last_credit_at = 0.0
        self._reading_paused = False
        self._inbox: list[bytes] = []

    def __repr__(self) -> str:
        return f"<Stream {self.id} on {self.session.tunnel_id}>"

    # -- attaching a protocol ------------------------------------------------------------

    def attach(self, protocol: Any) -> None:
        """Connect `protocol` to this stream; anything received before is delivered now."""
        self.protocol = protocol
        protocol.makeConnection(self)
        inbox, self._inbox = self._inbox, []
        for chunk in inbox:
            if self.protocol is None:
                break
            self._deliver(chunk)
        if self.fin_received and not self.closed:
            self._deliver_fin()
        if self.closed and self.close_reason is not None:
            self._notify_lost()

    # -- ITransport ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self._fin_wanted or not data:
            return
        self.bytes_out += len(data)
        session = self.session
        if (
            not self._pending
            and len(data) <= self.send_window
            and len(data) <= session.max_frame
            and session.can_write_now()
        ):
            self.send_window -= len(data)
            session.write_frame(frame.data(self.id, data))
            return
        self._pending.append(data)
        self.pending_bytes += len(data)
        session.schedule(self)
        if self.pending_bytes >= HIGH_WATER:
            self._pause_producer()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send FIN once everything queued has gone; the stream ends when the peer's FIN came."""
        if self.closed or self.disconnecting:
            return
        self.disconnecting = True
        self.loseWriteConnection()

    def loseWriteConnection(self) -> None:
        if self.closed or self._fin_wanted:
            return
        self._fin_wanted = True
        if not self._pending:
            self._send_fin()

    def abortConnection(self) -> None:
        self.reset(ResetCode.CANCELLED, "aborted by the local end")

    def getPeer(self):
        return self.session.transport.getPeer()

    def getHost(self):
        return self.session.transport.getHost()

    # -- IConsumer (what we send) --------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._producer_streaming = streaming
        self._producer_paused = False
        if self.pending_bytes >= HIGH_WATER:
            self._pause_producer()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def _pause_producer(self) -> None:
        if self._producer is not None and self._producer_streaming and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _drained(self) -> None:
        """Called by the session after it took bytes from this stream."""
        if self._producer is not None and self.pending_bytes < LOW_WATER:
            if self._producer_streaming:
                if self._producer_paused:
                    self._producer_paused = False
                    self._producer.resumeProducing()
            elif not self._pending:
                self._producer.resumeProducing()
        if self._fin_wanted and not self._pending and not self.fin_sent:
            self._send_fin()

    def take(self, limit: int) -> bytes:
        """Remove up to `limit` bytes (and the send window) of queued data for one frame."""
        limit = min(limit, self.send_window, self.pending_bytes)
        if limit <= 0:
            return b""
        pending = self._pending
        first = pending[0]
        if len(first) == limit:
            chunk = pending.popleft()
        elif len(first) > limit:
            chunk = first[:limit]
            pending[0] = first[limit:]
        else:
            parts = []
            need = limit
            while need:
                head = pending[0]
                if len(head) <= need:
                    parts.append(pending.popleft())
                    need -= len(head)
                else:
                    parts.append(head[:need])
                    pending[0] = head[need:]
                    need = 0
            chunk = b"".join(parts)
        self.pending_bytes -= limit
        self.send_window -= limit
        return chunk

    @property
    def sendable(self) -> bool:
        return bool(self._pending) and self.send_window > 0

    # -- IPushProducer (what we receive) -------------------------------------------------

    def pauseProducing(self) -> None:
        self._reading_paused = True

    def resumeProducing(self) -> None:
        self._reading_paused = False
        self._maybe_credit()

    def stopProducing(self) -> None:
        self.reset(ResetCode.CANCELLED, "the local reader stopped")

    # -- frames from the session ---------------------------------------------------------

    def frame_data(self, payload: bytes) -> None:
        size = len(payload)
        if size > self._recv_credit:
            self.reset(
                ResetCode.FLOW_CONTROL,
                f"peer sent {size} bytes with only {self._recv_credit} bytes of window",
            )
            return
        self._recv_credit -= size
        self.bytes_in += size
        if self.protocol is None:
            self._inbox.append(payload)
            return
        self._deliver(payload)

    def _deliver(self, payload: bytes) -> None:
        try:
            self.protocol.dataReceived(payload)
        except Exception as e:
            # A faulty protocol (a plugin's, say) costs its own stream, never the tunnel.
            self.session.log.failure("stream {stream_id}: its protocol failed", stream_id=self.id,
                                     **self.session.log_context)
            self.reset(ResetCode.INTERNAL_ERROR, f"the stream's protocol failed: {e!r}")
            return
        self._consumed += len(payload)
        self._maybe_credit()

    def _maybe_credit(self) -> None:
        if self._reading_paused or self.closed or self.fin_received:
            return
        if self._consumed < self.target_window // 2:
            return
        now = self.session.clock.seconds()
        grow = 0
        # The reader consumed half a window within a few round trips: the window, not the
        # reader, limits throughput, so double it (bounded), as TCP and QUIC autotuning do.
        if (
            now - self._last_credit_at < 4 * self.session.rtt
            and self.target_window < self.session.max_window
        ):
            new_target = min(self.target_window * 2, self.session.max_window)
            grow = new_target - self.target_window
            self.target_window = new_target
        self._last_credit_at = now
        delta = self._consumed + grow
        self._consumed = 0
        self._recv_credit += delta
        self.session.write_frame(frame.window_update(self.id, delta))

    def frame_window(self, delta: int) -> None:
        self.send_window += delta
        if self._pending:
            self.session.schedule(self)

    def frame_fin(self) -> None:
        if self.fin_received:
            return
        self.fin_received = True
        if self.protocol is not None:
            self._deliver_fin()

    def _deliver_fin(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()
        if self.fin_sent:
            self._close(Failure(ConnectionDone("stream closed")))

    def frame_rst(self, code: int, reason: str) -> None:
        self._close(Failure(StreamReset(code, reason)))

    # -- ending --------------------------------------------------------------------------

    def accept(self) -> None:
        """Tell the opener the stream is established (ACK), granting our initial window."""
        extra = self.session.initial_window - BASE_WINDOW
        if extra > 0:
            self._recv_credit += extra
            self.target_window = self.session.initial_window
        self.session.write_frame(frame.window_update(self.id, max(extra, 0), frame.Flag.ACK))

    def reset(self, code: int, reason: str) -> None:
        """Send RST with a reason and end the stream at once; queued data is dropped."""
        if self.closed:
            return
        self.session.write_frame(frame.rst(self.id, code, reason))
        self._close(Failure(StreamReset(code, reason)))

    def _send_fin(self) -> None:
        self.fin_sent = True
        self.session.write_frame(frame.fin(self.id))
        if self.fin_received:
            self._close(Failure(ConnectionDone("stream closed")))

    def _close(self, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._pending.clear()
        self.pending_bytes = 0
        self.session.forget(self, reason)
        if self.protocol is not None:
            self._notify_lost()

    def _notify_lost(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(self.close_reason)

    def tunnel_lost(self, reason: str) -> None:
        self._close(Failure(ConnectionLost(reason)))


def is_reset(reason: Failure) -> bool:
    return reason.check(StreamReset, ConnectionAborted, ConnectionLost) is not None

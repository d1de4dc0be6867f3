"""A tunnel session: many streams multiplexed over one (TLS) connection.

Scheduling: a stream writes straight through while the tunnel is writable and nobody else
waits. Otherwise its data queues and the stream joins a round-robin ring; when the transport
asks for more (resumeProducing), each ready stream in turn gets at most one frame, so a bulk
stream cannot starve a chatty one. The session is the TLS transport's producer: a full socket
pauses the session, queues grow, and each stream pauses its own producer at its high mark.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.errors import GatewayError, ProtocolError
from gateway.tunnel import frame
from gateway.tunnel.frame import BASE_WINDOW, GoAwayCode, ResetCode
from gateway.tunnel.splice import tune_socket
from gateway.tunnel.stream import Stream, StreamReset


@frozen
class TunnelSettings:
    ping_interval: float = 10.0
    initial_window: int = BASE_WINDOW
    max_window: int = 16 * 1024 * 1024
    max_frame: int = 64 * 1024
    max_streams: int = 20000

    @classmethod
    def from_config(cls, tunnel: Any) -> TunnelSettings:
        return cls(
            ping_interval=tunnel.ping_interval,
            initial_window=tunnel.initial_window,
            max_window=tunnel.max_window,
            max_frame=tunnel.max_frame,
            max_streams=tunnel.max_streams,
        )


class TunnelClosed(GatewayError):
    """The tunnel is gone or going away; no stream can be opened on it."""


_tunnel_ids = itertools.count(1)
MAX_STREAM_ID = 2**32 - 3
# PING replies held while the peer does not read what we send (the transport paused us);
# one more PING than this is a protocol error: a peer that only pings and never reads would
# otherwise make its replies queue without limit. A live peer sends one PING an interval.
MAX_OWED_PONGS = 16


@implementer(IPushProducer, IHandshakeListener)
class TunnelSession(Protocol):
    """Both ends of a tunnel. The connector is the client (odd stream ids)."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        settings: TunnelSettings,
        is_client: bool,
        on_stream: Callable[[Stream], None] | None = None,
        tunnel_id: str | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.is_client = is_client
        self.on_stream = on_stream
        self.owner: Any = None  # the TunnelHandler (service) or TunnelClient (connector)
        self.on_handshake: Callable[[TunnelSession], None] | None = None
        self.on_lost: list[Callable[[TunnelSession, Failure], None]] = []
        self.on_stream_closed: Callable[[Stream, Failure], None] | None = None
        self.tunnel_id = tunnel_id or f"t{next(_tunnel_ids)}"
        self.log_context: dict[str, Any] = {"tunnel_id": self.tunnel_id}
        self.max_frame = settings.max_frame
        self.max_window = settings.max_window
        self.initial_window = settings.initial_window
        self.streams: dict[int, Stream] = {}
        self._opening: dict[int, Deferred] = {}
        self._next_id = 1 if is_client else 2
        self._highest_peer_id = 0
        self._control_streams = 0
        self._decoder = frame.FrameDecoder()
        self._ready: deque[Stream] = deque()
        self._scheduled: set[int] = set()
        self.paused = False
        self.connected = False
        self.going_away = False  # we said GO_AWAY: refuse new inbound streams
        self.peer_going_away = False  # they said GO_AWAY: open no new streams on this tunnel
        self.go_away_reason: tuple[int, str] | None = None
        self.rtt = 0.05  # seconds, until a PING measures it
        self._last_received = 0.0
        self._ping_ids = itertools.count(1)
        self._pings: dict[int, float] = {}
        self._ping_call: Any = None
        self._last_ping_sent = 0.0
        self._owed_pongs: list[int] = []
        self._idle_waiters: list[Deferred] = []
        self._failed = False
        self.on_go_away: list[Callable[[TunnelSession, int, str], None]] = []
        self.bytes_in = 0
        self.bytes_out = 0

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self._last_received = self.clock.seconds()
        tune_socket(getattr(self.transport, "transport", self.transport))
        self.transport.registerProducer(self, True)
        self._last_ping_sent = self.clock.seconds()
        self._ping_call = self.clock.callLater(self.settings.ping_interval / 2, self._keepalive)

    def handshakeCompleted(self) -> None:
        if self.on_handshake is not None:
            self.on_handshake(self)

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        why = "tunnel lost"
        if self.go_away_reason is not None and self.go_away_reason[0] != GoAwayCode.NORMAL:
            why = f"tunnel closed by peer: {self.go_away_reason[1]}"
        for d in list(self._opening.values()):
            d.errback(TunnelClosed(why))
        self._opening.clear()
        for stream in list(self.streams.values()):
            stream.tunnel_lost(why)
        for callback in self.on_lost:
            callback(self, reason)
        self._fire_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self._last_received = self.clock.seconds()
        self.bytes_in += len(data)
        try:
            frames = self._decoder.feed(data)
            for f in frames:
                self._handle(f)
                if not self.connected or self._failed:
                    return
        except ProtocolError as e:
            self.fail(e.code, e.message)

    def close(self) -> None:
        """Close the tunnel cleanly (TLS close_notify) once queued bytes are out.

        The session must stop being the TLS transport's producer first: TLSMemoryBIOProtocol
        defers loseConnection until its producer is unregistered, so the close would never happen.
        """
        if self.transport is None or not self.connected:
            return
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def fail(self, code: int, message: str) -> None:
        """End the tunnel for a protocol violation: say why in GO_AWAY, then close.

        Everything the peer sends afterwards is ignored: one violation, one log line.
        """
        if self._failed:
            return
        self._failed = True
        self.log.error(
            "tunnel {tunnel_id} protocol error, closing: {message}",
            message=message, code=code, **self.log_context,
        )
        self.going_away = True
        self.write_frame(frame.go_away(code, message))
        self.close()

    # -- frames in -----------------------------------------------------------------------

    def _handle(self, f: frame.Frame) -> None:
        ftype = f.type
        if ftype == 0:  # DATA
            self._handle_data(f)
        elif ftype == 1:  # WINDOW_UPDATE
            self._handle_window(f)
        elif ftype == 2:  # PING
            self._handle_ping(f)
        else:
            self._handle_go_away(f)

    def _handle_data(self, f: frame.Frame) -> None:
        flags = f.flags
        sid = f.stream_id
        if flags & frame.SYN:
            self._accept_syn(sid, f.payload)
            return
        stream = self.streams.get(sid)
        if stream is None:
            # Frames for a stream already closed cross our RST/FIN in flight: drop them.
            # Frames for a stream never opened mean the peer is broken.
            if sid == 0 or (self._is_peer_id(sid) and sid > self._highest_peer_id) or (
                not self._is_peer_id(sid) and sid >= self._next_id
            ):
                raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"DATA for stream {sid}, which was never opened")
            return
        if flags & frame.RST:
            code, reason = frame.decode_reason(f.payload)
            opening = self._opening.pop(sid, None)
            if opening is not None:
                stream.closed = True
                self.forget(stream, Failure(StreamReset(code, reason)))
                opening.errback(StreamReset(code, reason))
            else:
                stream.frame_rst(code, reason)
            return
        if f.payload:
            stream.frame_data(f.payload)
        if flags & frame.FIN:
            stream.frame_fin()

    def _accept_syn(self, sid: int, payload: bytes) -> None:
        if not self._is_peer_id(sid):
            raise ProtocolError(
                GoAwayCode.PROTOCOL_ERROR,
                f"SYN for stream {sid}: the {'service' if self.is_client else 'connector'}"
                f" must use {'even' if self.is_client else 'odd'} stream ids",
            )
        if sid <= self._highest_peer_id:
            raise ProtocolError(GoAwayCode.PROTOCOL_ERROR, f"SYN for stream {sid}, which was already used")
        self._highest_peer_id = sid
        if len(payload) > frame.MAX_METADATA:
            raise ProtocolError(
                GoAwayCode.PROTOCOL_ERROR,
                f"SYN metadata of {len(payload)} bytes exceeds the limit of {frame.MAX_METADATA}",
            )
        metadata = frame.decode_metadata(payload)
        stream = Stream(self, sid, metadata)
        if self.going_away:
            self.write_frame(frame.rst(sid, ResetCode.GOING_AWAY, "this end is going away"))
            return
        if len(self.streams) >= self.settings.max_streams:
            self.write_frame(
                frame.rst(sid, ResetCode.TOO_MANY_STREAMS,
                          f"tunnel has {len(self.streams)} streams, the limit is {self.settings.max_streams}")
            )
            return
        self._add(stream)
        if self.on_stream is None:
            stream.reset(ResetCode.REFUSED, "this end accepts no streams")
            return
        try:
            self.on_stream(stream)
        except Exception as e:
            self.log.failure("stream {stream_id} handler failed", stream_id=sid, **self.log_context)
            stream.reset(ResetCode.INTERNAL_ERROR, f"internal error handling the stream: {e!r}")

    def _handle_window(self, f: frame.Frame) -> None:
        stream = self.streams.get(f.stream_id)
        if stream is None:
            return
        flags = f.flags
        if flags & frame.ACK:
            opening = self._opening.pop(f.stream_id, None)
            if f.value:
                stream.frame_window(f.value)
            if opening is not None:
                opening.callback(stream)
        elif f.value:
            stream.frame_window(f.value)
        if flags & frame.RST:
            stream.frame_rst(ResetCode.CANCELLED, "reset by peer")
        elif flags & frame.FIN:
            stream.frame_fin()

    def _handle_ping(self, f: frame.Frame) -> None:
        if f.flags & frame.SYN:
            if self.paused:
                self._owe_pong(f.value)
            else:
                self.write_frame(frame.ping(f.value, ack=True))
        elif f.flags & frame.ACK:
            sent = self._pings.pop(f.value, None)
            if sent is not None:
                sample = max(self.clock.seconds() - sent, 0.0001)
                self.rtt = sample if self.rtt == 0.05 else 0.875 * self.rtt + 0.125 * sample

    def _owe_pong(self, opaque: int) -> None:
        owed = self._owed_pongs
        if len(owed) >= MAX_OWED_PONGS:
            raise ProtocolError(
                GoAwayCode.PROTOCOL_ERROR,
                f"{len(owed) + 1} PINGs while not reading our replies; the limit is {MAX_OWED_PONGS}",
            )
        owed.append(opaque)

    def _handle_go_away(self, f: frame.Frame) -> None:
        code, message = frame.decode_reason(f.payload)
        self.peer_going_away = True
        self.go_away_reason = (code, message)
        if code == GoAwayCode.NORMAL:
            self.log.info("tunnel {tunnel_id}: peer is draining: {message}", message=message, **self.log_context)
        else:
            self.log.error(
                "tunnel {tunnel_id} closed by peer ({code_name}): {message}",
                code_name=_code_name(code), message=message, **self.log_context,
            )
            self.close()
        for callback in self.on_go_away:
            callback(self, code, message)

    def _is_peer_id(self, sid: int) -> bool:
        return sid != 0 and (sid % 2 == 0) == self.is_client

    # -- opening streams -----------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.connected and not self.peer_going_away and not self.going_away

    def open_stream(self, metadata: dict[str, Any], timeout: float | None = None) -> Deferred:
        """Open a stream; fires with the Stream once the peer ACKs, or fails with StreamReset.

        With `timeout`, a peer that neither accepts nor refuses in time gets an RST (TIMEOUT)
        and the Deferred fails with StreamReset.
        """
        if not self.available:
            raise TunnelClosed(f"tunnel {self.tunnel_id} is not accepting new streams")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            # Ids are never reused: a tunnel that ran out drains and the connector reconnects.
            self.go_away(GoAwayCode.NORMAL, "stream ids exhausted; open a new tunnel")
            raise TunnelClosed(f"tunnel {self.tunnel_id} has used all its stream ids")
        self._next_id += 2
        block = frame.syn(sid, metadata)
        stream = Stream(self, sid, metadata)
        self._add(stream)
        d = Deferred()
        self._opening[sid] = d
        if timeout is not None:
            call = self.clock.callLater(timeout, self._open_timed_out, stream, timeout)
            d.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        self.write_frame(block)
        extra = self.initial_window - BASE_WINDOW
        if extra > 0:
            stream._recv_credit += extra
            stream.target_window = self.initial_window
            self.write_frame(frame.window_update(sid, extra))
        return d

    def _open_timed_out(self, stream: Stream, timeout: float) -> None:
        opening = self._opening.pop(stream.id, None)
        if opening is None:
            return
        reason = f"the peer did not accept or refuse the stream within {timeout:g}s"
        self.write_frame(frame.rst(stream.id, ResetCode.TIMEOUT, reason))
        stream.closed = True
        self.forget(stream, Failure(StreamReset(ResetCode.TIMEOUT, reason)))
        opening.errback(StreamReset(ResetCode.TIMEOUT, reason))

    # -- frames out ----------------------------------------------------------------------

    def can_write_now(self) -> bool:
        return not self.paused and not self._ready and self.connected

    def write_frame(self, data: bytes) -> None:
        if self.connected:
            self.bytes_out += len(data)
            self.transport.write(data)

    def schedule(self, stream: Stream) -> None:
        if stream.id not in self._scheduled and stream.sendable:
            self._scheduled.add(stream.id)
            self._ready.append(stream)
        if not self.paused:
            self._flush()

    def _flush(self) -> None:
        ready = self._ready
        max_frame = self.max_frame
        while ready and not self.paused and self.connected:
            stream = ready.popleft()
            if stream.closed:
                self._scheduled.discard(stream.id)
                continue
            chunk = stream.take(max_frame)
            if chunk:
                self.write_frame(frame.data(stream.id, chunk))
            if stream.sendable:
                ready.append(stream)
            else:
                self._scheduled.discard(stream.id)
            stream._drained()

    def _add(self, stream: Stream) -> None:
        self.streams[stream.id] = stream
        if stream.metadata.get("kind") == "control":
            self._control_streams += 1

    def forget(self, stream: Stream, reason: Failure) -> None:
        if self.streams.pop(stream.id, None) is not None and stream.metadata.get("kind") == "control":
            self._control_streams -= 1
        self._scheduled.discard(stream.id)
        if self.on_stream_closed is not None:
            self.on_stream_closed(stream, reason)
        if self._idle_waiters and self.open_streams == 0:
            self._fire_idle()

    # -- IPushProducer: the transport under us ---------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._owed_pongs:
            owed, self._owed_pongs = self._owed_pongs, []
            for opaque in owed:
                self.write_frame(frame.ping(opaque, ack=True))
        self._flush()

    def stopProducing(self) -> None:
        self.paused = True

    # -- keep-alive and drain ------------------------------------------------------------

    def _keepalive(self) -> None:
        """Runs every half interval: PING once an interval, and call the tunnel dead once
        1.5 intervals passed without a byte (both ends PING, so a live peer is never that
        quiet); a dead tunnel is therefore noticed within two intervals."""
        interval = self.settings.ping_interval
        now = self.clock.seconds()
        silent = now - self._last_received
        if silent >= 1.5 * interval:
            self.log.warn(
                "tunnel {tunnel_id} dead: nothing received for {silent:.1f}s, closing",
                silent=silent, **self.log_context,
            )
            self.transport.abortConnection()
            return
        if now - self._last_ping_sent >= interval - 1e-9:
            self._last_ping_sent = now
            opaque = next(self._ping_ids) & 0xFFFFFFFF
            self._pings = {k: v for k, v in self._pings.items() if now - v < 4 * interval}
            self._pings[opaque] = now
            self.write_frame(frame.ping(opaque))
        self._ping_call = self.clock.callLater(interval / 2, self._keepalive)

    def go_away(self, code: int = GoAwayCode.NORMAL, message: str = "draining") -> None:
        """Tell the peer to open no more streams here; open ones carry on.

        A stream's protocol may define ``tunnel_draining()``: it is called here, after the
        GO_AWAY is written, so a protocol that sits between requests (an HTTP stream kept for a
        client connection's next request) ends its stream now rather than hold the drain open.
        """
        if self.going_away:
            return
        self.going_away = True
        self.write_frame(frame.go_away(code, message))
        for stream in list(self.streams.values()):
            draining = getattr(stream.protocol, "tunnel_draining", None)
            if draining is None or stream.closed:
                continue
            try:
                draining()
            except Exception:
                self.log.failure("stream {stream_id}: its protocol failed to drain", stream_id=stream.id,
                                 **self.log_context)

    @property
    def open_streams(self) -> int:
        # Counted, not scanned: the router reads this for every tunnel on every new stream.
        return len(self.streams) - self._control_streams

    def wait_idle(self) -> Deferred:
        """Fires when no stream but the control stream is open (or the tunnel is gone)."""
        if self.open_streams == 0 or not self.connected:
            return succeed(None)
        d = Deferred()
        self._idle_waiters.append(d)
        return d

    def _fire_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)


def _code_name(code: int) -> str:
    try:
        return GoAwayCode(code).name
    except ValueError:
        return str(code)

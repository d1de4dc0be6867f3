"""What both ends of a UDP flow share: datagrams onto its stream, and its idle timeout.

A UDP flow is one stream of length-prefixed datagrams (gateway.tunnel.datagrams). The user's
client (`gateway access socks`) and the connector (the tcp plugin's ``udp`` handler) each put
datagrams onto such a stream and close the flow when nothing went either way for a while.
"""

from __future__ import annotations

from typing import Any, Callable

from gateway.tunnel.datagrams import DatagramQueue, encode_datagram

# Datagrams that may wait per flow while its stream cannot take more (or is not open yet).
QUEUE_DATAGRAMS = 256
QUEUE_BYTES = 256 * 1024


class DatagramSender:
    """Datagrams onto a stream, as its producer: written at once while the stream takes them,
    else held in a bounded queue that drops the oldest (counted) until it resumes us.

    Before ``attach`` (the stream is not open yet) everything waits in the queue.
    ``on_stop`` is called when the stream stops producing for good.
    """

    def __init__(self, max_datagrams: int = QUEUE_DATAGRAMS, max_bytes: int = QUEUE_BYTES,
                 on_stop: Callable[[], Any] | None = None) -> None:
        self.queue = DatagramQueue(max_datagrams, max_bytes)
        self.stream: Any = None
        self.paused = True
        self.sent = 0
        self.on_stop = on_stop

    def attach(self, stream: Any) -> None:
        self.stream = stream
        stream.registerProducer(self, True)
        self.resumeProducing()

    def send(self, datagram: bytes) -> None:
        if self.paused:
            self.queue.push(datagram)
        else:
            self._write(datagram)

    def _write(self, datagram: bytes) -> None:
        self.sent += 1
        self.stream.write(encode_datagram(datagram))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and self.stream is not None and not self.stream.closed:
            self._write(self.queue.pop())

    def stopProducing(self) -> None:
        self.paused = True
        if self.on_stop is not None:
            self.on_stop()

    def close(self) -> None:
        """Nothing more goes out: forget what waits and let go of the stream."""
        self.paused = True
        self.queue.clear()
        if self.stream is not None:
            self.stream.unregisterProducer()


class IdleTimer:
    """Calls ``on_idle()`` once ``touch()`` was not called for ``idle`` seconds.

    A datagram only notes the time; the one timer looks again when the flow would next be idle,
    so a busy flow costs no timer operation per datagram.
    """

    def __init__(self, clock: Any, idle: float, on_idle: Callable[[], Any]) -> None:
        self.clock = clock
        self.idle = idle
        self.on_idle = on_idle
        self.active_at = clock.seconds()
        self._call: Any = clock.callLater(idle, self._check)

    def touch(self) -> None:
        self.active_at = self.clock.seconds()

    def _check(self) -> None:
        left = self.active_at + self.idle - self.clock.seconds()
        if left > 0:
            self._call = self.clock.callLater(left, self._check)
            return
        self._call = None
        self.on_idle()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

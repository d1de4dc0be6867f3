"""A connector's admin events on their way to its service (control message admin_event).

Rate-bounded here (a token bucket: ``rate`` a second, bursts of ``burst``), so a connector in
trouble cannot flood its service's control channel; what is over the rate is counted and said
in one event once the bucket refills. Events made while no tunnel is up (the tunnel loss
itself, say) wait in a bounded queue, newest kept, and go once one is.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from attrs import define, field

from gateway.control import messages as m

RATE = 5.0
BURST = 20
QUEUE = 50
MAX_TEXT = 1000


def admin_message(record: dict[str, Any]) -> dict[str, Any]:
    return {"type": m.ADMIN_EVENT, "time": record.get("time"), "level": record.get("level", "info"),
            "event": record.get("event", ""), "text": str(record.get("text", ""))[:MAX_TEXT]}


@define
class AdminEventForwarder:
    """``send(message) -> bool`` puts a control message on a live tunnel (False: none is up)."""

    clock: Any
    send: Callable[[dict[str, Any]], bool]
    rate: float = RATE
    burst: int = BURST
    waiting: deque = field(factory=lambda: deque(maxlen=QUEUE))
    dropped: int = 0
    _tokens: float = field(init=False, default=0.0)
    _filled_at: float | None = field(init=False, default=None)

    def report(self, record: dict[str, Any]) -> None:
        """An admin log record to forward (the admin log's listener)."""
        if not self._take():
            self.dropped += 1
            return
        if self.dropped:
            self._queue({"type": m.ADMIN_EVENT, "time": record.get("time"), "level": "warn", "event": "dropped",
                         "text": f"{self.dropped} admin events of this connector were not sent"
                                 f" (more than {self.rate:g} a second); its own admin log has them"})
            self.dropped = 0
        self._queue(admin_message(record))

    def flush(self) -> None:
        """Send what waited for a tunnel (call when one comes up)."""
        while self.waiting:
            if not self.send(self.waiting[0]):
                return
            self.waiting.popleft()

    def _queue(self, message: dict[str, Any]) -> None:
        self.waiting.append(message)
        self.flush()

    def _take(self) -> bool:
        now = self.clock.seconds()
        if self._filled_at is None:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

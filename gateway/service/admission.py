"""What the tunnel port lets unauthenticated peers do: per-address counts, rates, and quiet logs.

Anyone can reach the tunnel port, so everything a peer can make us do before it proved to be
a connector is bounded per source address (IPv6 per /64, the block one subscriber usually
gets), and the lines we log about refusals are throttled, so a flood costs one line a second
rather than one per socket. No I/O: the clock is injected.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from attrs import define, field
from twisted.logger import Logger


def address_key(host: str) -> str:
    """The unit limits count by: an IPv4 address, or the /64 of an IPv6 one (v4-mapped is IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@define
class AddressCounter:
    """How many connections each address holds now, with a ceiling per address."""

    limit: int
    counts: dict[str, int] = field(factory=dict)

    def acquire(self, key: str) -> bool:
        held = self.counts.get(key, 0)
        if held >= self.limit:
            return False
        self.counts[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self.counts.get(key, 0) - 1
        if held > 0:
            self.counts[key] = held
        else:
            self.counts.pop(key, None)


# Buckets that refilled completely are forgotten once this many addresses are tracked.
_PRUNE_AT = 4096


@define
class RateLimiter:
    """A token bucket per address: `per_minute` requests a minute, bursts of up to `per_minute`."""

    per_minute: int
    clock: Any
    _buckets: dict[str, tuple[float, float]] = field(factory=dict)  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Spend one token for `key`: 0 if allowed, else the seconds until one is available."""
        now = self.clock.seconds()
        rate = self.per_minute / 60.0
        tokens, when = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - when) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _PRUNE_AT:
            self._prune(now, rate)
        return 0.0

    def _prune(self, now: float, rate: float) -> None:
        full = float(self.per_minute)
        self._buckets = {k: (t, w) for k, (t, w) in self._buckets.items() if t + (now - w) * rate < full}


@define
class ThrottledLog:
    """Logs a recurring event at most once per `interval` (per `key`, where one is given),
    saying how many more were folded in.

    `format` gets the event's own fields plus `more`, the number of like events (of the same
    key) not logged since the last line. At most `max_keys` keys are remembered; past that,
    keys whose interval is over are forgotten, and if that is not enough the event counts
    under no key, so a flood from many addresses still costs at most one line per interval.
    """

    log: Logger
    clock: Any
    format: str
    level: str = "warn"
    interval: float = 1.0
    max_keys: int = 10_000
    # key -> [when its last line was logged, events folded since]
    _seen: dict[Any, list] = field(factory=dict)

    def emit(self, key: Any = None, **fields: Any) -> None:
        now = self.clock.seconds()
        seen = self._seen.get(key)
        if seen is None and len(self._seen) >= self.max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            if len(self._seen) >= self.max_keys:
                key = None
            seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return
        more = seen[1] if seen is not None else 0
        self._seen[key] = [now, 0]
        getattr(self.log, self.level)(self.format, more=more, **fields)

#!/usr/bin/env python3
"""polltrace.py SERVICE_FILE CONNECTOR_FILE FROM TO -- how two reactors waited, from bench/polltrace.

FROM and TO are CLOCK_MONOTONIC seconds (``python3 -c 'import time; print(time.monotonic())'``
around the load). Prints, for the window: the share of wall time each process spent inside
epoll_wait (idle: nothing to read or write), how many events a turn handled, the spread of the
waits, and the share of the window in which both waited at once (the request was in neither:
in nginx, in wrk, on the wire, or waiting for a CPU).
"""

import array
import sys


def load(path: str) -> list[tuple[float, float, int]]:
    a = array.array("d")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return [(a[i], a[i + 1], int(a[i + 2])) for i in range(0, len(a) - 2, 3)]


def waits(turns, lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(a, lo), min(b, hi)) for a, b, _ in turns if b > lo and a < hi]


def overlap(x, y) -> float:
    i = j = 0
    both = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if b > a:
            both += b - a
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return both


def describe(name: str, turns, lo: float, hi: float) -> list[tuple[float, float]]:
    w = waits(turns, lo, hi)
    events = [n for a, _, n in turns if lo < a < hi]
    span = hi - lo
    d = sorted(b - a for a, b in w) or [0.0]
    print(f"{name}: in epoll_wait {100 * sum(b - a for a, b in w) / span:.0f}% of {span:.1f} s, "
          f"{len(events) / span:.0f} turns/s, {sum(events) / max(len(events), 1):.1f} events/turn, "
          f"wait p50 {d[len(d) // 2] * 1e3:.2f} ms p90 {d[int(len(d) * 0.9)] * 1e3:.2f} ms max {d[-1] * 1e3:.1f} ms")
    return w


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__.splitlines()[0])
    lo, hi = float(sys.argv[3]), float(sys.argv[4])
    s = describe("service", load(sys.argv[1]), lo, hi)
    c = describe("connector", load(sys.argv[2]), lo, hi)
    print(f"both in epoll_wait at once: {100 * overlap(s, c) / (hi - lo):.0f}%")


if __name__ == "__main__":
    main()

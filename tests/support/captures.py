"""Recorded conversations (tests/unit/data/*_captures.txt, made by tests/unit/data/record.py).

A file holds captures as ``== NAME: how it was made`` followed by one line per chunk as it was
read from the socket: ``c HEX`` (client to server) or ``s HEX`` (server to client).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "unit" / "data"


def load_captures(filename: str) -> dict[str, list[tuple[str, bytes]]]:
    """Every capture in ``DATA/filename``: name -> [(direction "c" or "s", chunk), ...] in order."""
    captures: dict[str, list[tuple[str, bytes]]] = {}
    current: list[tuple[str, bytes]] = []
    for line in (DATA / filename).read_text().splitlines():
        if line.startswith("== "):
            current = captures.setdefault(line[3:].split(":", 1)[0], [])
        elif line[:2] in ("c ", "s "):
            current.append((line[0], bytes.fromhex(line[2:])))
    return captures


def one_side(capture: list[tuple[str, bytes]], direction: str) -> bytes:
    """All the bytes one side sent, joined."""
    return b"".join(chunk for side, chunk in capture if side == direction)


def feed(inspector, capture: list[tuple[str, bytes]], pieces=None):
    """Feed a capture to an inspector's feed_client/feed_server; the last verdict.

    ``pieces(chunk)`` cuts each recorded chunk into the pieces fed (default: fed whole).
    """
    verdict = inspector.verdict
    for side, chunk in capture:
        for piece in pieces(chunk) if pieces else [chunk]:
            verdict = (inspector.feed_client if side == "c" else inspector.feed_server)(piece)
    return verdict


def cut_at(chunk: bytes, cuts: list[int]) -> list[bytes]:
    """``chunk`` cut at the given offsets (any order, repeats allowed: empty pieces are fed too)."""
    points = sorted(cuts)
    return [chunk[a:b] for a, b in zip([0, *points], [*points, len(chunk)])]


def fed_whole_and_cut(make, capture: list[tuple[str, bytes]], pieces):
    """(verdict, record) of a new inspector ``make()`` fed the capture chunk by chunk, and of one fed it in ``pieces``."""
    whole, cut = make(), make()
    return (feed(whole, capture), whole.record), (feed(cut, capture, pieces), cut.record)


def one_byte_at_a_time(chunk: bytes) -> list[bytes]:
    return [chunk[i : i + 1] for i in range(len(chunk))]


def random_cuts(data):
    """For a hypothesis ``st.data()``: cut each chunk at up to six drawn offsets."""
    from hypothesis import strategies as st

    return lambda chunk: cut_at(chunk, data.draw(st.lists(st.integers(0, len(chunk)), max_size=6)))

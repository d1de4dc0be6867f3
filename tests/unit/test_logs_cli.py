"""`gateway logs show|follow` filters, on records as the logs write them."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from gateway.errors import GatewayError
from gateway.logs_cli import parse_since, record_filter

ADMIN = {"time": 1000.0, "kind": "admin", "level": "warn", "text": "tunnel lost"}
DONE = {"time": 1000.0, "kind": "session", "type": "stream", "app": "web", "user": "ann", "result": "done"}
FAILED = {"time": 1000.0, "kind": "session", "type": "stream", "app": "db", "user": "bob",
          "result": "connection refused"}
HTTP_502 = {"time": 1000.0, "kind": "session", "type": "http", "app": "web", "user": "ann", "status": 502,
            "result": "502"}


def flags(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"kind": None, "app": None, "user": None, "result": None, "since": None, **values})


def kept(**values) -> list[dict]:
    keep = record_filter(flags(**values), now=1100.0)
    return [r for r in (ADMIN, DONE, FAILED, HTTP_502) if keep(r)]


def test_filters_by_kind_app_user():
    """--kind, --app and --user each narrow the records."""
    assert kept(kind="admin") == [ADMIN]
    assert kept(app="web") == [DONE, HTTP_502]
    assert kept(user="bob") == [FAILED]


def test_filters_by_result():
    """--result: an exact result, a status or its class, failed, or an admin level."""
    assert kept(result="done") == [DONE]
    assert kept(result="5xx") == [HTTP_502]
    assert kept(result="502") == [HTTP_502]
    assert kept(result="failed") == [FAILED, HTTP_502]
    assert kept(result="warn") == [ADMIN]


def test_since_takes_durations_and_iso_times():
    """--since 10m counts back from now; an ISO time without zone is UTC; anything else is refused."""
    assert parse_since("10m", 1000.0) == 400.0
    assert parse_since("2026-01-31T08:00", 0) == datetime(2026, 1, 31, 8, tzinfo=UTC).timestamp()
    assert kept(since="1m") == []
    assert len(kept(since="2m")) == 4
    with pytest.raises(GatewayError, match="--since: expected a duration"):
        parse_since("yesterday", 0)


def test_a_signed_in_identity_matches_by_subject_or_email():
    """A session record whose user is an identity object matches any of its values."""
    record = {**DONE, "user": {"sub": "s-1", "email": "ann@example.com"}}
    keep = record_filter(flags(user="ann@example.com"), now=1100.0)
    assert keep(record) and not record_filter(flags(user="ann"), now=1100.0)(record)


def test_follow_loses_no_line_written_just_before_a_rotation(tmp_path, monkeypatch):
    """A line the writer adds to the old file between follow's read and its rotation check is
    still printed, before the new file's lines."""
    import json
    import os

    from gateway import logs_cli

    path = tmp_path / "session.log"
    path.write_text(json.dumps({"n": 0}) + "\n")
    tail = logs_cli._Tail(path)
    tail.start_at_end()
    real_stat = os.stat
    rotated = []

    def stat_after_a_late_write_and_a_rotation(p, *a, **kw):
        if not rotated:
            rotated.append(True)
            with open(path, "a") as f:
                f.write(json.dumps({"n": 1}) + "\n")
            path.rename(tmp_path / "session.log.1")
            path.write_text(json.dumps({"n": 2}) + "\n")
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(logs_cli.os, "stat", stat_after_a_late_write_and_a_rotation)
    assert [r["n"] for r in tail.read()] == [1, 2]


@pytest.mark.parametrize("polls_every", [1, 30, 200])
def test_follow_loses_no_file_when_the_log_rotates_twice_between_two_polls(tmp_path, polls_every):
    """Follow prints every record once, in order, however many rotations happen between its polls
    (with max_files = 2 a whole file is rotated out of sight of a follower that only reopens)."""
    from gateway import logs_cli
    from gateway.oplogs.files import RotatingLog

    path = tmp_path / "session.log"
    log = RotatingLog(path, max_bytes=4096, max_files=2)
    log.write({"n": -1})
    tail = logs_cli._Tail(path)
    tail.start_at_end()
    seen = []
    for n in range(120):   # ~100 bytes each: rotates every ~40 records, so twice or more
        log.write({"n": n, "pad": "x" * 80})
        if n % polls_every == 0:
            seen += [r["n"] for r in tail.read()]
    seen += [r["n"] for r in tail.read()]
    assert seen == list(range(120))

"""`gateway logs ...`: read the admin and session logs (rotated files too) and filter them;
switch connectors' session logs on the service (`gateway logs session on|off`).

gateway/cli.py adds these with :func:`add_parsers` and dispatches through :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import sys
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from gateway.config import DEFAULT_CONFIG_PATH, load_config
from gateway.errors import GatewayError, UnknownName
from gateway.oplogs.admin import updater_admin_log
from gateway.oplogs.files import log_files, parse_line, read_file_records, read_records
from gateway.oplogs.session import summary

KINDS = ("admin", "session")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FOLLOW_POLL = 0.5


def add_parsers(sub: Any) -> None:
    logs = sub.add_parser("logs", help="the admin and session logs: read, follow, switch the session log"
                          ).add_subparsers(dest="action", required=True)
    for name, text in (("show", "print the matching records of the local log files (rotated ones too)"),
                       ("follow", "print matching records as they are written (Ctrl-C stops)")):
        p = logs.add_parser(name, help=text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the node's or connector's TOML file")
        p.add_argument("--kind", choices=KINDS, help="only the admin log or only the session log (default both)")
        p.add_argument("--app", help="only records of this app")
        p.add_argument("--user", help="only records of this user")
        p.add_argument("--result", metavar="R",
                       help="only this result: done, an HTTP status (404) or class (5xx), failed (not done, or"
                            " a status >= 400), or a level of the admin log (warn, error)")
        p.add_argument("--since", metavar="10m|ISO", help="only records newer than this: 30s, 10m, 2h, 1d or an"
                                                          " ISO 8601 time (UTC unless it says)")
        p.add_argument("--json", action="store_true", help="print the records as JSON lines, as written")
        if name == "follow":
            p.add_argument("--lines", type=int, default=10, metavar="N",
                           help="first print the last N matching records (default 10)")
    session = logs.add_parser("session", help="switch connectors' session logs (on the service)")
    session.add_argument("state", choices=("on", "off", "inherit", "list"),
                         help="on, off; inherit: a connector follows its group again; list: the switches")
    session.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")
    scope = session.add_mutually_exclusive_group()
    scope.add_argument("--group", help="every connector of this group")
    scope.add_argument("--connector", help="one connector: its id or a unique prefix")


# -- reading ---------------------------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from ``now`` (10m) or an ISO 8601 time, as epoch seconds."""
    match = _DURATION.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise GatewayError(f"--since: expected a duration (30s, 10m, 2h, 1d) or an ISO 8601 time"
                           f" (2026-01-31T08:00), got {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _result_matches(record: dict[str, Any], wanted: str) -> bool:
    if record.get("kind") == "admin":
        return record.get("level") == wanted
    status = record.get("status")
    result = str(record.get("result", ""))
    if wanted == "failed":
        return status >= 400 if isinstance(status, int) else result != "done"
    if re.fullmatch(r"[1-5]xx", wanted):
        return isinstance(status, int) and status // 100 == int(wanted[0])
    return result == wanted or str(status) == wanted


def _user_matches(record: dict[str, Any], wanted: str) -> bool:
    user = record.get("user")
    if isinstance(user, dict):   # a signed-in identity: its subject, name or email
        return wanted in {str(v) for v in user.values()}
    return user is not None and str(user) == wanted


def record_filter(args: argparse.Namespace, now: float) -> Callable[[dict[str, Any]], bool]:
    """The filter the flags describe."""
    since = parse_since(args.since, now) if args.since else None

    def keep(record: dict[str, Any]) -> bool:
        if args.kind and record.get("kind") != args.kind:
            return False
        if since is not None and float(record.get("time", 0)) < since:
            return False
        if args.app and record.get("app") != args.app:
            return False
        if args.user and not _user_matches(record, args.user):
            return False
        return not args.result or _result_matches(record, args.result)

    return keep


def format_record(record: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(float(record.get("time", 0)), UTC).strftime("%Y-%m-%d %H:%M:%S")
    if record.get("kind") == "session":
        return f"{when} session {record.get('role', '')}: {summary(record)}"
    source = str(record.get("source", ""))
    return f"{when} {record.get('level', 'info'):<5} {source[:12]}: {record.get('text', '')}"


def log_paths(config_path: str, kind: str | None) -> list[Path]:
    """The log files ``--config`` names, for ``--kind`` (both by default)."""
    from gateway import plugins

    config = load_config(config_path, plugins.config_sections(plugins.make_plugin_manager()))
    paths = []
    if kind in (None, "admin"):
        if config.logging.admin_log is None and kind == "admin":
            raise GatewayError(f"{config_path}: the admin log is off (logging.admin_log = \"\")")
        if config.logging.admin_log is not None:
            # with the admin log of the updater beside a connector (update steps), if there is one
            paths += [config.logging.admin_log, updater_admin_log(config.logging.admin_log)]
    if kind in (None, "session"):
        paths.append(config.logging.session_log_file)
    return paths


def _merged(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The records of several logs, oldest first: each log is in time order already, so they are
    merged as they are read (a log of max_bytes x max_files is never all in memory)."""
    return heapq.merge(*(read_records(p) for p in paths), key=lambda r: float(r.get("time", 0)))


def _print(record: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(record, separators=(",", ":"), ensure_ascii=False) if as_json else format_record(record),
          flush=True)


def logs_show(args: argparse.Namespace) -> int:
    keep = record_filter(args, time.time())
    for record in _merged(log_paths(args.config, args.kind)):
        if keep(record):
            _print(record, args.json)
    return 0


class _Tail:
    """Reads the lines appended to one log file, reopening it when it rotates."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None
        self.inode: int | None = None
        self.partial = b""

    def start_at_end(self) -> None:
        self._open()
        if self.file is not None:
            self.file.seek(0, os.SEEK_END)

    def _open(self) -> None:
        try:
            self.file = open(self.path, "rb")
            self.inode = os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:
            self.file = None

    def read(self) -> Iterator[dict[str, Any]]:
        if self.file is None:
            self._open()
            if self.file is None:
                return
        yield from self._lines()
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != self.inode:
            # Rotated: the writer closed the old file before renaming it, so what it wrote after
            # our read above is there now; finish it, then read the new file from its start.
            yield from self._lines()
            old_file, old_inode = self.file, self.inode
            self.file, self.partial = None, b""
            self._open()
            # Between two polls the log may have rotated more than once: read the files rotated
            # since ours (kept open until now, so its inode is not reused) before the new one.
            for missed in self._rotated_since(old_inode):
                yield from read_file_records(missed)
            old_file.close()
            if self.file is not None:
                yield from self._lines()

    def _rotated_since(self, inode: int | None) -> list[Path]:
        """The rotated files written after the one with ``inode``, oldest first (all of them when
        that one is gone), but not the current file, which we have open."""
        rotated = []
        for p in log_files(self.path)[:-1] if self.path.exists() else log_files(self.path):
            try:
                rotated.append((os.stat(p).st_ino, p))
            except FileNotFoundError:
                continue
        inodes = [i for i, _ in rotated]
        after = rotated[inodes.index(inode) + 1:] if inode in inodes else rotated
        return [p for i, p in after if i != self.inode]

    def _lines(self) -> Iterator[dict[str, Any]]:
        data = self.partial + self.file.read()
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            record = parse_line(line)
            if record is not None:
                yield record


def logs_follow(args: argparse.Namespace) -> int:
    keep = record_filter(args, time.time())
    paths = log_paths(args.config, args.kind)
    tails = [_Tail(p) for p in paths]
    for tail in tails:
        tail.start_at_end()
    backlog: deque[dict[str, Any]] = deque(maxlen=max(0, args.lines))
    backlog.extend(r for r in _merged(paths) if keep(r))
    for record in backlog:
        _print(record, args.json)
    try:
        while True:
            for tail in tails:
                for record in tail.read():
                    if keep(record):
                        _print(record, args.json)
            time.sleep(FOLLOW_POLL)
    except KeyboardInterrupt:
        return 0


# -- the session log switches ------------------------------------------------------------------


def session_switch_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """The switches (state list), or the session log of --group or --connector switched: what was done."""
    from gateway import cli

    if args.state == "list":
        return {"switches": [[scope, name, on] for (scope, name), on in sorted(store.session_log_switches().items())]}
    if not args.group and not args.connector or args.group and args.connector:
        raise GatewayError(f"`gateway logs session {args.state}` needs --group G or --connector C (one of them)")
    if args.group:
        groups = {g.name for g in store.list_groups()} | {a.group for a in config.apps} | {"default"}
        if args.group not in groups:
            raise UnknownName(f"no connector group {args.group!r}; known groups: {', '.join(sorted(groups))}")
        scope, name, what = "group", args.group, f"group {args.group!r}"
    else:
        connector = cli._find_connector(store, args.connector)
        scope, name = "connector", connector.connector_id
        what = f"connector {connector.connector_id} ({connector.name})"
    if args.state == "inherit":
        if scope != "connector":
            raise GatewayError("inherit is for a connector (--connector C): it then follows its group's switch")
        store.clear_session_log(scope, name)
        return {"done": f"session log of {what}: follows its group's switch now"}
    store.set_session_log(scope, name, args.state == "on", datetime.now(UTC))
    return {"done": f"session log of {what}: {args.state}; the running service sends it to the connectors"
                    f" within service.config_interval ({config.service.config_interval:g}s), no restart needed"}


def logs_session(args: argparse.Namespace) -> int:
    from gateway import cli

    done = cli._perform(args, session_switch_operation)
    if "done" in done:
        print(done["done"])
    elif not done["switches"]:
        print("no session log switches: every connector's session log is off")
    else:
        cli._table([("SCOPE", "NAME", "SESSION LOG")] + [
            (scope, name, "on" if on else "off") for scope, name, on in done["switches"]])
    return 0


COMMANDS = {
    ("logs", "show"): logs_show,
    ("logs", "follow"): logs_follow,
    ("logs", "session"): logs_session,
}

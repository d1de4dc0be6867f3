"""JSON-lines log files with size-based rotation, and reading them back (rotated ones too).

A log ``admin.log`` rotates to ``admin.log.1`` (the newest old one) .. ``admin.log.{max_files-1}``;
the oldest is deleted, so the files of one log never take more than ``max_bytes * max_files``.
"""

from __future__ import annotations

import json
import os
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Callable, Iterator

from attrs import define, field, setters

# One record longer than this is cut (its text fields), so one line can never blow the bound.
MAX_RECORD = 16 * 1024


# Made once: json.dumps with arguments builds an encoder per call, a line per request on the hot path.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False).encode


def json_value(value: Any) -> str:
    """One value as JSON text, as the encoder above writes it; the plain kinds without its overhead."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    return _ENCODE(value)


def encode_record(record: dict[str, Any]) -> bytes:
    """One JSON line; a record too long for MAX_RECORD has its longest strings shortened."""
    line = _ENCODE(record).encode() + b"\n"
    if len(line) <= MAX_RECORD:
        return line
    cut = {k: (v[:MAX_RECORD // 8] + "…" if isinstance(v, str) and len(v) > MAX_RECORD // 8 else v)
           for k, v in record.items() if isinstance(v, (str, int, float, bool)) or v is None}
    cut["truncated"] = True
    return json.dumps(cut, separators=(",", ":"), ensure_ascii=False).encode()[:MAX_RECORD - 1] + b"\n"


@define(on_setattr=setters.NO_OP)   # the path is converted once; a write sets fields, and must stay cheap
class RotatingLog:
    """Appends JSON lines to ``path``, rotating before a line would take it past ``max_bytes``.

    Each line is flushed at once, unless ``flush_soon`` is given: then a line waits in the
    file's buffer (a few KiB, written out when full) until the call ``flush_soon`` arranges
    (``lambda f: reactor.callLater(0, f)``: the end of the reactor turn), so a turn that logs a
    hundred requests makes one write, not a hundred. What a crash can lose is that one turn's."""

    path: Path = field(converter=Path)
    max_bytes: int
    max_files: int
    flush_soon: Callable[[Callable[[], None]], Any] | None = None
    _file: Any = field(default=None, init=False, repr=False)
    _flush_pending: bool = field(default=False, init=False)
    _size: int = field(default=0, init=False)
    # Why the last write failed, kept so a full disk is reported once, not on every line.
    failing: str | None = field(default=None, init=False)

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(encode_record(record))

    def write_line(self, line: bytes) -> None:
        """Append one encoded line (at most MAX_RECORD bytes, ending in a newline)."""
        try:
            if self._file is None:
                self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
            if self.flush_soon is None:
                self._file.flush()
            elif not self._flush_pending:
                self._flush_pending = True
                self.flush_soon(self.flush)
            if self.failing is not None:
                self.failing = None
        except OSError as e:
            self._failed(e)

    def flush(self) -> None:
        """Write out what the file buffers (flush_soon calls this)."""
        self._flush_pending = False
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        # A log must not take the node down: drop the lines, reopen next time.
        self.failing = f"{self.path}: {error.strerror or error}"
        self.close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        self.close()
        oldest = rotated_path(self.path, self.max_files - 1)
        if self.max_files == 1:
            self.path.unlink(missing_ok=True)
        else:
            oldest.unlink(missing_ok=True)
            for n in range(self.max_files - 2, 0, -1):
                older = rotated_path(self.path, n)
                if older.exists():
                    older.rename(rotated_path(self.path, n + 1))
            self.path.rename(rotated_path(self.path, 1))
        self._open()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()   # writes out what it buffers
            except OSError:
                pass


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def log_files(path: Path) -> list[Path]:
    """The files of one log, oldest first: the rotated ones by number, then the current one."""
    rotated = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record from one line, or None for a line that is not one (cut by a crash, say)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a log, oldest first, across its rotated files."""
    for p in log_files(path):
        yield from read_file_records(p)


def read_file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of one file of a log; none if it was rotated away before we opened it."""
    try:
        with open(path, "rb") as f:
            for line in f:
                record = parse_line(line)
                if record is not None:
                    yield record
    except FileNotFoundError:
        return

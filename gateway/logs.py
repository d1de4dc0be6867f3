"""Log observers for `twistd gateway`: text or JSON lines, filtered by level."""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def make_observer(format: str, level: str, out: IO[str] | None = None) -> Any:
    out = out or sys.stdout
    # recordSeparator "": one JSON object per line, what line-oriented log shippers expect.
    inner = jsonFileLogObserver(out, recordSeparator="") if format == "json" else textFileLogObserver(out)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


_chosen = {"format": "text", "level": "info"}


def configure(format: str, level: str) -> str:
    """Choose format and level; returns the dotted name twistd's `logger` option wants."""
    _chosen.update(format=format, level=level)
    return f"{__name__}.configured_observer"


def configured_observer() -> Any:
    return make_observer(_chosen["format"], _chosen["level"])


def enabled(level: LogLevel) -> bool:
    """Whether events at ``level`` are kept by the configured observer: a hot path may skip
    building an event (one per HTTP request, say) that would be dropped anyway."""
    return level >= LEVELS[_chosen["level"]]

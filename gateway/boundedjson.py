"""JSON from peers with a bound on nesting: deep nesting would exhaust the parser's recursion.

Python's json module recurses once per nested array or object, so 16 KiB of ``[`` raises
RecursionError instead of a clean error. Every JSON a peer sends (SYN metadata, control
messages) is checked here first; the check costs two byte counts unless the text holds more
brackets than the limit allows.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Deeper than anything the gateway sends (an app's options table nests a few levels).
MAX_DEPTH = 32

# A JSON string (escapes included) or one bracket; strings are skipped whole so brackets in
# them do not count.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_OPEN = frozenset(b"[{")


class TooDeep(ValueError):
    """The JSON nests deeper than allowed; the message completes "<what> ..."."""


def nesting_depth(data: bytes, stop_above: int = MAX_DEPTH) -> int:
    """How deep arrays and objects nest in `data` (counting stops once past `stop_above`)."""
    depth = deepest = 0
    for match in _TOKEN.finditer(data):
        char = match.group()[0]
        if char in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    break
        elif char != 0x22:  # a closing bracket, not a string
            depth -= 1
    return deepest


def loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON nested at most `max_depth` deep; ValueError (with the reason) otherwise."""
    if data.count(b"[") + data.count(b"{") > max_depth:
        depth = nesting_depth(data, max_depth)
        if depth > max_depth:
            raise TooDeep(f"is nested more than {max_depth} levels deep (the limit)")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from None

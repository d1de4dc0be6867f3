"""The HTTPS front door (stub until SNI certificates land)."""

from __future__ import annotations

from typing import Any, Callable

SECTION_KEYS: tuple[str, ...] = ()


def parse_section(table: dict, error: Any) -> dict:
    return {}


def register_listeners(register: Callable[[str, str, Any], None], section: dict,
                       front_door_factory: Callable[[str], Any], reactor: Any) -> None:
    """Register the HTTPS listener (and the HTTP redirect) described by ``section``, if any."""
    return None

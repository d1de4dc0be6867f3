"""What the admin sees, as plain values: one group's apps, connectors and spread of streams.

Shared by ``gateway status`` (local store or remote), the admin API and the status page, so
the three always agree on what "healthy" and "share" mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import attrs
from attrs import frozen

from gateway.store.records import ConnectorRecord, GroupRecord


@frozen
class GroupSummary:
    """One connector group: its apps, its connectors (active first, busiest first) and health."""

    name: str
    apps: tuple[str, ...]
    connectors: tuple[ConnectorRecord, ...]

    @property
    def active(self) -> list[ConnectorRecord]:
        return [c for c in self.connectors if c.state == "active"]

    @property
    def open_streams(self) -> int:
        return sum(c.open_streams for c in self.active)

    @property
    def health(self) -> str:
        """"ok", "NO ACTIVE CONNECTOR" (apps nobody can reach) or "idle" (no apps, no connector)."""
        return "ok" if self.active else ("NO ACTIVE CONNECTOR" if self.apps else "idle")

    def share(self, connector: ConnectorRecord) -> str:
        """The connector's part of the group's open streams ("40%"), "-" when it carries none."""
        total = self.open_streams
        return f"{100 * connector.open_streams / total:.0f}%" if total and connector.state == "active" else "-"


def summarise(groups: Iterable[str], apps: Iterable[Any], connectors: Iterable[ConnectorRecord]) -> list[GroupSummary]:
    """Every group named by the store, an app or a connector, by name; `apps` have .name and .group."""
    apps, connectors = list(apps), list(connectors)
    names = set(groups) | {a.group for a in apps} | {c.group for c in connectors}
    return [
        GroupSummary(
            name=name,
            apps=tuple(sorted(a.name for a in apps if a.group == name)),
            connectors=tuple(sorted((c for c in connectors if c.group == name),
                                    key=lambda c: (c.state != "active", -c.open_streams, c.name))),
        )
        for name in sorted(names)
    ]


def when(value: datetime | None, missing: str = "never") -> str:
    """A stored time as the admin reads it (UTC, to the second), or `missing`."""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}" if value else missing


def jsonable(record: Any) -> dict[str, Any]:
    """An attrs record as JSON-ready values (datetimes as ISO 8601 text)."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in attrs.asdict(record).items()}


def connector_from_json(data: dict[str, Any]) -> ConnectorRecord:
    """The ConnectorRecord the API sent (the inverse of jsonable)."""
    return ConnectorRecord(**_with_times(ConnectorRecord, data))


def group_from_json(data: dict[str, Any]) -> GroupRecord:
    """The GroupRecord the API sent."""
    return GroupRecord(**_with_times(GroupRecord, data))


def _with_times(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in attrs.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in known:
            continue  # a newer service's extra fields
        if isinstance(value, str) and "datetime" in str(known[key].type):
            value = datetime.fromisoformat(value)
        out[key] = value
    return out

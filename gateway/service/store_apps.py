"""Apps published with `gateway apps` (kept in the store), merged with the config file's apps.

The service and the `gateway apps` command both use this, so what the command accepts is what
the service serves. The store holds web apps and private apps (segments). The file wins: a
stored app whose name or external URL the file's apps already use, or whose segments overlap
those of an app in another connector group, is left out (and the command refuses to make one).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import attrs

from gateway.config import WEB_PROTOCOL, AppConfig, GatewayConfig, overlapping_app, parse_app, web_origin
from gateway.errors import ConfigError
from gateway.store.records import AppRecord


def app_table(record: AppRecord) -> dict[str, Any]:
    """The ``[[apps]]`` table a stored app stands for."""
    return {**record.definition, "name": record.name, "group": record.group}


def parse_records(records: Iterable[AppRecord]) -> tuple[list[AppConfig], dict[str, str]]:
    """The stored apps that validate, and for the others their name -> what is wrong."""
    apps: list[AppConfig] = []
    problems: dict[str, str] = {}
    for record in records:
        try:
            apps.append(parse_app(app_table(record), source=f"store app {record.name}"))
        except ConfigError as e:
            problems[record.name] = str(e)
    return apps, problems


def clash(app: AppConfig, others: Iterable[AppConfig]) -> AppConfig | None:
    """The first of `others` with the same external scheme, host, port and path as `app`."""
    if not app.external_url:
        return None
    origin = web_origin(app.external_url)
    for other in others:
        if other.name != app.name and other.external_url and web_origin(other.external_url) == origin:
            return other
    return None


def overlap(app: AppConfig, others: Iterable[AppConfig], file_apps: Collection[str] = ()) -> str | None:
    """Why `app`'s segments cannot be served next to `others` (an app of another group has
    overlapping ones, named with where it comes from), or None."""
    found = overlapping_app(app, [a for a in others if a.name != app.name])
    if found is None:
        return None
    other, mine, theirs = found
    where = "the config file's" if other.name in file_apps else "stored"
    return (f"segment {str(app.segments[mine])!r} overlaps segment {str(other.segments[theirs])!r} of {where} app"
            f" {other.name!r} in group {other.group!r}: a destination is served by one group's connectors")


def merge(config: GatewayConfig, store_apps: Iterable[AppConfig],
          protocols: Collection[str]) -> tuple[GatewayConfig, dict[str, str]]:
    """`config` with the usable stored apps after its own; and name -> why for those left out."""
    names = {a.name for a in config.apps}
    merged = list(config.apps)
    left_out: dict[str, str] = {}
    for app in store_apps:
        if app.name in names:
            left_out[app.name] = f"{config.path} has an app of that name, and the config file wins"
        elif app.listen or (app.protocol != WEB_PROTOCOL and not app.is_private):
            left_out[app.name] = "only web apps and private apps (segments) can come from the store"
        elif app.protocol not in protocols:
            left_out[app.name] = f"no loaded plugin provides protocol {app.protocol!r}"
        elif (other := clash(app, merged)) is not None:
            where = "the config file's" if other.name in names else "stored"
            left_out[app.name] = (f"{where} app {other.name!r} has the same external URL"
                                  f" ({web_origin(app.external_url)})")
        elif app.is_private and (why := overlap(app, merged, names)) is not None:
            left_out[app.name] = why
        else:
            merged.append(app)
    return attrs.evolve(config, apps=tuple(merged)), left_out

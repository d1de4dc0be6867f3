"""`gateway store migrate`: bring the service's store to this gateway's schema, and nothing else."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config import DEFAULT_CONFIG_PATH, load_config
from gateway.errors import GatewayError


def add_parsers(sub: Any) -> None:
    store = sub.add_parser("store", help="the service's store (SQLite or PostgreSQL)").add_subparsers(
        dest="action", required=True)
    migrate = store.add_parser("migrate", help="apply the schema migrations this gateway brings, then exit"
                                               " (the service also applies them when it starts)")
    migrate.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")


def store_migrate(args: argparse.Namespace) -> int:
    from gateway import plugins
    from gateway.service.node import open_store

    config = load_config(args.config, plugins.config_sections(plugins.make_plugin_manager()))
    if config.service is None:
        raise GatewayError(f"{args.config} has no [service] table; give the service's config file")
    store = open_store(config.service)
    try:
        before, after = store.migrated
        if before == after:
            print(f"{store.location}: schema version {after}, up to date")
        else:
            print(f"{store.location}: schema version {before} -> {after}")
    finally:
        store.close()
    return 0


COMMANDS = {("store", "migrate"): store_migrate}

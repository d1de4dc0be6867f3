"""`gateway store migrate`: bring the service's store to this gateway's schema, and nothing else;
`gateway store copy`: copy its lasting state into a new, empty store (SQLite to PostgreSQL)."""

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
    copy = store.add_parser("copy", help="copy the store of --config into the new, empty store of --to-config"
                                         " (from the embedded SQLite file to PostgreSQL, say); stop the service first")
    copy.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file (the source)")
    copy.add_argument("--to-config", required=True,
                      help="a TOML file whose [service] store names the target (its password from"
                           " store_password_file or libpq's sources, as for the service)")


def _service_config(path: str) -> Any:
    from gateway import plugins

    config = load_config(path, plugins.config_sections(plugins.make_plugin_manager()))
    if config.service is None:
        raise GatewayError(f"{path} has no [service] table; give the service's config file")
    return config.service


def store_migrate(args: argparse.Namespace) -> int:
    from gateway.service.node import open_store

    store = open_store(_service_config(args.config))
    try:
        before, after = store.migrated
        if before == after:
            print(f"{store.location}: schema version {after}, up to date")
        else:
            print(f"{store.location}: schema version {before} -> {after}")
    finally:
        store.close()
    return 0


def store_copy(args: argparse.Namespace) -> int:
    from gateway.service.node import open_store
    from gateway.store.copy import SKIPPED, copy_store

    source_config, target_config = _service_config(args.config), _service_config(args.to_config)
    source = open_store(source_config)
    try:
        target = open_store(target_config)
        try:
            copied = copy_store(source, target)
        finally:
            target.close()
    finally:
        source.close()
    print(f"copied {source.location} to {target.location}: "
          + ", ".join(f"{n} {table}" for table, n in copied.items()))
    print(f"not copied: {', '.join(SKIPPED)} (each node writes its own row; sign-in codes and status page"
          f" sign-ins are short-lived). Every node of the new store needs the CA files (ca.pem, ca.key) of"
          f" {source_config.state_dir} in its own state_dir; start the nodes with --config {args.to_config}.")
    return 0


COMMANDS = {("store", "migrate"): store_migrate, ("store", "copy"): store_copy}

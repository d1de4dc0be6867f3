"""The `gateway diagnose` command (the checks are in gateway/diagnose.py)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config import DEFAULT_CONFIG_PATH
from gateway.errors import GatewayError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("diagnose", help="on a connector machine: check its certificate, the proxy, DNS, TCP, TLS,"
                                        " the clock, KDC and keytab, and each destination of its group's apps")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the connector's TOML file")
    p.add_argument("--max-skew", type=float, default=60.0, metavar="SECONDS",
                   help="the clock difference to the service that fails the clock check (default 60)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long each network check may take (default 10)")


def diagnose(args: argparse.Namespace) -> int:
    from gateway import diagnose as checks, plugins
    from gateway.cli import run_on_reactor
    from gateway.config import load_config

    if not args.timeout > 0 or not args.max_skew > 0:
        raise GatewayError("--timeout and --max-skew must be positive numbers of seconds")
    pm = plugins.make_plugin_manager()
    config = load_config(args.config, plugins.config_sections(pm))
    if config.connector is None:
        raise GatewayError(f"{args.config} has no [connector] table: run gateway diagnose with the connector's"
                           " config file")

    async def work(reactor: Any) -> Any:
        return await checks.run(reactor, config, pm, max_skew=args.max_skew, timeout=args.timeout)

    return checks.report(run_on_reactor(work, "gateway diagnose"), print)


COMMANDS = {("diagnose", None): diagnose}

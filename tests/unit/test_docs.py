"""The docs keep up with the code: hooks, CLI subcommands and config keys are all documented."""

import inspect
import re
from pathlib import Path

from gateway import cli, hookspecs
from gateway.config import _Parser

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _hook_names() -> list[str]:
    return sorted(
        name for name, value in vars(hookspecs).items()
        if name.startswith("gateway_") and inspect.isfunction(value)
    )


def test_every_hook_has_a_heading_in_plugins_md():
    """Each gateway_* hookspec in gateway/hookspecs.py has a `### <hook>` heading in docs/plugins.md."""
    headings = set(re.findall(r"^### `?(gateway_\w+)`?\s*$", _read("plugins.md"), re.MULTILINE))
    hooks = _hook_names()
    assert hooks, "found no gateway_* hooks in gateway/hookspecs.py"
    missing = [h for h in hooks if h not in headings]
    assert not missing, f"docs/plugins.md has no '### <hook>' heading for: {', '.join(missing)}"


def test_every_cli_subcommand_is_in_operations_md():
    """Each `gateway` subcommand in gateway/cli.py's COMMANDS is mentioned in docs/operations.md."""
    text = _read("operations.md")
    commands = [" ".join(part for part in key if part) for key in cli.COMMANDS]
    assert commands, "found no subcommands in gateway/cli.py COMMANDS"
    missing = [c for c in commands if f"gateway {c}" not in text]
    assert not missing, f"docs/operations.md never mentions: {', '.join('gateway ' + c for c in missing)}"


def test_every_config_key_is_in_configuration_md():
    """Each key the config parser accepts (TOP, SERVICE, APP, CONNECTOR, TUNNEL, LOGGING, METRICS) is in docs/configuration.md."""
    text = _read("configuration.md")
    lists = {name: getattr(_Parser, name)
             for name in ("TOP", "SERVICE", "APP", "CONNECTOR", "TUNNEL", "LOGGING", "METRICS")}
    missing = [
        f"{where}.{key}" for where, keys in lists.items() for key in keys
        if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text)
    ]
    assert not missing, f"docs/configuration.md does not mention: {', '.join(missing)}"

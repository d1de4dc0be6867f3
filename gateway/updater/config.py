"""The updater's own TOML file (``[updater]``), apart from the connector's.

The connector's file is read by whichever gateway version is installed in its virtualenv; the
updater's keys live in their own file so that an older connector never meets a table it does
not know. Errors name the file and the key, like gateway/config.py's.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from attrs import frozen

from gateway import plugins
from gateway.config import _Parser, _Table, load_config
from gateway.errors import ConfigError
from gateway.updater.manifest import ManifestRefused, parse_public_key

MIB = 1024 * 1024


@frozen
class UpdaterConfig:
    """The ``[updater]`` table (docs/configuration.md, *The updater's file*)."""

    path: Path
    connector_config: Path
    venv: Path
    state_dir: Path
    public_keys: tuple[Any, ...]
    poll_interval: float = 300.0
    health_timeout: float = 120.0
    stop_timeout: float = 60.0
    install_timeout: float = 300.0
    download_timeout: float = 600.0
    max_wheel_bytes: int = 200 * MIB
    auto: bool = True
    restart_delay: float = 2.0
    # from the connector's file: where its identity is, how long its drain may take, its proxy
    connector_state_dir: Path = Path()
    drain_timeout: float = 30.0
    # the connector's forward proxy ([connector] proxy, None: the environment's; "": none)
    proxy: str | None = None
    proxy_password_file: Path | None = None
    # the connector's [logging]: the updater's admin log goes beside the connector's, to its journald
    logging: Any = None

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


KEYS = ["connector_config", "venv", "state_dir", "public_keys", "poll_interval", "health_timeout",
        "stop_timeout", "install_timeout", "download_timeout", "max_wheel_bytes", "auto", "restart_delay"]


def load_updater_config(path: str | os.PathLike[str]) -> UpdaterConfig:
    shown = os.fspath(path)
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(shown, "(file)", "expected an existing configuration file, got no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(shown, "(file)", f"expected a readable UTF-8 file, got: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(shown, "(syntax)", f"expected valid TOML: {e}") from None
    return parse_updater_config(data, shown)


def parse_updater_config(data: dict[str, Any], shown: str) -> UpdaterConfig:
    parser = _Parser(shown)
    _Table(parser, "", data, ["updater"])
    table = parser.table(data, "updater")
    if table is None:
        raise parser.error("updater", "expected an [updater] table, got nothing")
    t = _Table(parser, "updater", table, KEYS)
    keys_value = t.get("public_keys", None, True, "an array of ed25519 public keys")
    if not isinstance(keys_value, list) or not keys_value:
        raise t.fail("public_keys", "a non-empty array of \"ed25519:BASE64\" keys (gateway update keygen prints one)",
                     keys_value)
    public_keys = []
    for i, text in enumerate(keys_value):
        try:
            public_keys.append(parse_public_key(text))
        except ManifestRefused as e:
            raise parser.error(f"updater.public_keys[{i}]", f"expected an ed25519 public key: {e}") from None
    auto = t.get("auto", True, False)
    if not isinstance(auto, bool):
        raise t.fail("auto", "true or false", auto)
    connector_config = t.path("connector_config")
    try:
        connector = load_config(connector_config, plugins.config_sections(plugins.make_plugin_manager()))
    except ConfigError as e:
        raise parser.error("updater.connector_config", f"expected a readable connector configuration: {e}") from None
    if connector.connector is None:
        raise parser.error("updater.connector_config", f"expected a file with a [connector] table, got"
                                                       f" {connector_config} without one")
    venv = t.path("venv")
    if not (venv / "bin" / "python").exists():
        raise parser.error("updater.venv", f"expected the connector's virtualenv (a directory with bin/python),"
                                           f" got {venv}")
    return UpdaterConfig(
        path=parser.abs_path,
        connector_config=connector_config,
        venv=venv,
        state_dir=t.path("state_dir"),
        public_keys=tuple(public_keys),
        poll_interval=t.number("poll_interval", 300, positive=True),
        health_timeout=t.number("health_timeout", 120, positive=True),
        stop_timeout=t.number("stop_timeout", 60, positive=True),
        install_timeout=t.number("install_timeout", 300, positive=True),
        download_timeout=t.number("download_timeout", 600, positive=True),
        max_wheel_bytes=t.integer("max_wheel_bytes", 200 * MIB, 1024),
        auto=auto,
        restart_delay=t.number("restart_delay", 2, positive=True),
        connector_state_dir=connector.connector.state_dir,
        drain_timeout=connector.connector.drain_timeout,
        proxy=connector.connector.proxy,
        proxy_password_file=connector.connector.proxy_password_file,
        logging=connector.logging,
    )

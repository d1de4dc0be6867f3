"""What a registered connector keeps on disk: connection settings, its key and certificates."""

from __future__ import annotations

import json
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import evolve, frozen

from gateway.errors import GatewayError
from gateway.pki import keys

SETTINGS_FILE = "connection.toml"
CA_FILE = "ca.pem"
CERT_FILE = "client.pem"
KEY_FILE = "client.key"
# A renewal writes the new key here first, then client.pem, then renames this over client.key.
NEXT_KEY_FILE = "client.key.next"


class NotRegistered(GatewayError):
    """The connector's state directory holds no usable registration."""


@frozen
class ConnectorIdentity:
    state_dir: Path
    service_host: str
    service_port: int
    server_name: str
    connector_id: str
    group: str
    name: str
    ca_cert: Any
    cert: Any
    key: Any

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @classmethod
    def load(cls, state_dir: Path, now: datetime | None = None) -> ConnectorIdentity:
        register = (
            f"register it first: gateway connector register --service HOST:PORT"
            f" --token-file FILE --state-dir {state_dir}"
        )
        settings_path = state_dir / SETTINGS_FILE
        try:
            settings = tomllib.loads(settings_path.read_text())
            ca_cert = keys.load_cert((state_dir / CA_FILE).read_bytes())
            cert = keys.load_cert((state_dir / CERT_FILE).read_bytes())
            key = _matching_key(state_dir, cert)
            identity = cls(
                state_dir=state_dir,
                service_host=str(settings["service_host"]),
                service_port=int(settings["service_port"]),
                server_name=str(settings["server_name"]),
                connector_id=str(settings["connector_id"]),
                group=str(settings.get("group", "")),
                name=str(settings.get("name", "")),
                ca_cert=ca_cert,
                cert=cert,
                key=key,
            )
        except FileNotFoundError as e:
            raise NotRegistered(f"this connector is not registered ({e.filename} is missing); {register}") from None
        except (KeyError, ValueError, tomllib.TOMLDecodeError) as e:
            raise NotRegistered(f"the registration in {state_dir} is damaged ({e}); {register}") from None
        now = now or datetime.now(UTC)
        if identity.not_after <= now:
            raise NotRegistered(
                f"this connector's certificate expired on {identity.not_after:%Y-%m-%d %H:%M} UTC;"
                f" get a new token from the service and {register}"
            )
        return identity


def _matching_key(state_dir: Path, cert: Any) -> Any:
    """client.key, or client.key.next if a renewal stopped between writing client.pem and the rename."""
    key = keys.load_key((state_dir / KEY_FILE).read_bytes())
    if key.public_key() == cert.public_key():
        return key
    next_path = state_dir / NEXT_KEY_FILE
    if next_path.exists():
        next_key = keys.load_key(next_path.read_bytes())
        if next_key.public_key() == cert.public_key():
            os.replace(next_path, state_dir / KEY_FILE)
            return next_key
    raise ValueError(f"{KEY_FILE} does not belong to {CERT_FILE}")


def install_certificate(identity: ConnectorIdentity, cert: Any, key: Any) -> ConnectorIdentity:
    """Write a renewed key (0600) and certificate so that a crash at any point leaves a loadable
    pair, and return the identity that uses them."""
    state_dir = identity.state_dir
    keys.write_private(state_dir / NEXT_KEY_FILE, keys.key_pem(key))
    keys.write_public(state_dir / CERT_FILE, keys.cert_pem(cert))
    os.replace(state_dir / NEXT_KEY_FILE, state_dir / KEY_FILE)
    return evolve(identity, cert=cert, key=key)


def write_settings(state_dir: Path, **values: Any) -> None:
    lines = ["# Written by `gateway connector register`. The connector keeps nothing else on disk."]
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v)}")
    keys.write_public(state_dir / SETTINGS_FILE, ("\n".join(lines) + "\n").encode())

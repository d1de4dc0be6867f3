"""`gateway update keygen|sign|publish|show|resume` (the admin and the service) and `gateway connector update`
(the connector's machine). gateway/cli.py adds these with :func:`add_parsers` and dispatches
through :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.updater import manifest as mf

DEFAULT_UPDATER_CONFIG = "/etc/gateway/updater.toml"


def add_parsers(sub: Any) -> None:
    update = sub.add_parser("update", help="connector releases: signing keys, signed manifests, publishing"
                            ).add_subparsers(dest="action", required=True)
    keygen = update.add_parser("keygen", help="make an ed25519 signing key (keep it off the service)")
    keygen.add_argument("--key", required=True, help="where to write the private key (mode 0600; must not exist)")
    sign = update.add_parser("sign", help="write the signed manifest of a wheel")
    sign.add_argument("--key", required=True, help="the private key from `gateway update keygen`")
    sign.add_argument("--wheel", required=True, help="the gateway wheel to release")
    sign.add_argument("--mode", choices=mf.MODES, default="auto",
                      help="auto: updaters install it by themselves; manual: only `gateway connector update` does")
    sign.add_argument("--output", help="the manifest file (default: the wheel's path with .manifest.json)")
    publish = update.add_parser("publish", help="offer a signed release to the service's connectors")
    publish.add_argument("--config", default="/etc/gateway/gateway.toml", help="the service's TOML file")
    publish.add_argument("--manifest", required=True, help="the signed manifest from `gateway update sign`")
    publish.add_argument("--wheel", required=True, help="the wheel it names")
    publish.add_argument("--public-key", metavar="ed25519:BASE64",
                         help="check the signature with this key before publishing (recommended)")
    show = update.add_parser("show", help="what the service offers its connectors now")
    show.add_argument("--config", default="/etc/gateway/gateway.toml", help="the service's TOML file")
    resume = update.add_parser("resume", help="lift a group's halted rollout (after an update failed there),"
                                              " for every node sharing the store")
    resume.add_argument("--config", default="/etc/gateway/gateway.toml", help="the service's TOML file")
    resume.add_argument("--group", required=True, help="the connector group whose rollout to let go on")


def add_connector_parser(conn: Any) -> None:
    """`gateway connector update`, beside `gateway connector register`."""
    cu = conn.add_parser("update", help="ask this machine's updater to install the published release now"
                                        " (also a manual one)")
    cu.add_argument("--config", default=DEFAULT_UPDATER_CONFIG, help="the updater's TOML file")


def keygen(args: argparse.Namespace) -> int:
    from gateway.pki.keys import write_private

    path = Path(args.key)
    if path.exists():
        raise GatewayError(f"{path} exists; refusing to overwrite a signing key (choose another --key)")
    key = mf.generate_key()
    write_private(path, mf.private_key_pem(key))
    print(mf.public_key_text(key.public_key()))
    print(f"signing key written to {path} (key id {mf.key_id(key.public_key())}); keep it off the service."
          " Put the line above in each updater's [updater] public_keys.", file=sys.stderr)
    return 0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise GatewayError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def sign(args: argparse.Namespace) -> int:
    key = mf.load_private_key(_read(args.key, "signing key"), args.key)
    wheel = Path(args.wheel)
    version = mf.wheel_version(wheel.name)
    try:
        sha256, size = mf.file_digest(wheel)
    except OSError as e:
        raise GatewayError(f"cannot read the wheel {wheel}: {e.strerror or e}") from None
    release = mf.Manifest(version=version, wheel=wheel.name, sha256=sha256, size=size, mode=args.mode)
    mf.parse_manifest(json.loads(release.canonical()))  # what an updater will check, checked now
    output = Path(args.output) if args.output else wheel.with_name(wheel.name + ".manifest.json")
    from gateway.pki.keys import write_public

    write_public(output, mf.encode_document(mf.sign(release, key)))
    print(f"signed {wheel.name} (version {version}, {size} bytes, sha256 {sha256}, mode {args.mode}) with key"
          f" {mf.key_id(key.public_key())}: {output}", file=sys.stderr)
    return 0


def _updates_dir(config_path: str) -> Path:
    from gateway import plugins
    from gateway.config import load_config
    from gateway.service.updates import updates_dir

    config = load_config(config_path, plugins.config_sections(plugins.make_plugin_manager()))
    if config.service is None:
        raise GatewayError(f"{config_path} has no [service] table; give the service's config file")
    return updates_dir(config.service.state_dir)


def publish(args: argparse.Namespace) -> int:
    from gateway.pki.keys import write_public
    from gateway.service.updates import MANIFEST_FILE, WHEELS_DIR

    document = mf.decode_document(_read(args.manifest, "manifest"))
    body = document.get("manifest")
    release = mf.parse_manifest(body)
    if args.public_key:
        release = mf.verify(document, [mf.parse_public_key(args.public_key)])
    wheel = Path(args.wheel)
    if wheel.name != release.wheel:
        raise GatewayError(f"the manifest is for {release.wheel}, not {wheel.name}")
    try:
        digest = mf.file_digest(wheel)
    except OSError as e:
        raise GatewayError(f"cannot read the wheel {wheel}: {e.strerror or e}") from None
    if digest != (release.sha256, release.size):
        raise GatewayError(f"{wheel} has sha256 {digest[0]} ({digest[1]} bytes), the manifest says"
                           f" {release.sha256} ({release.size} bytes): sign this wheel again")
    directory = _updates_dir(args.config)
    (directory / WHEELS_DIR).mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    partial = directory / WHEELS_DIR / (wheel.name + ".part")
    shutil.copyfile(wheel, partial)
    partial.replace(directory / WHEELS_DIR / wheel.name)
    # The manifest last: an updater never sees a manifest whose wheel is not there yet.
    write_public(directory / MANIFEST_FILE, mf.encode_document(document))
    for old in (directory / WHEELS_DIR).glob("*.whl"):
        if old.name != wheel.name:
            old.unlink()
    print(f"published {release.wheel} (version {release.version}, mode {release.mode}); updaters pick it up"
          " at their next poll", file=sys.stderr)
    return 0


def show(args: argparse.Namespace) -> int:
    from gateway.service.updates import MANIFEST_FILE

    path = _updates_dir(args.config) / MANIFEST_FILE
    if not path.exists():
        print("no release is published (gateway update publish)")
        return 0
    release = mf.parse_manifest(mf.decode_document(path.read_bytes()).get("manifest"))
    print(f"version {release.version}: {release.wheel}, {release.size} bytes, sha256 {release.sha256},"
          f" mode {release.mode}")
    return 0


def resume(args: argparse.Namespace) -> int:
    """Lift the halt of a group's rollout in the store, which every node reads."""
    from gateway import cli

    with cli._service_store(args) as (_, store):
        lifted = store.lift_update_halt(args.group)
    if lifted is None:
        print(f"the rollout to group {args.group!r} is not halted; nothing to resume", file=sys.stderr)
        return 0
    print(f"the rollout of {lifted} to group {args.group!r} goes on: its updaters ask for the lease again at"
          " their next poll (the failed version too: fix what failed first, or publish another)", file=sys.stderr)
    return 0


def connector_update(args: argparse.Namespace) -> int:
    """Talk to the running updater's control socket; print what it says; 0 if it ended ok."""
    from gateway.updater.config import load_updater_config
    from gateway.updater.daemon import CONTROL_SOCKET

    config = load_updater_config(args.config)
    path = config.state_dir / CONTROL_SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as e:
        raise GatewayError(f"cannot reach the updater at {path} ({e.strerror or e}); is"
                           f" `twistd gateway-updater --config {args.config}` running?") from None
    last = ""
    with sock, sock.makefile("rb") as replies:
        sock.sendall(b"update\n")
        for line in replies:
            last = line.decode("utf-8", "replace").rstrip("\n")
            print(last, flush=True)
    return 0 if last.startswith("ok:") else 1


COMMANDS = {
    ("update", "keygen"): keygen,
    ("update", "sign"): sign,
    ("update", "publish"): publish,
    ("update", "show"): show,
    ("update", "resume"): resume,
    ("connector", "update"): connector_update,
}

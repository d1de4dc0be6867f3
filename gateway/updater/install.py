"""Installing wheels into the connector's virtualenv, and keeping the running version's wheel.

`pip install --no-deps --no-index` of a wheel already checked against the signed manifest: pip
never fetches anything, so nothing unchecked reaches the virtualenv (a release that needs new
dependencies says so, and the admin installs them first). `snapshot_wheel` rebuilds the wheel
of the installed version from its files and RECORD, so the first update can be rolled back even
when the updater did not install that version itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from gateway.errors import GatewayError

DIST = "gateway"
# Files of an installed distribution that describe the installation, not the release.
_INSTALL_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_OUTPUT_LIMIT = 64 * 1024

VENV_INFO = (
    "import json, sysconfig\n"
    "from importlib import metadata\n"
    "try:\n    v = metadata.version('gateway')\nexcept metadata.PackageNotFoundError:\n    v = None\n"
    "print(json.dumps({'version': v, 'purelib': sysconfig.get_paths()['purelib']}))\n"
)


class InstallFailed(GatewayError):
    """pip could not install a wheel, or the virtualenv could not be read."""


class _Collect(ProcessProtocol):
    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < _OUTPUT_LIMIT:
            self.output += data[: _OUTPUT_LIMIT - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.done.callback((reason.value.exitCode, bytes(self.output).decode("utf-8", "replace")))


def run(reactor: Any, argv: list[str], timeout: float) -> Deferred:
    """Run argv; fires with (exit code, output), killing it after `timeout` seconds (code None)."""
    done: Deferred = Deferred()
    protocol = _Collect(done)
    process = reactor.spawnProcess(protocol, argv[0], argv, env=dict(os.environ))
    timer = reactor.callLater(timeout, lambda: process.signalProcess("KILL"))

    def finished(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return done.addBoth(finished)


async def venv_info(reactor: Any, python: Path) -> dict[str, Any]:
    """{"version": the gateway version installed (None if none), "purelib": its site-packages}."""
    code, output = await run(reactor, [str(python), "-c", VENV_INFO], 60.0)
    if code != 0:
        raise InstallFailed(f"could not read the virtualenv of {python}: {output.strip()[-500:]}")
    return json.loads(output.strip().splitlines()[-1])


async def pip_install(reactor: Any, python: Path, wheel: Path, timeout: float, ignore_installed: bool = False) -> None:
    """Install `wheel` (replacing what is there) with the virtualenv's own pip, offline."""
    argv = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
            "--disable-pip-version-check", "--no-input", "--no-cache-dir", "--quiet", str(wheel)]
    if ignore_installed:
        argv.insert(4, "--ignore-installed")
    code, output = await run(reactor, argv, timeout)
    if code != 0:
        why = "timed out" if code is None else f"exited with status {code}"
        raise InstallFailed(f"pip install of {wheel.name} {why}: {output.strip()[-800:]}")


def remove_broken_dists(purelib: Path, name: str = DIST) -> list[str]:
    """Remove `name`'s dist-info directories that have no RECORD (what an install cut short
    leaves: pip can neither uninstall nor replace them); returns their names."""
    removed = []
    for info in purelib.glob(f"{name}-*.dist-info"):
        if info.is_dir() and not (info / "RECORD").exists():
            shutil.rmtree(info)
            removed.append(info.name)
    return removed


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def snapshot_wheel(purelib: Path, out_dir: Path, name: str = DIST) -> Path:
    """Rebuild the wheel of the installed distribution `name` from its files; returns its path.

    Scripts (outside site-packages) are left out: pip makes them again from entry_points.txt.
    An editable install has nothing to rebuild from and is refused.
    """
    dists = [d for d in metadata.distributions(path=[str(purelib)]) if d.metadata["Name"] == name]
    if not dists:
        raise InstallFailed(f"no {name} distribution is installed in {purelib}")
    dist = dists[0]
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        raise InstallFailed(f"{name} in {purelib} is an editable install: there is no release to keep for a rollback")
    tag = next((line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")), "py3-none-any")
    version = dist.version
    wheel = out_dir / f"{name}-{version}-{tag}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = wheel.with_name(wheel.name + ".part")
    records = []
    record_path = None
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
        for path in dist.files or ():
            parts = path.parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue
            if parts[0].endswith(".dist-info") and len(parts) == 2:
                if parts[1] == "RECORD":
                    record_path = str(path)
                if parts[1] in _INSTALL_ONLY:
                    continue
            data = Path(dist.locate_file(path)).read_bytes()
            z.writestr(str(path), data)
            records.append(f"{path},{_record_hash(data)},{len(data)}")
        if record_path is None:
            raise InstallFailed(f"{name} {version} in {purelib} has no RECORD; cannot keep it for a rollback")
        records.append(f"{record_path},,")
        z.writestr(record_path, "\n".join(records) + "\n")
    partial.replace(wheel)
    return wheel

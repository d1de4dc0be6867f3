"""`twistd gateway-updater`: supervise the connector, and update it from the service's signed releases.

One update, in order (docs/operations.md, *Updates*):

1. ask the service for the published manifest; check its signature against the pinned keys;
2. download the wheel and check its sha256 and size against the manifest;
3. take the group's update lease from the service (one connector per group at a time, never
   the last healthy one);
4. keep the running version's wheel for a rollback (rebuilt from the installed files if needed);
5. drain the connector (SIGTERM: GO_AWAY, open streams finish) and wait for it to exit: it is
   drained *before* the install so it never imports a module of the next version;
6. install the new wheel into the connector's virtualenv, start the connector;
7. wait until the service sees it active with the new version; if it exits or does not come up
   within `health_timeout`, install the kept wheel again, start it, and report the failure;
8. release the lease (a failure halts the rollout of that version to the group).

Anything refused before step 5 (signature, hash, an unreachable wheel, an install that fails)
leaves the running connector untouched. Every outcome is an admin event, in this process's log
and sent to the service.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.basic import LineOnlyReceiver

from gateway.connector.identity import ConnectorIdentity
from gateway.errors import GatewayError
from gateway.updater import install
from gateway.updater.config import UpdaterConfig
from gateway.updater.exchange import ExchangeFailed, MAX_EVENT_TEXT, UpdateClient
from gateway.updater.manifest import Manifest, ManifestRefused, file_digest, verify
from gateway.updater.supervisor import Supervisor, describe_exit

WHEELS_DIR = "wheels"
STATE_FILE = "state.json"
CONTROL_SOCKET = "control.sock"
# How often the health check asks the service while the new version comes up.
HEALTH_POLL = 1.0


# twistd from the virtualenv's Python whether or not the virtualenv has a twistd script
# (`python -m twisted` is the newer `twist`, which has no --nodaemon).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class UpdateFailed(GatewayError):
    """The new version did not come up."""


def connector_argv(config: UpdaterConfig) -> list[str]:
    """The connector as a child: twistd in the foreground, from the connector's virtualenv."""
    return [str(config.python), "-c", TWISTD, "--nodaemon", "--pidfile=", "gateway",
            "--config", str(config.connector_config)]


class Updater(MultiService):
    log = Logger()

    def __init__(self, config: UpdaterConfig, reactor: Any, client: Any = None, supervisor: Any = None,
                 installer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.client = client or UpdateClient(reactor, self._identity, proxy=self._proxy)
        self.supervisor = supervisor or Supervisor(reactor, connector_argv(config), config.restart_delay)
        self.installer = installer or VenvInstaller(reactor, config)
        self.version: str | None = None
        self.state = self._read_state()
        # None: no check running; else whether the running one was forced
        self._checking: bool | None = None
        self._waiters: list[Deferred] = []
        self._forced_waiters: list[Deferred] = []
        self._said: set[str] = set()
        self._poll = LoopingCall(self.poll)
        self._poll.clock = reactor
        # control connections of `gateway connector update` that hear this update's events
        self.listeners: list[Any] = []

    @property
    def ctx(self) -> dict[str, Any]:
        return {"venv": str(self.config.venv)}

    def _identity(self) -> ConnectorIdentity:
        return ConnectorIdentity.load(self.config.connector_state_dir)

    def _proxy(self, ident: ConnectorIdentity) -> Any:
        """The connector's forward proxy to the service, if it has one: the updater goes the same way."""
        from gateway.connector.proxy import choose_proxy

        return choose_proxy(self.config.proxy, self.config.proxy_password_file, ident.service_host,
                            ident.service_port)

    # -- start and stop ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.state_dir, 0o700)
        (self.config.state_dir / WHEELS_DIR).mkdir(exist_ok=True)
        ensureDeferred(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        self.version = await self.installer.installed_version()
        self.log.info("updater for the connector in {venv}: installed version {version}; checking for updates"
                      " every {interval:g}s ({mode})", version=self.version, interval=self.config.poll_interval,
                      mode="automatic" if self.config.auto else "manual: gateway connector update", **self.ctx)
        self.supervisor.start()
        if self.running:
            self._poll.start(self.config.poll_interval, now=False)

    def _start_failed(self, failure: Any) -> None:
        self.log.failure("the updater could not start the connector", failure, **self.ctx)
        self.reactor.stop()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._poll.running:
            self._poll.stop()
        # Stopping the updater stops (drains) the connector it supervises.
        return self.supervisor.stop(self.config.drain_timeout + self.config.stop_timeout)

    # -- checking --------------------------------------------------------------------------

    def poll(self) -> Deferred:
        return self.check(force=False).addErrback(lambda f: self.log.failure("update check failed", f, **self.ctx))

    def check(self, force: bool) -> Deferred:
        """One check (and update, if due); fires with (ok, text). One runs at a time: a caller
        during a check gets that check's outcome, unless it forces one and the running check was
        a poll (which leaves manual releases alone): then a forced check follows."""
        waiter: Deferred = Deferred()
        if self._checking is None:
            self._waiters.append(waiter)
            self._run_check(force)
        elif force and not self._checking:
            self._forced_waiters.append(waiter)
        else:
            self._waiters.append(waiter)
        return waiter

    def _run_check(self, force: bool) -> None:
        self._checking = force
        ensureDeferred(self._check(force)).addBoth(self._checked)

    def _checked(self, result: Any) -> None:
        self._checking = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if self._forced_waiters:
            self._waiters, self._forced_waiters = self._forced_waiters, []
            self._run_check(True)

    async def _check(self, force: bool) -> tuple[bool, str]:
        try:
            reply = await self.client.request("manifest")
        except ExchangeFailed as e:
            return self._refuse(f"could not ask the service for updates: {e}", key="unreachable")
        self._said.discard("unreachable")
        document = reply.get("manifest")
        if document is None:
            return self._quiet(True, "no update is published", "none")
        try:
            manifest = verify(document, list(self.config.public_keys))
        except ManifestRefused as e:
            return self._refuse(f"update manifest refused, version {self.version} untouched: {e}",
                                key=f"bad manifest {document.get('signature')!r}")
        if manifest.version == self.version:
            return self._quiet(True, f"version {self.version} is the published one", "current")
        if self.state.get("failed", {}).get(manifest.version) == manifest.sha256:
            return self._quiet(False, f"version {manifest.version} failed to come up here before and was rolled"
                                      " back; publish another release", f"failed {manifest.version}")
        if reply.get("halted") == manifest.version:
            return self._quiet(False, f"the rollout of {manifest.version} to this group is halted: it failed on"
                                      " another connector", f"halted {manifest.version}")
        if not force and (manifest.mode == "manual" or not self.config.auto):
            why = "the release is marked manual" if manifest.mode == "manual" else "[updater] auto is false"
            return self._quiet(True, f"version {manifest.version} is published; {why}: run `gateway connector"
                                     f" update` on this machine to install it", f"manual {manifest.version}")
        return await self._update(manifest)

    def _quiet(self, ok: bool, text: str, key: str) -> tuple[bool, str]:
        """An outcome said once in the log (polls repeat it), and to a waiting admin every time."""
        if key not in self._said:
            self._said.add(key)
            self.log.info("{text}", text=text, **self.ctx)
        self._tell(text)
        return ok, text

    def _refuse(self, text: str, key: str) -> tuple[bool, str]:
        """A refusal: an admin event once per cause (the service hears it too), and False."""
        if key not in self._said:
            self._said.add(key)
            self.event("error", text)
        else:
            self._tell(text)
        return False, text

    # -- updating ------------------------------------------------------------------------------

    async def _update(self, manifest: Manifest) -> tuple[bool, str]:
        wheel = self.config.state_dir / WHEELS_DIR / manifest.wheel
        if not _has(wheel, manifest):
            try:
                await self.client.fetch_wheel(manifest.wheel, wheel, manifest.sha256, manifest.size,
                                              self.config.max_wheel_bytes, self.config.download_timeout)
            except ExchangeFailed as e:
                return self._refuse(f"update to {manifest.version} refused, version {self.version} untouched:"
                                    f" {e}", key=f"fetch {manifest.sha256} {e}")
        duration = self.config.drain_timeout + self.config.stop_timeout + 2 * (
            self.config.install_timeout + self.config.health_timeout)
        try:
            lease = await self.client.request("lease", version=manifest.version, duration=duration)
        except ExchangeFailed as e:
            return self._refuse(f"could not ask the service for the update lease: {e}", key="lease unreachable")
        if not lease.get("granted"):
            return self._quiet(False, f"update to {manifest.version} waits: {lease.get('reason')}",
                               f"wait {lease.get('reason')}")
        outcome = "failed"
        try:
            outcome = await self._replace(manifest, wheel)
        finally:
            try:
                # "failed" halts the release for the group; "aborted" (nothing was changed) does not
                await self.client.request("release", version=manifest.version, outcome=outcome)
            except ExchangeFailed as e:
                self.log.warn("could not release the update lease ({error}); it expires by itself",
                              error=str(e), **self.ctx)
        if outcome == "aborted":
            return False, f"update to {manifest.version} refused, version {self.version} untouched"
        if outcome == "failed":
            return False, f"update to {manifest.version} failed and was rolled back to {self.version}"
        return True, f"updated to {manifest.version}"

    async def _replace(self, manifest: Manifest, wheel: Path) -> str:
        """"ok", "failed" (rolled back) or "aborted" (refused before the connector was touched)."""
        previous = self.version
        try:
            kept = await self.installer.keep_current(self.config.state_dir / WHEELS_DIR)
        except GatewayError as e:
            self.event("error", f"update to {manifest.version} refused, version {previous} untouched: cannot keep"
                                f" the running version for a rollback: {e}")
            return "aborted"
        self.event("info", f"updating from {previous} to {manifest.version}: draining the connector")
        await self.supervisor.stop(self.config.drain_timeout + self.config.stop_timeout)
        try:
            await self.installer.install(wheel)
            self.supervisor.start(restart=False)
            await self._healthy(manifest.version)
        except Exception as e:   # whatever went wrong once the connector was stopped, it must come back
            self.event("error", f"update to {manifest.version} failed: {e}; rolling back to {previous}")
            await self._roll_back(previous, kept, manifest)
            return "failed"
        self.supervisor.hold = False
        self.version = manifest.version
        self._prune(keep={wheel.name, kept.name})
        self.event("info", f"updated from {previous} to {manifest.version}; the connector is active with it")
        return "ok"

    async def _roll_back(self, previous: str | None, kept: Path, manifest: Manifest) -> None:
        self.state.setdefault("failed", {})[manifest.version] = manifest.sha256
        self._write_state()
        await self.supervisor.stop(self.config.drain_timeout + self.config.stop_timeout)
        try:
            await self.installer.install(kept)
            self.supervisor.start(restart=False)
            await self._healthy(previous)
        except Exception as e:
            self.event("error", f"the rollback to {previous} did not come up either: {e}; the updater keeps"
                                " restarting the connector")
        else:
            self.event("warn", f"rolled back to {previous} after the failed update to {manifest.version};"
                               " the connector is active again")
        self.supervisor.hold = False
        if not self.supervisor.running:
            self.supervisor.start()

    async def _healthy(self, version: str | None) -> None:
        """Returns once the service sees the connector active with `version`; UpdateFailed if it
        exits first or is not there within health_timeout."""
        deadline = self.reactor.seconds() + self.config.health_timeout
        last = "no answer from the service yet"
        while True:
            if not self.supervisor.running:
                code, signal = self.supervisor.last_exit or (None, None)
                raise UpdateFailed(f"the connector exited ({describe_exit(code, signal)}) before it came up")
            try:
                health = await self.client.request("health")
                versions = health.get("versions") or []
                if health.get("active") and versions == [version]:
                    return
                last = (f"the service sees it {'active' if health.get('active') else 'not connected'}"
                        f" with version(s) {', '.join(versions) or 'none'}")
            except ExchangeFailed as e:
                last = str(e)
            if self.reactor.seconds() >= deadline:
                raise UpdateFailed(f"not active with version {version} within {self.config.health_timeout:g}s"
                                   f" (health_timeout): {last}")
            await deferLater(self.reactor, HEALTH_POLL, lambda: None)

    # -- events, state -------------------------------------------------------------------------

    def event(self, level: str, text: str) -> None:
        """An admin event: this process's log (event "update") and the service's recent events."""
        getattr(self.log, level)("{text}", text=text, event="update", **self.ctx)
        self._tell(text)
        d = ensureDeferred(self.client.request("event", level=level, text=text[:MAX_EVENT_TEXT]))
        d.addErrback(lambda f: self.log.info("could not send the admin event to the service: {error}",
                                             error=f.getErrorMessage(), **self.ctx))

    def _tell(self, text: str) -> None:
        for listener in list(self.listeners):
            listener.say(text)

    def _read_state(self) -> dict[str, Any]:
        try:
            value = json.loads((self.config.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_state(self) -> None:
        path = self.config.state_dir / STATE_FILE
        path.with_name(STATE_FILE + ".tmp").write_text(json.dumps(self.state, indent=2))
        path.with_name(STATE_FILE + ".tmp").replace(path)

    def _prune(self, keep: set[str]) -> None:
        """Keep only the running version's wheel and the one before it."""
        for path in (self.config.state_dir / WHEELS_DIR).glob("*.whl"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _has(wheel: Path, manifest: Manifest) -> bool:
    """Whether a wheel downloaded before is there, whole and the manifest's."""
    try:
        return file_digest(wheel) == (manifest.sha256, manifest.size)
    except OSError:
        return False


class VenvInstaller:
    """The connector's virtualenv: which version it has, keeping its wheel, installing another."""

    log = Logger()

    def __init__(self, reactor: Any, config: UpdaterConfig) -> None:
        self.reactor = reactor
        self.config = config

    async def installed_version(self) -> str | None:
        return (await install.venv_info(self.reactor, self.config.python))["version"]

    async def keep_current(self, wheels: Path) -> Path:
        """The wheel of the installed version, kept in `wheels` (rebuilt from the installed files)."""
        info = await install.venv_info(self.reactor, self.config.python)
        return install.snapshot_wheel(Path(info["purelib"]), wheels)

    async def install(self, wheel: Path) -> None:
        try:
            await install.pip_install(self.reactor, self.config.python, wheel, self.config.install_timeout)
        except install.InstallFailed:
            # An install cut short (the previous attempt failing half way, a full disk) leaves a
            # dist-info without RECORD that pip cannot replace: remove it and install over the files.
            info = await install.venv_info(self.reactor, self.config.python)
            if not install.remove_broken_dists(Path(info["purelib"])):
                raise
            self.log.warn("removed a half-installed gateway from {venv}; installing {wheel} over it",
                          wheel=wheel.name, **{"venv": str(self.config.venv)})
            await install.pip_install(self.reactor, self.config.python, wheel, self.config.install_timeout,
                                      ignore_installed=True)


# -- `gateway connector update`: the control socket -------------------------------------------------


class ControlProtocol(LineOnlyReceiver):
    """One line in ("update"), the update's events out, then "ok: ..." or "failed: ..."."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def lineReceived(self, line: bytes) -> None:
        updater = self.factory.updater
        if line.strip() != b"update":
            self.say("failed: unknown request; this socket takes `update`")
            self.transport.loseConnection()
            return
        updater.listeners.append(self)

        def done(result: Any) -> None:
            if self in updater.listeners:
                updater.listeners.remove(self)
            if isinstance(result, tuple):
                ok, text = result
            else:
                ok, text = False, f"the update check failed: {result.getErrorMessage()}"
            self.say(f"{'ok' if ok else 'failed'}: {text}")
            self.transport.loseConnection()

        updater.check(force=True).addBoth(done)

    def say(self, text: str) -> None:
        self.sendLine(text.replace("\n", " ").encode("utf-8"))

    def connectionLost(self, reason: Any = None) -> None:
        updater = self.factory.updater
        if self in updater.listeners:
            updater.listeners.remove(self)


def control_service(updater: Updater, reactor: Any) -> StreamServerEndpointService:
    """The UNIX socket `gateway connector update` talks to, owner-only (mode 0600)."""
    path = updater.config.state_dir / CONTROL_SOCKET
    updater.config.state_dir.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    factory = Factory.forProtocol(ControlProtocol)
    factory.updater = updater
    escaped = str(path).replace(":", r"\:")
    return StreamServerEndpointService(serverFromString(reactor, f"unix:{escaped}:mode=600"), factory)

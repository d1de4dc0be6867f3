"""Unit tests of connector updates: manifests, the group lease, the reply decoder, the updater's steps."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from gateway.errors import ConfigError
from gateway.service.updates import MAX_LEASE, lease_expiry, lease_refusal
from gateway.store.records import UpdateLease
from gateway.updater import manifest as mf
from gateway.updater.config import parse_updater_config
from gateway.updater.daemon import Updater
from gateway.updater.exchange import ExchangeFailed, ReplyDecoder, encode_header
from gateway.updater.install import InstallFailed, snapshot_wheel

SHA = "ab" * 32


def release(version: str = "0.2.0", mode: str = "auto", sha256: str = SHA) -> mf.Manifest:
    return mf.Manifest(version=version, wheel=f"gateway-{version}-py3-none-any.whl", sha256=sha256, size=1000,
                       mode=mode)


# -- manifests ---------------------------------------------------------------------------------


def test_a_signed_manifest_verifies_with_its_key():
    """A manifest signed with a key is accepted, field for field, by an updater pinning that key."""
    key = mf.generate_key()
    document = json.loads(mf.encode_document(mf.sign(release(), key)))
    assert mf.verify(document, [key.public_key()]) == release()


def test_a_manifest_altered_after_signing_is_refused():
    """Changing any field after signing (the version here) makes the signature fail."""
    key = mf.generate_key()
    document = mf.sign(release(), key)
    document["manifest"]["sha256"] = "cd" * 32
    with pytest.raises(mf.ManifestRefused, match="does not verify with any pinned key"):
        mf.verify(document, [key.public_key()])


def test_a_manifest_signed_by_another_key_is_refused_naming_both_keys():
    """A manifest signed by a key the updater does not pin is refused; the message names the keys."""
    mine, theirs = mf.generate_key(), mf.generate_key()
    with pytest.raises(mf.ManifestRefused) as e:
        mf.verify(mf.sign(release(), theirs), [mine.public_key()])
    assert mf.key_id(theirs.public_key()) in str(e.value) and mf.key_id(mine.public_key()) in str(e.value)


@pytest.mark.parametrize("field,value,what", [
    ("wheel", "../gateway-0.2.0-py3-none-any.whl", "wheel"),
    ("wheel", "gateway-0.3.0-py3-none-any.whl", "wheel"),
    ("sha256", "AB" * 32, "sha256"),
    ("size", True, "size"),
    ("mode", "now", "mode"),
    ("extra", 1, "fields this updater does not know"),
])
def test_a_signed_but_malformed_manifest_is_refused(field, value, what):
    """Even with a good signature, a wheel name with a path, another version's wheel, upper-case hex,
    a non-number size, an unknown mode or unknown fields are refused."""
    key = mf.generate_key()
    body = {"version": "0.2.0", "wheel": "gateway-0.2.0-py3-none-any.whl", "sha256": SHA, "size": 1000,
            "mode": "auto"}
    body[field] = value
    signed = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    document = {"format": 1, "manifest": body, "signature": base64.b64encode(key.sign(signed)).decode()}
    with pytest.raises(mf.ManifestRefused, match=what):
        mf.verify(document, [key.public_key()])


def test_public_keys_round_trip_and_bad_ones_are_refused():
    """A public key printed as ed25519:BASE64 reads back; other text is refused with the expected form."""
    key = mf.generate_key().public_key()
    assert mf.key_id(mf.parse_public_key(mf.public_key_text(key))) == mf.key_id(key)
    for bad in ("ssh-ed25519 AAAA", "ed25519:!!!", "ed25519:" + "A" * 8):
        with pytest.raises(mf.ManifestRefused):
            mf.parse_public_key(bad)


# -- the lease ---------------------------------------------------------------------------------


def test_a_lease_held_by_another_connector_of_the_group_refuses_naming_it():
    """The group's live lease of another connector refuses; the holder itself may ask again; no lease grants.
    (The lease kept in the store, its expiry and the race of two nodes: test_store_shared_state.py.)"""
    held = UpdateLease("a", "2", datetime(2026, 1, 1, tzinfo=UTC))
    assert "connector a of group 'g' is updating to 2" in lease_refusal("g", "b", "2", held, None, ["a"], ["a"])
    assert lease_refusal("g", "a", "2", held, None, ["b"], ["b"]) is None
    assert lease_refusal("g", "b", "2", None, None, ["a"], ["a"]) is None


def test_the_last_healthy_connector_of_a_group_gets_no_lease_while_others_are_down():
    """With every other connector of the group down the lease is refused, naming them; a group
    of one connector may update (there is nobody to keep it lit)."""
    refusal = lease_refusal("g", "a", "2", None, None, ["b" * 32], [])
    assert "last healthy one of group 'g'" in refusal and "b" * 12 in refusal
    assert lease_refusal("solo", "a", "2", None, None, [], []) is None


def test_a_halted_version_is_refused_with_how_to_resume_and_another_is_not():
    """The group's halted version is refused saying how to go on; another version is not affected."""
    refusal = lease_refusal("g", "b", "3", None, "3", ["a"], ["a"])
    assert "halted" in refusal and "gateway update resume --group g" in refusal
    assert lease_refusal("g", "b", "4", None, "3", ["a"], ["a"]) is None


def test_a_lease_lasts_what_was_asked_within_bounds():
    """A lease ends after the asked duration, at least 1 s, at most MAX_LEASE."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert lease_expiry(now, 600) == now + timedelta(seconds=600)
    assert lease_expiry(now, 0) == now + timedelta(seconds=1)
    assert lease_expiry(now, 10 ** 9) == now + timedelta(seconds=MAX_LEASE)


# -- the reply decoder -------------------------------------------------------------------------


def test_the_reply_decoder_takes_a_header_split_anywhere_then_the_announced_body():
    """The header may arrive a byte at a time; the body goes to the sink, up to the size announced."""
    got = bytearray()
    decoder = ReplyDecoder(got.extend, max_body=10)
    data = encode_header({"type": "update_wheel", "size": 5}) + b"hello"
    for i in range(len(data)):
        decoder.feed(data[i:i + 1])
    assert decoder.header["size"] == 5 and bytes(got) == b"hello"


def test_the_reply_decoder_refuses_more_than_announced_or_allowed():
    """A body beyond the announced size, or a size above max_wheel_bytes, is an error, not a write."""
    decoder = ReplyDecoder(lambda data: None, max_body=10)
    with pytest.raises(ExchangeFailed, match="more than the 3 bytes"):
        decoder.feed(encode_header({"type": "update_wheel", "size": 3}) + b"four")
    with pytest.raises(ExchangeFailed, match="max_wheel_bytes"):
        ReplyDecoder(lambda data: None, max_body=10).feed(encode_header({"type": "update_wheel", "size": 11}) + b"x")
    with pytest.raises(ExchangeFailed, match="the service refused: nope"):
        ReplyDecoder().feed(encode_header({"type": "error", "message": "nope"}))


# -- snapshot of the installed version ---------------------------------------------------------


def _installed(site: Path, editable: bool = False) -> None:
    (site / "gateway").mkdir(parents=True)
    (site / "gateway" / "__init__.py").write_text("__version__ = '0.1.0'\n")
    info = site / "gateway-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gateway\nVersion: 0.1.0\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nTag: py3-none-any\n")
    (info / "INSTALLER").write_text("pip\n")
    if editable:
        (info / "direct_url.json").write_text(json.dumps({"url": "file:///src", "dir_info": {"editable": True}}))
    files = ["gateway/__init__.py", "gateway-0.1.0.dist-info/METADATA", "gateway-0.1.0.dist-info/WHEEL",
             "gateway-0.1.0.dist-info/INSTALLER", "gateway-0.1.0.dist-info/RECORD", "../../../bin/gateway"]
    if editable:
        files.append("gateway-0.1.0.dist-info/direct_url.json")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def test_the_installed_version_is_rebuilt_into_a_wheel_for_the_rollback(tmp_path):
    """The running version's files and metadata become a wheel (scripts and install records left
    out, RECORD made anew with hashes), so the first update can be rolled back."""
    _installed(tmp_path / "site")
    wheel = snapshot_wheel(tmp_path / "site", tmp_path / "kept")
    assert wheel.name == "gateway-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("gateway-0.1.0.dist-info/RECORD").decode()
    assert names == {"gateway/__init__.py", "gateway-0.1.0.dist-info/METADATA", "gateway-0.1.0.dist-info/WHEEL",
                     "gateway-0.1.0.dist-info/RECORD"}
    assert "gateway/__init__.py,sha256=" in record and "INSTALLER" not in record


def test_an_editable_install_cannot_be_kept_for_a_rollback(tmp_path):
    """An editable (development) install is refused with the reason: there is no release to keep."""
    _installed(tmp_path / "site", editable=True)
    with pytest.raises(InstallFailed, match="editable install"):
        snapshot_wheel(tmp_path / "site", tmp_path / "kept")


# -- the updater's configuration ----------------------------------------------------------------


def _updater_table(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    (tmp_path / "connector.toml").write_text(f'[connector]\nstate_dir = "{tmp_path / "state"}"\ndrain_timeout = 7\n')
    key = mf.public_key_text(mf.generate_key().public_key())
    return {"updater": {"connector_config": str(tmp_path / "connector.toml"), "venv": str(tmp_path / "venv"),
                        "state_dir": str(tmp_path / "updater"), "public_keys": [key], **extra}}


def test_the_updater_config_reads_the_connector_file_for_its_drain_and_identity(tmp_path):
    """[updater] names the connector's file; its state_dir and drain_timeout come from there."""
    config = parse_updater_config(_updater_table(tmp_path), str(tmp_path / "u.toml"))
    assert config.drain_timeout == 7 and config.connector_state_dir == tmp_path / "state"
    assert config.poll_interval == 300 and config.auto is True


@pytest.mark.parametrize("key,value,expected", [
    ("public_keys", [], "updater.public_keys"),
    ("public_keys", ["rsa:AAAA"], r"updater.public_keys\[0\]"),
    ("auto", "yes", "updater.auto"),
    ("poll_interval", 0, "updater.poll_interval"),
    ("venv", "/nonexistent", "updater.venv"),
])
def test_a_bad_updater_key_is_named(tmp_path, key, value, expected):
    """Each bad [updater] value is refused naming its key."""
    data = _updater_table(tmp_path)
    data["updater"][key] = value
    with pytest.raises(ConfigError, match=expected):
        parse_updater_config(data, str(tmp_path / "u.toml"))


# -- the updater's steps, with fakes -------------------------------------------------------------


class FakeClient:
    """The service, as the updater sees it: a published document, a lease, health, events."""

    def __init__(self, document: dict | None, wheel_bytes: bytes = b"", granted: bool = True) -> None:
        self.document = document
        self.wheel_bytes = wheel_bytes
        self.granted = granted
        self.calls: list[tuple[str, dict]] = []
        self.healthy_version: str | None = None
        self.events: list[tuple[str, str]] = []

    async def request(self, op: str, **params: Any) -> dict:
        self.calls.append((op, params))
        if op == "manifest":
            return {"type": "update_reply", "manifest": self.document, "halted": None}
        if op == "lease":
            return {"granted": self.granted, "reason": None if self.granted else "connector x is updating"}
        if op == "health":
            return {"active": self.healthy_version is not None, "versions": [self.healthy_version or "?"]}
        if op == "event":
            self.events.append((params["level"], params["text"]))
        return {"type": "update_reply"}

    async def fetch_wheel(self, name, destination, sha256, size, max_bytes, timeout) -> None:
        self.calls.append(("wheel", {"name": name}))
        if hashlib.sha256(self.wheel_bytes).hexdigest() != sha256:
            raise ExchangeFailed(f"wrong hash: the wheel {name} the service sent has sha256 ...")
        destination.write_bytes(self.wheel_bytes)


class FakeSupervisor:
    def __init__(self, client: FakeClient, comes_up: dict[str, bool]) -> None:
        self.client = client
        self.comes_up = comes_up   # version -> whether it comes up when started
        self.running = False
        self.hold = True
        self.installed = "0.1.0"
        self.stops = 0
        self.last_exit = None

    def start(self, restart: bool = True) -> None:
        self.hold = not restart
        if self.comes_up.get(self.installed, True):
            self.running = True
            self.client.healthy_version = self.installed
        else:
            self.running = False
            self.last_exit = (1, None)

    def stop(self, timeout: float):
        self.stops += 1
        self.running = False
        self.client.healthy_version = None
        return succeed((0, None))


class FakeInstaller:
    def __init__(self, supervisor: FakeSupervisor, kept: Path) -> None:
        self.supervisor = supervisor
        self.kept = kept
        self.installs: list[str] = []

    async def installed_version(self) -> str:
        return self.supervisor.installed

    async def keep_current(self, wheels: Path) -> Path:
        self.kept.write_bytes(b"old")
        return self.kept

    async def install(self, wheel: Path) -> None:
        self.installs.append(wheel.name)
        self.supervisor.installed = mf.wheel_version(wheel.name)


def make_updater(tmp_path: Path, document: dict | None, wheel_bytes: bytes = b"new wheel", granted: bool = True,
                 comes_up: dict[str, bool] | None = None, keys: list | None = None, auto: bool = True):
    (tmp_path / "updater").mkdir(exist_ok=True)
    (tmp_path / "updater" / "wheels").mkdir(exist_ok=True)
    config = parse_updater_config(_updater_table(tmp_path, auto=auto, health_timeout=30), str(tmp_path / "u.toml"))
    if keys is not None:
        from attrs import evolve

        config = evolve(config, public_keys=tuple(keys))
    clock = Clock()
    client = FakeClient(document, wheel_bytes, granted)
    supervisor = FakeSupervisor(client, comes_up or {})
    installer = FakeInstaller(supervisor, tmp_path / "updater" / "wheels" / "gateway-0.1.0-py3-none-any.whl")
    updater = Updater(config, clock, client=client, supervisor=supervisor, installer=installer)
    updater.version = "0.1.0"
    supervisor.start()
    return updater, client, supervisor, installer, clock


def signed(key, version="0.2.0", data=b"new wheel", mode="auto") -> dict:
    return mf.sign(mf.Manifest(version=version, wheel=f"gateway-{version}-py3-none-any.whl",
                               sha256=hashlib.sha256(data).hexdigest(), size=len(data), mode=mode), key)


def outcome(d) -> Any:
    results: list = []
    d.addBoth(results.append)
    assert results, "the check did not finish"
    return results[0]


def test_an_update_drains_installs_restarts_and_checks_health(tmp_path):
    """A good release: wheel fetched, lease taken, connector stopped, new wheel installed, started,
    seen healthy with the new version; lease released ok; an info admin event says so."""
    key = mf.generate_key()
    updater, client, supervisor, installer, clock = make_updater(tmp_path, signed(key), keys=[key.public_key()])
    ok, text = outcome(updater.check(force=False))
    assert ok and text == "updated to 0.2.0"
    assert updater.version == "0.2.0" and supervisor.running and supervisor.installed == "0.2.0"
    assert installer.installs == ["gateway-0.2.0-py3-none-any.whl"]
    assert ("release", {"version": "0.2.0", "outcome": "ok"}) in client.calls
    assert any("updated from 0.1.0 to 0.2.0" in text for _, text in client.events)


def test_a_bad_signature_is_refused_and_the_connector_untouched(tmp_path):
    """A manifest signed by another key: refused with an error admin event; nothing fetched,
    stopped or installed."""
    ours, theirs = mf.generate_key(), mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(theirs), keys=[ours.public_key()])
    ok, text = outcome(updater.check(force=True))
    assert not ok and "signature does not verify" in text and "0.1.0 untouched" in text
    assert supervisor.stops == 0 and installer.installs == [] and [op for op, _ in client.calls] == ["manifest", "event"]
    assert client.events[0][0] == "error"


def test_a_wheel_with_the_wrong_hash_is_refused_and_the_connector_untouched(tmp_path):
    """The service sends other bytes than the manifest's sha256: refused before any lease or drain."""
    key = mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(key), wheel_bytes=b"tampered",
                                                             keys=[key.public_key()])
    ok, text = outcome(updater.check(force=False))
    assert not ok and "wrong hash" in text and "0.1.0 untouched" in text
    assert supervisor.stops == 0 and installer.installs == [] and "lease" not in [op for op, _ in client.calls]


def test_without_the_lease_the_updater_waits(tmp_path):
    """A refused lease leaves the connector running and says why."""
    key = mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(key), granted=False,
                                                             keys=[key.public_key()])
    ok, text = outcome(updater.check(force=False))
    assert not ok and "waits: connector x is updating" in text and supervisor.stops == 0


def test_a_version_that_does_not_come_up_is_rolled_back_and_not_tried_again(tmp_path):
    """The new version exits at start: the kept wheel is installed again and started, the lease
    released as failed, and the next check does not retry that release."""
    key = mf.generate_key()
    updater, client, supervisor, installer, clock = make_updater(
        tmp_path, signed(key), keys=[key.public_key()], comes_up={"0.2.0": False})
    ok, text = outcome(updater.check(force=False))
    assert not ok and "rolled back to 0.1.0" in text
    assert installer.installs == ["gateway-0.2.0-py3-none-any.whl", "gateway-0.1.0-py3-none-any.whl"]
    assert supervisor.installed == "0.1.0" and supervisor.running and updater.version == "0.1.0"
    assert ("release", {"version": "0.2.0", "outcome": "failed"}) in client.calls
    assert any(level == "warn" and "rolled back to 0.1.0" in t for level, t in client.events)
    ok, text = outcome(updater.check(force=False))
    assert not ok and "failed to come up here before" in text and len(installer.installs) == 2


def test_a_version_not_healthy_in_time_is_rolled_back(tmp_path):
    """A new version that runs but never shows up active with its version is rolled back after health_timeout."""
    key = mf.generate_key()
    updater, client, supervisor, installer, clock = make_updater(tmp_path, signed(key), keys=[key.public_key()])
    real_start = supervisor.start

    def start_silent(restart: bool = True) -> None:
        real_start(restart)
        if supervisor.installed == "0.2.0":
            client.healthy_version = None   # running, never connected

    supervisor.start = start_silent
    d = updater.check(force=False)
    for _ in range(40):
        clock.advance(1)
    ok, text = outcome(d)
    assert not ok and supervisor.installed == "0.1.0"
    assert any("not active with version 0.2.0 within 30s" in t for _, t in client.events)


def test_a_manual_release_waits_for_gateway_connector_update(tmp_path):
    """mode manual: a poll leaves it (saying how to install it); a forced check installs it."""
    key = mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(key, mode="manual"),
                                                             keys=[key.public_key()])
    ok, text = outcome(updater.check(force=False))
    assert ok and "gateway connector update" in text and installer.installs == []
    ok, text = outcome(updater.check(force=True))
    assert ok and updater.version == "0.2.0"


def test_every_package_of_the_tree_is_in_the_wheel():
    """pyproject's package list names every package under gateway/ and plugins/: a package left out
    makes a wheel whose connector dies at import, which an update would install."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "gateway").rglob("__init__.py")}
    found |= {p.parent.name for p in (root / "plugins").glob("*/*/__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_a_running_version_that_cannot_be_kept_aborts_without_halting_the_group(tmp_path):
    """If the running version's wheel cannot be kept for a rollback, the update is refused before the
    connector is touched, and the lease is released as aborted (the release is not halted for the group)."""
    key = mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(key), keys=[key.public_key()])

    async def cannot_keep(wheels: Path) -> Path:
        raise InstallFailed("gateway in /venv is an editable install: there is no release to keep for a rollback")

    installer.keep_current = cannot_keep
    ok, text = outcome(updater.check(force=False))
    assert not ok and "0.1.0 untouched" in text and supervisor.stops == 0 and installer.installs == []
    assert ("release", {"version": "0.2.0", "outcome": "aborted"}) in client.calls
    assert any("editable install" in t for _, t in client.events)


def test_a_half_installed_version_is_found_and_removed_for_the_rollback(tmp_path):
    """A gateway dist-info without RECORD (an install cut short) is removed, so the kept wheel can be
    installed over it; a whole installation is left alone."""
    from gateway.updater.install import remove_broken_dists

    _installed(tmp_path / "site")
    broken = tmp_path / "site" / "gateway-0.2.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Name: gateway\nVersion: 0.2.0\n")
    assert remove_broken_dists(tmp_path / "site") == ["gateway-0.2.0.dist-info"]
    assert not broken.exists() and (tmp_path / "site" / "gateway-0.1.0.dist-info" / "RECORD").exists()


def test_gateway_connector_update_during_a_poll_gets_a_forced_check_after_it(tmp_path):
    """A forced check asked while a poll is running (which leaves a manual release alone) runs
    after that poll instead of taking its answer, and installs the manual release."""
    key = mf.generate_key()
    updater, client, supervisor, installer, _ = make_updater(tmp_path, signed(key, mode="manual"),
                                                             keys=[key.public_key()])
    from twisted.internet.defer import Deferred

    gate: Deferred = Deferred()
    real_request = client.request

    async def slow_manifest(op: str, **params: Any) -> dict:
        if op == "manifest" and not gate.called:
            await gate
        return await real_request(op, **params)

    client.request = slow_manifest
    poll = updater.check(force=False)
    forced = updater.check(force=True)
    gate.callback(None)
    ok, text = outcome(poll)
    assert ok and "run `gateway connector update`" in text
    ok, text = outcome(forced)
    assert ok and text == "updated to 0.2.0" and updater.version == "0.2.0"

"""Connector updates (issue 14, part D) with real wheels, virtualenvs and processes.

Wheels of three versions are built once for the module from a copy of this tree (N, N+1, and a
broken N+2 whose connector dies at start); one virtualenv with N installed is made once and
copied for each connector. The virtualenvs see this tree's dependencies through a .pth file, not
its gateway: the connector runs the wheel installed in its own virtualenv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gateway_harness import BIN, TWISTD, free_port, subprocess_env, toml_table, wait_until
from gateway_harness import http_request as get
from loadgen import HttpBackend, LoadGen, Seen, tcp_handler
from proxy_harness import password_file, tinyproxy  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
N, N1, N2 = "0.90.1", "0.90.2", "0.90.3"
WEB = "web.apps.example.test"
BROKEN = 'raise RuntimeError("this build is broken on purpose (the update test\'s N+2)")\n'


def _source_copy(dest: Path, version: str, broken: bool) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
    dest.mkdir(parents=True)
    for name in ("gateway", "plugins"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    (dest / "twisted" / "plugins").mkdir(parents=True)
    for plugin in (ROOT / "twisted" / "plugins").glob("*.py"):
        shutil.copy(plugin, dest / "twisted" / "plugins")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    project = (dest / "pyproject.toml").read_text()
    (dest / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', project, count=1))
    init = (dest / "gateway" / "__init__.py").read_text()
    (dest / "gateway" / "__init__.py").write_text(
        re.sub(r'(?m)^__version__ = ".*"$', f'__version__ = "{version}"', init, count=1))
    if broken:
        node = dest / "gateway" / "connector" / "node.py"
        node.write_text(node.read_text() + BROKEN)
    return dest


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """{version: wheel path} for N, N+1 and the broken N+2, built in parallel once per module."""
    base = tmp_path_factory.mktemp("releases")
    out = base / "wheels"
    builds = []
    for version, broken in ((N, False), (N1, False), (N2, True)):
        src = _source_copy(base / f"src-{version}", version, broken)
        builds.append(subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "-w", str(out / version), str(src)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for build in builds:
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, output
    return {v: next((out / v).glob("gateway-*.whl")) for v in (N, N1, N2)}


@pytest.fixture(scope="module")
def venv_n(tmp_path_factory, releases):
    """A virtualenv with wheel N installed (and this tree's dependencies through a .pth)."""
    venv = tmp_path_factory.mktemp("venv") / "n"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   env={**subprocess_env(), "VIRTUAL_ENV": ""})
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "gateway-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(releases[N])], check=True, timeout=300)
    return venv


def versions(svc, gw) -> dict[str, tuple[str, str]]:
    """connector id -> (state, software version), as the service's store has them."""
    result = gw.cli("connectors", "list", "--json", "--config", str(svc.config_path))
    assert result.returncode == 0, result.stderr
    return {c["connector_id"]: (c["state"], c["software_version"]) for c in json.loads(result.stdout)}


def all_on(svc, gw, connectors, version: str) -> bool:
    now = versions(svc, gw)
    return all(now.get(c.connector_id) == ("active", version) for c in connectors)


class Updater:
    """An updater process beside one registered connector, with the connector's own virtualenv."""

    def __init__(self, gw, connector, venv_template: Path, public_key: str, **extra) -> None:
        self.gw = gw
        self.connector = connector
        self.venv = connector.dir / "venv"
        shutil.copytree(venv_template, self.venv, symlinks=True)
        self.state_dir = connector.dir / "updater"
        self.config_path = connector.dir / "updater.toml"
        self.config_path.write_text(toml_table("updater", {
            "connector_config": str(connector.config_path), "venv": str(self.venv),
            "state_dir": str(self.state_dir), "public_keys": [public_key], "poll_interval": 1,
            "health_timeout": 60, "stop_timeout": 15, "restart_delay": 0.5, **extra}))
        self.proc = None

    def start(self):
        self.proc = self.gw.spawn(f"updater-{self.connector.name}",
                                  [TWISTD, "-n", "--pidfile=", "gateway-updater", "--config", str(self.config_path)])
        return self

    def log(self) -> str:
        return self.proc.log()

    def update_now(self) -> subprocess.CompletedProcess:
        return self.gw.cli("connector", "update", "--config", str(self.config_path), timeout=180)


def signing_key(gw) -> tuple[Path, str]:
    path = gw.tmp / f"signing-{next(gw.counter)}.pem"
    result = gw.cli("update", "keygen", "--key", str(path))
    assert result.returncode == 0, result.stderr
    return path, result.stdout.strip()


def publish(gw, svc, key: Path, wheel: Path, mode: str = "auto") -> Path:
    manifest = gw.tmp / f"{wheel.name}.{next(gw.counter)}.manifest.json"
    result = gw.cli("update", "sign", "--key", str(key), "--wheel", str(wheel), "--mode", mode,
                    "--output", str(manifest))
    assert result.returncode == 0, result.stderr
    result = gw.cli("update", "publish", "--config", str(svc.config_path), "--manifest", str(manifest),
                    "--wheel", str(wheel))
    assert result.returncode == 0, result.stderr
    return manifest


def group_of_two(gw, backends, web_backend, tcp_seen):
    tcp_backend = backends(tcp_handler(tcp_seen, delay=0.005))
    front = free_port()
    svc = gw.service(apps=[{"name": "tcp", "destination": tcp_backend.destination}], start=False,
                     service={"heartbeat_interval": 1})
    svc.add_front_door(front, [{"name": "web", "external_url": f"http://{WEB}:{front}/",
                                "internal_url": web_backend.url}])
    svc.start()
    connectors = [gw.connector(svc, name=f"c{i}", start=False, tunnels=2, drain_timeout=10) for i in range(2)]
    return svc, front, connectors


@pytest.mark.timeout(600)
def test_a_group_rolls_to_the_next_version_under_load_and_a_broken_one_is_rolled_back(gw, backends, releases,
                                                                                       venv_n):
    """Two connectors under HTTP and TCP load: N+1 is rolled out one at a time with not one failed
    request, both end on N+1; a broken N+2 fails on the first, is rolled back to N+1 and halted for
    the group, so the second never tries it and the group is never dark."""
    web_backend = HttpBackend(delay=0.005)
    tcp_seen = Seen()
    svc, front, connectors = group_of_two(gw, backends, web_backend, tcp_seen)
    key, public = signing_key(gw)
    updaters = [Updater(gw, c, venv_n, public).start() for c in connectors]
    wait_until(lambda: all_on(svc, gw, connectors, N), 60, f"both connectors active on {N}", interval=0.5)
    wait_until(lambda: get(front, f"{WEB}:{front}", "/")[0].status == 200, 30, "the web app to answer")
    load = LoadGen(http_port=front, http_host=f"{WEB}:{front}", tcp_port=svc.app_port("tcp"),
                   http_workers=3, tcp_workers=2, max_requests=100_000, max_seconds=400)
    try:
        with load:
            wait_until(lambda: load.succeeded("tcp") > 50 and load.succeeded("http-post") > 50, 30, "load flowing")
            publish(gw, svc, key, releases[N1])
            wait_until(lambda: all_on(svc, gw, connectors, N1), 240, f"both connectors active on {N1}",
                       interval=0.5)
            done = load.done
            wait_until(lambda: load.done > done + 100, 30, "load to carry on after the update")
            publish(gw, svc, key, releases[N2])
            wait_until(lambda: any("rolled back to " + N1 in u.log() for u in updaters), 240,
                       "the broken release to be rolled back")
            first = next(u for u in updaters if "rolled back to " + N1 in u.log())
            other = next(u for u in updaters if u is not first)
            wait_until(lambda: f"the rollout of {N2} to this group is halted" in other.log(), 60,
                       "the other updater to see the rollout halted")
            wait_until(lambda: all_on(svc, gw, connectors, N1), 60, f"both connectors back on {N1}", interval=0.5)
            done = load.done
            wait_until(lambda: load.done > done + 100, 30, "load to carry on after the rollback")
    finally:
        web_backend.close()
    assert load.failures == [], f"{load.summary()}; first: {load.failures[:5]}"
    assert web_backend.seen.twice() == [] and tcp_seen.twice() == []
    for updater in updaters:
        assert f"updated from {N} to {N1}" in updater.log(), updater.log()[-3000:]
    assert "this build is broken on purpose" in first.log()
    assert f"update to {N2} failed" in first.log() and f"updating from {N1} to {N2}" not in other.log()
    # one at a time: the service never granted the second lease while the first was held
    service_log = svc.log()
    grants = re.findall(r"connector (\w+) \(group default\) may update to (\S+) now", service_log)
    assert [v for _, v in grants] == [N1, N1, N2], grants
    assert "no healthy connector of group" not in service_log
    # the updaters' admin events reached the service
    assert f"updated from {N} to {N1}" in service_log and f"rolled back to {N1}" in service_log
    # and their own admin logs, which an admin reads on the connector's machine
    shown = gw.cli("logs", "show", "--kind", "admin", "--config", str(first.connector.config_path))
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"updater\s*: .*rolled back to {re.escape(N1)}", shown.stdout), shown.stdout[-3000:]
    # the halt is in the store: an admin lifts it (the updaters stopped first, N2 is still broken)
    for updater in updaters:
        updater.proc.stop()
    resumed = gw.cli("update", "resume", "--config", str(svc.config_path), "--group", "default")
    assert resumed.returncode == 0 and f"the rollout of {N2} to group 'default' goes on" in resumed.stderr, resumed
    again = gw.cli("update", "resume", "--config", str(svc.config_path), "--group", "default")
    assert again.returncode == 0 and "is not halted" in again.stderr, again


@pytest.mark.timeout(300)
def test_a_bad_signature_a_wrong_hash_and_an_unreachable_wheel_are_refused(gw, tmp_path, releases, venv_n,
                                                                           tinyproxy):
    """Through the real service: a manifest signed by another key, a wheel whose bytes are not the
    manifest's, a wheel the service cannot serve, and a lease for the last healthy connector of a
    group whose other connector is down are each refused saying why (the first three as admin
    events on the service), and the running connector (same process, version N) is never touched;
    once the connector is deleted its certificate gets no answer at all.
    The connector reaches the service through a forward proxy (tinyproxy, basic auth): so does its updater."""
    svc = gw.service()
    connector = gw.connector(svc, name="c0", start=False, tunnels=1, drain_timeout=5)
    proxied = f'[connector]\nproxy = "{tinyproxy.url}"\nproxy_password_file = "{password_file(tmp_path)}"\n'
    connector.config_path.write_text(connector.config_path.read_text().replace("[connector]\n", proxied, 1))
    key, public = signing_key(gw)
    other_key, _ = signing_key(gw)
    updater = Updater(gw, connector, venv_n, public, auto=False).start()
    wait_until(lambda: all_on(svc, gw, [connector], N), 60, f"the connector active on {N}", interval=0.5)
    published = svc.state_dir / "updates" / "wheels" / releases[N1].name

    publish(gw, svc, other_key, releases[N1])
    result = updater.update_now()
    assert result.returncode == 1 and "signature does not verify with any pinned key" in result.stdout, result.stdout

    publish(gw, svc, key, releases[N1])
    tampered = bytearray(releases[N1].read_bytes())
    tampered[-30] ^= 0xFF   # the same size, one byte changed: only the hash can tell
    published.write_bytes(bytes(tampered))
    result = updater.update_now()
    assert result.returncode == 1 and "wrong hash" in result.stdout, result.stdout

    published.unlink()   # the wheel the manifest names is gone from the service
    result = updater.update_now()
    assert result.returncode == 1 and "cannot read the wheel" in result.stdout, result.stdout

    assert all_on(svc, gw, [connector], N)
    assert updater.log().count("connector started (pid") == 1 and "draining the connector" not in updater.log()
    service_log = svc.log()
    for why in ("signature does not verify", "wrong hash", "cannot read the wheel"):
        assert re.search(rf"updater of connector \w+ \(error\): .*{why}", service_log), why

    # a second connector of the group registered but down: this one is the last healthy one
    shutil.copy(releases[N1], published)
    assert gw.register(svc, name="c1").returncode == 0
    result = updater.update_now()
    assert result.returncode == 1 and "the last healthy one of group 'default'" in result.stdout, result.stdout
    assert all_on(svc, gw, [connector], N)
    down = next(cid for cid in versions(svc, gw) if cid != connector.connector_id)
    assert svc.delete_connector(down).returncode == 0   # gone for good: the group is this one alone

    # and the good release, asked for by hand, installs (manual: auto is false here)
    result = updater.update_now()
    assert result.returncode == 0 and f"updated to {N1}" in result.stdout, result.stdout
    assert all_on(svc, gw, [connector], N1)
    # a deleted connector's certificate gets nothing from the service
    assert svc.delete_connector(connector.connector_id).returncode == 0
    result = updater.update_now()
    assert result.returncode == 1 and "this connector was deleted from the service" in result.stdout, result.stdout
    # every exchange went through the proxy too: far more CONNECTs than the connector's two runs made
    assert tinyproxy.connects_to(svc.address) > 20, tinyproxy.connects_to(svc.address)

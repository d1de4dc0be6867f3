"""Integration fixtures: real `twistd gateway` and `gateway` processes on 127.0.0.1.

Everything runs in the test's tmp_path on free ports. Every process a test starts is stopped
at teardown (SIGTERM, then SIGKILL after a deadline); every wait polls with a deadline. When a
test fails, the tail of each process log is printed.

Back ends (echo, sink, source, slow source) are plain-socket threads in the test process, so
they never share an event loop with the code under test.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
GATEWAY = str(BIN / "gateway")
HOST = "127.0.0.1"

STOP_DEADLINE = 10.0
START_DEADLINE = 30.0


# -- generic helpers --------------------------------------------------------------------------

from ports import free_port  # noqa: E402  (tests/support: PostgreSQL's port comes from there too)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on HOST:port now."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the predicate may fail until ready
            last_error = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GATEWAY_DISABLE_PLUGINS", None)
    env.pop("GATEWAY_ENROL_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def stop_process(popen: subprocess.Popen, deadline: float = STOP_DEADLINE) -> None:
    """SIGTERM a helper process the test started itself (nginx, an OpenID provider), then SIGKILL
    if it has not exited by the deadline."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(deadline)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(deadline)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_table(name: str, values: dict[str, Any], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head, *(f"{k} = {toml_value(v)}" for k, v in values.items())]) + "\n"


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """One child process whose stdout and stderr go to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout}s") from None

    def stop(self, deadline: float = STOP_DEADLINE) -> int:
        """SIGTERM, then SIGKILL if it has not exited by the deadline."""
        if self.running:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(deadline)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()
        return self.popen.returncode

    def kill9(self) -> None:
        if self.running:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(STOP_DEADLINE)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])


class Service:
    """A service node: config file, state dir, ports, and the twistd process running it."""

    def __init__(self, gw: Gateway, name: str, apps: list[dict[str, Any]], service: dict[str, Any],
                 tunnel: dict[str, Any], logging: dict[str, Any]) -> None:
        self.gw = gw
        self.name = name
        self.dir = gw.tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.port = free_port()
        self.apps = list(apps)
        self.service_extra = dict(service)
        self.tunnel = dict(tunnel)
        self.logging = {"level": "info", **logging}
        self.config_path = self.dir / "svc.toml"
        self.proc: Proc | None = None
        self.starts = 0
        self.write_config()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def app_port(self, name: str) -> int:
        for app in self.apps:
            if app["name"] == name:
                return app["port"]
        raise KeyError(name)

    def write_config(self) -> None:
        text = toml_table("service", {
            "state_dir": str(self.state_dir), "listen": f"tcp:{self.port}:interface={HOST}",
            "node_id": self.name, "names": ["localhost", HOST], **self.service_extra,
        })
        for app in self.apps:
            entry = {k: v for k, v in app.items() if k != "port"}
            if "segments" not in entry:   # a private app has no listen of its own
                entry.setdefault("listen", f"tcp:{app['port']}:interface={HOST}")
            if "listen" in entry:   # anyone who reaches a listen app connects: the config must say so
                entry["options"] = {"preauth": "none", **entry.get("options", {})}
            text += "\n" + toml_table("apps", entry, array=True)
        if self.tunnel:
            text += "\n" + toml_table("tunnel", self.tunnel)
        text += "\n" + toml_table("logging", self.logging)
        self.config_path.write_text(text)

    def add_app(self, name: str, destination: str, **extra: Any) -> int:
        port = free_port()
        self.apps.append({"name": name, "destination": destination, "port": port, **extra})
        self.write_config()
        return port

    def add_front_door(self, port: int, apps: list[dict[str, Any]], http: dict[str, Any] | None = None,
                       more: str = "") -> None:
        """Append to the config file an [http] front door listening on 127.0.0.1:`port` (with more
        `http` keys), the TOML in `more` (say [http.oidc]) and `apps` as web apps (protocol http).
        write_config rewrites the file without them."""
        text = self.config_path.read_text()
        text += "\n" + toml_table("http", {"listen": f"tcp:{port}:interface={HOST}", **(http or {})}) + more
        for app in apps:
            text += "\n" + toml_table("apps", {"protocol": "http", **app}, array=True)
        self.config_path.write_text(text)

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Proc:
        self.starts += 1
        self.proc = self.gw.spawn(
            f"{self.name}-{self.starts}",
            [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(self.config_path)], env=env,
        )
        if wait:
            self.wait_listening()
        return self.proc

    def wait_listening(self) -> None:
        proc = self.proc
        wait_until(lambda: _alive_and(proc, "listening for tunnels" in proc.log()), START_DEADLINE,
                   f"{proc.name} to listen")

    def stop(self) -> int:
        return self.proc.stop()

    def kill9(self) -> None:
        self.proc.kill9()

    def restart(self) -> Proc:
        self.proc.stop()
        return self.start()

    def log(self) -> str:
        """The logs of every run of this service, oldest first."""
        return "".join(p.log() for p in self.gw.procs if p.name.startswith(f"{self.name}-"))

    def token(self, lifetime: int | None = None, group: str | None = None) -> Path:
        path = self.gw.tmp / f"token-{next(self.gw.counter)}.txt"
        argv = ["token", "create", "--config", str(self.config_path), "--output", str(path)]
        if lifetime is not None:
            argv += ["--lifetime", str(lifetime)]
        if group is not None:
            argv += ["--group", group]
        result = self.gw.cli(*argv)
        assert result.returncode == 0, result.stderr
        self.gw.secrets.append(path.read_text().strip().split(".")[2])
        return path

    def delete_connector(self, connector_id: str) -> subprocess.CompletedProcess:
        return self.gw.cli("connectors", "delete", "--config", str(self.config_path), connector_id)


class Connector:
    """A registered connector's state dir, config file and twistd process."""

    def __init__(self, gw: Gateway, name: str, service: Service) -> None:
        self.gw = gw
        self.name = name
        self.service = service
        self.dir = gw.tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "conn.toml"
        self.proc: Proc | None = None
        self.starts = 0
        self.tunnels = 2

    @property
    def connector_id(self) -> str:
        text = (self.state_dir / "connection.toml").read_text()
        return re.search(r'connector_id = "([0-9a-f]+)"', text).group(1)

    def configure(self, tunnels: int = 1, backoff_initial: float = 0.2, backoff_max: float = 1.0,
                  drain_timeout: float | None = None, ping_interval: float | None = None,
                  log_format: str = "text", log_level: str = "info", logging: dict[str, Any] | None = None,
                  **tunnel: Any) -> None:
        self.tunnels = tunnels
        values: dict[str, Any] = {"state_dir": str(self.state_dir), "tunnels": tunnels,
                                  "backoff_initial": backoff_initial, "backoff_max": backoff_max}
        if drain_timeout is not None:
            values["drain_timeout"] = drain_timeout
        text = toml_table("connector", values)
        if ping_interval is not None:
            tunnel["ping_interval"] = ping_interval
        if tunnel:
            text += "\n" + toml_table("tunnel", tunnel)
        text += "\n" + toml_table("logging", {"format": log_format, "level": log_level, **(logging or {})})
        self.config_path.write_text(text)

    def start(self, wait: bool = True) -> Proc:
        if not self.config_path.exists():
            self.configure()
        self.starts += 1
        self.proc = self.gw.spawn(
            f"{self.name}-{self.starts}",
            [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(self.config_path)],
        )
        if wait:
            self.wait_up()
        return self.proc

    def up_count(self) -> int:
        return len(re.findall(r"tunnel \S+ up to node", self.proc.log()))

    def wait_up(self, count: int | None = None, timeout: float = START_DEADLINE) -> None:
        """Wait until this run of the connector logged `count` tunnels up (default: all)."""
        count = self.tunnels if count is None else count
        proc = self.proc
        wait_until(lambda: _alive_and(proc, self.up_count() >= count), timeout,
                   f"{proc.name}: {count} tunnels up")

    def stop(self) -> int:
        return self.proc.stop()

    def kill9(self) -> None:
        self.proc.kill9()

    def log(self) -> str:
        return "".join(p.log() for p in self.gw.procs if p.name.startswith(f"{self.name}-"))


def _alive_and(proc: Proc, condition: bool) -> bool:
    if condition:
        return True
    if not proc.running:
        raise AssertionError(f"{proc.name} exited with {proc.returncode}:\n{proc.tail()}")
    return False


class Gateway:
    """Starts services and connectors for one test and cleans up after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.cli_logs: list[tuple[str, str]] = []
        self.secrets: list[str] = []
        self.counter = iter(range(1, 1_000_000))
        self._names = iter(range(1, 1_000_000))

    # -- processes --

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.tmp / f"{name}.log", self.tmp, env or subprocess_env())
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [GATEWAY, *args], capture_output=True, text=True, cwd=self.tmp, env=env or subprocess_env(),
            timeout=timeout, input=stdin,
        )
        self.cli_logs.append((" ".join(["gateway", *args]), result.stdout + result.stderr))
        return result

    def twistd(self, config: Path, env: dict[str, str] | None = None, timeout: float = 60.0,
               ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(config)], capture_output=True, text=True,
            cwd=self.tmp, env=env or subprocess_env(), timeout=timeout,
        )
        self.cli_logs.append((f"twistd --config {config}", result.stdout + result.stderr))
        return result

    # -- roles --

    def service(self, apps: list[dict[str, Any]] | None = None, name: str = "svc", start: bool = True,
                service: dict[str, Any] | None = None, tunnel: dict[str, Any] | None = None,
                logging: dict[str, Any] | None = None) -> Service:
        """A service; each app is {name, destination, [port], ...}; a free listen port is chosen."""
        apps = [{**a, "port": a.get("port") or free_port()} for a in (apps or [])]
        svc = Service(self, name, apps, service or {}, tunnel or {}, logging or {})
        if start:
            svc.start()
        return svc

    def register(self, service: Service, name: str | None = None, token: Path | None = None,
                 state_dir: Path | None = None) -> subprocess.CompletedProcess:
        token = token or service.token()
        name = name or f"conn{next(self._names)}"
        state_dir = state_dir or self.tmp / name / "state"
        return self.cli("connector", "register", "--service", service.address, "--token-file", str(token),
                        "--state-dir", str(state_dir), "--name", name)

    def connector(self, service: Service, name: str | None = None, start: bool = True,
                  **options: Any) -> Connector:
        """Register a new connector with `service`, write its config and (by default) start it."""
        name = name or f"conn{next(self._names)}"
        conn = Connector(self, name, service)
        result = self.register(service, name=name, state_dir=conn.state_dir)
        assert result.returncode == 0, f"register failed: {result.stdout}{result.stderr}"
        conn.configure(**options)
        if start:
            conn.start()
        return conn

    # -- logs --

    def all_logs(self) -> str:
        parts = [p.log() for p in self.procs if p.log_path.exists()]
        parts += [out for _, out in self.cli_logs]
        return "\n".join(parts)

    def assert_no_secret_in_logs(self) -> None:
        text = self.all_logs()
        for secret in self.secrets:
            assert secret not in text, "a token secret appears in a log or command output"

    def dump(self) -> None:
        for proc in self.procs:
            print(f"\n===== {proc.name} (pid {proc.pid}, rc {proc.returncode}) {' '.join(proc.argv)}")
            print(proc.tail())
        for cmd, out in self.cli_logs[-10:]:
            print(f"\n===== {cmd}\n{out[-3000:]}")

    def cleanup(self, deadline: float = 5.0) -> None:
        """SIGTERM everything still running, then SIGKILL whatever outlives a shared deadline."""
        for proc in self.procs:
            proc.signal(signal.SIGTERM)
        end = time.monotonic() + deadline
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill9()
            proc._log.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def gw(tmp_path, request):
    gateway = Gateway(tmp_path)
    yield gateway
    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed or hasattr(rep, "wasxfail")
    gateway.cleanup()
    if failed:
        gateway.dump()
    # Whatever the test did, no token secret may show up in any log or command output.
    gateway.assert_no_secret_in_logs()


# -- back ends (plain sockets, threads) --------------------------------------------------------


class Backend:
    """A threaded TCP server on 127.0.0.1; `handler(conn, backend)` runs per connection."""

    def __init__(self, handler: Callable[[socket.socket, Backend], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.results: list[Any] = []
        self.accepted = 0
        self.eofs = 0  # connections whose EOF a handler saw (sized_sink_handler counts them)
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def destination(self) -> str:
        return f"{HOST}:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, result: Any) -> None:
        with self.lock:
            self.results.append(result)

    def wait_results(self, n: int, timeout: float) -> list[Any]:
        wait_until(lambda: len(self.results) >= n, timeout, f"{n} results from the back end")
        return list(self.results)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


CHUNK = 1024 * 1024
_POOL = os.urandom(4 * CHUNK)


def chunks(total: int, seed: int = 0):
    """`total` bytes of varied content, as memoryviews of up to 1 MiB."""
    view = memoryview(_POOL)
    k = seed
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        offset = (k * 7919 * 13) % (len(_POOL) - CHUNK)
        yield view[offset:offset + n]
        sent += n
        k += 1


def echo_handler(conn: socket.socket, backend: Backend) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def sink_handler(conn: socket.socket, backend: Backend) -> None:
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    backend.record((n, h.hexdigest()))


def sized_sink_handler(total: int) -> Callable[[socket.socket, Backend], None]:
    """Like sink_handler, but records as soon as `total` bytes came (without waiting for EOF)."""

    def handler(conn: socket.socket, backend: Backend) -> None:
        h = hashlib.sha256()
        n = 0
        while n < total:
            data = conn.recv(min(1 << 20, total - n))
            if not data:
                break
            h.update(data)
            n += len(data)
        backend.record((n, h.hexdigest()))
        while conn.recv(65536):
            pass
        backend.eofs += 1

    return handler


def stalled_sink_handler(total: int, release: threading.Event) -> Callable[[socket.socket, Backend], None]:
    """A back end that reads nothing until `release` is set, then reads `total` bytes like sized_sink."""
    inner = sized_sink_handler(total)

    def handler(conn: socket.socket, backend: Backend) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        if release.wait(120):
            inner(conn, backend)

    return handler


def source_handler(total: int) -> Callable[[socket.socket, Backend], None]:
    def handler(conn: socket.socket, backend: Backend) -> None:
        h = hashlib.sha256()
        n = 0
        for chunk in chunks(total, seed=backend.accepted):
            conn.sendall(chunk)
            h.update(chunk)
            n += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        backend.record((n, h.hexdigest()))
        # Wait for the client to close, so the last bytes are not lost to a reset.
        while conn.recv(65536):
            pass

    return handler


def slow_source_handler(count: int, chunk: int = 32 * 1024, interval: float = 0.02):
    """Sends `count` chunks of `chunk` bytes, one every `interval` seconds, then closes."""

    def handler(conn: socket.socket, backend: Backend) -> None:
        h = hashlib.sha256()
        n = 0
        for k in range(count):
            data = next(chunks(chunk, seed=k))
            conn.sendall(data)
            h.update(data)
            n += len(data)
            time.sleep(interval)
        conn.shutdown(socket.SHUT_WR)
        backend.record((n, h.hexdigest()))
        while conn.recv(65536):
            pass

    return handler


def reset_after_request(conn: socket.socket, backend: Backend) -> None:
    """Read the request head, record what came, then reset the connection without answering."""
    head, rest = read_head(conn)
    backend.record(head + b"\r\n\r\n" + rest)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def backends():
    made: list[Backend] = []

    def make(handler: Callable[[socket.socket, Backend], None]) -> Backend:
        b = Backend(handler)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


# -- clients -----------------------------------------------------------------------------------


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_all(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    """Read to EOF; return (byte count, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def upload_to_sink(port: int, total: int, seed: int, sink: Backend, timeout: float) -> None:
    """Send ``total`` bytes of ``chunks(total, seed)`` to ``port``, half-close, and assert the sink
    behind it received exactly those bytes (count and sha256)."""
    digest = hashlib.sha256()
    with connect(port, timeout=60) as s:
        for chunk in chunks(total, seed=seed):
            s.sendall(chunk)
            digest.update(chunk)
        s.shutdown(socket.SHUT_WR)
        [(n, received)] = sink.wait_results(1, timeout)
    assert (n, received) == (total, digest.hexdigest())


def read_exact(sock: socket.socket, total: int) -> tuple[int, str]:
    """Read exactly `total` bytes (or up to EOF if it comes first); return (count, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while n < total:
        data = sock.recv(min(1 << 20, total - n))
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def echo_once(port: int, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """Send `payload` through an echo app, half-close, and return what came back."""
    with connect(port, timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_to_eof(s)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes its side."""
    out = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(out)
        out += data


def connection_ends(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer ends the connection (FIN or reset) within ``timeout`` without sending more."""
    sock.settimeout(timeout)
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def wait_echo(port: int, timeout: float = 30.0, payload: bytes = b"ping") -> None:
    """Poll until the echo app on `port` answers `payload` correctly."""
    wait_until(lambda: echo_once(port, payload, timeout=5.0) == payload, timeout,
               f"the echo app on port {port} to work")


# -- HTTP/1.1 by hand and through http.client ------------------------------------------------


def read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read on from `buf` up to the blank line that ends an HTTP head: (the head, what came after).
    A peer that closes first raises ConnectionError: a test fails with what came, a Backend
    handler (which ends quietly on OSError) just ends."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed after {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def http_request(port: int, host: str, path: str = "/", method: str = "GET", body: Any = None,
                 headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None,
                 timeout: float = 30.0) -> tuple[http.client.HTTPResponse, bytes]:
    """One request to 127.0.0.1:`port` with Host `host`: (response, body bytes). On `conn` when
    given (it stays open, for keep-alive tests), else on a connection of its own, closed after."""
    c = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        r = c.getresponse()
        return r, r.read()
    finally:
        if conn is None:
            c.close()


# -- hand-written tunnel clients (Python's ssl module, our own frame parsing) -----------------

FRAME_HEADER = struct.Struct("!BBHII")  # version, type, flags, stream id, length/value
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8


def raw_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"", value: int | None = None,
              version: int = 1) -> bytes:
    length = len(payload) if value is None else value
    return FRAME_HEADER.pack(version, ftype, flags, stream_id, length) + payload


def control_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack("!I", len(body)) + body


def tls_client(port: int, cert: Path | None = None, key: Path | None = None, ca: Path | None = None,
               timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS connection to the tunnel port; with `ca`, the service must prove it holds that CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca is not None:
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.settimeout(timeout)
    return ctx.wrap_socket(sock, server_hostname=HOST)


class FrameReader:
    """Reads tunnel frames from a socket. `next()` returns None at EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                return False
            self.buf += data
        return True

    def next(self) -> tuple[int, int, int, int, int, bytes] | None:
        if not self._fill(FRAME_HEADER.size):
            return None
        version, ftype, flags, sid, length = FRAME_HEADER.unpack_from(self.buf)
        payload = b""
        if ftype in (DATA, GO_AWAY):
            if not self._fill(FRAME_HEADER.size + length):
                return None
            payload = bytes(self.buf[FRAME_HEADER.size:FRAME_HEADER.size + length])
            del self.buf[:FRAME_HEADER.size + length]
        else:
            del self.buf[:FRAME_HEADER.size]
        return version, ftype, flags, sid, length, payload

    def until_go_away(self) -> tuple[list[tuple], tuple[int, str] | None]:
        """Read frames until GO_AWAY (returned as (code, text)) or EOF (None)."""
        frames = []
        while True:
            f = self.next()
            if f is None:
                return frames, None
            frames.append(f)
            if f[1] == GO_AWAY:
                code, = struct.unpack_from("!I", f[5])
                return frames, (code, f[5][4:].decode("utf-8", "replace"))

    def wait_closed(self, timeout: float) -> bool:
        """Whether the peer closes the connection (EOF or reset) within `timeout`, data discarded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except (ssl.SSLError, OSError):
                return True
        return False


def control_messages(frames: list[tuple], stream_id: int = 1) -> list[dict[str, Any]]:
    """Decode the Int32-prefixed JSON messages carried by DATA frames of one stream."""
    data = b"".join(f[5] for f in frames if f[1] == DATA and f[3] == stream_id and not f[2] & (SYN | RST))
    out = []
    while len(data) >= 4:
        n, = struct.unpack_from("!I", data)
        if len(data) < 4 + n:
            break
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out

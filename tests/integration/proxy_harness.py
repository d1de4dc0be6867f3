"""Forward proxies for the tests: a real tinyproxy with basic auth, and a TLS-inspecting proxy of
our own (answers CONNECT with 200, then does TLS itself with a foreign CA's certificate)."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from components import require
from gateway_harness import HOST, Backend, free_port, listening, stop_process, toml_value, wait_until
from testca import CA

PROXY_USER = "gw-connector"
PROXY_PASSWORD = "proxy-pass-7f3a"


class Tinyproxy:
    """A tinyproxy on 127.0.0.1 asking for basic auth, logging every CONNECT it serves."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.log_path = tmp / "tinyproxy.log"
        conf = tmp / "tinyproxy.conf"
        conf.write_text("\n".join([
            f"Port {self.port}", f"Listen {HOST}", "Timeout 60", "MaxClients 50", "LogLevel Connect",
            f'LogFile "{self.log_path}"', f'PidFile "{tmp / "tinyproxy.pid"}"',
            f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}", f"Allow {HOST}", "",
        ]))
        self.proc = subprocess.Popen([require("tinyproxy"), "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "tinyproxy.out", "wb"))
        wait_until(lambda: listening(self.port), 30, "tinyproxy to listen")

    @property
    def url(self) -> str:
        return f"http://{PROXY_USER}@{HOST}:{self.port}"

    def connects_to(self, address: str) -> int:
        """How many CONNECT requests to ``address`` tinyproxy has taken."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return len(re.findall(rf"Request \(file descriptor \d+\): CONNECT {re.escape(address)} ", text))

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def tinyproxy(tmp_path):
    proxy = Tinyproxy(tmp_path)
    yield proxy
    proxy.stop()


def intercepting_handler(context: ssl.SSLContext):
    """A TLS-inspecting proxy: answers CONNECT with 200, then does TLS itself with its own certificate."""

    def handler(conn: socket.socket, backend: Backend) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        backend.record(head.split(b"\r\n", 1)[0].decode())
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass   # the connector refuses our certificate: that is the point

    return handler


@pytest.fixture
def intercepting_proxy(tmp_path, backends):
    ca = CA(tmp_path / "inspect-ca", name="Corp Inspection CA")
    return backends(intercepting_handler(ca.server_context(HOST)))


def password_file(tmp: Path, password: str = PROXY_PASSWORD) -> Path:
    path = tmp / f"proxy-password-{abs(hash(password))}"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def connector_config(path: Path, state_dir: Path, **connector: object) -> Path:
    lines = ["[connector]", f"state_dir = {toml_value(str(state_dir))}", "tunnels = 2", "backoff_initial = 0.2",
             "backoff_max = 1.0", *(f"{k} = {toml_value(str(v) if isinstance(v, Path) else v)}"
                                    for k, v in connector.items()),
             "", "[logging]", 'level = "info"', ""]
    path.write_text("\n".join(lines))
    return path

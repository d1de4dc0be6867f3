"""A real nginx as a web back end for integration tests (the `nginx` fixture, registered in
conftest.py): test_http.py and test_http_proxy.py publish it as a web app."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from components import require
from gateway_harness import HOST, free_port, http_request, stop_process, wait_until


class Nginx:
    """A real nginx (the program at `binary`) on a free port: 1 worker, in the foreground, everything under `root`."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.port = free_port()
        self.www = root / "www"
        (self.www / "up").mkdir(parents=True)
        (root / "tmp").mkdir()
        os.chmod(root, 0o755)
        conf = root / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log {root}/access.log;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  server {{
    listen {HOST}:{self.port};
    root {self.www};
    client_max_body_size 0;
    location = /headers {{
      default_type text/plain;
      return 200 "host=$http_host|xff=$http_x_forwarded_for|proto=$http_x_forwarded_proto|xhost=$http_x_forwarded_host|fwd=$http_forwarded|conn=$http_connection|te=$http_transfer_encoding|secret=$http_x_secret\\n";
    }}
    location = /redir {{ return 302 http://{HOST}:{self.port}/x; }}
    location = /cookie {{
      add_header Set-Cookie "s=1; Domain={HOST}; Path=/";
      add_header Refresh "0; url=http://{HOST}:{self.port}/y";
      add_header Content-Location "http://{HOST}:{self.port}/cookie";
      return 200 "ok\n";
    }}
    location /up/ {{ dav_methods PUT; create_full_put_path on; }}
  }}
}}
""")
        self.log = open(root / "nginx.out", "ab")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(root / "error.log")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._listening(), 10, "nginx to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited: {(self.root / 'error.log').read_text()[-2000:]}")
        return http_request(self.port, f"{HOST}:{self.port}", "/headers", timeout=2)[0].status == 200

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def nginx(tmp_path):
    """A running Nginx; skips the test (fails it in CI) naming the package when nginx is not installed."""
    server = Nginx(tmp_path / "nginx", require("nginx"))
    yield server
    server.stop()

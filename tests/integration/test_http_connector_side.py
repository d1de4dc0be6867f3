"""The connector's back-end pool and back-end TLS through real processes.

A small threaded Python HTTP/1.1 back end counts its connections and the requests on each, so
keep-alive reuse is visible from outside; for https it serves a certificate from a CA the test
makes, given to the connector as options.backend_ca_file.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway_harness import (HOST, TWISTD, free_port, http_request, reset_after_request, subprocess_env, toml_table,
                             wait_until)
from testca import CA

APP = "wiki.apps.example.test"


# -- a back end that counts connections ------------------------------------------------------


class CountingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.number = self.server.connections
        self.requests = 0

    def do_GET(self) -> None:
        self.requests += 1
        body = f"conn={self.number} requests={self.requests} auth={self.headers.get('Authorization')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__((HOST, 0), CountingHandler)
        self.lock = threading.Lock()
        self.connections = 0
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers():
    started = []

    def start(context=None):
        server = CountingServer(context)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- the gateway -----------------------------------------------------------------------------


def oidc_section(svc) -> str:
    """An [http.oidc] table for a provider nobody runs: enough for apps that name an SSO provider
    (they need pre-authentication) when the test looks only at the connector."""
    secret = svc.config_path.parent / "oidc-secret.txt"
    secret.write_text("not-a-real-secret\n")
    return "\n" + toml_table("http.oidc", {"issuer": f"http://{HOST}:1/", "client_id": "gateway",
                                           "client_secret_file": str(secret)})


def publish(gw, apps: list[dict], oidc: bool = False):
    """A service with a front door for `apps` and one connector; returns (service, connector, port)."""
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, apps, more=oidc_section(svc) if oidc else "")
    svc.start()
    conn = gw.connector(svc)
    wait_until(lambda: "config" in conn.proc.log() and apps[0]["name"] in conn.proc.log(), 30,
               "the connector to get its apps")
    return svc, conn, port


def get(front: int, path: str = "/", host: str = APP, conn: http.client.HTTPConnection | None = None):
    return http_request(front, host, path, conn=conn)


def app(name: str, internal_url: str, **options) -> dict:
    entry = {"name": name, "external_url": f"http://{APP}/" if name == "wiki" else f"http://{name}.example.test/",
             "internal_url": internal_url}
    if options:
        entry["options"] = options
    return entry


# -- keep-alive ------------------------------------------------------------------------------


def test_many_requests_use_few_backend_connections(gw, servers):
    """40 requests on new client connections, then 8 clients at once: the back end sees few connections."""
    backend = servers()
    svc, conn, front = publish(gw, [app("wiki", f"http://{HOST}:{backend.port}/")])
    wait_until(lambda: get(front)[0].status == 200, 30, "the app to answer")
    before = backend.connections
    bodies = [get(front)[1].decode() for _ in range(40)]
    assert all(b.startswith("conn=") for b in bodies), bodies[:3]
    assert backend.connections - before <= 1, bodies
    assert "requests=41" in bodies[-1] or "requests=40" in bodies[-1], bodies[-1]

    def client(_: int) -> int:
        c = http.client.HTTPConnection(HOST, front, timeout=30)
        statuses = [get(front, conn=c)[0].status for _ in range(10)]
        c.close()
        return statuses.count(200)

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 80
    # At most one back-end connection per request in flight at once (8), plus the first one.
    assert backend.connections <= 9, backend.connections


def test_backend_reset_gives_502_and_the_pool_recovers(gw, servers, backends):
    """A back end that resets instead of answering: 502 with an id the connector log also has."""

    reset = backends(reset_after_request)
    svc, conn, front = publish(gw, [app("rude", f"http://{HOST}:{reset.port}/")])
    r, body = get(front, "/x", host="rude.example.test")
    assert r.status == 502, body
    request_id = r.getheader("X-Request-Id")
    assert reset.wait_results(1, 10)[0].startswith(b"GET /x HTTP/1.1\r\n")
    assert b"Connection: close" not in reset.results[0]
    wait_until(lambda: request_id in conn.proc.log(), 10, "the 502's id in the connector log")
    line = next(line for line in conn.proc.log().splitlines() if request_id in line)
    assert f"{HOST}:{reset.port}" in line, line


# -- back-end TLS ----------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path / "pki", "test-ca"), CA(tmp_path / "pki", "other-ca")


def publish_https(gw, servers, issuer: CA, hostname: str, **options):
    """A back end serving a certificate for `hostname` from `issuer`, published as the wiki app at
    https://localhost:<port>/ with `options`; returns (back end, connector, front-door port)."""
    backend = servers(issuer.server_context(hostname))
    svc, conn, front = publish(gw, [app("wiki", f"https://localhost:{backend.port}/", **options)])
    return backend, conn, front


def test_https_backend_verified_with_backend_ca_file(gw, servers, ca):
    good, _ = ca
    backend, conn, front = publish_https(gw, servers, good, "localhost", backend_ca_file=str(good.pem_path))
    wait_until(lambda: get(front)[0].status == 200, 30, "the https app to answer")
    bodies = [get(front)[1].decode() for _ in range(10)]
    assert all(b.startswith("conn=") for b in bodies)
    assert backend.connections <= 2, bodies  # kept alive over TLS too


def test_https_backend_from_an_unknown_ca_gives_502_naming_the_problem(gw, servers, ca):
    good, other = ca
    backend, conn, front = publish_https(gw, servers, good, "localhost", backend_ca_file=str(other.pem_path))
    r, body = get(front)
    assert r.status == 502
    request_id = r.getheader("X-Request-Id")
    assert "localhost" not in body.decode() and "certificate" not in body.decode()
    wait_until(lambda: request_id in conn.proc.log(), 10, "the id in the connector log")
    log = conn.proc.log()
    assert f"the TLS certificate of https://localhost:{backend.port} is not trusted" in log, log[-3000:]
    assert "unable to get local issuer certificate" in log and str(other.pem_path) in log


def test_https_backend_with_the_wrong_host_name_gives_502(gw, servers, ca):
    good, _ = ca
    backend, conn, front = publish_https(gw, servers, good, "elsewhere.example.test",
                                         backend_ca_file=str(good.pem_path))
    r, _ = get(front)
    assert r.status == 502
    wait_until(lambda: r.getheader("X-Request-Id") in conn.proc.log(), 10, "the id in the connector log")
    assert "does not match the host name 'localhost'" in conn.proc.log(), conn.proc.log()[-3000:]


def test_backend_tls_verify_off_connects_and_warns_once(gw, servers, ca):
    _, other = ca
    backend, conn, front = publish_https(gw, servers, other, "elsewhere.example.test", backend_tls_verify=False)
    wait_until(lambda: get(front)[0].status == 200, 30, "the https app to answer")
    assert get(front)[0].status == 200
    assert conn.proc.log().count("options.backend_tls_verify is false") == 1


def test_unknown_sso_provider_is_a_config_error_on_the_connector(gw, servers):
    """An app naming an SSO provider no connector plugin provides: the connector says so when the
    app's config arrives; nothing reaches the back end (unauthenticated requests are sent to sign in)."""
    backend = servers()
    svc, conn, front = publish(gw, [app("wiki", f"http://{HOST}:{backend.port}/", sso="nope", preauth="oidc")],
                               oidc=True)
    wait_until(lambda: "options.sso names the SSO provider 'nope'" in conn.proc.log(), 30,
               "the config error in the connector log")
    r, _ = get(front)
    assert r.status in (302, 503)   # to the provider, or "cannot sign in now": it is not running
    assert backend.connections == 0


# -- an SSO provider from a real entry point ---------------------------------------------------

STUB_PLUGIN = '''
from gateway import hookimpl


class Stub:
    def credentials(self, app, identity, request):
        return [(b"Authorization", b"Stub " + identity["sub"].encode())]


@hookimpl
def gateway_register_sso_providers(register):
    register("stub", Stub())
'''


def sso_plugin_path(tmp_path: Path) -> Path:
    """A distribution with a `gateway` entry point, importable only by processes given this path."""
    root = tmp_path / "sso-plugin"
    info = root / "stub_sso-0.1.dist-info"
    info.mkdir(parents=True)
    (root / "stub_sso.py").write_text(STUB_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stub-sso\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gateway]\nstub_sso = stub_sso\n")
    return root


def test_sso_provider_from_an_entry_point_is_loaded_on_the_connector(gw, servers, tmp_path):
    """A provider registered through the `gateway` entry-point group is known to the connector (no
    config error for options.sso). That it adds credentials for a signed-in user is
    test_http_sso.py's part; an app with SSO but no pre-authentication never starts."""
    backend = servers()
    port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(port, [app("wiki", f"http://{HOST}:{backend.port}/", sso="stub", preauth="oidc")],
                       more=oidc_section(svc))
    svc.start()
    conn = gw.connector(svc, start=False)
    path = os.pathsep.join(p for p in (str(sso_plugin_path(tmp_path)), os.environ.get("PYTHONPATH")) if p)
    conn.starts += 1
    conn.proc = gw.spawn(f"{conn.name}-1", [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(conn.config_path)],
                         env=subprocess_env(PYTHONPATH=path))
    conn.wait_up()
    wait_until(lambda: "apps wiki" in conn.proc.log(), 30, "the connector to get its apps")
    log = conn.proc.log()
    assert "options.sso names" not in log, log[-3000:]
    assert backend.connections == 0

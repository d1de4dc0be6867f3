"""`gateway apps` through real processes: a running service picks up web apps added to its store.

A service (front door on [http] listen) and a connector run; small HTTP back ends answer in
threads of the test. `gateway apps add|set|remove` write the store; the service applies the
change within config_interval (or at once on SIGHUP), without a restart.
"""

from __future__ import annotations

import signal
import socket

from components import needs
from gateway_harness import (GATEWAY, HOST, connection_ends, echo_handler, free_port, http_request, port_is_free,
                             read_head, wait_until)
from test_access_private import publish, sign_in_with_token

pytestmark = needs(modules=["gateway_http"])

WIKI = "wiki.apps.example.test"
BLOG = "blog.apps.example.test"


def http_handler(name: str):
    """A keep-alive HTTP/1.1 back end answering every GET with "<name> <path>"."""

    def handler(conn: socket.socket, backend) -> None:
        buffer = b""
        while True:
            head, buffer = read_head(conn, buffer)   # ends the handler when the client closes
            path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            body = f"{name} {path}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))

    return handler


def get(front: int, host: str, path: str = "/") -> tuple[int, str]:
    r, body = http_request(front, f"{host}:{front}", path, timeout=10)
    return r.status, body.decode(errors="replace")


def answers(front: int, host: str, text: str):
    def check() -> bool:
        status, body = get(front, host, "/hello")
        return status == 200 and body.startswith(text)

    return check


def start(gw, backend, config_interval: float):
    """A service with the file's wiki app on a front door, and a connector; returns (svc, conn, front)."""
    front = free_port()
    svc = gw.service(start=False, service={"config_interval": config_interval})
    svc.add_front_door(front, [{"name": "wiki", "external_url": f"http://{WIKI}:{front}/",
                                "internal_url": f"http://{backend.destination}/"}])
    svc.start()
    conn = gw.connector(svc)
    wait_until(answers(front, WIKI, "wiki-backend /hello"), 30, "the wiki app (from the file) to answer")
    return svc, conn, front


def apps(gw, svc, *argv):
    return gw.cli("apps", *argv, "--config", str(svc.config_path))


def test_added_changed_and_removed_apps_take_effect_without_restart(gw, backends):
    """add -> served within a few config intervals; set -> routed to the new back end; remove -> 404."""
    wiki_backend = backends(http_handler("wiki-backend"))
    blog_backend = backends(http_handler("blog-backend"))
    blog2_backend = backends(http_handler("blog2-backend"))
    svc, conn, front = start(gw, wiki_backend, config_interval=1)
    first_proc = svc.proc

    assert get(front, BLOG)[0] == 404
    result = apps(gw, svc, "add", "blog", "--external-url", f"http://{BLOG}:{front}/",
                  "--internal-url", f"http://{blog_backend.destination}/")
    assert result.returncode == 0, result.stderr
    wait_until(answers(front, BLOG, "blog-backend /hello"), 30, "the blog app (from the store) to answer")
    assert "app blog added (from the store)" in svc.proc.log()
    wait_until(lambda: "blog→" in conn.proc.log(), 10, "the connector to get blog in its config")

    listed = apps(gw, svc, "list")
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["blog"][:3] == ["blog", "store", "default"]
    assert rows["wiki"][:3] == ["wiki", "config", "default"]

    result = apps(gw, svc, "set", "blog", "--internal-url", f"http://{blog2_backend.destination}/")
    assert result.returncode == 0, result.stderr
    wait_until(answers(front, BLOG, "blog2-backend /hello"), 30, "the blog app to reach its new back end")
    assert "app blog changed (from the store)" in svc.proc.log()

    result = apps(gw, svc, "remove", "blog")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: get(front, BLOG)[0] == 404, 30, "the removed blog app to answer 404")
    assert "app blog removed (from the store)" in svc.proc.log()
    assert answers(front, WIKI, "wiki-backend /hello")()
    assert svc.proc is first_proc and first_proc.running  # never restarted


def test_sighup_applies_a_stored_app_at_once(gw, backends):
    """With a long config_interval, SIGHUP applies an app added to the store."""
    wiki_backend = backends(http_handler("wiki-backend"))
    blog_backend = backends(http_handler("blog-backend"))
    svc, conn, front = start(gw, wiki_backend, config_interval=3600)
    result = apps(gw, svc, "add", "blog", "--external-url", f"http://{BLOG}:{front}/",
                  "--internal-url", f"http://{blog_backend.destination}/")
    assert result.returncode == 0, result.stderr
    assert get(front, BLOG)[0] == 404  # not yet: the next refresh is an hour away
    svc.proc.signal(signal.SIGHUP)
    wait_until(answers(front, BLOG, "blog-backend /hello"), 30, "the blog app to answer after SIGHUP")
    assert "app blog added (from the store)" in svc.proc.log()


def test_bad_input_is_refused_with_what_to_do(gw, backends):
    """A bad URL, a name or external URL the file has, an unknown group: exit 1, message names the flag."""
    wiki_backend = backends(http_handler("wiki-backend"))
    svc, conn, front = start(gw, wiki_backend, config_interval=1)
    internal = f"http://{wiki_backend.destination}/"
    cases = [
        (["add", "blog", "--external-url", "blog.apps.example.test", "--internal-url", internal],
         "--external-url: expected a URL starting with https:// or http://"),
        (["add", "wiki", "--external-url", f"http://{BLOG}:{front}/", "--internal-url", internal],
         "NAME: app 'wiki' is in"),
        (["add", "blog", "--external-url", f"http://{WIKI.upper()}:{front}/", "--internal-url", internal],
         "--external-url: expected an external URL unique among apps"),
        (["add", "blog", "--external-url", f"http://{BLOG}:{front}/", "--internal-url", internal,
          "--group", "nowhere"], "create it first with `gateway groups create nowhere`"),
    ]
    for argv, message in cases:
        result = apps(gw, svc, *argv)
        assert result.returncode == 1 and message in result.stderr, (argv, result.stderr)
    assert "blog" not in apps(gw, svc, "list").stdout
    assert get(front, BLOG)[0] == 404

    # A group made with `gateway groups create` is accepted.
    assert gw.cli("groups", "create", "branch", "--config", str(svc.config_path)).returncode == 0
    result = apps(gw, svc, "add", "blog", "--external-url", f"http://{BLOG}:{front}/", "--internal-url", internal,
                  "--group", "branch")
    assert result.returncode == 0, result.stderr
    # No connector in branch yet: the front door knows the app and answers 502, not 404.
    wait_until(lambda: get(front, BLOG)[0] == 502, 30, "the blog app (group branch, no connector) to answer 502")


def _echoes(port: int, data: bytes) -> bool:
    """Whether a new connection to the local port gets `data` echoed (False: closed or reset)."""
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(data)
            return sock.recv(64) == data
    except OSError:
        return False


def test_private_app_from_the_store_serves_its_assigned_users(gw, tmp_path, backends):
    """apps add --segment: an assigned user reaches it through gateway access; apps set --allow-user
    to someone else cuts the user's open stream and refuses new ones; an overlapping app of another
    group is refused by the command, naming the first."""
    echo = backends(echo_handler)
    svc = gw.service(start=False, service={"config_interval": 1})
    publish(svc)
    svc.start()
    gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")

    segment = f"tcp {HOST}:{echo.port}"
    result = apps(gw, svc, "add", "echo", "--segment", segment, "--allow-user", "alice")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "app echo added (from the store)" in svc.proc.log(), 30, "the service to read the app")
    port = free_port()
    gw.spawn("access", [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "echo",
                        "--listen", f"{HOST}:{port}"], env=env)
    wait_until(lambda: not port_is_free(port), 30, "gateway access tcp to listen")
    wait_until(lambda: _echoes(port, b"hello"), 30, "the private app from the store to echo")

    assert gw.cli("groups", "create", "branch", "--config", str(svc.config_path)).returncode == 0
    result = apps(gw, svc, "add", "other", "--segment", f"tcp {HOST}/32:1-65535", "--allow-user", "alice",
                  "--group", "branch")
    assert result.returncode == 1
    assert f"overlaps segment '{segment}' of stored app 'echo' in group 'default'" in result.stderr

    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(b"open")
    assert sock.recv(64) == b"open"
    result = apps(gw, svc, "set", "echo", "--allow-user", "bob")
    assert result.returncode == 0, result.stderr
    assert connection_ends(sock, 30)
    sock.close()
    assert not _echoes(port, b"again")

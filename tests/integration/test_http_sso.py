"""Single sign-on to back ends, and user affinity, through real processes.

A user signs in at the real OpenID provider (test_http_oidc.py's node ``oidc-provider`` and its
small cookie-jar browser); the service's front door sends the signed-in identity to a connector
in the stream metadata; the connector asks an SSO provider loaded through the ``gateway`` entry
point group (tests/integration/sso_plugin, on the connectors' PYTHONPATH only) for credentials
and the back end gets them as headers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components import needs
from gateway_harness import HOST, TWISTD, free_port, port_is_free, subprocess_env, toml_table, wait_until
from test_http_oidc import SECRET, USERS, WIKI, AppServer, Browser, OpenIDProvider, sign_in

PLUGIN_PATH = Path(__file__).resolve().parent / "sso_plugin"
# More users than test_http_oidc.py's two, so users spread over two connectors (see the affinity test).
EXTRA_USERS = {f"user{i}": {"name": f"User {i}", "email": f"user{i}@example.test", "groups": [f"team{i % 3}"]}
               for i in range(1, 15)}

needs_provider = needs("node", node_modules=["oidc-provider"])


def start_connector(gw, svc):
    """A registered connector whose twistd finds the test SSO provider (and the service does not);
    the provider labels the requests it signs with the connector's id."""
    conn = gw.connector(svc, start=False)
    conn.starts += 1
    env = subprocess_env(PYTHONPATH=str(PLUGIN_PATH), GW_TEST_SSO_LABEL=conn.connector_id)
    conn.proc = gw.spawn(f"{conn.name}-{conn.starts}",
                         [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(conn.config_path)], env=env)
    conn.wait_up()
    wait_until(lambda: re.search(r"config \S+: apps wiki", conn.proc.log()), 30, f"{conn.name} to get app wiki")
    return conn


def start_stack(gw, tmp_path, started: list, connectors: int, **app_keys):
    """The provider, a recording back end, a service with one oidc web app using the test SSO
    provider, and ``connectors`` connectors; returns them and the app's external URL."""
    front = free_port()
    base = f"http://{WIKI}:{front}"
    provider = OpenIDProvider(tmp_path / "idp", [f"{base}/.gateway/callback"], [f"{base}/.gateway/signedout"])
    backend = AppServer()
    started += [provider, backend]
    (tmp_path / "client-secret.txt").write_text(SECRET + "\n")
    gw.secrets.append(SECRET)
    svc = gw.service(start=False)
    svc.add_front_door(front, [{"name": "wiki", "external_url": base + "/",
                                "internal_url": f"http://{HOST}:{backend.port}/",
                                "options": {"preauth": "oidc", "sso": "test-sso"}, **app_keys}],
                       more="\n" + toml_table("http.oidc", {"issuer": provider.issuer, "client_id": "gateway",
                                                            "client_secret_file": str(tmp_path / "client-secret.txt")}))
    svc.start()
    conns = [start_connector(gw, svc) for _ in range(connectors)]
    wait_until(lambda: "oidc: provider" in svc.log(), 30, "the service to discover the provider")
    return provider, backend, svc, conns, base


@pytest.fixture
def stack(gw, tmp_path, monkeypatch):
    for name, user in EXTRA_USERS.items():
        monkeypatch.setitem(USERS, name, user)   # the provider's accounts come from this table
    started: list = []
    yield lambda connectors=1, **app_keys: start_stack(gw, tmp_path, started, connectors, **app_keys)
    for thing in started:
        thing.stop()


def header(seen: dict, name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


def served_by(svc, path: str) -> tuple[str, str]:
    """(request id, connector id) of the 200 the service logged for ``path``: the line is written
    once the response is, so it may come just after the client has the whole response."""
    m = wait_until(lambda: re.search(rf"request (\w+) GET {re.escape(path)} for app wiki via connector (\w+): 200",
                                     svc.log()), 10, f"a 200 for {path} in the service log")
    return m.group(1), m.group(2)


@needs_provider
def test_sso_credentials_for_the_signed_in_user_reach_the_back_end(gw, stack):
    """alice signs in; the connector's SSO provider (from an entry point) gets her identity from the
    stream metadata and the back end gets its headers, replacing what the client sent; the gateway's
    session cookie never reaches the back end."""
    provider, backend, svc, (conn,), base = stack()
    browser = Browser()
    page = sign_in(browser, base + "/first", "alice", provider)
    assert page.status == 200 and page.url == base + "/first", page.text[:300]
    assert any(k[2].startswith("gateway_session_") for k in browser.cookies)

    browser.cookies[(WIKI, "/", "theme")] = "dark"
    page = browser.request("GET", base + "/second", headers={"Authorization": "Basic Zm9yZ2Vk",
                                                             "X-Test-Groups": "admins"})
    assert page.status == 200
    for seen in backend.requests:
        assert header(seen, "Authorization") == ["Bearer test-sso.alice"], seen
        assert header(seen, "X-Test-Groups") == ["wiki-users,staff"], seen
        assert header(seen, "X-Test-Connector") == [conn.connector_id], seen
        assert not any("gateway_session_" in v for v in header(seen, "Cookie")), seen
    assert [s["path"] for s in backend.requests] == ["/first", "/second"]
    assert header(backend.requests[1], "Cookie") == ["theme=dark"]
    assert json.loads(page.body)["path"] == "/second"

    # The service sent both requests to this connector, and the provider in that process saw alice.
    for path in ("/first", "/second"):
        assert served_by(svc, path)[1] == conn.connector_id
    log = conn.proc.log()
    assert log.count(f"test-sso on {conn.connector_id}: credentials for user alice to app wiki") == 2, log[-3000:]
    # The SSO provider is the connector's only: the service never loaded it.
    assert "test-sso" not in svc.log()
    cookie = next(v for k, v in browser.cookies.items() if k[2].startswith("gateway_session_"))
    assert cookie not in log and cookie not in svc.log()


@needs_provider
def test_user_affinity_keeps_each_user_on_one_connector(gw, stack):
    """Two connectors, affinity = "user": every request of a signed-in user, each on a new client
    connection, lands on the same connector. Users sign in one after another until both connectors
    have served one: all come from 127.0.0.1, so keying by client address would keep them on one
    connector (with 16 users keyed apart, rendezvous hashing puts all on one with odds 2**-15)."""
    provider, backend, svc, conns, base = stack(connectors=2, affinity="user")
    ids = {c.connector_id for c in conns}
    where: dict[str, str] = {}
    for user in ["alice", "bob", *EXTRA_USERS]:
        browser = Browser()
        page = sign_in(browser, base + f"/{user}/0", user, provider)
        assert page.status == 200, page.text[:300]
        for n in range(1, 4):
            assert browser.request("GET", base + f"/{user}/{n}").status == 200   # a new connection each
        seen = [s for s in backend.requests if s["path"].startswith(f"/{user}/")]
        assert [s["path"] for s in seen] == [f"/{user}/{n}" for n in range(4)]
        assert {header(s, "Authorization")[0] for s in seen} == {f"Bearer test-sso.{user}"}
        labels = {header(s, "X-Test-Connector")[0] for s in seen}
        assert len(labels) == 1, f"{user}'s requests went to {labels}"
        where[user] = labels.pop()
        assert {served_by(svc, f"/{user}/{n}")[1] for n in range(4)} == {where[user]}
        if set(where.values()) == ids:
            break
    assert set(where.values()) == ids, f"every user on one connector: {where}"
    for conn in conns:
        mine = [u for u, c in where.items() if c == conn.connector_id]
        log = conn.proc.log()
        for user in where:
            count = log.count(f"credentials for user {user} to app wiki")
            assert count == (4 if user in mine else 0), (conn.name, user, count)


@needs_provider
def test_two_users_never_share_a_back_end_connection(gw, stack):
    """alice and bob, on one client machine, alternate requests, each on a new client connection
    (so back-end connections go back to the pool in between): an app with SSO binds each back-end
    connection to its user, so none serves both."""
    provider, backend, svc, (conn,), base = stack()
    browsers = {user: Browser() for user in ("alice", "bob")}
    for user, browser in browsers.items():
        assert sign_in(browser, base + f"/{user}/0", user, provider).status == 200
    for n in range(1, 5):
        for user, browser in browsers.items():
            assert browser.request("GET", base + f"/{user}/{n}").status == 200
    peers = {user: {s["peer"] for s in backend.requests if s["path"].startswith(f"/{user}/")} for user in browsers}
    assert peers["alice"] and peers["bob"] and not peers["alice"] & peers["bob"], peers
    for seen in backend.requests:
        user = seen["path"].split("/")[1]
        assert header(seen, "Authorization") == [f"Bearer test-sso.{user}"], seen

def test_sso_without_a_signed_in_user_is_refused_at_start(gw):
    """options.sso on a passthrough app: the service exits before anything starts, naming app and option."""
    front = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(front, [{"name": "wiki", "external_url": f"http://{WIKI}/", "internal_url": f"http://{HOST}:9/",
                                "options": {"preauth": "passthrough", "sso": "test-sso"}}])
    result = gw.twistd(svc.config_path, timeout=30)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert ("app wiki: options.sso = 'test-sso' needs a signed-in user: set options.preauth = \"oidc\" too"
            in out), out
    assert port_is_free(front) and port_is_free(svc.port)
    # refused while reading the config, like any other config error: no traceback, nothing written
    assert "Traceback" not in out and not svc.state_dir.exists(), out

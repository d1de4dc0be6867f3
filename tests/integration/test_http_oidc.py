"""OIDC pre-authentication through real processes: a real OpenID provider (the certified npm
``oidc-provider``, run with node), the service's front door, a connector and a Python back end.

A small browser (http.client and a cookie jar) follows the whole flow with real HTTP: the
redirect to the provider, its login and consent forms, the callback, the session cookie, the app.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import jwt
import pytest

from components import needs
from gateway_harness import HOST, free_port, http_request, stop_process, toml_table, wait_until

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")
WIKI = "wiki.apps.example.test"
SECRET = "client-secret-7f3a9c1e5b"
USERS = {
    "alice": {"name": "Alice Example", "email": "alice@example.test", "groups": ["wiki-users", "staff"]},
    "bob": {"name": "Bob Example", "email": "bob@example.test", "groups": ["staff"]},
}

pytestmark = needs("node", node_modules=["oidc-provider"])


# -- the OpenID provider ----------------------------------------------------------------------------


class OpenIDProvider:
    """tests/node/provider.mjs on a free port; restart(rotate=True) comes back with a new signing key."""

    def __init__(self, root: Path, redirect_uris: list[str], logout_uris: list[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.issuer = f"http://{HOST}:{self.port}"
        self.keys = root / "keys.json"
        self.config = root / "provider.json"
        self.config.write_text(json.dumps({
            "issuer": self.issuer, "port": self.port, "keys_file": str(self.keys), "users": USERS,
            "clients": [{"client_id": "gateway", "client_secret": SECRET, "redirect_uris": redirect_uris,
                         "post_logout_redirect_uris": logout_uris}],
        }))
        self.runs = 0
        self.start()

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.root / f"provider-{self.runs}.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([NODE, str(NODE_DIR / "provider.mjs"), str(self.config)], cwd=NODE_DIR,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._listening, 30, "the OpenID provider to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the provider exited: {self.log_path.read_text()[-3000:]}")
        return "provider listening" in self.log_path.read_text()

    def kid(self) -> str:
        return json.loads(self.keys.read_text())["keys"][0]["kid"]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def restart(self, rotate: bool) -> None:
        self.stop()
        if rotate:
            self.keys.unlink()
        self.start()


# -- the back end -----------------------------------------------------------------------------------


class AppServer:
    """A tiny web app: answers every request with what it received (and the port its connection
    came from, which tells back-end connections apart), and records it."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                seen = {"method": self.command, "path": self.path, "peer": self.client_address[1],
                        "headers": [[k, v] for k, v in self.headers.items()]}
                owner.requests.append(seen)
                body = json.dumps({"app": "wiki content", **seen}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = handle_one

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a browser --------------------------------------------------------------------------------------


class Page:
    def __init__(self, url: str, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Browser:
    """Every host is 127.0.0.1 (the port from the URL); cookies are host-only and path-scoped, as a
    browser keeps them; Secure cookies are sent only over https (never here)."""

    def __init__(self) -> None:
        self.cookies: dict[tuple[str, str, str], str] = {}   # (host, path, name) -> value
        self.set_cookies: list[str] = []

    def cookie_header(self, host: str, path: str) -> str:
        pairs = [(p, n, v) for (h, p, n), v in self.cookies.items()
                 if h == host and (path == p or path.startswith(p.rstrip("/") + "/") or p == "/")]
        return "; ".join(f"{n}={v}" for p, n, v in sorted(pairs, key=lambda x: -len(x[0])))

    def _store(self, host: str, request_path: str, value: str) -> None:
        self.set_cookies.append(value)
        first, *attributes = value.split(";")
        name, _, cookie = first.strip().partition("=")
        attrs = {a.strip().partition("=")[0].lower(): a.strip().partition("=")[2] for a in attributes}
        path = attrs.get("path") or request_path.rsplit("/", 1)[0] or "/"
        if "secure" in attrs:
            return  # http only in these tests: a browser would not keep it for plain http use
        if attrs.get("max-age") == "0" or (attrs.get("expires", "").find("1970") >= 0):
            self.cookies.pop((host, path, name), None)
        else:
            self.cookies[(host, path, name)] = cookie

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Page:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = dict(headers or {})
        cookie = self.cookie_header(parts.hostname, parts.path or "/")
        if cookie:
            all_headers["Cookie"] = cookie
        if body is not None:
            all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        r, data = http_request(parts.port, parts.netloc, path, method, body, all_headers)
        for value in r.msg.get_all("Set-Cookie") or []:
            self._store(parts.hostname, parts.path or "/", value)
        return Page(url, r.status, list(r.getheaders()), data)

    def follow(self, url: str, method: str = "GET", body: bytes | None = None, stop_at: str = "") -> Page:
        """Request and follow redirects (as a browser: 303 and 302 after POST become GET); stop early
        at a redirect whose target starts with ``stop_at``."""
        for _ in range(20):
            page = self.request(method, url, body)
            location = page.header("Location")
            if page.status not in (301, 302, 303, 307, 308) or not location:
                return page
            url = urljoin(url, location[0])
            if stop_at and url.startswith(stop_at):
                page.next_url = url
                return page
            if page.status in (302, 303):
                method, body = "GET", None
        raise AssertionError("too many redirects")


def forms(page: Page) -> list[tuple[str, dict[str, str]]]:
    """(action URL, fields) of each form on a page; a logout form also gets its 'yes' button."""
    found = []
    for m in re.finditer(r"<form([^>]*)>(.*?)</form>", page.text, re.S):
        attrs, inner = m.group(1), m.group(2)
        action = re.search(r'action="([^"]*)"', attrs)
        fields = {unescape(n): unescape(v) for n, v in
                  re.findall(r'<input[^>]*?name="([^"]*)"[^>]*?value="([^"]*)"', inner)}
        if 'id="op.logoutForm"' in attrs:
            fields["logout"] = "yes"
        found.append((urljoin(page.url, unescape(action.group(1)) if action else page.url), fields))
    return found


def sign_in(browser: Browser, url: str, user: str, provider: OpenIDProvider) -> Page:
    """Open ``url`` and get through the provider's login and consent forms as ``user``."""
    page = browser.follow(url)
    for _ in range(5):
        if not page.url.startswith(provider.issuer) or page.status != 200:
            return page
        (action, fields), = forms(page)
        if "login" in fields or fields.get("prompt") == "login":
            fields.update(login=user, password="any")
        page = browser.follow(action, "POST", urlencode(fields).encode())
    raise AssertionError(f"stuck at the provider: {page.url} {page.text[:500]}")


# -- the gateway ------------------------------------------------------------------------------------


def start_gateway(gw, tmp_path, options: dict, **oidc_settings):
    """Provider, back end, service with one oidc web app, connector; returns them and the app's URL."""
    front = free_port()
    base = f"http://{WIKI}:{front}"
    provider = OpenIDProvider(tmp_path / "idp", [f"{base}/.gateway/callback"], [f"{base}/.gateway/signedout"])
    backend = AppServer()
    (tmp_path / "client-secret.txt").write_text(SECRET + "\n")
    gw.secrets.append(SECRET)   # the harness fails the test if it shows up in any log
    svc = gw.service(start=False)
    svc.add_front_door(front, [{"name": "wiki", "external_url": base + "/",
                                "internal_url": f"http://{HOST}:{backend.port}/",
                                "options": {"preauth": "oidc", **options}}],
                       more="\n" + toml_table("http.oidc", {"issuer": provider.issuer, "client_id": "gateway",
                                                            "client_secret_file": str(tmp_path / "client-secret.txt"),
                                                            **oidc_settings}))
    svc.start()
    conn = gw.connector(svc)
    wait_until(lambda: "oidc: provider" in svc.log(), 30, "the service to discover the provider")
    return provider, backend, svc, conn, base


@pytest.fixture
def stack(gw, tmp_path):
    started = []

    def make(options: dict, **settings):
        result = start_gateway(gw, tmp_path, options, **settings)
        started.append(result)
        return result

    yield make
    for provider, backend, *_ in started:
        provider.stop()
        backend.stop()


def request_ids(log: str, pattern: str) -> list[str]:
    return re.findall(rf"request (\w+) [^\n]*{pattern}", log)


def test_sign_in_flow_end_to_end(gw, stack):
    """Unauthenticated -> provider -> login -> callback -> the page first asked for, as the user; the back
    end never sees an unauthenticated request, gets no gateway cookie and a verifiable JWT assertion."""
    provider, backend, svc, conn, base = stack({"jwt_assertion": True, "allowed_groups": ["wiki-users"]})
    browser = Browser()

    first = browser.request("GET", base + "/page?x=1")
    assert first.status == 302 and first.header("Location")[0].startswith(provider.issuer + "/auth?")
    query = parse_qs(urlsplit(first.header("Location")[0]).query)
    assert query["code_challenge_method"] == ["S256"] and query["redirect_uri"] == [base + "/.gateway/callback"]
    assert backend.requests == []

    page = sign_in(browser, base + "/page?x=1", "alice", provider)
    assert page.status == 200 and page.url == base + "/page?x=1", page.text[:300]
    seen = json.loads(page.body)
    assert seen["app"] == "wiki content" and seen["path"] == "/page?x=1"
    assert len(backend.requests) == 1, "only the signed-in request reached the back end"
    session, = [c for c in browser.set_cookies if c.startswith("gateway_session_")]
    assert "HttpOnly" in session and "SameSite=Lax" in session
    assert "Secure" not in session and "Max-Age" not in session   # plain http; not persistent

    # the back end: no gateway cookie, the app's own cookie kept, a forged assertion replaced
    browser.cookies[(WIKI, "/", "theme")] = "dark"
    page = browser.request("GET", base + "/again", headers={"X-Gateway-Jwt-Assertion": "forged"})
    headers = json.loads(page.body)["headers"]
    assert [v for k, v in headers if k.lower() == "cookie"] == ["theme=dark"]
    token, = [v for k, v in headers if k.lower() == "x-gateway-jwt-assertion"]
    jwks = browser.request("GET", base + "/.gateway/jwks.json")
    assert jwks.status == 200
    key = jwt.PyJWKSet.from_dict(json.loads(jwks.body))[jwt.get_unverified_header(token)["kid"]].key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=base + "/", issuer=base)
    assert (claims["sub"], claims["email"], claims["name"]) == ("alice", "alice@example.test", "Alice Example")
    assert claims["groups"] == ["wiki-users", "staff"]
    log = svc.log()
    assert re.search(r"request \w+: user alice \(alice@example.test\) signed in to app wiki", log)

    # a tampered session cookie: a fresh sign-in, no error page, nothing to the back end
    count = len(backend.requests)
    key_ = next(k for k in browser.cookies if k[2].startswith("gateway_session_"))
    good = browser.cookies[key_]
    browser.cookies[key_] = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    tampered = browser.request("GET", base + "/x")
    assert tampered.status == 302 and tampered.header("Location")[0].startswith(provider.issuer)
    browser.cookies[key_] = good

    # a callback with a state this browser never started: refused, nothing to the back end
    wrong = browser.request("GET", base + "/.gateway/callback?code=made-up&state=made-up")
    assert wrong.status == 400 and b"not valid or has expired" in wrong.body
    assert len(backend.requests) == count

    # the unauthenticated requests never opened a stream (no "via connector" line for their ids)
    log = svc.log()
    answered = request_ids(log, "302 from the front door") + request_ids(log, "400 from the front door")
    assert len(answered) >= 3
    for rid in answered:
        assert not re.search(rf"request {rid} [^\n]*via connector", log)

    # sign-out: cookie gone, the provider's end-session page, then our signed-out page
    out = browser.follow(base + "/.gateway/signout")
    assert out.url.startswith(provider.issuer), out.url
    assert not any(k[2].startswith("gateway_session_") for k in browser.cookies)
    (action, fields), = forms(out)
    done = browser.follow(action, "POST", urlencode(fields).encode())
    assert done.url == base + "/.gateway/signedout" and b"signed out" in done.body
    again = browser.request("GET", base + "/page")
    assert again.status == 302 and again.header("Location")[0].startswith(provider.issuer)

    # logs: the user and request ids, never codes, tokens or cookie values
    log = svc.log() + conn.log()
    assert token not in log and good not in log and "made-up" not in log
    assert not re.search(r"code=[\w-]{20,}", log)


def test_unassigned_user_gets_403_and_sessions_expire(gw, stack):
    """A user outside allowed_groups gets a 403 page naming them (the back end sees nothing); a session
    past session_lifetime leads to a fresh sign-in."""
    provider, backend, svc, conn, base = stack({"allowed_groups": ["wiki-users"]}, session_lifetime=3)
    bob = Browser()
    page = sign_in(bob, base + "/", "bob", provider)
    assert page.status == 403 and page.url == base + "/"
    assert "bob@example.test" in page.text and "administrator" in page.text
    assert str(backend.port) not in page.text and backend.requests == []
    assert re.search(r"request \w+: user bob is not assigned to app wiki: 403", svc.log())

    alice = Browser()
    page = sign_in(alice, base + "/", "alice", provider)
    assert page.status == 200 and len(backend.requests) == 1
    # the provider still knows alice, so the fresh sign-in goes through without a form
    wait_until(lambda: alice.request("GET", base + "/").status == 302, 30, "the 3 s session to expire")
    assert len(backend.requests) >= 1


def test_an_unverified_email_does_not_match_allowed_users(gw, stack, monkeypatch):
    """mallory's account at the real provider claims alice's email address, unverified: an app that
    allows alice by email answers mallory 403 and the back end sees nothing; alice, verified, gets in."""
    monkeypatch.setitem(USERS, "mallory", {"name": "Mallory", "email": "alice@example.test",
                                           "email_verified": False, "groups": []})
    provider, backend, svc, conn, base = stack({"allowed_users": ["alice@example.test"]})
    page = sign_in(Browser(), base + "/", "mallory", provider)
    assert page.status == 403 and backend.requests == []
    assert re.search(r"request \w+: user mallory is not assigned to app wiki: 403", svc.log())
    page = sign_in(Browser(), base + "/", "alice", provider)
    assert page.status == 200 and len(backend.requests) == 1

def test_provider_key_rotation(gw, stack):
    """The provider restarts with a new signing key: the next sign-in still works (the gateway fetches
    the JWKS again on the unknown kid)."""
    provider, backend, svc, conn, base = stack({})
    assert sign_in(Browser(), base + "/", "alice", provider).status == 200
    old_kid = provider.kid()
    provider.restart(rotate=True)
    assert provider.kid() != old_kid
    page = sign_in(Browser(), base + "/", "alice", provider)
    assert page.status == 200 and json.loads(page.body)["app"] == "wiki content"
    assert f"unknown key id {provider.kid()}: fetched the provider's JWKS again" in svc.log()

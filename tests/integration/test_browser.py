"""A real browser through the gateway: Debian's Chromium, headless, driven by Playwright
(tests/node/browser.mjs), signs in at a real OpenID provider, lands on a web app published over
the HTTPS front door, follows a redirect the app points at its internal URL, keeps a WebSocket echo
open through the tunnel while it sends messages, and signs out.

Every host name is *.apps.example.test, mapped to 127.0.0.1 inside Chromium (--host-resolver-rules,
every other name unresolvable), the provider listens on 127.0.0.1: nothing leaves the machine.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import signal
import socket
import subprocess

from components import needs, require
from gateway_harness import HOST, free_port, read_head, toml_table, wait_until
from test_http_oidc import NODE_DIR, SECRET, OpenIDProvider
from testca import CA
from websocket_harness import ws_frame, ws_read, ws_switch

# Another Chromium than Debian's (the chromium of scripts/packages.txt), when set.
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM")
NODE = shutil.which("node")
WIKI = "wiki.apps.example.test"
HOST_RULES = f"MAP *.apps.example.test {HOST}, MAP * ~NOTFOUND, EXCLUDE {HOST}"
MESSAGES = 6
INTERVAL_MS = 500

pytestmark = needs("node", *([] if CHROMIUM else ["chromium"]), node_modules=["playwright-core", "oidc-provider"])


# -- the web app behind the connector ---------------------------------------------------------------


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Wiki</title></head>
<body>
<h1 id="who">{who}</h1>
<ul id="echoes"></ul>
<script>
// The WebSocket goes to the host the browser is on: the external one, never the back end's.
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
window.wsState = {{opened: 0, closed: 0, errors: 0}};
ws.onopen = () => {{ wsState.opened += 1; }};
ws.onerror = () => {{ wsState.errors += 1; }};
ws.onclose = (e) => {{ wsState.closed += 1; wsState.code = e.code; }};
ws.onmessage = (e) => {{
  const li = document.createElement('li');
  li.textContent = e.data;
  document.getElementById('echoes').append(li);
}};
window.wsSend = (text) => ws.send(text);
</script>
</body></html>
"""


def read_request(conn: socket.socket, buf: bytes) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, target, lower-cased headers, what came after the head), or None at EOF."""
    try:
        head, rest = read_head(conn, buf)
    except ConnectionError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length") or 0)
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    return method, target, headers, rest[length:]


def claims_of(headers: dict[str, str]) -> dict:
    """The payload of X-Gateway-Jwt-Assertion, not verified (test_http_oidc checks its signature)."""
    token = headers.get("x-gateway-jwt-assertion", "")
    if token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def web_app(conn: socket.socket, backend) -> None:
    """An HTTP/1.1 keep-alive back end: / is the page (it names the user the gateway asserted),
    /go redirects to an absolute URL on the back end's own (internal) origin, /landing is where that
    leads, /ws is a WebSocket echo. Every request is recorded as (method, target, headers)."""
    buf = b""
    while True:
        request = read_request(conn, buf)
        if request is None:
            return
        method, target, headers, buf = request
        backend.record((method, target, headers))
        path = target.split("?", 1)[0]
        if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            ws_switch(conn, headers["sec-websocket-key"].encode())
            try:
                while True:
                    opcode, payload, buf = ws_read(conn, buf)
                    backend.record(("ws", opcode, payload))
                    conn.sendall(ws_frame(payload, 8 if opcode == 8 else opcode))
                    if opcode == 8:
                        return
            except AssertionError:  # the browser went away without a close frame
                return
        extra = b""
        if path == "/":
            claims = claims_of(headers)
            who = f"Signed in as {claims['sub']} ({claims.get('email', '')})" if claims else "Nobody signed in"
            status, body = b"200 OK", PAGE.format(who=html.escape(who)).encode()
        elif path == "/go":
            status, body = b"302 Found", b"moved"
            extra = b"Location: http://%s:%d/landing?from=go\r\n" % (HOST.encode(), backend.port)
        elif path == "/landing":
            status, body = b"200 OK", b"<!doctype html><title>Landing</title><p id=landed>landed at " + \
                html.escape(target).encode() + b"</p>"
        else:
            status, body = b"404 Not Found", b"not here"
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html; charset=utf-8\r\n" + extra +
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)


# -- the test ---------------------------------------------------------------------------------------


def run_browser(scenario: dict, timeout: float = 120) -> dict:
    """tests/node/browser.mjs with `scenario` on stdin (it holds a password); its JSON report. In a
    session of its own, so that a run past `timeout` is killed with the Chromium it started."""
    proc = subprocess.Popen([NODE, str(NODE_DIR / "browser.mjs")], cwd=NODE_DIR, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(scenario), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"browser.mjs still running after {timeout}s: {out[-2000:]} {err[-2000:]}") from None
    lines = out.strip().splitlines()
    assert proc.returncode == 0 and lines, f"browser.mjs exited {proc.returncode}: {err[-3000:]}"
    return json.loads(lines[-1])


def test_chromium_signs_in_follows_a_redirect_and_keeps_a_websocket(gw, backends, tmp_path):
    """Chromium types the app's plain http URL, is sent to https and on to the provider, logs in and
    consents, comes back signed in and sees the app's page naming the user; the page's WebSocket
    echoes every message over a few seconds without closing while another tab follows the app's
    redirect to its internal URL and stays on the external host; sign-out ends the session, and the
    next visit goes to the provider's login form again."""
    ca = CA(tmp_path / "certs")
    http_port, tls_port = free_port(), free_port()
    app = f"https://{WIKI}:{tls_port}/"
    provider = OpenIDProvider(tmp_path / "idp", [app + ".gateway/callback"], [app + ".gateway/signedout"])
    backend = backends(web_app)
    try:
        (tmp_path / "client-secret.txt").write_text(SECRET + "\n")
        gw.secrets.append(SECRET)   # the harness fails the test if it shows up in any log
        svc = gw.service(start=False)
        more = "\n" + toml_table("http.certificates", ca.issue("star", ["*.apps.example.test"]).as_table(), array=True)
        more += "\n" + toml_table("http.oidc", {"issuer": provider.issuer, "client_id": "gateway",
                                                "client_secret_file": str(tmp_path / "client-secret.txt")})
        svc.add_front_door(http_port, [{"name": "wiki", "external_url": app,
                                        "internal_url": f"http://{backend.destination}/",
                                        "options": {"preauth": "oidc", "jwt_assertion": True}}],
                           http={"tls_listen": f"tcp:{tls_port}:interface={HOST}"}, more=more)
        svc.start()
        gw.connector(svc)
        wait_until(lambda: "oidc: provider" in svc.log(), 30, "the service to discover the provider")

        seen = run_browser({
            "chromium": CHROMIUM or require("chromium"), "host_rules": HOST_RULES, "ignore_certificate_errors": True,
            "start": f"http://{WIKI}:{http_port}/", "app": app, "issuer": provider.issuer,
            "login": "alice", "password": "any password", "redirect_path": "go",
            "messages": MESSAGES, "interval_ms": INTERVAL_MS,
        })
    finally:
        provider.stop()
    assert seen["ok"], (f"{seen.get('error')}\nsteps: {seen['steps']}\nfailed requests: {seen['failed_requests']}\n"
                        f"websocket: {seen.get('websocket')}; in the page: {seen.get('page_state')}")

    # sign-in: plain http -> 308 to https -> 302 to the provider; login and consent; back on the app
    signin = seen["signin"]
    hops = signin["hops"]
    assert [h["status"] for h in hops[:2]] == [308, 302], hops
    assert hops[0]["location"] == app and hops[1]["url"] == app
    assert hops[1]["location"].startswith(provider.issuer + "/auth?")
    assert signin["first_page"].startswith(provider.issuer + "/interaction/")
    assert signin["provider_pages"] == ["login", "consent"]
    assert signin["landed"] == app and signin["who"] == "Signed in as alice (alice@example.test)"
    session = [c for c in signin["cookies"] if c["name"].startswith("gateway_session_")]
    assert len(session) == 1 and session[0]["secure"] and session[0]["httpOnly"], signin["cookies"]
    assert session[0]["sameSite"] == "Lax" and session[0]["session"] and session[0]["path"] == "/"

    # the WebSocket: opened once to the external host, every message echoed in order, never closed
    ws = seen["websocket"]
    sent = [f"message {i} of {MESSAGES}" for i in range(1, MESSAGES + 1)]
    assert ws["urls"] == [f"wss://{WIKI}:{tls_port}/ws"]
    assert ws["sent"] == sent and ws["received"] == sent and ws["echoes"] == sent
    assert ws["state"] == {"opened": 1, "closed": 0, "errors": 0} and not ws["closed_before_signout"]
    assert ws["open_ms"] >= (MESSAGES - 1) * INTERVAL_MS
    assert [r[2] for r in backend.results if r[0] == "ws" and r[1] == 1] == [m.encode() for m in sent]

    # the redirect: the back end's internal Location came to the browser as the external URL
    redirect = seen["redirect"]
    assert [(h["url"], h["status"], h["location"]) for h in redirect["hops"]] == [
        (app + "go", 302, app + "landing?from=go"), (app + "landing?from=go", 200, None)]
    assert redirect["final"] == app + "landing?from=go" and "landed at /landing?from=go" in redirect["text"]

    # sign-out: the session cookie is gone at once; the provider confirms; then our signed-out page
    signout = seen["signout"]
    assert signout["provider_page"].startswith(provider.issuer)
    assert not any(c["name"].startswith("gateway_session_") for c in signout["cookies"])
    assert signout["final"] == app + ".gateway/signedout" and "signed out" in signout["text"]
    assert signout["next_visit"].startswith(provider.issuer + "/interaction/") and signout["next_visit_login_form"]

    # the back end: only signed-in requests, each with the assertion and none with a gateway cookie
    requests = [r for r in backend.results if r[0] != "ws"]
    targets = [r[1] for r in requests]
    assert targets.count("/") == 1 and targets.count("/ws") == 1 and targets.count("/go") == 1, targets
    for method, target, headers in requests:
        assert claims_of(headers).get("sub") == "alice", target
        assert "gateway_" not in headers.get("cookie", ""), target
    upgrade = next(r[2] for r in requests if r[1] == "/ws")
    assert upgrade["upgrade"].lower() == "websocket" and upgrade["host"] == backend.destination
    # only what the provider's pages load from the internet (a web font) failed: nothing of ours
    assert all(".apps.example.test" not in f and HOST not in f for f in seen["failed_requests"]), \
        seen["failed_requests"]
    assert "user alice (alice@example.test) signed in to app wiki" in svc.log()

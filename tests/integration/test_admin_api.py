"""The admin API and the status page of a real service node ([admin]): every refusal through
real sockets (missing, wrong, revoked token; sign-in and sign-out without their CSRF token or
from another site; a forged session cookie; an oversized body), the happy paths, and the
`gateway --service URL` remote mode of the command pinning the service's CA by its token."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from components import needs, require
from gateway_harness import GATEWAY, HOST, free_port, listening, subprocess_env, toml_table, wait_until


def admin_service(gw, tls: bool = True, service: dict | None = None, **admin):
    """A started service node with an [admin] listener on a free loopback port."""
    svc = gw.service(start=False, service={"inactive_after": 1, "sweep_interval": 0.5, **(service or {})})
    svc.admin_port = free_port()
    svc.admin_tls = tls
    svc.config_path.write_text(svc.config_path.read_text() + "\n" + toml_table(
        "admin", {"listen": f"tcp:{svc.admin_port}:interface={HOST}", "tls": tls, **admin}))
    svc.start()
    wait_until(lambda: listening(svc.admin_port), 20, "the admin listener")
    return svc


def admin_url(svc) -> str:
    return f"{'https' if svc.admin_tls else 'http'}://{HOST}:{svc.admin_port}"


def create_admin_token(gw, svc, name: str = "alice", *more: str) -> tuple[str, Path]:
    """(the token's id, the file holding it) from `gateway admin token create` (with `more` flags)."""
    path = gw.tmp / f"admin-{name}-{next(gw.counter)}.token"
    result = gw.cli("admin", "token", "create", "--config", str(svc.config_path), "--name", name,
                    "--output", str(path), *more)
    assert result.returncode == 0, result.stderr
    text = path.read_text().strip()
    gw.secrets.append(text.split(".")[2])
    return text.split(".")[1], path


def request(svc, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """One request to the admin listener, trusting only the service's CA."""
    if svc.admin_tls:
        context = ssl.create_default_context(cafile=str(svc.state_dir / "ca.pem"))
        conn = http.client.HTTPSConnection(HOST, svc.admin_port, timeout=20, context=context)
    else:
        conn = http.client.HTTPConnection(HOST, svc.admin_port, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def api(svc, method: str, path: str, token: str | None = None, body: dict | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict, http.client.HTTPResponse]:
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = json.dumps(body).encode() if body is not None else None
    response = request(svc, method, path, payload, headers)
    return response.status, json.loads(response.body), response


def token_text(path: Path) -> str:
    return path.read_text().strip()


# -- the API's refusals --------------------------------------------------------------------------


def test_the_api_refuses_a_call_without_a_token(gw):
    """No Authorization header: 401 with a JSON error that says how to send a token, and nothing served."""
    svc = admin_service(gw)
    status, body, response = api(svc, "GET", "/api/v1/connectors")
    assert status == 401
    assert body["error"] == "missing_token"
    assert "Authorization: Bearer" in body["message"] and "gateway admin token create" in body["message"]
    assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert "connectors" not in body
    status, body, _ = api(svc, "GET", "/api/v1/connectors", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert (status, body["error"]) == (401, "missing_token")


def test_the_api_refuses_a_wrong_or_foreign_token(gw):
    """A token with a wrong secret, a malformed one and another gateway's token: 401 unknown_token."""
    svc = admin_service(gw)
    _, path = create_admin_token(gw, svc)
    prefix, token_id, secret, fingerprint = token_text(path).split(".")
    wrong = ".".join((prefix, token_id, ("A" if secret[0] != "A" else "B") + secret[1:], fingerprint))
    for token in (wrong, "gwa1.nonsense", ".".join((prefix, token_id, secret, "0" * 64))):
        status, body, _ = api(svc, "GET", "/api/v1/status", token=token)
        assert (status, body["error"]) == (401, "unknown_token"), (token, body)
        assert "gateway admin token create" in body["message"]
        assert "groups" not in body
    status, body, _ = api(svc, "GET", "/api/v1/status", token=token_text(path))
    assert status == 200 and body["node_id"] == svc.name


def test_a_revoked_token_is_refused_at_once(gw):
    """`gateway admin token revoke` on a token in use: its next API call is a 401 revoked_token."""
    svc = admin_service(gw)
    token_id, path = create_admin_token(gw, svc)
    assert api(svc, "GET", "/api/v1/connectors", token=token_text(path))[0] == 200
    result = gw.cli("admin", "token", "revoke", "--config", str(svc.config_path), token_id)
    assert result.returncode == 0, result.stderr
    status, body, _ = api(svc, "GET", "/api/v1/connectors", token=token_text(path))
    assert (status, body["error"]) == (401, "revoked_token")
    assert "revoked" in body["message"] and "gateway admin token create" in body["message"]
    listed = gw.cli("admin", "token", "list", "--config", str(svc.config_path)).stdout
    assert token_id in listed and "alice" in listed


@needs("faketime")
def test_an_expired_token_is_refused(gw):
    """A token made (under faketime) 30 days ago for 1 day: the API answers 401 expired_token, and the
    sign-in form refuses it too."""
    svc = admin_service(gw)
    path = gw.tmp / "expired.token"
    result = subprocess.run([require("faketime"), "-f", "-30d", GATEWAY, "admin", "token", "create", "--config",
                             str(svc.config_path), "--name", "old", "--expires", "1d", "--output", str(path)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    gw.secrets.append(token_text(path).split(".")[2])
    status, body, _ = api(svc, "GET", "/api/v1/status", token=token_text(path))
    assert (status, body["error"]) == (401, "expired_token")
    assert "expired" in body["message"] and "gateway admin token create" in body["message"]
    cookie, field = signin_form(svc)
    response = sign_in(svc, token_text(path), cookie, field)
    assert response.status == 401 and b"expired" in response.body


def test_the_api_refuses_an_oversized_body_without_buffering_it(gw):
    """A 1 MiB body to a token-protected route: 413, and the service keeps serving."""
    svc = admin_service(gw)
    _, path = create_admin_token(gw, svc)
    response = request(svc, "POST", "/api/v1/groups", b"x" * (1024 * 1024),
                       {"Authorization": f"Bearer {token_text(path)}", "Content-Type": "application/json"})
    assert response.status == 413
    assert json.loads(response.body)["error"] == "body_too_large"
    assert api(svc, "GET", "/api/v1/groups", token=token_text(path))[0] == 200


def test_the_api_serves_and_changes_what_the_cli_does(gw, backends):
    """With a token: status, connectors, groups, apps, events; a group created and a connector moved."""
    from gateway_harness import echo_handler

    backend = backends(echo_handler)
    svc = admin_service(gw)
    svc.proc.stop()
    svc.add_app("echo", backend.destination)
    svc.config_path.write_text(svc.config_path.read_text() + "\n" + toml_table(
        "admin", {"listen": f"tcp:{svc.admin_port}:interface={HOST}"}))
    svc.start()
    wait_until(lambda: listening(svc.admin_port), 20, "the admin listener")
    conn = gw.connector(svc)
    _, path = create_admin_token(gw, svc)
    token = token_text(path)
    status, body, _ = api(svc, "GET", "/api/v1/status", token=token)
    group = next(g for g in body["groups"] if g["name"] == "default")
    assert group["apps"] == ["echo"] and group["health"] == "ok"
    assert [c["name"] for c in group["connectors"]] == [conn.name]
    status, body, _ = api(svc, "GET", "/api/v1/connectors", token=token)
    assert [c["connector_id"] for c in body["connectors"]] == [conn.connector_id]
    assert api(svc, "POST", "/api/v1/groups", token=token, body={"name": "spare"})[0] == 200
    status, body, _ = api(svc, "POST", "/api/v1/groups", token=token, body={"name": "Bad Name"})
    assert (status, body["error"]) == (400, "bad_request") and "[a-z0-9]" in body["message"]
    status, body, _ = api(svc, "POST", f"/api/v1/connectors/{conn.connector_id}/move", token=token,
                          body={"group": "spare"})
    assert status == 200 and body["connector"]["group"] == "spare"
    status, body, _ = api(svc, "DELETE", "/api/v1/connectors/0000", token=token)
    assert (status, body["error"]) == (404, "not_found")
    status, body, _ = api(svc, "GET", "/api/v1/apps", token=token)
    assert [(a["name"], a["source"]) for a in body["apps"]] == [("echo", "config")]
    status, body, _ = api(svc, "GET", "/api/v1/events?limit=0", token=token)
    assert status == 400 and "limit" in body["message"]
    assert api(svc, "GET", "/api/v1/events", token=token)[0] == 200
    status, body, _ = api(svc, "GET", "/api/v1/nothing", token=token)
    assert (status, body["error"]) == (404, "not_found")
    gw.assert_no_secret_in_logs()


def test_the_openapi_document_is_served_without_a_token(gw):
    """GET /api/openapi.json: an OpenAPI 3 document naming the token-protected routes, no token needed."""
    svc = admin_service(gw)
    response = request(svc, "GET", "/api/openapi.json")
    assert response.status == 200
    document = json.loads(response.body)
    assert document["openapi"].startswith("3.")
    assert "delete" in document["paths"]["/api/v1/connectors/{connector_id}"]


# -- the status page's refusals ------------------------------------------------------------------


def signin_form(svc) -> tuple[str, str]:
    """(the CSRF cookie, the form's csrf field) from GET /signin."""
    response = request(svc, "GET", "/signin")
    assert response.status == 200
    cookie = SimpleCookie(response.getheader("Set-Cookie"))["gateway_admin_csrf"].value
    return cookie, _csrf_field(response.body.decode())


def _csrf_field(page: str) -> str:
    """The value of the page's hidden csrf field."""
    return re.search(r'<input[^>]*name="csrf"[^>]*>', page).group(0).split('value="')[1].split('"')[0]


def sign_in(svc, token: str, cookie: str | None, field: str | None, origin: str | None = None):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie is not None:
        headers["Cookie"] = f"gateway_admin_csrf={cookie}"
    if origin is not None:
        headers["Origin"] = origin
    form = {"token": token, **({"csrf": field} if field is not None else {})}
    return request(svc, "POST", "/signin", urlencode(form).encode(), headers)


def session_cookie(response) -> str:
    cookies = [v for k, v in response.getheaders() if k.lower() == "set-cookie"]
    for header in cookies:
        parsed = SimpleCookie(header)
        if "gateway_admin_session" in parsed and parsed["gateway_admin_session"].value:
            return header
    raise AssertionError(f"no session cookie in {cookies}")


def signed_in(gw, svc) -> tuple[str, dict[str, str], str]:
    """(a new admin token's id, the Cookie header of a session it signed in, the sign-in form's csrf)."""
    token_id, path = create_admin_token(gw, svc)
    cookie, field = signin_form(svc)
    session = SimpleCookie(session_cookie(sign_in(svc, token_text(path), cookie, field)))
    return token_id, {"Cookie": f"gateway_admin_session={session['gateway_admin_session'].value}"}, field


def test_the_page_sends_a_visitor_without_a_session_to_sign_in(gw):
    """GET / without a cookie, and with a forged or unknown session cookie: 303 to /signin, no status shown."""
    svc = admin_service(gw)
    for headers in ({}, {"Cookie": "gateway_admin_session=forged"},
                    {"Cookie": "gateway_admin_session=" + "A" * 43}):
        response = request(svc, "GET", "/", headers=headers)
        assert response.status == 303, headers
        assert response.getheader("Location") == "/signin"
        assert b"Connectors" not in response.body


def test_sign_in_refuses_a_form_without_its_csrf_token_or_from_another_site(gw):
    """POST /signin with no CSRF field, a field not matching the cookie, or a foreign Origin: 403, no session."""
    svc = admin_service(gw)
    _, path = create_admin_token(gw, svc)
    token = token_text(path)
    cookie, field = signin_form(svc)
    own = f"https://{HOST}:{svc.admin_port}"
    for response in (sign_in(svc, token, cookie, None), sign_in(svc, token, None, field),
                     sign_in(svc, token, cookie, "x" + field[1:]),
                     sign_in(svc, token, cookie, field, origin="https://evil.example.test")):
        assert response.status == 403
        assert b"refused" in response.body
        assert not any(k.lower() == "set-cookie" and "gateway_admin_session" in v for k, v in response.getheaders())
    response = sign_in(svc, token, cookie, field, origin=own)
    assert response.status == 303 and response.getheader("Location") == "/"
    header = session_cookie(response)
    for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert attribute.lower() in header.lower(), header


def test_sign_in_refuses_a_wrong_token_with_the_reason(gw):
    """POST /signin with a well-formed wrong token: 401 and the form again saying why; no session cookie."""
    svc = admin_service(gw)
    _, path = create_admin_token(gw, svc)
    prefix, token_id, secret, fingerprint = token_text(path).split(".")
    cookie, field = signin_form(svc)
    wrong = ".".join((prefix, token_id, ("A" if secret[0] != "A" else "B") + secret[1:], fingerprint))
    response = sign_in(svc, wrong, cookie, field)
    assert response.status == 401
    assert b"unknown admin token" in response.body
    assert not any(k.lower() == "set-cookie" and "gateway_admin_session=" in v and "Max-Age=0" not in v
                   for k, v in response.getheaders())


def test_sign_out_needs_the_sessions_csrf_token_and_revocation_ends_the_session(gw):
    """Signed in, the page shows; sign-out without the session's CSRF token is 403 and the session stays;
    revoking the token sends the next page view to /signin."""
    svc = admin_service(gw)
    token_id, jar, field = signed_in(gw, svc)
    page = request(svc, "GET", "/", headers=jar)
    assert page.status == 200 and b"Gateway status" in page.body
    assert page.getheader("Content-Security-Policy").startswith("default-src 'none'")
    assert page.getheader("X-Frame-Options") == "DENY" and page.getheader("Cache-Control") == "no-store"
    for form in ({}, {"csrf": field}):   # none, and the sign-in form's (not the session's)
        response = request(svc, "POST", "/signout", urlencode(form).encode(),
                           {**jar, "Content-Type": "application/x-www-form-urlencoded"})
        assert response.status == 403
    assert request(svc, "GET", "/", headers=jar).status == 200
    assert gw.cli("admin", "token", "revoke", "--config", str(svc.config_path), token_id).returncode == 0
    response = request(svc, "GET", "/", headers=jar)
    assert response.status == 303 and response.getheader("Location") == "/signin"


def test_sign_out_with_the_sessions_csrf_token_ends_the_session(gw):
    """POST /signout with the page's CSRF token: 303 to /signin, and the old cookie no longer opens the page."""
    svc = admin_service(gw)
    _, jar, _ = signed_in(gw, svc)
    page = request(svc, "GET", "/", headers=jar)
    response = request(svc, "POST", "/signout", urlencode({"csrf": _csrf_field(page.body.decode())}).encode(),
                       {**jar, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 303 and response.getheader("Location") == "/signin"
    assert request(svc, "GET", "/", headers=jar).status == 303


def test_plain_http_on_loopback_works_and_its_cookie_is_not_secure(gw):
    """[admin] tls = false on 127.0.0.1: the API and the remote command work over plain HTTP; the session
    cookie is HttpOnly and SameSite=Strict but not Secure (a browser would drop it over http)."""
    svc = admin_service(gw, tls=False)
    _, path = create_admin_token(gw, svc)
    assert api(svc, "GET", "/api/v1/status", token=token_text(path))[0] == 200
    assert api(svc, "GET", "/api/v1/status")[0] == 401
    cookie, field = signin_form(svc)
    header = session_cookie(sign_in(svc, token_text(path), cookie, field, origin=f"http://{HOST}:{svc.admin_port}"))
    assert "httponly" in header.lower() and "samesite=strict" in header.lower()
    assert "secure" not in header.lower().replace("samesite", "")
    result = gw.cli("--service", admin_url(svc), "--admin-token-file", str(path), "groups", "list")
    assert result.returncode == 0 and "default" in result.stdout, result.stderr


# -- gateway --service URL -----------------------------------------------------------------------


def test_the_command_runs_against_a_remote_service_with_a_token_file_or_the_environment(gw):
    """`gateway --service URL` lists connectors, shows status, creates a group; the token from a file or
    GATEWAY_ADMIN_TOKEN; a command the API does not offer is refused naming those it does."""
    svc = admin_service(gw)
    conn = gw.connector(svc)
    _, path = create_admin_token(gw, svc)
    url = admin_url(svc)
    result = gw.cli("--service", url, "--admin-token-file", str(path), "connectors", "list")
    assert result.returncode == 0, result.stderr
    assert conn.name in result.stdout and conn.connector_id[:12] in result.stdout
    env = subprocess_env(GATEWAY_ADMIN_TOKEN=token_text(path))
    result = gw.cli("--service", url, "groups", "create", "spare", env=env)
    assert result.returncode == 0, result.stderr
    result = gw.cli("--service", url, "connectors", "move", conn.connector_id[:8], "--group", "spare", env=env)
    assert result.returncode == 0, result.stderr
    result = gw.cli("--service", url, "status", env=env)
    assert result.returncode == 0, result.stderr
    assert "group spare: 1/1 connectors active" in result.stdout
    result = gw.cli("--service", url, "admin", "token", "list", env=env)
    assert result.returncode == 1 and "works on the service machine only" in result.stderr
    assert "connectors list" in result.stderr
    result = gw.cli("--service", url, "connectors", "delete", conn.connector_id[:8], env=env)
    assert result.returncode == 0 and "certificate is revoked" in result.stdout, result.stderr
    result = gw.cli("--service", url, "connectors", "list", "--all", env=env)
    assert "deleted" in result.stdout
    gw.assert_no_secret_in_logs()


def test_a_change_through_the_api_takes_effect_on_the_node_at_once(gw):
    """On the SQLite store (no change feed) a node re-reads what its admin API changed at once, not
    at its next config_interval (an hour here): an app added is served, a deleted connector is cut."""
    svc = admin_service(gw, service={"config_interval": 3600})
    conn = gw.connector(svc)
    _, path = create_admin_token(gw, svc)
    env = subprocess_env(GATEWAY_ADMIN_TOKEN=token_text(path))
    url = admin_url(svc)
    result = gw.cli("--service", url, "apps", "add", "web-now", "--external-url", "http://web-now.apps.example.test/",
                    "--internal-url", "http://127.0.0.1:9/", env=env)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "app web-now added (from the store)" in svc.proc.log(), 20, "the node to serve the new app")
    result = gw.cli("--service", url, "connectors", "delete", conn.connector_id[:8], env=env)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "this connector was deleted from the service" in conn.proc.log(), 20,
               "the deleted connector's tunnels to be cut")


def test_the_remote_command_refuses_without_a_token_and_a_service_of_another_ca(gw):
    """No token: the command says how to give one. A token of another gateway: refused before the token
    is sent, naming the CA mismatch. A revoked token: the service's refusal is shown."""
    svc = admin_service(gw)
    other = gw.service(name="other")
    _, foreign = create_admin_token(gw, other, name="bob")
    token_id, path = create_admin_token(gw, svc)
    url = admin_url(svc)
    result = gw.cli("--service", url, "status")
    assert result.returncode == 1 and "--admin-token-file" in result.stderr and "GATEWAY_ADMIN_TOKEN" in result.stderr
    result = gw.cli("--service", url, "--admin-token-file", str(foreign), "status")
    assert result.returncode == 1 and "does not hold the CA your admin token names" in result.stderr
    assert "admin API" not in svc.proc.log() or "refused" not in svc.proc.log()
    gw.cli("admin", "token", "revoke", "--config", str(svc.config_path), token_id)
    result = gw.cli("--service", url, "--admin-token-file", str(path), "status")
    assert result.returncode == 1 and "revoked_token" in result.stderr and "revoked" in result.stderr


def test_a_read_only_token_reads_and_every_change_is_refused_with_403(gw):
    """`--role read`: the API's GETs and the remote command's reads work; a DELETE, a POST and a
    remote change are refused naming the token and what to use instead; nothing changed."""
    svc = admin_service(gw)
    conn = gw.connector(svc)
    token_id, path = create_admin_token(gw, svc, "wallboard", "--role", "read")
    token = token_text(path)
    status, body, _ = api(svc, "GET", "/api/v1/connectors", token=token)
    assert status == 200 and [c["connector_id"] for c in body["connectors"]] == [conn.connector_id]
    for method, where, payload in (("DELETE", f"/api/v1/connectors/{conn.connector_id}", None),
                                   ("POST", "/api/v1/groups", {"name": "sneaky"})):
        status, body, _ = api(svc, method, where, token=token, body=payload)
        assert status == 403 and body["error"] == "read_only", body
        assert token_id in body["message"] and "--role admin" in body["message"], body
    remote = ["--service", admin_url(svc), "--admin-token-file", str(path)]
    listed = gw.cli(*remote, "connectors", "list")
    assert listed.returncode == 0 and conn.connector_id[:8] in listed.stdout, listed.stderr
    refused = gw.cli(*remote, "connectors", "delete", conn.connector_id)
    assert refused.returncode == 1 and "read_only" in refused.stderr and "may only read" in refused.stderr
    assert "Traceback" not in refused.stderr
    groups = gw.cli("groups", "list", "--config", str(svc.config_path)).stdout
    assert "sneaky" not in groups
    assert gw.cli("connectors", "list", "--config", str(svc.config_path)).stdout.count(conn.connector_id[:8]) == 1
    tokens = gw.cli("admin", "token", "list", "--config", str(svc.config_path)).stdout
    assert re.search(rf"{token_id}\s+wallboard\s+read\s", tokens), tokens
    assert "by read-only admin token" in svc.log()

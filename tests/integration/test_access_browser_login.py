"""`gateway login` in a real browser: headless Chromium signs in at the real ``oidc-provider``
through the service's sign-in page, the loopback client receives the code, redeems it for a
user certificate, and `gateway access tcp` then reaches a private app through a connector."""

from __future__ import annotations

import json
import shlex
import shutil
import stat
import subprocess
import sys

from components import needs
from gateway_harness import GATEWAY, HOST, echo_handler, free_port, subprocess_env, toml_table, wait_echo, wait_until
from test_http_oidc import NODE, NODE_DIR, SECRET, OpenIDProvider

pytestmark = needs("node", "chromium", node_modules=["oidc-provider", "playwright-core"])


def private_app_toml(name: str, destination: str, ports: str, protocol: str = "tcp", **options) -> str:
    """One [[apps]] table of a private app with one segment."""
    return "\n" + toml_table("apps", {
        "name": name, "options": options,
        "segments": [{"destination": destination, "ports": ports, "protocol": protocol}],
    }, array=True)


RENEW = """
import sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from gateway.access import credentials, login


async def main(reactor):
    creds = credentials.load(sys.argv[1])
    credentials.save(await login.renew(reactor, creds))

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


def renew_cached(service: str, env: dict) -> subprocess.CompletedProcess:
    """Renew the cached certificate with its refresh secret, as the client does, in a process of its own."""
    return subprocess.run([sys.executable, "-c", RENEW, service], capture_output=True, text=True, env=env, timeout=60)


def test_browser_sign_in_then_access_through_a_connector(gw, backends, tmp_path):
    """Chromium signs alice in; the CLI gets a certificate; access tcp reaches the echo app."""
    front = free_port()
    portal = f"http://{HOST}:{front}"
    provider = OpenIDProvider(tmp_path / "idp", [f"{portal}/.gateway/callback"], [f"{portal}/.gateway/signedout"])
    try:
        echo = backends(echo_handler)
        (tmp_path / "client-secret.txt").write_text(SECRET + "\n")
        gw.secrets.append(SECRET)
        svc = gw.service(start=False, service={"config_interval": 1})
        text = svc.config_path.read_text()
        text += "\n" + toml_table("http", {"listen": f"tcp:{front}:interface={HOST}"})
        text += "\n" + toml_table("http.oidc", {"issuer": provider.issuer, "client_id": "gateway",
                                                "client_secret_file": str(tmp_path / "client-secret.txt")})
        text += "\n" + toml_table("access", {"url": portal, "tunnel": svc.address})
        text += private_app_toml("echo", HOST, str(echo.port), allowed_users=["alice"])
        svc.config_path.write_text(text)
        svc.start()
        gw.connector(svc)

        home = tmp_path / "home"
        report = tmp_path / "browser.json"
        scenario = tmp_path / "scenario.json"
        scenario.write_text(json.dumps({"chromium": shutil.which("chromium") or "/usr/bin/chromium",
                                        "issuer": provider.issuer, "login": "alice", "password": "any",
                                        "report": str(report)}))
        env = subprocess_env(
            XDG_CONFIG_HOME=str(home),
            BROWSER=f"{shlex.quote(NODE)} {shlex.quote(str(NODE_DIR / 'login.mjs'))} %s",
            GATEWAY_TEST_LOGIN_SCENARIO=str(scenario),
        )
        result = gw.cli("login", "--service", portal, env=env, timeout=180)
        seen = json.loads(report.read_text()) if report.exists() else {}
        assert result.returncode == 0, (result.stdout, result.stderr, seen)
        assert seen.get("ok"), seen
        assert seen["provider_pages"][:1] == ["login"]
        assert seen["landed"].startswith(f"http://{HOST}:") and seen["landed"].endswith("/callback")
        assert "signed in" in seen["text"].lower()
        assert "alice" in (result.stdout + result.stderr)

        cached = list((home / "gateway" / "credentials").glob("*.json"))
        assert len(cached) == 1
        assert stat.S_IMODE(cached[0].stat().st_mode) == 0o600
        assert stat.S_IMODE(cached[0].parent.stat().st_mode) == 0o700
        document = json.loads(cached[0].read_text())
        secret = json.dumps(document.get("refresh") or document.get("credential") or {})
        assert "secret" in secret   # the refresh credential the sign-in left

        port = free_port()
        gw.spawn("access", [GATEWAY, "access", "tcp", "--service", portal, "--app", "echo",
                            "--listen", f"{HOST}:{port}"], env=env)
        wait_echo(port)
        wait_until(lambda: "session: user alice app echo" in svc.log(), 20, "the session record")

        # The refresh secret the sign-in left buys a new certificate without the browser (as the
        # client does when less than a third of the certificate's life is left) until the user
        # is revoked.
        first = json.loads(cached[0].read_text())["certificate"]
        renewed = renew_cached(portal, env)
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        assert json.loads(cached[0].read_text())["certificate"] != first
        assert "user alice got a certificate for credential" in svc.log()
        revoked = gw.cli("users", "revoke", "--config", str(svc.config_path), "--user", "alice")
        assert revoked.returncode == 0, revoked.stderr
        refused = renew_cached(portal, env)
        assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr
        for value in json.loads(cached[0].read_text()).values():
            if isinstance(value, dict) and "secret" in value:
                gw.secrets.append(value["secret"])
    finally:
        provider.stop()

"""Kerberos constrained delegation single sign-on (the kerberos_sso plugin) through real processes.

A real MIT KDC with the LDAP back end and a real Negotiate-only Apache (kdc_harness.py), the
real OpenID provider and its cookie-jar browser (test_http_oidc.py), a service with the
front door and a connector whose own TOML has a [kerberos] table: users sign in, the connector
delegates for them (S4U2Self + S4U2Proxy from its keytab) and Apache's REMOTE_USER says whom
it saw. Each failure is provoked on the realm for real and must end in the 502 page with the
correlation id and a connector log line naming cause and fix.
"""

from __future__ import annotations

import http.client
import json
import re

import pytest

from components import needs, require_module
from gateway_harness import HOST, TWISTD, free_port, http_request, subprocess_env, toml_table, wait_until
from kdc_harness import BACKEND, CONNECTOR, KRB5_VARIABLES, OTHER, ROTATED, principal
from test_http_oidc import SECRET, USERS, AppServer, Browser, OpenIDProvider, sign_in

require_module("gssapi")
pytestmark = needs("node", node_modules=["oidc-provider"])

HOSTS = {"wiki": "wiki.apps.example.test", "other": "other.apps.example.test",
         "challenge": "challenge.apps.example.test", "echo": "echo.apps.example.test",
         "plain": "plain.apps.example.test", "unproven": "unproven.apps.example.test",
         "bound": "bound.apps.example.test", "sam": "sam.apps.example.test"}
# Provider accounts beyond alice and bob: carol and dave are in the realm (made by the test),
# mallory is not.
EXTRA_USERS = {name: {"name": name.title(), "email": f"{name}@example.test", "groups": []}
               for name in ("carol", "dave", "mallory")}
# erin's on-premises account name, as the identity provider's preferred_username claim.
EXTRA_USERS["erin"] = {"name": "Erin", "email": "erin@example.test", "groups": [], "preferred_username": "erin.sam"}
# An account at the identity provider whose subject names the back end's own service principal.
SERVICE_NAMED = BACKEND
EXTRA_USERS[SERVICE_NAMED] = {"name": "Service", "email": "svc@example.test", "groups": []}


class Stack:
    def __init__(self, gw, tmp_path, kdc, apache, account: str = CONNECTOR, metrics_port: int | None = None) -> None:
        self.apache = apache
        self.front = free_port()
        self.base = {name: f"http://{host}:{self.front}" for name, host in HOSTS.items()}
        self.provider = OpenIDProvider(tmp_path / "idp", [f"{b}/.gateway/callback" for b in self.base.values()],
                                       [f"{b}/.gateway/signedout" for b in self.base.values()])
        self.echo = AppServer()
        (tmp_path / "client-secret.txt").write_text(SECRET + "\n")
        gw.secrets.append(SECRET)
        kerberos = {"preauth": "oidc", "sso": "kerberos", "kerberos_spn": BACKEND}
        internal = f"http://{HOST}:{apache.port}/"
        apps = [
            {"name": "wiki", "internal_url": internal, "options": kerberos},
            {"name": "other", "internal_url": internal, "options": {**kerberos, "kerberos_spn": OTHER}},
            {"name": "challenge", "internal_url": internal, "options": {**kerberos, "kerberos_preemptive": False,
                                                                      "kerberos_identity": "claim:sub"}},
            {"name": "echo", "internal_url": f"http://{HOST}:{self.echo.port}/",
             "options": {**kerberos, "kerberos_preemptive": False}},
            {"name": "sam", "internal_url": internal,
             "options": {**kerberos, "sso_claims": ["preferred_username"],
                         "kerberos_identity": "claim:preferred_username"}},
            {"name": "bound", "internal_url": internal, "options": {**kerberos, "kerberos_preemptive": False}},
            {"name": "unproven", "internal_url": f"http://{HOST}:{self.echo.port}/", "options": kerberos},
            {"name": "plain", "internal_url": f"http://{HOST}:{self.echo.port}/", "options": {"preauth": "oidc"}},
        ]
        self.svc = gw.service(start=False)
        self.svc.add_front_door(self.front, [{**app, "external_url": self.base[app["name"]] + "/"} for app in apps],
                                more="\n" + toml_table("http.oidc", {
                                    "issuer": self.provider.issuer, "client_id": "gateway",
                                    "client_secret_file": str(tmp_path / "client-secret.txt")}))
        self.svc.start()
        self.conn = gw.connector(self.svc, start=False)
        with open(self.conn.config_path, "a") as f:
            f.write("\n" + toml_table("kerberos", {"keytab": str(kdc.keytab(account)), "principal": principal(account),
                                                   "krb5_conf": str(kdc.krb5_conf), "check_user": "alice"}))
            if metrics_port is not None:
                f.write("\n" + toml_table("metrics", {"enabled": True, "listen": f"tcp:{metrics_port}:interface={HOST}"}))
        # The connector finds the realm through [kerberos] krb5_conf only, not this process's KRB5_CONFIG.
        env = {k: v for k, v in subprocess_env().items() if k not in KRB5_VARIABLES}
        self.conn.starts += 1
        self.conn.proc = gw.spawn(f"{self.conn.name}-1", [TWISTD, "-n", "--pidfile=", "gateway", "--config",
                                                          str(self.conn.config_path)], env=env)
        self.conn.wait_up()
        wait_until(lambda: "wiki→" in self.conn.proc.log(), 30, "the connector to get its apps")
        wait_until(lambda: "oidc: provider" in self.svc.log(), 30, "the service to discover the provider")
        self.browsers: dict[str, Browser] = {}

    def browser(self, user: str, app: str = "wiki") -> Browser:
        """``user``'s browser, signed in to ``app`` (the provider remembers the user after the first app)."""
        browser = self.browsers.setdefault(user, Browser())
        if not any(host == HOSTS[app] for host, _, _ in browser.cookies):
            page = sign_in(browser, self.base[app] + "/open", user, self.provider)
            assert page.status in (200, 404, 401, 502), page.text[:300]
        return browser

    def get(self, user: str, app: str = "wiki", path: str = "/whoami", **headers: str):
        return self.browser(user, app).request("GET", self.base[app] + path, headers=headers)

    def stop(self) -> None:
        self.provider.stop()
        self.echo.stop()


@pytest.fixture
def stack(gw, tmp_path, kdc, negotiate_apache, monkeypatch):
    for name, user in EXTRA_USERS.items():
        monkeypatch.setitem(USERS, name, user)
    started: list[Stack] = []

    def make(**kw) -> Stack:
        started.append(Stack(gw, tmp_path, kdc, negotiate_apache, **kw))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def assert_sso_failed(stack: Stack, page, cause: str, fix: str) -> None:
    """The user got the 502 page with the correlation id and nothing of Kerberos; the connector's
    log names the cause and the fix under that id."""
    assert page.status == 502, (page.status, page.text[:500])
    assert "Single sign-on to the application failed" in page.text
    rid = re.search(r"Correlation id: <code>(\w+)</code>", page.text).group(1)
    for internal in ("Kerberos", "KDC", "EXAMPLE.TEST", "HTTP/", cause):
        assert internal not in page.text, internal
    line = wait_until(lambda: re.search(rf"request {rid} for app \w+: Kerberos single sign-on for .*", stack.conn.proc.log()),
                      10, f"the connector's log line for {rid}").group(0)
    assert f"failed: {cause}:" in line and f"Fix: {fix}" in line, line


def alternate_on_one_connection(s: Stack, app: str, path: str, rounds: int) -> None:
    """alice's and bob's requests to ``app``, alternating on one client keep-alive connection:
    each must be answered with the user's own name."""
    cookies = {user: s.browser(user, app).cookie_header(HOSTS[app], "/") for user in ("alice", "bob")}
    client = http.client.HTTPConnection(HOST, s.front, timeout=30)
    try:
        for _ in range(rounds):
            for user in ("alice", "bob"):
                r, body = http_request(s.front, f"{HOSTS[app]}:{s.front}", path, headers={"Cookie": cookies[user]},
                                       conn=client)
                assert (r.status, body) == (200, f"user={principal(user)}\n".encode()), (user, r.status, body)
    finally:
        client.close()


def test_signed_in_users_reach_the_back_end_as_themselves(stack, kdc):
    """alice and bob sign in; Apache (Negotiate only) sees REMOTE_USER alice@EXAMPLE.TEST and
    bob@EXAMPLE.TEST, also alternating on one client keep-alive connection; the mutual-auth reply
    verifies; a user's second request needs no KDC exchange, even with the KDC stopped."""
    s = stack()
    log = wait_until(lambda: re.search(r"kerberos: account \S+ got a TGT .*", s.conn.proc.log()), 30,
                     "the start-up check").group(0)
    assert "protocol transition for alice@EXAMPLE.TEST works" in log, log
    for user in ("alice", "bob"):
        page = s.get(user)
        assert (page.status, page.body) == (200, f"user={principal(user)}\n".encode()), page.text[:300]
    alternate_on_one_connection(s, "wiki", "/whoami", rounds=3)
    with kdc.kdc_stopped():
        assert s.get("alice").body == f"user={principal('alice')}\n".encode()


def test_kdc_round_trips_and_cache_hits_are_in_the_connectors_metrics(stack):
    """The connector's /metrics counts a KDC exchange for each new user and a cache hit for each later request."""
    from test_metrics_scrape import scrape, value

    port = free_port()
    s = stack(metrics_port=port)
    assert s.get("alice").status == 200   # signed in; her credentials for the wiki's SPN are cached
    before = scrape(port)
    for _ in range(3):
        assert s.get("alice").status == 200
    after = scrape(port)
    assert value(after, "gateway_kerberos_cache_hits_total") - value(before, "gateway_kerberos_cache_hits_total") == 3
    assert value(after, "gateway_kerberos_kdc_round_trips_total") == value(before, "gateway_kerberos_kdc_round_trips_total")
    assert s.get("bob").status == 200
    bob = scrape(port)
    assert value(bob, "gateway_kerberos_kdc_round_trips_total") - value(after, "gateway_kerberos_kdc_round_trips_total") == 1
    assert value(bob, "gateway_kerberos_cached_credentials") == 2
    assert value(bob, "gateway_http_responses_total", app="wiki", group="default", code_class="2xx") == 0, \
        "the front door's metrics are the node's, not the connector's"


def test_connections_authenticated_once_are_never_shared_between_users(stack):
    """A back end that authenticates a connection once (GssapiConnectionBound, as IIS) and an app
    in 401-challenge mode: later requests go without a token, so only the per-user pool keeps
    bob off alice's authenticated connection; alternating on one client connection, each sees
    their own name."""
    s = stack()
    alternate_on_one_connection(s, "bound", "/bound-whoami", rounds=4)
    # Most of those requests carried no token: the back end challenged each user's connection once.
    challenges = re.findall(r'"GET /bound-whoami HTTP/1.1" 401', (s.apache.root / "logs" / "access.log").read_text())
    assert len(challenges) <= 4, challenges


def test_the_account_name_can_come_from_a_claim_the_app_asks_for(stack, kdc):
    """kerberos_identity = "claim:preferred_username" with sso_claims = ["preferred_username"]: the
    front door sends that claim to the connector, and Apache sees erin as her on-premises name."""
    kdc.kadmin("addprinc -randkey erin.sam")
    s = stack()
    page = s.get("erin", "sam")
    assert (page.status, page.body) == (200, b"user=erin.sam@EXAMPLE.TEST\n"), page.text[:300]


def test_a_401_challenge_is_answered_and_the_clients_authorization_never_forwarded(stack):
    """kerberos_preemptive = false: the request goes without a token, Apache's 401 Negotiate
    challenge is answered with alice's, and she gets her page; a back end that does not challenge
    never sees the Authorization header the client sent."""
    s = stack()
    page = s.get("alice", "challenge", Authorization="Negotiate Zm9yZ2Vk")
    assert (page.status, page.body) == (200, f"user={principal('alice')}\n".encode()), page.text[:300]
    page = s.get("alice", "echo", "/anything", Authorization="Basic Zm9yZ2Vk")
    assert page.status == 200
    seen = json.loads(page.body)
    assert seen["path"] == "/anything"
    assert not [v for k, v in seen["headers"] if k.lower() == "authorization"], seen["headers"]


def test_a_subject_naming_a_service_is_never_delegated(stack):
    """A user whose subject claim is the back end's SPN (kerberos_identity = "claim:sub") is not
    delegated as that service: 502 page, IDENTITY_UNMAPPED in the log; alice on the same app works."""
    s = stack()
    assert_sso_failed(s, s.get(SERVICE_NAMED, "challenge", "/whoami", Authorization="Negotiate eA=="),
                      "IDENTITY_UNMAPPED", "check the app's options.kerberos_identity")
    assert s.get("alice", "challenge").body == f"user={principal('alice')}\n".encode()


def test_each_failure_is_a_502_page_and_a_log_line_with_the_fix(stack, kdc):
    """KDC down, a user unknown to the KDC, a target the account may not delegate to, and an
    account without protocol transition: each request gets the 502 page with its correlation id
    (no Kerberos detail) and the connector logs cause and fix; apps without SSO keep working."""
    for user in ("carol", "dave"):
        kdc.kadmin(f"addprinc -randkey {user}")
    s = stack()
    assert s.get("alice").status == 200
    with kdc.kdc_stopped():
        assert_sso_failed(s, s.get("carol"), "KDC_UNREACHABLE", "check that the KDC is running")
        assert s.get("alice").status == 200   # cached: no KDC needed
        assert s.get("alice", "plain", "/x").status == 200
    assert_sso_failed(s, s.get("mallory"), "USER_UNKNOWN", "check which identity the app delegates")
    assert_sso_failed(s, s.get("alice", "other"), "DELEGATION_NOT_ALLOWED",
                      f"add {OTHER} to the delegation targets of {principal(CONNECTOR)}")
    kdc.kadmin(f"modprinc -ok_to_auth_as_delegate {CONNECTOR}")
    try:
        assert_sso_failed(s, s.get("dave"), "NO_PROTOCOL_TRANSITION", f"allow {principal(CONNECTOR)} to delegate")
    finally:
        kdc.kadmin(f"modprinc +ok_to_auth_as_delegate {CONNECTOR}")
    assert s.get("dave").status == 200   # failures are not cached: fixed, it works at once
    assert s.get("carol").status == 200


def test_a_back_end_that_does_not_prove_the_spns_key_is_not_relayed(stack):
    """A back end that answers 200 to alice's token without the mutual-auth reply (it never held
    the SPN's key: here a plain web server) gets the 502 page instead of its content."""
    s = stack()
    page = s.get("alice", "unproven", "/secret")
    assert_sso_failed(s, page, "MUTUAL_AUTH_FAILED", "check that the back end uses the keytab of")
    assert "wiki content" not in page.text
    assert s.echo.requests and s.echo.requests[-1]["path"] == "/secret"


def test_a_keytab_with_a_stale_key_is_named_at_start_and_other_apps_are_served(stack):
    """A connector whose keytab holds an old key: the start-up check logs KEYTAB_WRONG_KEY with the
    fix, the Kerberos app answers 502, and an app without SSO is served by the same connector."""
    s = stack(account=ROTATED)
    line = wait_until(lambda: re.search(r"kerberos: start-up check of .*", s.conn.proc.log()), 30,
                      "the start-up check").group(0)
    assert "KEYTAB_WRONG_KEY" in line and "export a new keytab" in line and "other apps are served" in line, line
    assert_sso_failed(s, s.get("alice"), "KEYTAB_WRONG_KEY", "export a new keytab")
    assert s.get("alice", "plain", "/y").status == 200

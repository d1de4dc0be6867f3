"""Pre-authentication pieces without a network: cookie codec, PKCE, settings, assignment, the gate's flow."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from gateway import plugins
from gateway.config import AppConfig, parse_config
from gateway.errors import ConfigError, GatewayError

from gateway_http import auth, oidc, sessions
from gateway_http.assertion import Signer
from gateway_http.rules import Origin, Request

ISSUER = "https://idp.example.test"
WIKI = "http://wiki.apps.example.test:8080/"
EXTERNAL = Origin("http", "wiki.apps.example.test", 8080)


# -- cookie codec ---------------------------------------------------------------------------------


def sealer() -> sessions.Sealer:
    return sessions.Sealer(b"k" * 32)


def test_sealed_cookie_round_trips_and_expires():
    """A sealed document opens with the same purpose until its exp passes."""
    s = sealer()
    value = s.seal("session:wiki", {"sub": "alice", "exp": 100})
    assert s.open("session:wiki", value, 99) == {"sub": "alice", "exp": 100}
    assert s.open("session:wiki", value, 100) is None


@pytest.mark.parametrize("mangle", [
    lambda v: v[:-2] + ("A" if v[-2] != "A" else "B") + v[-1],   # one ciphertext character changed
    lambda v: v[:20],                                            # truncated
    lambda v: "v2." + v[3:],                                     # unknown version
    lambda v: "not a cookie",
    lambda v: v + "!!",                                          # not base64
])
def test_tampered_cookie_does_not_open(mangle):
    """Altered, cut or foreign values open as None (a fresh sign-in), never an exception."""
    s = sealer()
    value = s.seal("session:wiki", {"sub": "alice", "exp": 100})
    assert s.open("session:wiki", mangle(value), 0) is None


def test_cookie_of_another_app_or_key_does_not_open():
    """The purpose (session of which app, or pending sign-in) and the key are bound into the seal."""
    value = sealer().seal("session:wiki", {"sub": "alice", "exp": 100})
    assert sealer().open("session:hr", value, 0) is None
    assert sealer().open("signin:wiki", value, 0) is None
    assert sessions.Sealer(b"x" * 32).open("session:wiki", value, 0) is None


def test_key_file_is_made_once_with_mode_0600(tmp_path):
    """The session key is made in the state dir with mode 0600 and read back on the next start."""
    a = sessions.Sealer.from_state_dir(tmp_path)
    value = a.seal("p", {"exp": 10})
    assert (tmp_path / sessions.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert sessions.Sealer.from_state_dir(tmp_path).open("p", value, 0) == {"exp": 10}


def test_our_cookies_are_removed_from_the_cookie_header():
    """The back end gets the client's other cookies byte for byte and in order, not the gateway's
    (in any letter case); a value of ours alone leaves nothing."""
    name = sessions.session_cookie_name("wiki")
    assert sessions.strip_our_cookies(f"a=1; {name}=v1.xyz; b=2".encode()) == b"a=1; b=2"
    assert sessions.strip_our_cookies(f"{name}=v1.xyz;  a=\"1\";b=2 ".encode()) == b'a="1";b=2 '
    assert sessions.strip_our_cookies(b"GATEWAY_Signin_0123456789ab=v1.q; gateway_session_x=1") == b""
    assert sessions.strip_our_cookies(b"gateway_theme=dark; a=1") == b"gateway_theme=dark; a=1"
    value = b"a=1;b=2;;  c=3"
    assert sessions.strip_our_cookies(value) is value


def test_set_cookie_attributes():
    """HttpOnly and SameSite=Lax always; Secure only on https; Max-Age only when persistent."""
    assert sessions.set_cookie("n", "v", "/", False, None) == b"n=v; Path=/; HttpOnly; SameSite=Lax"
    assert sessions.set_cookie("n", "v", "/a/", True, 60) == b"n=v; Path=/a/; HttpOnly; SameSite=Lax; Secure; Max-Age=60"


# -- PKCE and the authorization request -----------------------------------------------------------


def test_pkce_s256_matches_rfc7636_appendix_b():
    """S256 of the RFC 7636 example verifier is the RFC's challenge; fresh verifiers are 43-128 characters."""
    assert oidc.s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier, challenge = oidc.pkce_pair()
    assert 43 <= len(verifier) <= 128 and oidc.s256(verifier) == challenge
    assert oidc.pkce_pair()[0] != verifier


@pytest.mark.parametrize("target, expected", [
    ("/page?a=1", "/page?a=1"),
    ("/", "/"),
    ("//evil.example/x", "/wiki/"),
    ("/\\evil.example", "/wiki/"),
    ("https://evil.example/", "/wiki/"),
    ("javascript:alert(1)", "/wiki/"),
    ("/a\tb", "/wiki/"),
])
def test_return_target_is_same_origin_only(target, expected):
    """Only a same-origin path comes back after sign-in: no open redirect."""
    assert auth.safe_return(target, "/wiki/") == expected


# -- settings and options -------------------------------------------------------------------------


def config(http=None, options=None):
    data = {"service": {"state_dir": "/tmp/gw-state"},
            "apps": [{"name": "wiki", "external_url": WIKI, "internal_url": "http://wiki.corp/",
                      "options": options or {}}]}
    if http is not None:
        data["http"] = http
    return parse_config(data, "gw.toml", plugins.config_sections(plugins.make_plugin_manager({})))


GOOD = {"issuer": ISSUER, "client_id": "gw", "client_secret_file": "secret.txt"}


def test_oidc_table_defaults():
    """[http.oidc] needs issuer, client_id and client_secret_file; the rest has the documented defaults."""
    settings = config(http={"oidc": GOOD}).sections["http"]["oidc"]
    assert settings == oidc.Settings(issuer=ISSUER, client_id="gw", client_secret_file="secret.txt",
                                     scopes=("openid", "profile", "email"), groups_claim="groups",
                                     session_lifetime=8 * 3600, persistent_session=False, ca_file="",
                                     emails_verified=False)
    assert config(http={}).sections["http"]["oidc"] is None


@pytest.mark.parametrize("change, words", [
    ({"issuer": "http://idp.example.test"}, "http.oidc.issuer: expected an https:// URL (plain http only for 127.0.0.1"),
    ({"issuer": "ftp://idp.example.test"}, "http.oidc.issuer"),
    ({"client_id": None}, "http.oidc.client_id: expected a value"),
    ({"client_secret_file": ""}, "http.oidc.client_secret_file: expected a non-empty string"),
    ({"client_secret": "s3cret"}, "http.oidc.client_secret: unknown key"),
    ({"scopes": ["profile"]}, 'http.oidc.scopes: expected a list of scopes including "openid"'),
    ({"session_lifetime": 0}, "http.oidc.session_lifetime: expected a whole number of seconds"),
    ({"session_lifetime": "8h"}, "http.oidc.session_lifetime"),
    ({"persistent_session": "yes"}, "http.oidc.persistent_session: expected true or false"),
    ({"emails_verified": 1}, "http.oidc.emails_verified: expected true or false"),
])
def test_bad_oidc_table_is_refused(change, words):
    """Each bad [http.oidc] value is a ConfigError naming the dotted key (and never echoing a secret key's value)."""
    table = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        config(http={"oidc": table})
    assert words in str(e.value)
    assert "s3cret" not in str(e.value)


def test_plain_http_issuer_allowed_on_loopback():
    """A plain-http issuer is allowed for 127.0.0.1 and localhost (tests)."""
    settings = config(http={"oidc": {**GOOD, "issuer": "http://127.0.0.1:9000"}}).sections["http"]["oidc"]
    assert settings.issuer == "http://127.0.0.1:9000"


def app(**options) -> AppConfig:
    return AppConfig(name="wiki", listen="", destination="wiki.corp:80", host="wiki.corp", port=80,
                     protocol="http", options=options, external_url=WIKI, internal_url="http://wiki.corp/")


@pytest.mark.parametrize("options, words", [
    ({"preauth": "saml"}, 'options.preauth: expected "passthrough" or "oidc"'),
    ({"preauth": "oidc", "allowed_users": "alice"}, "options.allowed_users: expected a list of non-empty strings"),
    ({"preauth": "oidc", "allowed_groups": [""]}, "options.allowed_groups: expected a list"),
    ({"preauth": "oidc", "jwt_assertion": "yes"}, "options.jwt_assertion: expected true or false"),
    ({"allowed_users": ["alice"]}, 'options.allowed_users: needs options.preauth = "oidc"'),
    ({"jwt_assertion": True}, 'options.jwt_assertion: needs options.preauth = "oidc"'),
    ({"preauth": "oidc", "sso_claims": "samaccountname"}, "options.sso_claims: expected a list of at most 8"),
    ({"preauth": "oidc", "sso_claims": ["a b"]}, "options.sso_claims: expected a list"),
    ({"preauth": "oidc", "sso_claims": [f"c{i}" for i in range(9)]}, "options.sso_claims: expected a list"),
    ({"sso_claims": ["samaccountname"]}, 'options.sso_claims: needs options.preauth = "oidc"'),
])
def test_bad_app_options_are_refused(options, words):
    """Bad per-app pre-authentication options name the app and the option."""
    with pytest.raises(GatewayError) as e:
        auth.check_app_options(app(**options))
    assert str(e.value).startswith("app wiki: ") and words in str(e.value)


def test_build_gate_needs_the_oidc_table_and_a_readable_secret(tmp_path):
    """An oidc app without [http.oidc], or with a missing secret file, stops the front door with a ConfigError."""
    cfg = attrs.evolve(config(http={}), path=tmp_path / "gw.toml")
    apps = [app(preauth="oidc")]
    with pytest.raises(ConfigError, match=r"http\.oidc: expected a \[http\.oidc\] table"):
        auth.build_gate({"oidc": None}, apps, cfg, Clock())
    settings = oidc.Settings(issuer=ISSUER, client_id="gw", client_secret_file="missing.txt")
    with pytest.raises(ConfigError, match="http.oidc.client_secret_file: expected a readable file"):
        auth.build_gate({"oidc": settings}, apps, cfg, Clock())
    assert isinstance(auth.build_gate({}, [app()], cfg, Clock()), auth.PassthroughGate)


# -- assignment and identity ----------------------------------------------------------------------


ALICE = auth.Identity("u-alice", "Alice", "Alice@Example.test", ("staff", "wiki-users"), email_verified=True)


@pytest.mark.parametrize("options, assigned", [
    ({}, True),
    ({"allowed_users": ["u-alice"]}, True),
    ({"allowed_users": ["alice@example.test"]}, True),
    ({"allowed_users": ["bob"]}, False),
    ({"allowed_groups": ["wiki-users"]}, True),
    ({"allowed_groups": ["admins"]}, False),
    ({"allowed_users": ["bob"], "allowed_groups": ["staff"]}, True),
    ({"allowed_users": [], "allowed_groups": []}, False),
])
def test_assignment(options, assigned):
    """allowed_users matches the subject or the email (any case); allowed_groups any group; neither admits all."""
    assert auth.is_assigned(ALICE, app(preauth="oidc", **options)) is assigned


def test_an_unverified_email_matches_no_allowed_user():
    """An email the provider has not verified never matches allowed_users (the subject still does)."""
    unverified = auth.Identity("u-mallory", "Mallory", "alice@example.test", ())
    assert not auth.is_assigned(unverified, app(preauth="oidc", allowed_users=["alice@example.test"]))
    assert auth.is_assigned(unverified, app(preauth="oidc", allowed_users=["u-mallory"]))


@pytest.mark.parametrize("claim, trusted, verified", [
    ({}, False, False), ({"email_verified": True}, False, True), ({"email_verified": "true"}, False, True),
    ({"email_verified": False}, False, False), ({"email_verified": "yes"}, False, False),
    ({}, True, True), ({"email_verified": False}, True, False),
])
def test_email_verified_claim(claim, trusted, verified):
    """email_verified must be true (or "true"); missing counts as unverified unless [http.oidc]
    emails_verified says the provider issues only verified addresses; an explicit false always wins."""
    claims = {"sub": "u", "email": "a@example.test", **claim}
    assert auth.identity_from_claims(claims, "groups", trusted).email_verified is verified


@pytest.mark.parametrize("claims, settings, status", [
    ({"email": "alice@example.test"}, {}, 403),
    ({"email": "alice@example.test", "email_verified": False}, {"emails_verified": True}, 403),
    ({"email": "alice@example.test", "email_verified": True}, {}, 302),
    ({"email": "alice@example.test"}, {"emails_verified": True}, 302),
])
def test_allowed_users_by_email_needs_a_verified_email_through_the_session(tmp_path, claims, settings, status):
    """After sign-in, an app allowing a user by email admits the session only if the email was verified."""
    clock = Clock()
    clock.advance(1000)
    provider = FakeProvider(clock, claims={"name": "Mallory", **claims})
    g = gate(tmp_path, clock, provider, **settings)
    the_app = app(preauth="oidc", allowed_users=["alice@example.test"])
    back, _, cookies = sign_in(g, provider, the_app)
    assert back.status == 302
    answer = g.check(request(cookies=cookies), the_app, EXTERNAL, "h").result
    assert (answer.status if isinstance(answer, auth.Respond) else 302) == status
    if status == 302:
        assert answer.identity.email_verified and answer.identity.to_metadata()["email_verified"] is True


def test_sso_claims_travel_from_sign_in_through_the_session_to_the_metadata(tmp_path):
    """An app's options.sso_claims: those string claims of the sign-in (no others, none longer than
    256 characters) are kept in the session and sent in the identity metadata for the connector."""
    clock = Clock()
    clock.advance(1000)
    provider = FakeProvider(clock, claims={"name": "Alice", "samaccountname": "asmith", "office": "B2",
                                           "long": "x" * 257, "number": 7})
    g = gate(tmp_path, clock, provider)
    the_app = app(preauth="oidc", sso_claims=["samaccountname", "long", "number", "missing"])
    back, _, cookies = sign_in(g, provider, the_app)
    assert back.status == 302
    answer = g.check(request(cookies=cookies), the_app, EXTERNAL, "h").result
    assert answer.identity.to_metadata()["claims"] == {"samaccountname": "asmith"}
    assert "claims" not in auth.identity_from_claims({"sub": "u", "samaccountname": "a"}, "groups").to_metadata()


def test_metadata_caps_groups():
    """The identity in stream metadata stays small however many groups the user has."""
    many = auth.Identity("u", groups=tuple(f"group-{i:05d}-{'x' * 50}" for i in range(2000)))
    meta = many.to_metadata()
    assert len(json.dumps(meta)) < 10 * 1024 and meta["groups"][0] == many.groups[0]


# -- id_token checks ------------------------------------------------------------------------------


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWK = {**RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "use": "sig", "alg": "RS256"}


def id_token(now=1000, kid="k1", key=KEY, **claims) -> str:
    body = {"iss": ISSUER, "aud": "gw", "sub": "u-alice", "iat": now, "exp": now + 300, "nonce": "n1", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="RS256",
                      headers={"kid": kid})


def test_valid_id_token_is_accepted():
    """Signature, iss, aud, exp, iat and nonce all check out: the claims come back."""
    assert oidc.verify_id_token(id_token(), JWK, ISSUER, "gw", "n1", 1000)["sub"] == "u-alice"


@pytest.mark.parametrize("token, words", [
    (lambda: id_token(nonce="other"), "nonce"),
    (lambda: id_token(iss="https://evil.example"), "does not check out"),
    (lambda: id_token(aud="someone-else"), "does not check out"),
    (lambda: id_token(now=0), "expired"),
    (lambda: id_token(now=5000), "future"),
    (lambda: id_token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), "does not check out"),
    (lambda: id_token(aud=["gw", "other"]), "azp"),
    (lambda: jwt.encode({"sub": "x"}, "a-shared-secret-of-at-least-32-bytes!", algorithm="HS256"), "HS256"),
])
def test_bad_id_token_is_refused(token, words):
    """Wrong nonce, issuer, audience or key, expired or future tokens and symmetric algorithms are refused."""
    with pytest.raises(oidc.SignInError, match=words):
        oidc.verify_id_token(token(), JWK, ISSUER, "gw", "n1", 1000)


def test_unknown_kid_refetches_the_jwks_at_most_once_a_minute():
    """A token signed with a new key makes the provider client fetch the JWKS again, rate-limited."""
    clock = Clock()
    provider = oidc.Provider(oidc.Settings(ISSUER, "gw", "f"), "secret", clock, agent=None)
    provider.metadata = {"jwks_uri": ISSUER + "/jwks"}
    provider.jwks = {"keys": [JWK]}
    fetches = []
    new_jwk = {**JWK, "kid": "k2"}
    provider._fetch_json = lambda *a, **kw: fetches.append(a[1]) or succeed({"keys": [new_jwk]})
    assert provider.key_for(id_token()).result == JWK and fetches == []
    assert provider.key_for(id_token(kid="k2")).result == new_jwk and len(fetches) == 1
    d = provider.key_for(id_token(kid="k3"))   # unknown again, right away: refused without a fetch
    d.addErrback(lambda f: f.trap(oidc.SignInError) and "refused")
    assert d.result == "refused" and len(fetches) == 1
    clock.advance(oidc.JWKS_REFETCH_INTERVAL)
    d = provider.key_for(id_token(kid="k3"))
    d.addErrback(lambda f: f.trap(oidc.SignInError) and "refused")
    assert d.result == "refused" and len(fetches) == 2


# -- the gate's flow, with a provider double ------------------------------------------------------


class FakeProvider:
    """Discovery already done; the code exchange returns an id_token made with the nonce it was given."""

    metadata = {"authorization_endpoint": ISSUER + "/auth", "end_session_endpoint": ISSUER + "/end",
                "jwks_uri": ISSUER + "/jwks", "token_endpoint": ISSUER + "/token"}

    def __init__(self, clock, claims=None, available=True):
        self.clock = clock
        self.claims = claims or {"name": "Alice", "email": "alice@example.test", "groups": ["staff"]}
        self.available = available
        self.exchanges = []
        self.nonce = None

    def ready(self):
        return succeed(self.metadata) if self.available else fail(oidc.SignInError("unreachable"))

    def exchange(self, code, verifier, redirect_uri):
        self.exchanges.append((code, verifier, redirect_uri))
        return succeed({"id_token": id_token(now=int(self.clock.seconds()), nonce=self.nonce, **self.claims),
                        "access_token": "at"})

    def key_for(self, token):
        return succeed(JWK)

    def userinfo(self, access_token):
        return succeed({})


def gate(tmp_path, clock, provider=None, **settings):
    s = oidc.Settings(ISSUER, "gw", "f", **settings)
    return auth.OIDCGate(s, provider or FakeProvider(clock), sessions.Sealer.from_state_dir(tmp_path),
                         Signer.from_state_dir(tmp_path), clock)


def request(target="/page?x=1", method=b"GET", cookies=None, headers=()):
    hs = [(b"Host", b"wiki.apps.example.test:8080"), *headers]
    if cookies:
        hs.append((b"Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    return Request(method, target.encode(), b"HTTP/1.1", hs)


def header(respond, name):
    return [v.decode() for k, v in respond.headers if k.decode().lower() == name.lower()]


def cookie_of(set_cookie: str) -> tuple[str, str]:
    name, _, value = set_cookie.split(";")[0].partition("=")
    return name, value


def sign_in(g, provider, the_app, target="/page?x=1"):
    """Run the redirect and the callback; return (the callback's answer, the cookies it set)."""
    start = g.check(request(target), the_app, EXTERNAL, "127.0.0.1").result
    assert start.status == 302
    query = parse_qs(urlsplit(header(start, "Location")[0]).query)
    provider.nonce = query["nonce"][0]
    pending = dict(cookie_of(c) for c in header(start, "Set-Cookie"))
    back = g.check(request(f"/.gateway/callback?code=c1&state={query['state'][0]}", cookies=pending),
                   the_app, EXTERNAL, "127.0.0.1").result
    return back, query, dict(cookie_of(c) for c in header(back, "Set-Cookie") if cookie_of(c)[1])


def test_unauthenticated_get_is_redirected_to_the_provider_with_pkce(tmp_path):
    """A GET without a session gets a 302 to the authorization endpoint (S256 challenge, state, nonce)
    and a pending sign-in cookie scoped to the callback path."""
    clock = Clock()
    answer = gate(tmp_path, clock).check(request(), app(preauth="oidc"), EXTERNAL, "127.0.0.1").result
    assert isinstance(answer, auth.Respond) and answer.status == 302
    url = urlsplit(header(answer, "Location")[0])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert url.geturl().startswith(ISSUER + "/auth?")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == "http://wiki.apps.example.test:8080/.gateway/callback"
    assert query["scope"] == "openid profile email" and query["state"] and query["nonce"]
    cookie, = header(answer, "Set-Cookie")
    assert cookie.startswith(sessions.signin_cookie_name(query["state"]) + "=")
    assert "Path=/.gateway/callback" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_full_flow_sets_a_session_and_forwards_as_the_user(tmp_path):
    """Callback: the verifier matching the challenge goes to the token endpoint, the browser returns to
    the page it asked for with a session cookie, and the next request is forwarded with the identity
    and a verifiable assertion for the front door to add."""
    clock = Clock()
    clock.advance(1000)
    provider = FakeProvider(clock)
    g = gate(tmp_path, clock, provider)
    the_app = app(preauth="oidc", jwt_assertion=True)
    back, query, cookies = sign_in(g, provider, the_app)
    assert back.status == 302 and header(back, "Location") == ["http://wiki.apps.example.test:8080/page?x=1"]
    code, verifier, redirect_uri = provider.exchanges[0]
    assert oidc.s256(verifier) == query["code_challenge"][0] and code == "c1"
    session_cookie = [c for c in header(back, "Set-Cookie") if c.startswith(sessions.SESSION_COOKIE)][0]
    assert "Max-Age" not in session_cookie and "Secure" not in session_cookie and "Path=/;" in session_cookie
    forged = (b"X-Gateway-Jwt-Assertion", b"forged")
    allow = g.check(request(cookies={**cookies, "app": "1"}, headers=[forged]), the_app, EXTERNAL, "h").result
    assert isinstance(allow, auth.Allow) and allow.identity.subject == "u-alice"
    assert allow.identity.groups == ("staff",)
    assert allow.headers is None and forged not in allow.added
    token, = [v for k, v in allow.added if k == b"X-Gateway-Jwt-Assertion"]
    jwks = g.check(request("/.gateway/jwks.json"), the_app, EXTERNAL, "h").result
    key = jwt.PyJWK(json.loads(jwks.body)["keys"][0]).key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=WIKI, issuer="http://wiki.apps.example.test:8080",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert (claims["sub"], claims["email"], claims["groups"]) == ("u-alice", "alice@example.test", ["staff"])


def test_session_expires_after_its_lifetime(tmp_path):
    """Past session_lifetime the cookie no longer counts: a fresh sign-in starts (no error page)."""
    clock = Clock()
    provider = FakeProvider(clock)
    g = gate(tmp_path, clock, provider, session_lifetime=600, persistent_session=True)
    back, _, cookies = sign_in(g, provider, app(preauth="oidc"))
    assert any("Max-Age=600" in c for c in header(back, "Set-Cookie"))
    clock.advance(599)
    assert isinstance(g.check(request(cookies=cookies), app(preauth="oidc"), EXTERNAL, "h").result, auth.Allow)
    clock.advance(1)
    assert g.check(request(cookies=cookies), app(preauth="oidc"), EXTERNAL, "h").result.status == 302


def test_wrong_state_or_nonce_fails_the_sign_in(tmp_path):
    """A callback whose state has no pending sign-in gets 400; an id_token with another nonce gets 401; no session either way."""
    clock = Clock()
    provider = FakeProvider(clock)
    g = gate(tmp_path, clock, provider)
    start = g.check(request(), app(preauth="oidc"), EXTERNAL, "h").result
    pending = dict(cookie_of(c) for c in header(start, "Set-Cookie"))
    answer = g.check(request("/.gateway/callback?code=c&state=forged", cookies=pending), app(preauth="oidc"),
                     EXTERNAL, "h").result
    assert answer.status == 400 and provider.exchanges == []
    state = parse_qs(urlsplit(header(start, "Location")[0]).query)["state"][0]
    provider.nonce = "not-the-one-we-sent"
    answer = g.check(request(f"/.gateway/callback?code=c&state={state}", cookies=pending), app(preauth="oidc"),
                     EXTERNAL, "h").result
    assert answer.status == 401
    assert not any(c.startswith(sessions.SESSION_COOKIE) for c in header(answer, "Set-Cookie"))


def test_unassigned_user_gets_403_naming_them(tmp_path):
    """A signed-in user outside allowed_users/allowed_groups gets a 403 page with their name, nothing internal."""
    clock = Clock()
    provider = FakeProvider(clock)
    g = gate(tmp_path, clock, provider)
    the_app = app(preauth="oidc", allowed_groups=["admins"])
    _, _, cookies = sign_in(g, provider, the_app)
    answer = g.check(request(cookies=cookies), the_app, EXTERNAL, "h").result
    assert answer.status == 403 and b"alice@example.test" in answer.body and b"administrator" in answer.body
    assert b"wiki.corp" not in answer.body


def test_post_without_session_gets_401_and_provider_down_503(tmp_path):
    """A POST without a session is not redirected (its body would be lost): 401; an unreachable provider: 503."""
    clock = Clock()
    assert gate(tmp_path, clock).check(request(method=b"POST"), app(preauth="oidc"), EXTERNAL, "h").result.status == 401
    down = gate(tmp_path, clock, FakeProvider(clock, available=False))
    assert down.check(request(), app(preauth="oidc"), EXTERNAL, "h").result.status == 503


def test_signout_clears_the_cookie_and_goes_to_end_session(tmp_path):
    """Sign-out expires the session cookie and sends the browser to the provider's end_session_endpoint."""
    clock = Clock()
    provider = FakeProvider(clock)
    g = gate(tmp_path, clock, provider)
    _, _, cookies = sign_in(g, provider, app(preauth="oidc"))
    answer = g.check(request("/.gateway/signout", cookies=cookies), app(preauth="oidc"), EXTERNAL, "h").result
    location = urlsplit(header(answer, "Location")[0])
    assert location.geturl().startswith(ISSUER + "/end?")
    assert parse_qs(location.query)["post_logout_redirect_uri"] == [
        "http://wiki.apps.example.test:8080/.gateway/signedout"]
    assert any(c.startswith(sessions.session_cookie_name("wiki") + "=;") and "Max-Age=0" in c
               for c in header(answer, "Set-Cookie"))


def test_passthrough_app_is_untouched_and_path_prefix_is_honoured(tmp_path):
    """A passthrough app's requests go through unchanged; an app under /wiki/ has its callback there."""
    clock = Clock()
    g = gate(tmp_path, clock)
    assert g.check(request(), app(), EXTERNAL, "h") == auth.Allow()   # decided at once: no Deferred
    prefixed = attrs.evolve(app(preauth="oidc"), external_url="http://apps.example.test:8080/wiki/")
    answer = g.check(request("/wiki/x"), prefixed, Origin("http", "apps.example.test", 8080), "h").result
    query = parse_qs(urlsplit(header(answer, "Location")[0]).query)
    assert query["redirect_uri"] == ["http://apps.example.test:8080/wiki/.gateway/callback"]
    assert "Path=/wiki/.gateway/callback" in header(answer, "Set-Cookie")[0]


def test_secret_and_tokens_are_not_logged(tmp_path):
    """Settings repr and the module's log formats carry no secret: the secret is read only from its file."""
    (tmp_path / "s.txt").write_text("top-secret-value\n")
    assert oidc.load_secret(tmp_path / "s.txt") == "top-secret-value"
    assert "top-secret-value" not in repr(oidc.Settings(ISSUER, "gw", str(tmp_path / "s.txt")))
    assert Path(auth.__file__).read_text().count("id_token=") == 0

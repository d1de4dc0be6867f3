"""The kerberos SSO plugin without a KDC: its config table, the apps' options, whose name is
delegated, and how the provider turns a failure (a clock skew from a faked time source here)
into SSOFailed and an admin-log event naming cause and fix. Real exchanges are in
tests/integration/test_kerberos_sso.py."""

from __future__ import annotations

import types

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from components import require_module
from gateway.config import AppConfig, ConfigError
from gateway_kerberos_sso import settings as config
from gateway_kerberos_sso.cache import CredentialCache
from gateway_kerberos_sso.provider import KerberosSSO, SSOFailed, has_body, negotiate_value

gssapi = require_module("gssapi")

from gateway_kerberos_sso import delegation  # noqa: E402 - after the check that gssapi is installed

ACCOUNT = {"keytab": "/etc/gateway/connector.keytab", "principal": "HTTP/connector.corp@CORP.EXAMPLE"}
ALICE = {"sub": "alice", "name": "Alice", "email": "alice@corp.example", "email_verified": True, "groups": []}


def error(key, expected):
    return ConfigError("conn.toml", f"kerberos.{key}", expected)


def web_app(**options):
    return AppConfig(name="wiki", listen="", destination="wiki.corp:80", host="wiki.corp", port=80,
                     protocol="http", options={"preauth": "oidc", "sso": "kerberos", **options})


@pytest.mark.parametrize("table, key", [
    ({**ACCOUNT, "keytabs": "/x"}, "kerberos.keytabs: unknown key"),
    ({"principal": ACCOUNT["principal"]}, "kerberos.keytab: required"),
    ({**ACCOUNT, "keytab": "connector.keytab"}, "kerberos.keytab: expected an absolute path"),
    ({**ACCOUNT, "principal": "HTTP/connector.corp"}, "kerberos.principal: expected the delegating account"),
    ({**ACCOUNT, "krb5_conf": "/nonexistent/krb5.conf"}, "kerberos.krb5_conf: expected a readable krb5.conf"),
    ({**ACCOUNT, "threads": 0}, "kerberos.threads: expected a whole number from 1 to 64"),
    ({**ACCOUNT, "max_entries": True}, "kerberos.max_entries: expected a whole number"),
    ({**ACCOUNT, "preemptive": "yes"}, "kerberos.preemptive: expected true or false"),
    ({**ACCOUNT, "check_user": "krbtgt/CORP.EXAMPLE"}, "kerberos.check_user: expected a user principal"),
])
def test_a_bad_kerberos_table_names_the_key(table, key):
    """Each bad [kerberos] key is refused with an error naming it and what is expected."""
    with pytest.raises(ConfigError) as raised:
        config.parse_section(table, error)
    assert key in str(raised.value)


def test_the_kerberos_table_defaults():
    """No table: no Kerberos SSO; a table with keytab and principal: 10000 entries, 4 threads, preemptive."""
    assert config.parse_section({}, error) is None
    settings = config.parse_section({**ACCOUNT, "check_user": "probe"}, error)
    assert (settings.max_entries, settings.threads, settings.preemptive) == (10_000, 4, True)
    assert settings.realm == "CORP.EXAMPLE" and settings.check_user == "probe@CORP.EXAMPLE"


def test_the_spn_defaults_to_http_at_the_internal_host():
    """kerberos_spn defaults to HTTP/<the internal URL's host>; a malformed one names the option."""
    assert config.app_settings(web_app()).spn == "HTTP/wiki.corp"
    for bad in ("HTTP/wiki.corp@CORP", "wiki.corp", 7):
        with pytest.raises(config.AppError, match="options.kerberos_spn"):
            config.app_settings(web_app(kerberos_spn=bad))
    with pytest.raises(config.AppError, match="options.kerberos_identity"):
        config.app_settings(web_app(kerberos_identity="claim:a b"))
    with pytest.raises(config.AppError, match="needs 'samaccountname' in options.sso_claims"):
        config.app_settings(web_app(kerberos_identity="claim:samaccountname"))
    with pytest.raises(config.AppError, match="needs options.kerberos_map"):
        config.app_settings(web_app(kerberos_identity="map"))


def test_whose_name_is_delegated():
    """upn: the verified email with its domain as realm (or kerberos_realm); claim:sub with the
    account's realm; map: the subject's alias, with the app's realm when it has none."""
    assert config.app_settings(web_app()).principal(ALICE, "CORP") == "alice@CORP.EXAMPLE"
    assert config.app_settings(web_app(kerberos_realm="AD.CORP")).principal(ALICE, "CORP") == "alice@AD.CORP"
    assert config.app_settings(web_app(kerberos_identity="claim:sub")).principal(ALICE, "CORP") == "alice@CORP"
    mapped = config.app_settings(web_app(kerberos_identity="map", kerberos_realm="AD.CORP",
                                         kerberos_map={"alice": "asmith", "bob": "bjones@OTHER"}))
    assert mapped.principal(ALICE, "CORP") == "asmith@AD.CORP"
    assert mapped.principal({**ALICE, "sub": "bob"}, "CORP") == "bjones@OTHER"
    sam = config.app_settings(web_app(kerberos_identity="claim:samaccountname", sso_claims=["samaccountname"]))
    assert sam.principal({**ALICE, "claims": {"samaccountname": "asmith"}}, "CORP") == "asmith@CORP"
    with pytest.raises(config.IdentityError, match="no 'samaccountname' claim"):
        sam.principal(ALICE, "CORP")
    with pytest.raises(config.IdentityError, match="not in the app's options.kerberos_map"):
        mapped.principal({**ALICE, "sub": "carol"}, "CORP")


@pytest.mark.parametrize("identity, options", [
    ({**ALICE, "email_verified": False}, {}),
    ({**ALICE, "sub": "krbtgt/CORP"}, {"kerberos_identity": "claim:sub"}),
    ({**ALICE, "sub": "HTTP/wiki.corp@CORP"}, {"kerberos_identity": "claim:sub"}),
    ({**ALICE, "name": "Alice Example"}, {"kerberos_identity": "claim:name"}),
    ({**ALICE, "sub": "alice\x00x"}, {"kerberos_identity": "claim:sub"}),
])
def test_a_name_that_is_not_a_plain_user_is_never_delegated(identity, options):
    """An unverified email, or a claim naming a service (krbtgt/, HTTP/), with spaces or a NUL, is refused."""
    with pytest.raises(config.IdentityError):
        config.app_settings(web_app(**options)).principal(identity, "CORP")


def provider_with(delegate):
    """A started provider whose KDC exchange is ``delegate(account, user, spn)``, run synchronously."""
    provider = KerberosSSO()
    reactor = MemoryReactorClock()
    provider.start(types.SimpleNamespace(sections={"kerberos": config.parse_section(ACCOUNT, error)}), reactor)
    fake = types.SimpleNamespace(**{name: getattr(delegation, name) for name in dir(delegation)})
    fake.delegate = delegate
    provider._delegation = fake
    provider.cache = CredentialCache(reactor, lambda user, spn: maybeDeferred(provider._delegate, user, spn))
    return provider


REQUEST = types.SimpleNamespace(method=b"GET", target=b"/", headers=[(b"X-Gateway-Request-Id", b"r42")])


def test_a_skewed_clock_is_a_failure_naming_ntp():
    """The KDC refusing a skewed clock (as GSSAPI reports it) fails the request with SSOFailed, which
    names nothing of Kerberos, and logs CLOCK_SKEW with the NTP fix under the request's id."""
    skewed = gssapi.exceptions.GSSError(851968, 2529638949)   # KRB5KRB_AP_ERR_SKEW as the minor code

    def delegate(account, user, spn):
        raise delegation.classify(skewed, "account", account=account.principal, user=user, spn=spn)

    provider = provider_with(delegate)
    with capturedLogs() as events:
        d = provider.credentials(web_app(), ALICE, REQUEST)
        failures = []
        d.addErrback(failures.append)
    assert failures and failures[0].check(SSOFailed)
    assert "CLOCK_SKEW" in str(failures[0].value)
    line = "\n".join(formatEvent(e) for e in events)
    assert "request r42 for app wiki: Kerberos single sign-on for alice@CORP.EXAMPLE to HTTP/wiki.corp failed:" \
           " CLOCK_SKEW" in line and "NTP" in line, line
    assert provider.counters["failures"] == {"CLOCK_SKEW": 1}


def test_the_first_context_is_used_once_and_counters_count_hits():
    """One exchange serves a user's requests: the first uses the exchange's context, later ones
    new contexts; counters say 1 KDC exchange and the cache hits."""
    made = []

    def delegate(account, user, spn):
        made.append((user, spn))
        negotiation = types.SimpleNamespace(header=b"Negotiate Zmlyc3Q=")
        return types.SimpleNamespace(first=negotiation, expires_at=None,
                                     negotiate=lambda: types.SimpleNamespace(header=b"Negotiate bmV4dA=="))

    provider = provider_with(delegate)
    got = []
    provider.credentials(web_app(), ALICE, REQUEST).addCallback(got.append)
    assert got and list(got[0]) == [(b"Authorization", b"Negotiate Zmlyc3Q=")]
    provider.pool = None   # the second context would go to the pool: take it synchronously instead
    provider._context = lambda fresh: fresh.take_first() or fresh.delegation.negotiate()
    provider.credentials(web_app(), ALICE, REQUEST).addCallback(got.append)
    assert list(got[1]) == [(b"Authorization", b"Negotiate bmV4dA==")]
    assert made == [("alice@CORP.EXAMPLE", "HTTP/wiki.corp")]
    assert (provider.counters["kdc_exchanges"], provider.counters["cache_hits"]) == (1, 1)


def test_challenge_mode_sends_no_token_unless_the_request_has_a_body():
    """kerberos_preemptive = false: a GET goes without a token; a POST with a body gets one at once."""
    provider = provider_with(lambda account, user, spn: types.SimpleNamespace(
        first=types.SimpleNamespace(header=b"Negotiate dA=="), expires_at=None))
    app = web_app(kerberos_preemptive=False)
    assert list(provider.credentials(app, ALICE, REQUEST)) == []
    post = types.SimpleNamespace(method=b"POST", target=b"/", headers=[(b"Content-Length", b"3")])
    got = []
    provider.credentials(app, ALICE, post).addCallback(got.append)
    assert list(got[0]) == [(b"Authorization", b"Negotiate dA==")]
    assert has_body(post) and not has_body(REQUEST)
    assert negotiate_value([(b"WWW-Authenticate", b"Negotiate abc")]) == b"abc"
    assert negotiate_value([(b"WWW-Authenticate", b"Basic realm=x")]) is None


def test_without_a_kerberos_table_the_app_is_a_config_error():
    """A connector without [kerberos]: the app's check says what to add, and requests fail."""
    provider = KerberosSSO()
    provider.start(types.SimpleNamespace(sections={"kerberos": None}), MemoryReactorClock())
    assert "no [kerberos] table" in provider.check_app(web_app())
    with pytest.raises(SSOFailed):
        provider.credentials(web_app(), ALICE, REQUEST)

"""gateway login's pure parts: the sign-in URL, the loopback /callback page, refusal sentences."""

from urllib.parse import parse_qs, urlsplit

import pytest
from twisted.internet.defer import Deferred
from twisted.web.test.requesthelper import DummyRequest

from gateway.access.login import CallbackResource, LoginError, _refusal, check_service_url, login_url
from gateway.pkce import pkce_pair, s256


def callback(resource, path=b"/callback", **args):
    request = DummyRequest([b"callback"])
    request.path = path
    request.args = {k.encode(): [v.encode()] for k, v in args.items()}
    body = resource.render_GET(request)
    return request.responseCode or 200, body.decode()


GOOD = {"code": "K", "tunnel": "127.0.0.1:8443", "server_name": "127.0.0.1", "ca": "sha256:" + "a" * 64}


def test_the_sign_in_url_carries_port_state_and_an_s256_challenge():
    """login_url puts the loopback port, the state and the S256 challenge on URL/.gateway/login."""
    verifier, challenge = pkce_pair()
    url = login_url("https://access.example.test/", 39127, "st", challenge)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "access.example.test", "/.gateway/login")
    query = parse_qs(parts.query)
    assert query == {"port": ["39127"], "state": ["st"], "code_challenge": [s256(verifier)],
                     "code_challenge_method": ["S256"]}


@pytest.mark.parametrize("url", ["http://gateway.example.test", "ftp://x", "gateway.example.test:8443"])
def test_a_sign_in_url_that_is_not_https_or_loopback_http_is_refused(url):
    """Plain http is refused off loopback (the page carries a sign-in code); other schemes too."""
    with pytest.raises(LoginError):
        check_service_url(url)


def test_loopback_http_and_https_sign_in_urls_are_taken():
    """http://127.0.0.1:P and https://host pass the check."""
    check_service_url("http://127.0.0.1:8080")
    check_service_url("https://access.example.test")


def test_the_callback_takes_the_redirect_with_its_own_state_once():
    """The right state fires the login with the redirect's values and says the tab can close; later hits get 409."""
    done = Deferred()
    resource = CallbackResource("S", done)
    status, body = callback(resource, state="S", **GOOD)
    assert status == 200 and "close this tab" in body
    assert done.called and done.result["code"] == "K" and done.result["tunnel"] == "127.0.0.1:8443"
    assert callback(resource, state="S", **GOOD)[0] == 409


def test_the_callback_ignores_a_redirect_with_another_state():
    """A forged or stale redirect (state differs) gets 400 and does not end the login."""
    done = Deferred()
    status, body = callback(CallbackResource("S", done), state="T", **GOOD)
    assert status == 400 and "does not belong" in body
    assert not done.called


def test_a_redirect_without_a_code_ends_the_login_with_the_providers_error():
    """The right state without a code (the sign-in failed) ends the login with the error it carries."""
    done = Deferred()
    status, body = callback(CallbackResource("S", done), state="S", error="access_denied")
    failures = []
    done.addErrback(failures.append)
    assert status == 400 and "access_denied" in body
    assert "access_denied" in str(failures[0].value) and "run gateway login" in str(failures[0].value)


def test_other_paths_are_not_found():
    """Only /callback is served on the loopback listener."""
    assert callback(CallbackResource("S", Deferred()), path=b"/favicon.ico")[0] == 404


def test_refusals_say_what_to_do():
    """Each refusal code from the service becomes a sentence with advice; token refusals point to the admin."""
    assert "ask your administrator for a new one" in _refusal(
        {"type": "error", "code": "revoked", "message": "this credential was revoked"}, "token")
    assert "wait a minute" in _refusal({"type": "error", "code": "rate_limited", "message": "slow down"}, "code")
    assert _refusal({"type": "error", "code": "not_signed_in", "message": "code used: run gateway login again"},
                    "code").count("gateway login") == 1

"""The user's credential cache: where it lives, its modes, atomic writes, refresh timing, no secrets shown."""

import json
import stat
from datetime import UTC, datetime, timedelta

import pytest

from gateway.access import credentials as cache
from gateway.access.credentials import CacheError, Credentials
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def make(service="http://127.0.0.1:8080", lifetime=3600, token=None, refresh=None):
    ca = CertificateAuthority.create(NOW - timedelta(days=1))
    key = keys.generate_key()
    cert = ca.issue_user_certificate(keys.make_csr(key, "me"), "0123456789abcdef", NOW, timedelta(seconds=lifetime))
    return Credentials(
        service=service, tunnel="127.0.0.1:8443", server_name="127.0.0.1", ca_pem=keys.cert_pem(ca.cert).decode(),
        key_pem=keys.key_pem(key).decode(), certificate_pem=keys.cert_pem(cert).decode(),
        user={"sub": "alice-sub", "email": "alice@example.test"}, token=token,
        refresh=refresh if refresh is not None or token else {"id": "0123456789abcdef", "secret": "S3CRET-refresh",
                                                               "expires_at": (NOW + timedelta(hours=12)).isoformat()},
    )


@pytest.fixture
def env(tmp_path):
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path / "home")}


def test_the_cache_lives_under_xdg_config_home_keyed_by_the_service(env, tmp_path):
    """The file is $XDG_CONFIG_HOME/gateway/credentials/<first 16 hex of sha256(service)>.json."""
    path = cache.path_for("http://127.0.0.1:8080/", env)
    assert path.parent == tmp_path / "config" / "gateway" / "credentials"
    assert path.name == cache.cache_key("http://127.0.0.1:8080") + ".json"
    assert len(path.stem) == 16


def test_without_xdg_config_home_the_cache_is_under_home_dot_config(tmp_path):
    """An unset or relative XDG_CONFIG_HOME falls back to ~/.config."""
    for value in ("", "relative/dir"):
        assert cache.credentials_dir({"XDG_CONFIG_HOME": value, "HOME": str(tmp_path)}) == \
            tmp_path / ".config" / "gateway" / "credentials"


def test_saved_credentials_are_0600_in_a_0700_directory_and_load_back(env):
    """save writes the file 0600 and its directory 0700 (tightened if it existed), and load reads it back."""
    creds = make()
    directory = cache.credentials_dir(env)
    directory.mkdir(parents=True, mode=0o755)
    directory.chmod(0o755)
    path = cache.save(creds, env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = cache.load("http://127.0.0.1:8080", env)
    assert loaded == creds
    assert [p.name for p in directory.iterdir()] == [path.name]   # no temporary file left behind


def test_loading_without_a_sign_in_says_to_run_gateway_login(env):
    """No cache file: the error names the command to run."""
    with pytest.raises(CacheError, match="run gateway login --service http://x.test"):
        cache.load("http://x.test/", env)


def test_a_damaged_cache_file_is_refused_with_advice_and_without_its_contents(env):
    """A cache file that is not ours says to log out and in again, and shows none of its bytes."""
    path = cache.path_for("svc:1", env)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "service": "svc:1", "secret": "LEAKME"}))
    with pytest.raises(CacheError, match="gateway logout and gateway login again") as e:
        cache.load("svc:1", env)
    assert "LEAKME" not in str(e.value)


def test_find_without_service_takes_the_only_cache_and_asks_when_there_are_several(env):
    """With one service cached --service may be left out; with two the error lists them."""
    cache.save(make("http://one.test"), env)
    assert cache.find(None, env).service == "http://one.test"
    cache.save(make("two.test:8443"), env)
    with pytest.raises(CacheError, match=r"several services \(.*one.test.*two.test:8443"):
        cache.find(None, env)


def test_delete_forgets_the_file(env):
    """delete removes the cache file and returns what it forgot; a second delete finds nothing."""
    cache.save(make(), env)
    assert cache.delete("http://127.0.0.1:8080", env).user["sub"] == "alice-sub"
    assert not cache.path_for("http://127.0.0.1:8080", env).exists()
    assert cache.delete("http://127.0.0.1:8080", env) is None


def test_a_certificate_needs_refresh_with_less_than_a_third_of_its_life_left():
    """needs_refresh is false with more than 1/3 of the life left and true below it (and after expiry)."""
    creds = make(lifetime=3600)
    start = creds.certificate.not_valid_before_utc
    life = creds.expires_at - start
    assert not creds.needs_refresh(start + life * 0.6)
    assert creds.needs_refresh(start + life * 0.7)
    assert creds.needs_refresh(creds.expires_at + timedelta(seconds=1))


def test_the_renewal_credential_is_the_token_or_the_refresh_secret():
    """A token login renews with its token; a browser login with its refresh id and secret."""
    assert make(token="gwu1.x").renewal() == {"kind": "token", "token": "gwu1.x"}
    assert make().renewal() == {"kind": "refresh", "id": "0123456789abcdef", "secret": "S3CRET-refresh"}


def test_describing_credentials_shows_no_secret():
    """repr and describe name the user and service but never the key, the refresh secret or the token."""
    for creds in (make(), make(token="gwu1.TOKENSECRET")):
        for text in (repr(creds), creds.describe()):
            assert "S3CRET" not in text and "TOKENSECRET" not in text and "PRIVATE KEY" not in text
        assert "alice@example.test" in creds.describe()


def test_delete_without_service_asks_which_when_several_are_cached(env):
    """logout without --service and two services cached refuses and deletes nothing."""
    cache.save(make("http://one.test"), env)
    cache.save(make("two.test:8443"), env)
    with pytest.raises(CacheError, match="say which with --service"):
        cache.delete(None, env)
    assert len(list(cache.credentials_dir(env).glob("*.json"))) == 2


def test_delete_forgets_a_damaged_file_too(env):
    """A cache file that no longer parses is still removed by logout."""
    path = cache.path_for("svc:1", env)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert cache.delete("svc:1", env) is None and not path.exists()

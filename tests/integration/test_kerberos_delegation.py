"""Kerberos constrained delegation (gateway_kerberos_sso.delegation) against a real MIT KDC.

The ``kdc`` fixture (kdc_harness.py) runs slapd + krb5kdc on 127.0.0.1; the connector's account
does S4U2Self + S4U2Proxy from its keytab, and a python-gssapi acceptor holding the back end's
keytab (what Apache's mod_auth_gssapi does) checks whom the token names. Each failure is
provoked on the realm itself, and must come out as the cause an admin can act on.
"""

from __future__ import annotations

import base64
import http.client
import os
import pwd
import time
from pathlib import Path

import pytest

from components import require_module

gssapi = require_module("gssapi")

from gateway_kerberos_sso.delegation import (  # noqa: E402 - after the check that gssapi is installed
    Account, Cause, DelegationError, check_account, delegate, delegate_cifs, verify_reply,
)
from gateway_harness import HOST  # noqa: E402
from kdc_harness import BACKEND, CIFS, CONNECTOR, NOFLAG, OTHER, ROTATED, principal  # noqa: E402

ALICE = principal("alice")


def account(kdc, name: str = CONNECTOR, keytab: Path | None = None) -> Account:
    return Account(principal(name), str(keytab or kdc.keytab(name)))


def accept(kdc, spn: str, token: bytes) -> tuple[str, bytes]:
    """A back end holding `spn`'s keytab accepts `token`: the initiator it sees, and its mutual-auth reply."""
    creds = gssapi.Credentials(usage="accept", store={"keytab": str(kdc.keytab(spn)),
                                                      "rcache": f"file2:{kdc.root / 'rcache' / 'acceptor'}"})
    context = gssapi.SecurityContext(creds=creds, usage="accept")
    reply = context.step(token)
    assert context.complete
    return str(context.initiator_name), reply


def negotiate_reply(reply: bytes) -> bytes:
    return b"Negotiate " + base64.b64encode(reply)


def failure(call, *args) -> DelegationError:
    with pytest.raises(DelegationError) as raised:
        call(*args)
    return raised.value


def test_the_back_end_sees_the_delegated_user(kdc):
    """S4U2Self + S4U2Proxy give a SPNEGO token the back end accepts as alice, whose reply verifies."""
    delegation = delegate(account(kdc), ALICE, BACKEND)
    seen, reply = accept(kdc, BACKEND, delegation.first.token)
    assert seen == ALICE
    verify_reply(delegation.first, negotiate_reply(reply))
    assert delegation.first.context.complete
    assert delegation.first.header.startswith(b"Negotiate ")


def test_the_ticket_end_comes_from_the_service_ticket(kdc):
    """expires_at is the service ticket's end: within the realm's 10 h maximum life from now."""
    delegation = delegate(account(kdc), ALICE, BACKEND, now=lambda: 0.0)
    assert delegation.expires_at is not None
    assert time.time() < delegation.expires_at <= time.time() + 10 * 3600 + 60


def test_apache_with_mod_auth_gssapi_sees_the_delegated_user(kdc, negotiate_apache):
    """A real Negotiate-only back end refuses a request without a token and answers alice's with
    REMOTE_USER=alice@EXAMPLE.TEST and a mutual-auth reply that verifies."""
    status, headers, _ = get(negotiate_apache.port, "/whoami")
    assert status == 401 and headers.get("WWW-Authenticate") == "Negotiate"
    delegation = delegate(account(kdc), ALICE, BACKEND)
    status, headers, body = get(negotiate_apache.port, "/whoami", delegation.first.header.decode())
    assert (status, body) == (200, f"user={ALICE}\n")
    verify_reply(delegation.first, headers["WWW-Authenticate"].encode())


def get(port: int, path: str, authorization: str | None = None) -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path, headers={"Authorization": authorization} if authorization else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def test_later_negotiations_need_no_kdc(kdc):
    """A delegation's credentials make new contexts for the same SPN while the KDC is down."""
    delegation = delegate(account(kdc), principal("bob"), BACKEND)
    with kdc.kdc_stopped():
        again = delegation.negotiate()
    assert again.token != delegation.first.token
    assert accept(kdc, BACKEND, again.token)[0] == principal("bob")


def test_cifs_delegation_gets_a_ticket_the_smb_server_accepts(kdc):
    """delegate_cifs gets alice a service ticket for cifs/HOST that the SMB server's keytab accepts."""
    delegation = delegate_cifs(account(kdc), ALICE, "smb.example.test")
    assert delegation.spn == CIFS
    assert accept(kdc, CIFS, delegation.first.token)[0] == ALICE


def test_the_start_up_check_passes_for_a_delegating_account(kdc):
    """check_account gets a TGT and sees protocol transition for the connector's account."""
    check_account(account(kdc), ALICE)


def test_a_stopped_kdc_is_unreachable(kdc):
    """With krb5kdc stopped, a delegation fails as KDC_UNREACHABLE."""
    with kdc.kdc_stopped():
        error = failure(delegate, account(kdc), ALICE, BACKEND)
    assert error.cause is Cause.KDC_UNREACHABLE, error
    assert "EXAMPLE.TEST" in error.summary


def test_a_user_not_in_the_realm_is_unknown(kdc):
    """S4U2Self for a user the KDC does not know fails as USER_UNKNOWN naming the user."""
    error = failure(delegate, account(kdc), principal("mallory"), BACKEND)
    assert error.cause is Cause.USER_UNKNOWN, error
    assert "mallory@EXAMPLE.TEST" in error.summary


def test_a_target_not_allowed_is_refused_as_such(kdc):
    """S4U2Proxy to an SPN outside krbAllowedToDelegateTo fails as DELEGATION_NOT_ALLOWED naming both."""
    error = failure(delegate, account(kdc), ALICE, OTHER)
    assert error.cause is Cause.DELEGATION_NOT_ALLOWED, error
    assert OTHER in error.summary and CONNECTOR in error.summary


def test_a_target_taken_off_the_account_is_refused(kdc):
    """Removing the back end from the account's delegation targets in LDAP turns success into DELEGATION_NOT_ALLOWED."""
    delegate(account(kdc), ALICE, BACKEND)
    kdc.forbid_delegation(CONNECTOR, BACKEND)
    try:
        error = failure(delegate, account(kdc), ALICE, BACKEND)
    finally:
        kdc.allow_delegation(CONNECTOR, BACKEND)
    assert error.cause is Cause.DELEGATION_NOT_ALLOWED, error


def test_an_unknown_target_is_named(kdc):
    """S4U2Proxy to an SPN the realm does not have fails as TARGET_UNKNOWN."""
    error = failure(delegate, account(kdc), ALICE, "HTTP/nowhere.example.test")
    assert error.cause is Cause.TARGET_UNKNOWN, error


def test_an_account_without_protocol_transition_is_told_apart(kdc):
    """An account allowed to delegate but without ok_to_auth_as_delegate fails as NO_PROTOCOL_TRANSITION."""
    error = failure(delegate, account(kdc, NOFLAG), ALICE, BACKEND)
    assert error.cause is Cause.NO_PROTOCOL_TRANSITION, error
    assert "ok_to_auth_as_delegate" in error.fix
    assert failure(check_account, account(kdc, NOFLAG), ALICE).cause is Cause.NO_PROTOCOL_TRANSITION


def test_the_flag_taken_off_the_account_is_seen(kdc):
    """Clearing ok_to_auth_as_delegate on the connector's account turns success into NO_PROTOCOL_TRANSITION."""
    kdc.kadmin(f"modprinc -ok_to_auth_as_delegate {CONNECTOR}")
    try:
        error = failure(delegate, account(kdc), ALICE, BACKEND)
    finally:
        kdc.kadmin(f"modprinc +ok_to_auth_as_delegate {CONNECTOR}")
    assert error.cause is Cause.NO_PROTOCOL_TRANSITION, error


def test_a_keytab_with_a_stale_key_is_named(kdc):
    """A keytab written before the account's key changed (old kvno) fails as KEYTAB_WRONG_KEY."""
    error = failure(delegate, account(kdc, ROTATED), ALICE, BACKEND)
    assert error.cause is Cause.KEYTAB_WRONG_KEY, error


def test_a_keytab_of_another_account_is_named(kdc):
    """A keytab without the account's principal fails as KEYTAB_WRONG_KEY."""
    error = failure(delegate, account(kdc, CONNECTOR, kdc.keytab(BACKEND)), ALICE, BACKEND)
    assert error.cause is Cause.KEYTAB_WRONG_KEY, error


def test_an_account_deleted_from_the_realm_is_named(kdc):
    """A keytab whose account was deleted from the realm fails as ACCOUNT_UNKNOWN."""
    gone = "HTTP/gone.example.test"
    kdc.kadmin(f"addprinc -randkey +ok_to_auth_as_delegate {gone}")
    kdc.kadmin(f"ktadd -k {kdc.keytab(gone)} {gone}")
    kdc.kadmin(f"delprinc -force {gone}")
    error = failure(delegate, account(kdc, gone), ALICE, BACKEND)
    assert error.cause is Cause.ACCOUNT_UNKNOWN, error


@pytest.mark.parametrize("make", ["missing", "directory", "not a keytab"])
def test_an_unreadable_keytab_is_named(kdc, tmp_path, make):
    """A keytab path that cannot be read as a keytab fails as KEYTAB_UNREADABLE before any KDC exchange."""
    path = tmp_path / "connector.keytab"
    if make == "directory":
        path.mkdir()
    elif make == "not a keytab":
        path.write_text("HTTP/connector.example.test secret\n")
    error = failure(delegate, account(kdc, CONNECTOR, path), ALICE, BACKEND)
    assert error.cause is Cause.KEYTAB_UNREADABLE, error
    assert str(path) in error.fix


def test_a_keytab_the_connector_may_not_read_is_named(kdc, tmp_path):
    """A keytab the connector's user may not read (mode 0600, owned by another user) fails as KEYTAB_UNREADABLE."""
    path = tmp_path / "connector.keytab"
    path.write_bytes(kdc.keytab(CONNECTOR).read_bytes())
    path.chmod(0o600 if os.geteuid() == 0 else 0)  # root: owned by root; else: no mode bit at all
    os.chmod(tmp_path, 0o755)
    assert _cause_as_nobody(account(kdc, CONNECTOR, path)) == Cause.KEYTAB_UNREADABLE.name


def _cause_as_nobody(acc: Account) -> str:
    """The cause delegate() fails with in a forked child, running as nobody when the tests run as
    root (root reads any file), or what went wrong there."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if os.geteuid() == 0:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            delegate(acc, ALICE, BACKEND)
            answer = "no error"
        except DelegationError as e:
            answer = e.cause.name
        except BaseException as e:  # noqa: BLE001 - reported to the parent as the answer
            answer = repr(e)
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_a_reply_of_another_context_fails_mutual_auth(kdc):
    """A mutual-auth reply that answers another context, or is not Negotiate, fails as MUTUAL_AUTH_FAILED."""
    delegation = delegate(account(kdc), ALICE, BACKEND)
    other = delegation.negotiate()
    _, reply_to_other = accept(kdc, BACKEND, other.token)
    accept(kdc, BACKEND, delegation.first.token)
    for header in (negotiate_reply(reply_to_other), b"Basic realm=x", b"Negotiate !!!"):
        error = failure(verify_reply, delegation.first, header)
        assert error.cause is Cause.MUTUAL_AUTH_FAILED, (header, error)
        assert BACKEND in error.summary

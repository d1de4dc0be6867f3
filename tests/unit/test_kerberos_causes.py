"""gateway_kerberos_sso.delegation.classify: GSSAPI failures the test realm cannot make (clock skew)
and the ways one error reads, by krb5 code or by message (tests/integration/test_kerberos_delegation.py
provokes the others on a real KDC)."""

from __future__ import annotations

import pytest

from components import require_module

gssapi = require_module("gssapi")

from gateway_kerberos_sso.delegation import Cause, DelegationError, classify  # noqa: E402

FAILURE = 851968  # GSS_S_FAILURE: "Unspecified GSS failure.  Minor code may provide more information"
KRB5 = 2529638912  # ERROR_TABLE_BASE_krb5 as an unsigned minor code
NAMES = {"account": "HTTP/connector.corp@CORP", "user": "alice@CORP", "spn": "HTTP/wiki.corp",
         "keytab": "/etc/gateway/connector.keytab", "realm": "CORP"}


def MappedError(message: str) -> gssapi.exceptions.GSSError:  # noqa: N802 - reads like the class it makes
    """A GSSError as SPNEGO reports it: a per-process minor code (not krb5's) and the krb5 message."""
    error = gssapi.exceptions.GSSError(FAILURE, 100005)
    error.args = (f"Major ({FAILURE}): Unspecified GSS failure, Minor (100005): {message}",)
    return error


@pytest.mark.parametrize("stage", ["account", "self", "proxy"])
def test_a_skewed_clock_is_named_at_every_stage(stage):
    """KRB5KRB_AP_ERR_SKEW (by its krb5 code, or its message through SPNEGO) is CLOCK_SKEW, with the NTP fix."""
    for error in (gssapi.exceptions.GSSError(FAILURE, KRB5 + 37), MappedError("Clock skew too great")):
        classified = classify(error, stage, **NAMES)
        assert classified.cause is Cause.CLOCK_SKEW, (error, classified)
        assert "NTP" in classified.fix


@pytest.mark.parametrize(("code", "message", "stage", "transition", "cause"), [
    (KRB5 + 156, "Cannot contact any KDC for realm 'CORP'", "self", None, Cause.KDC_UNREACHABLE),
    (KRB5 + 6, "Client not found in Kerberos database", "self", None, Cause.USER_UNKNOWN),
    (KRB5 + 7, "Server HTTP/x@CORP not found in Kerberos database", "proxy", None, Cause.TARGET_UNKNOWN),
    (KRB5 + 13, "KDC can't fulfill requested option", "proxy", True, Cause.DELEGATION_NOT_ALLOWED),
    (KRB5 + 13, "KDC can't fulfill requested option", "proxy", None, Cause.DELEGATION_NOT_ALLOWED),
    (KRB5 + 13, "KDC can't fulfill requested option", "proxy", False, Cause.NO_PROTOCOL_TRANSITION),
    (KRB5 + 31, "Decrypt integrity check failed", "account", None, Cause.KEYTAB_WRONG_KEY),
    (KRB5 + 181, "Key table entry not found", "account", None, Cause.KEYTAB_WRONG_KEY),
    (KRB5 + 31, "Decrypt integrity check failed", "proxy", None, Cause.OTHER),
    (None, "Something nobody planned for", "proxy", None, Cause.OTHER),
])
def test_each_error_reads_the_same_by_code_and_by_message(code, message, stage, transition, cause):
    """A krb5 error means one cause at a stage, whether its code is MIT's own or SPNEGO's mapped one."""
    errors = [MappedError(message)] + ([gssapi.exceptions.GSSError(FAILURE, code)] if code else [])
    for error in errors:
        assert classify(error, stage, transition, **NAMES).cause is cause, error


def test_the_error_names_what_to_fix_and_keeps_the_detail_for_the_log():
    """A DelegationError's message has the summary, the fix with the names filled in, and the GSSAPI text."""
    error = classify(MappedError("KDC can't fulfill requested option"), "proxy", False, **NAMES)
    assert isinstance(error, DelegationError)
    assert error.summary == "HTTP/connector.corp@CORP may not do protocol transition"
    assert "modprinc +ok_to_auth_as_delegate" in error.fix and "HTTP/connector.corp@CORP" in error.fix
    assert str(error) == f"{error.summary}: {error.fix} ({error.detail})"
    assert "KDC can't fulfill requested option" in error.detail

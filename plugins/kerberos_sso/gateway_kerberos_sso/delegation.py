"""Kerberos constrained delegation from a keytab, with python-gssapi: the KDC exchanges.

The connector's delegating account (a principal in a keytab, flagged ``ok_to_auth_as_delegate``
and allowed to delegate to the back end's SPN in ``msDS-AllowedToDelegateTo`` /
``krbAllowedToDelegateTo``) gets a ticket *for a user* to itself without the user's password
(S4U2Self, "protocol transition"), then a ticket for the user to the back end's SPN
(S4U2Proxy) inside the first ``init_sec_context``. What comes back is a SPNEGO token for
``Authorization: Negotiate``, the security context that checks the back end's mutual-auth
reply, and the user's delegated credentials: later contexts for the same SPN from those
credentials use the service ticket they hold and ask the KDC nothing.

Every function here blocks on the network (the KDC) or on files (the keytab): call them from a
thread pool, never on the reactor thread. A failure is a :class:`DelegationError` whose
``cause`` says which of the known problems it is and whose ``fix`` tells the admin what to
change; the GSSAPI text is kept in ``detail`` for the log, never for the user.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import struct
import time
from typing import Callable

import gssapi
from attrs import frozen

from gateway.errors import GatewayError

SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
KERBEROS = gssapi.MechType.kerberos
FORWARDABLE = 0x40000000  # TKT_FLG_FORWARDABLE (RFC 4120 ticket flag 1)
KEYTAB_VERSIONS = (b"\x05\x01", b"\x05\x02")  # the first two bytes of an MIT/Heimdal/AD keytab
REQUEST_FLAGS = gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.out_of_sequence_detection


class Cause(enum.Enum):
    """Why a delegation failed, each with the admin's fix (``{account}``, ``{user}``, ``{spn}``,
    ``{keytab}`` and ``{realm}`` are filled in)."""

    KDC_UNREACHABLE = ("the KDC of realm {realm} could not be reached",
                       "check that the KDC is running and that this connector reaches it (the realm's "
                       "kdc entries in krb5.conf, DNS, firewalls; TCP and UDP port 88)")
    CLOCK_SKEW = ("this connector's clock and the KDC's differ by more than the allowed skew",
                  "synchronise this connector's clock with the domain's (NTP); Kerberos allows 5 minutes")
    KEYTAB_UNREADABLE = ("the keytab {keytab} cannot be read",
                         "make {keytab} a keytab readable by the connector's user (klist -kt {keytab})")
    KEYTAB_WRONG_KEY = ("the keytab {keytab} holds no current key for {account}",
                        "export a new keytab for {account} (the account's password or key changed after "
                        "{keytab} was written, or the keytab is another account's): compare the kvno of "
                        "klist -kt {keytab} with kvno {account}")
    ACCOUNT_UNKNOWN = ("the delegating account {account} is not in the realm",
                       "create the account {account} or correct the connector's principal setting")
    USER_UNKNOWN = ("the user {user} is not known to the KDC",
                    "check which identity the app delegates (UPN, SAM account name or a mapped alias) and "
                    "that {user} exists in the realm")
    TARGET_UNKNOWN = ("the back end's SPN {spn} is not in the realm",
                      "register the SPN {spn} on the back end's service account (setspn -S), or correct "
                      "the app's SPN setting")
    DELEGATION_NOT_ALLOWED = ("{account} may not delegate to {spn}",
                              "add {spn} to the delegation targets of {account} (msDS-AllowedToDelegateTo; "
                              "MIT LDAP: krbAllowedToDelegateTo)")
    NO_PROTOCOL_TRANSITION = ("{account} may not do protocol transition",
                              "allow {account} to delegate with any authentication protocol "
                              "(TrustedToAuthForDelegation; MIT: kadmin modprinc +ok_to_auth_as_delegate)")
    MUTUAL_AUTH_FAILED = ("the back end's Negotiate reply did not prove it holds the key of {spn}",
                          "check that the back end uses the keytab of {spn} and is the host the app names")
    BACKEND_REFUSED = ("the back end refused the delegated ticket of {user} for {spn}",
                       "check that the back end's keytab holds the current key of {spn} (compare the kvno of klist -kt "
                       "on the back end with kvno {spn}) and that {spn} is the SPN of the host the app names")
    OTHER = ("Kerberos delegation for {user} to {spn} failed",
             "see the detail; klist -kt {keytab} and the KDC's log tell more")

    def __init__(self, summary: str, fix: str) -> None:
        self.summary = summary
        self.fix = fix


class DelegationError(GatewayError):
    """A delegation failed for a known ``cause``; ``fix`` is the admin's next step, ``detail``
    the GSSAPI text (for the log, not for the user)."""

    def __init__(self, cause: Cause, detail: str, **names: str) -> None:
        names = {key: names.get(key, "?") for key in ("account", "user", "spn", "keytab", "realm")}
        self.cause = cause
        self.summary = cause.summary.format(**names)
        self.fix = cause.fix.format(**names)
        self.detail = detail
        super().__init__(f"{self.summary}: {self.fix} ({detail})")


@frozen
class Account:
    """The connector's delegating account: its principal (``HTTP/connector.corp@CORP``) and keytab path."""

    principal: str
    keytab: str

    @property
    def realm(self) -> str:
        return self.principal.rpartition("@")[2] or "?"

    @property
    def ccache(self) -> str:
        """This account's private in-memory ccache: its TGT is got once and refreshed from the
        keytab by the library, never mixed with another account's or with KRB5CCNAME's."""
        digest = hashlib.sha256(f"{self.principal}\0{self.keytab}".encode()).hexdigest()[:16]
        return f"MEMORY:gateway-kcd-{digest}"


@frozen(eq=False)
class Negotiation:
    """One security context with a back end: ``token`` goes in ``Authorization: Negotiate``;
    ``context`` checks the back end's reply (:func:`verify_reply`)."""

    spn: str
    context: gssapi.SecurityContext
    token: bytes

    @property
    def header(self) -> bytes:
        return b"Negotiate " + base64.b64encode(self.token)


@frozen(eq=False)
class Delegation:
    """A user's delegated credentials to one SPN, and the first negotiation made with them.

    ``expires_at`` is when the service ticket ends (POSIX seconds), None when not known;
    ``negotiate()`` makes another context from the same credentials, without the KDC.
    """

    user: str
    spn: str
    credentials: gssapi.Credentials
    first: Negotiation
    expires_at: float | None
    mech: gssapi.OID

    def negotiate(self) -> Negotiation:
        """A new context and token for the same user and SPN (the service ticket is in the credentials)."""
        return _initiate(self.credentials, self.spn, self.mech)


def account_credentials(account: Account) -> gssapi.Credentials:
    """The delegating account's initiator credentials, with a TGT (got from the keytab when needed).

    Raises DelegationError: keytab unreadable or without the account's current key, account
    unknown, KDC unreachable, clock skew.
    """
    _check_keytab(account)
    names = _names(account)
    try:
        creds = gssapi.Credentials(name=_principal(account.principal), usage="initiate",
                                   store={"client_keytab": account.keytab, "ccache": account.ccache})
        creds.lifetime  # noqa: B018 - asking for it makes the library get the TGT now
    except gssapi.exceptions.GSSError as e:
        raise classify(e, "account", **names) from e
    return creds


def check_account(account: Account, probe_user: str) -> None:
    """The start-up check: a TGT from the keytab, and protocol transition for ``probe_user``
    (any user of the realm: S4U2Self for the account itself is refused by the KDC, so it takes
    one). Raises DelegationError naming the cause; asks the KDC nothing about any SPN."""
    creds = account_credentials(account)
    names = {**_names(account), "user": probe_user}
    try:
        impersonated = creds.impersonate(_principal(probe_user), usage="initiate")
    except gssapi.exceptions.GSSError as e:
        raise classify(e, "self", **names) from e
    if protocol_transition(impersonated, probe_user, account.principal) is False:
        raise DelegationError(Cause.NO_PROTOCOL_TRANSITION, f"the S4U2Self ticket for {probe_user} is not forwardable",
                              **names)


def delegate(account: Account, user: str, spn: str, mech: gssapi.OID = SPNEGO,
             now: Callable[[], float] = time.time) -> Delegation:
    """S4U2Self for ``user`` (a principal: ``alice@CORP``), then S4U2Proxy to ``spn``
    (``HTTP/wiki.corp``); blocking. Raises DelegationError naming the cause."""
    creds = account_credentials(account)
    names = {**_names(account), "user": user, "spn": spn}
    try:
        impersonated = creds.impersonate(_principal(user), usage="initiate", mechs=[mech])
    except gssapi.exceptions.GSSError as e:
        raise classify(e, "self", **names) from e
    try:
        first = _initiate(impersonated, spn, mech)
    except gssapi.exceptions.GSSError as e:
        raise classify(e, "proxy", transition=protocol_transition(impersonated, user, account.principal),
                       **names) from e
    return Delegation(user, spn, impersonated, first, _ticket_end(impersonated, user, spn, now), mech)


def delegate_cifs(account: Account, user: str, host: str, now: Callable[[], float] = time.time) -> Delegation:
    """Delegation to an SMB server's ``cifs/HOST`` (SPNEGO, as SMB2 SESSION_SETUP carries it).

    The token (``first.token``) is the security buffer of an SMB2 SESSION_SETUP request for
    ``user``; the server's answer buffer goes to ``first.context.step``. The server must
    accept tickets for ``cifs/HOST`` (its keytab); a standalone Samba also needs the account
    flagged ``no_auth_data_required``, since it refuses tickets that carry a PAC.
    """
    return delegate(account, user, f"cifs/{host}", SPNEGO, now)


def verify_reply(negotiation: Negotiation, www_authenticate: bytes) -> None:
    """Check the back end's mutual-auth reply (``Negotiate <token>`` of its WWW-Authenticate);
    raises DelegationError(MUTUAL_AUTH_FAILED) when it does not complete the context."""
    scheme, _, token = www_authenticate.strip().partition(b" ")
    try:
        if scheme.lower() != b"negotiate" or not token.strip():
            raise ValueError(f"expected 'Negotiate <token>', got {www_authenticate[:40]!r}")
        negotiation.context.step(base64.b64decode(token.strip(), validate=True))
        if not negotiation.context.complete:
            raise ValueError("the context wants another round trip")
    except (ValueError, gssapi.exceptions.GSSError) as e:
        raise DelegationError(Cause.MUTUAL_AUTH_FAILED, str(e), spn=negotiation.spn) from e


def protocol_transition(impersonated: gssapi.Credentials, user: str, account: str) -> bool | None:
    """Whether the KDC let ``account`` do protocol transition for ``user``: the S4U2Self ticket
    is forwardable exactly when the account has ``ok_to_auth_as_delegate``. None when the
    credentials do not say (not MIT's export format)."""
    for ticket in _tickets(impersonated):
        if ticket["client"] == user and ticket["server"] == account:
            return bool(ticket["flags"] & FORWARDABLE)
    return None


def classify(error: gssapi.exceptions.GSSError, stage: str, transition: bool | None = None,
             **names: str) -> DelegationError:
    """The DelegationError for a GSSAPI failure at ``stage``: ``account`` (the TGT from the
    keytab), ``self`` (S4U2Self) or ``proxy`` (S4U2Proxy); ``transition`` as
    :func:`protocol_transition` says. ``names`` fill in the admin's text."""
    detail = str(error)
    return DelegationError(cause_of(_kind(error.min_code, detail), stage, transition), detail, **names)


# MIT krb5 error codes as GSSAPI minor codes (unsigned), by what they mean here. The krb5 mech
# reports these; through SPNEGO the mechglue maps them to small per-process numbers, so the
# (English) message is read as well, from _KINDS_BY_TEXT.
_KRB5 = 2529638912  # ERROR_TABLE_BASE_krb5 (-1765328384) as an unsigned 32-bit number
_KINDS_BY_CODE = {
    _KRB5 + 6: "client unknown", _KRB5 + 7: "server unknown", _KRB5 + 13: "refused option",
    _KRB5 + 24: "bad key", _KRB5 + 31: "bad key", _KRB5 + 44: "bad key", _KRB5 + 37: "skew",
    _KRB5 + 156: "unreachable", _KRB5 + 154: "unreachable", _KRB5 + 181: "bad key", _KRB5 + 195: "bad key",
}
_KINDS_BY_TEXT = (
    ("cannot contact any kdc", "unreachable"), ("cannot find kdc", "unreachable"),
    ("clock skew too great", "skew"),
    ("client not found in kerberos database", "client unknown"),
    ("not found in kerberos database", "server unknown"),
    ("can't fulfill requested option", "refused option"), ("not allowed to delegate", "refused option"),
    ("decrypt integrity check failed", "bad key"), ("preauthentication failed", "bad key"),
    ("key table entry not found", "bad key"), ("version of key is not available", "bad key"),
    ("no credentials cache found", "bad key"),
)
# What each kind means at each stage; a kind not listed for a stage is Cause.OTHER.
_CAUSES = {
    "unreachable": {"account": Cause.KDC_UNREACHABLE, "self": Cause.KDC_UNREACHABLE, "proxy": Cause.KDC_UNREACHABLE},
    "skew": {"account": Cause.CLOCK_SKEW, "self": Cause.CLOCK_SKEW, "proxy": Cause.CLOCK_SKEW},
    # With client_keytab, a keytab without the account's key shows as "No credentials cache
    # found" (no way to get initial credentials); a stale key as a failed decryption.
    "bad key": {"account": Cause.KEYTAB_WRONG_KEY},
    "client unknown": {"account": Cause.ACCOUNT_UNKNOWN, "self": Cause.USER_UNKNOWN},
    "server unknown": {"account": Cause.ACCOUNT_UNKNOWN, "self": Cause.USER_UNKNOWN, "proxy": Cause.TARGET_UNKNOWN},
    "refused option": {"proxy": Cause.DELEGATION_NOT_ALLOWED},
}


def cause_of(kind: str | None, stage: str, transition: bool | None = None) -> Cause:
    """The Cause a kind of krb5 error (see _KINDS_BY_CODE) means at ``stage``."""
    cause = _CAUSES.get(kind or "", {}).get(stage, Cause.OTHER)
    # MIT answers KDC_ERR_BADOPTION both for a target the account may not delegate to and for
    # an S4U2Self ticket that is not forwardable (no protocol transition): its flag tells which.
    if cause is Cause.DELEGATION_NOT_ALLOWED and transition is False:
        return Cause.NO_PROTOCOL_TRANSITION
    return cause


def _kind(code: int | None, message: str) -> str | None:
    if code in _KINDS_BY_CODE:
        return _KINDS_BY_CODE[code]
    text = message.lower()
    return next((kind for needle, kind in _KINDS_BY_TEXT if needle in text), None)


def _check_keytab(account: Account) -> None:
    try:
        with open(account.keytab, "rb") as f:
            version = f.read(2)
    except OSError as e:
        raise DelegationError(Cause.KEYTAB_UNREADABLE, e.strerror or str(e), **_names(account)) from e
    if version not in KEYTAB_VERSIONS:
        raise DelegationError(Cause.KEYTAB_UNREADABLE, "not a keytab (unknown format)", **_names(account))


def _names(account: Account) -> dict[str, str]:
    return {"account": account.principal, "keytab": account.keytab, "realm": account.realm}


def _principal(name: str) -> gssapi.Name:
    return gssapi.Name(name, gssapi.NameType.kerberos_principal)


def _initiate(creds: gssapi.Credentials, spn: str, mech: gssapi.OID) -> Negotiation:
    service, _, host = spn.partition("/")
    context = gssapi.SecurityContext(name=gssapi.Name(f"{service}@{host}", gssapi.NameType.hostbased_service),
                                     creds=creds, usage="initiate", mech=mech, flags=REQUEST_FLAGS)
    return Negotiation(spn, context, context.step())


def _ticket_end(impersonated: gssapi.Credentials, user: str, spn: str, now: Callable[[], float]) -> float | None:
    """When the user's ticket to ``spn`` ends: from the credentials' tickets, else their lifetime."""
    for ticket in _tickets(impersonated):
        if ticket["client"] == user and ticket["server"].partition("@")[0] == spn and ticket["end"]:
            return float(ticket["end"])
    try:
        return now() + impersonated.lifetime
    except gssapi.exceptions.GSSError:
        return None


def _tickets(creds: gssapi.Credentials) -> list[dict]:
    """The tickets in MIT-exported credentials, as client, server, end and flags.

    The export is (OID, token) pairs, SPNEGO's token holding the krb5 mech's pairs, whose token
    is "K5C1" JSON with the credential cache. It carries session keys too: only names, times
    and flags are read, nothing is kept. Empty when the export is not MIT's format.
    """
    try:
        doc = _k5c1(creds.export())
        entries = doc[1][7][1:] if doc else []
        return [{"client": e[0], "server": e[1], "end": e[5], "flags": e[8]} for e in entries
                if isinstance(e, list) and len(e) > 8 and "X-CACHECONF:" not in e[1]]
    except (gssapi.exceptions.GSSError, struct.error, ValueError, TypeError, IndexError, KeyError):
        return []


def _k5c1(blob: bytes) -> list | None:
    offset = 0
    while offset < len(blob):
        (oid_length,) = struct.unpack_from(">I", blob, offset)
        (length,) = struct.unpack_from(">I", blob, offset + 4 + oid_length)
        token = blob[offset + 8 + oid_length:offset + 8 + oid_length + length]
        found = json.loads(token) if token.startswith(b'["K5C1"') else _k5c1(token)
        if found:
            return found
        offset += 8 + oid_length + length
    return None

"""The plugin's settings: the connector's ``[kerberos]`` table and each app's ``kerberos_*`` options.

No gssapi here: the table is parsed wherever the plugin is installed (the service too), and a
connector without python-gssapi must still say clearly what is missing.
"""

from __future__ import annotations

import os
import re
from typing import Any

from attrs import frozen

SECTION = "kerberos"
SECTION_KEYS = ("keytab", "principal", "krb5_conf", "max_entries", "threads", "preemptive", "check_user")
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_THREADS = 4
MAX_THREADS = 64
IDENTITIES = ("upn", "map")   # or "claim:NAME"
CLAIMS = ("sub", "email", "name")   # what the stream metadata carries of every signed-in user
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")   # any other: listed in the app's options.sso_claims
# A user principal: one name and a realm, nothing that could name a service ("krbtgt/...",
# "HTTP/host") or smuggle a second component, no whitespace or control characters.
_USER_PRINCIPAL = re.compile(r"[^\s/@\\\x00-\x1f\x7f]{1,256}@[A-Za-z0-9.\-]{1,255}")
_SPN = re.compile(r"[A-Za-z][A-Za-z0-9\-]{0,63}/[A-Za-z0-9.\-]{1,255}")


@frozen
class Settings:
    """The connector's delegating account (``[kerberos]``)."""

    keytab: str
    principal: str
    krb5_conf: str | None = None
    max_entries: int = DEFAULT_MAX_ENTRIES
    threads: int = DEFAULT_THREADS
    preemptive: bool = True
    check_user: str | None = None

    @property
    def realm(self) -> str:
        return self.principal.rpartition("@")[2]


def parse_section(table: dict, error: Any) -> Settings | None:
    """``[kerberos]`` as Settings; None when the table is absent (no Kerberos SSO on this node)."""
    if not table:
        return None
    unknown = sorted(set(table) - set(SECTION_KEYS))
    if unknown:
        raise error(unknown[0], f"unknown key; expected one of {', '.join(SECTION_KEYS)}")
    for key in ("keytab", "principal"):
        if key not in table:
            raise error(key, "required: the keytab path and the principal of the connector's delegating account")
    keytab = _absolute_path(table["keytab"], "keytab", error)
    principal = table["principal"]
    if not isinstance(principal, str) or principal.count("@") != 1 or not principal.partition("@")[2] \
            or not principal.partition("@")[0] or any(c.isspace() for c in principal):
        raise error("principal", f"expected the delegating account's principal with its realm, such as "
                                 f"\"HTTP/connector.corp.example@CORP.EXAMPLE\", got {principal!r}")
    krb5_conf = table.get("krb5_conf")
    if krb5_conf is not None:
        krb5_conf = _absolute_path(krb5_conf, "krb5_conf", error)
        if not os.path.isfile(krb5_conf):
            raise error("krb5_conf", f"expected a readable krb5.conf file, got {krb5_conf!r} (no such file)")
    max_entries = _whole(table, "max_entries", DEFAULT_MAX_ENTRIES, 1, 10_000_000, error)
    threads = _whole(table, "threads", DEFAULT_THREADS, 1, MAX_THREADS, error)
    preemptive = table.get("preemptive", True)
    if not isinstance(preemptive, bool):
        raise error("preemptive", f"expected true or false, got {preemptive!r}")
    check_user = table.get("check_user")
    if check_user is not None:
        if not isinstance(check_user, str) or not check_user:
            raise error("check_user", f"expected a user of the realm, such as \"probe\", got {check_user!r}")
        check_user = with_realm(check_user, principal.partition("@")[2])
        if not _USER_PRINCIPAL.fullmatch(check_user):
            raise error("check_user", f"expected a user principal (name@REALM, no '/'), got {check_user!r}")
    return Settings(keytab, principal, krb5_conf, max_entries, threads, preemptive, check_user)


def _absolute_path(value: Any, key: str, error: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise error(key, f"expected an absolute path, got {value!r}")
    return value


def _whole(table: dict, key: str, default: int, low: int, high: int, error: Any) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(key, f"expected a whole number from {low} to {high}, got {value!r}")
    return value


class AppError(ValueError):
    """An app's kerberos_* options cannot work; the message names the option."""


class IdentityError(ValueError):
    """The signed-in user has no Kerberos name under the app's kerberos_identity; the message says why."""


@frozen
class AppSettings:
    """One app's Kerberos options, resolved: the SPN, whose name to delegate, when to send tokens."""

    spn: str
    identity: str                 # "upn", "map" or "claim:NAME"
    realm: str | None             # appended to names without one (None: the account's realm)
    users: dict                   # kerberos_map: subject -> alias
    preemptive: bool | None       # None: the [kerberos] table's preemptive

    def principal(self, identity: dict, account_realm: str) -> str:
        """The principal to delegate for the signed-in ``identity`` (the stream metadata's dict)."""
        realm = self.realm or account_realm
        if self.identity == "upn":
            email = identity.get("email")
            if not isinstance(email, str) or "@" not in email:
                raise IdentityError("the user has no email address (UPN) to delegate")
            if identity.get("email_verified") is not True:
                raise IdentityError(f"the user's email {email!r} is not verified by the identity provider")
            local, _, domain = email.rpartition("@")
            name = f"{local}@{self.realm or domain.upper()}"
        elif self.identity == "map":
            subject = identity.get("sub")
            alias = self.users.get(subject) if isinstance(subject, str) else None
            if alias is None:
                raise IdentityError(f"the user {subject!r} is not in the app's options.kerberos_map")
            name = with_realm(alias, realm)
        else:
            claim = self.identity.partition(":")[2]
            extra = identity.get("claims") if isinstance(identity.get("claims"), dict) else {}
            value = identity.get(claim) if claim in CLAIMS else extra.get(claim)
            if not isinstance(value, str) or not value:
                raise IdentityError(f"the user has no {claim!r} claim to delegate")
            if claim == "email" and identity.get("email_verified") is not True:
                raise IdentityError(f"the user's email {value!r} is not verified by the identity provider")
            name = with_realm(value, realm)
        if not _USER_PRINCIPAL.fullmatch(name):
            raise IdentityError(f"{name!r} is not a user principal (name@REALM with no '/', spaces or controls)")
        return name


def with_realm(name: str, realm: str) -> str:
    return name if "@" in name else f"{name}@{realm}"


def app_settings(app: Any) -> AppSettings:
    """``app``'s Kerberos options; AppError naming the option when one cannot work."""
    options = app.options or {}
    spn = options.get("kerberos_spn", f"HTTP/{app.host}")
    if not isinstance(spn, str) or not _SPN.fullmatch(spn):
        raise AppError(f"app {app.name}: options.kerberos_spn: expected the back end's service principal name "
                       f"such as \"HTTP/wiki.corp.example\" (without realm), got {spn!r}")
    identity = options.get("kerberos_identity", "upn")
    claim = identity.partition(":")[2] if isinstance(identity, str) and identity.startswith("claim:") else None
    if not isinstance(identity, str) or (identity not in IDENTITIES and not (claim and _CLAIM_NAME.fullmatch(claim))):
        raise AppError(f"app {app.name}: options.kerberos_identity: expected \"upn\", \"map\" or \"claim:NAME\" "
                       f"(NAME: sub, email, name or a claim listed in options.sso_claims), got {identity!r}")
    if claim and claim not in CLAIMS and claim not in (options.get("sso_claims") or []):
        raise AppError(f"app {app.name}: options.kerberos_identity = {identity!r} needs {claim!r} in options.sso_claims "
                       f"(the front door sends the connector only the claims listed there)")
    realm = options.get("kerberos_realm")
    if realm is not None and (not isinstance(realm, str) or not re.fullmatch(r"[A-Za-z0-9.\-]{1,255}", realm)):
        raise AppError(f"app {app.name}: options.kerberos_realm: expected a realm such as \"CORP.EXAMPLE\", "
                       f"got {realm!r}")
    users = options.get("kerberos_map", {})
    if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in users.items()):
        raise AppError(f"app {app.name}: options.kerberos_map: expected a table of user subjects to Kerberos "
                       f"names (\"alias\" or \"alias@REALM\"), got {users!r}")
    if identity == "map" and not users:
        raise AppError(f"app {app.name}: options.kerberos_identity = \"map\" needs options.kerberos_map")
    preemptive = options.get("kerberos_preemptive")
    if preemptive is not None and not isinstance(preemptive, bool):
        raise AppError(f"app {app.name}: options.kerberos_preemptive: expected true or false, got {preemptive!r}")
    return AppSettings(spn, identity, realm, dict(users), preemptive)

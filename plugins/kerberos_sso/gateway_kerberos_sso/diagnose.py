"""`gateway diagnose` checks of the ``[kerberos]`` table: each KDC of the realm reachable, the keytab
readable and holding keys for the delegating account.

No gssapi: the checks read krb5.conf and the keytab themselves (the MIT keytab file format,
version 0x502) and dial the KDCs over TCP, so they run on a connector without the extra too.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway.diagnose import Check
from gateway.errors import describe_failure

from .settings import Settings

KDC_PORT = 88
DEFAULT_KRB5_CONF = "/etc/krb5.conf"
# A keytab is a few KiB; a file beyond this is not one.
MAX_KEYTAB = 1024 * 1024
_KDC_FIX = ("check the kdc entries of the realm in krb5.conf, DNS, and that a firewall lets this connector reach"
            " the KDC on TCP and UDP port 88")


def krb5_conf_path(settings: Settings, environ: Any = None) -> str:
    environ = os.environ if environ is None else environ
    return settings.krb5_conf or environ.get("KRB5_CONFIG") or DEFAULT_KRB5_CONF


def realm_kdcs(text: str, realm: str) -> list[tuple[str, int]]:
    """The ``kdc = host[:port]`` entries of ``realm`` in a krb5.conf text, in order."""
    kdcs: list[tuple[str, int]] = []
    section, in_realm, depth = "", False, 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section, in_realm, depth = header.group(1), False, 0
            continue
        if section != "realms":
            continue
        opening = re.fullmatch(r"([^=\s]+)\s*=\s*\{", line)
        if opening and depth == 0:
            in_realm, depth = opening.group(1) == realm, 1
            continue
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            in_realm, depth = False, 0
            continue
        entry = re.fullmatch(r"kdc\s*=\s*(\S+)", line)
        if in_realm and depth == 1 and entry:
            host, _, port = entry.group(1).rpartition(":") if not entry.group(1).endswith("]") else (entry.group(1), "", "")
            if not host or not port.isdigit():
                host, port = entry.group(1), str(KDC_PORT)
            kdcs.append((host.strip("[]"), int(port)))
    return kdcs


async def kdc_checks(reactor: Any, settings: Settings, timeout: float = 10.0, environ: Any = None) -> list[Check]:
    """One line per KDC krb5.conf lists for the account's realm: TCP reach."""
    path = krb5_conf_path(settings, environ)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_KEYTAB)
    except OSError as e:
        return [Check.fail("kdc", f"cannot read {path}: {e.strerror}",
                           "set [kerberos] krb5_conf to the realm's krb5.conf, or install one at /etc/krb5.conf")]
    kdcs = realm_kdcs(text, settings.realm)
    if not kdcs:
        return [Check.skip("kdc", f"{path} lists no kdc for {settings.realm}: the library finds them in DNS (SRV"
                                  " records); not checked")]
    checks = []
    for host, port in kdcs:
        where = f"{host}:{port}"
        d = connectProtocol(HostnameEndpoint(reactor, host, port, timeout=timeout), Protocol())
        d.addTimeout(timeout, reactor)
        try:
            protocol = await d
        except Exception as e:  # noqa: BLE001 - the reason is the line
            checks.append(Check.fail("kdc", f"KDC {where} of {settings.realm} ({path}) is unreachable:"
                                            f" {describe_failure(Failure(e))}", _KDC_FIX))
            continue
        protocol.transport.loseConnection()
        checks.append(Check.ok("kdc", f"KDC {where} of {settings.realm} accepts TCP connections"))
    return checks


def keytab_principals(data: bytes) -> list[str]:
    """The principals of an MIT keytab (format 0x0502); ValueError if it is not one."""
    if data[:2] != b"\x05\x02":
        raise ValueError("not a keytab (it does not start with the keytab format 0x0502)")
    names, pos = [], 2
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from(">i", data, pos)
        pos += 4
        if size < 0:   # a hole left by a removed entry
            pos += -size
            continue
        entry, pos = data[pos:pos + size], pos + size
        if len(entry) < size:
            raise ValueError("the keytab ends in the middle of an entry")
        (count,) = struct.unpack_from(">H", entry, 0)
        at, parts = 2, []
        for _ in range(count + 1):   # the realm, then the components
            (length,) = struct.unpack_from(">H", entry, at)
            parts.append(entry[at + 2:at + 2 + length].decode("utf-8", "replace"))
            at += 2 + length
        names.append("/".join(parts[1:]) + "@" + parts[0])
    return names


def keytab_check(settings: Settings) -> Check:
    """The keytab is readable by this user and holds keys for the delegating account."""
    path = settings.keytab
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEYTAB)
    except OSError as e:
        return Check.fail("keytab", f"cannot read the keytab {path}: {e.strerror}",
                          "make it readable by the connector's user only (chown; chmod 0600)")
    try:
        principals = keytab_principals(data)
    except (ValueError, struct.error) as e:
        return Check.fail("keytab", f"{path} is not a usable keytab: {e}",
                          "export the account's keys again (ktpass on Windows, kadmin ktadd on MIT)")
    keys = principals.count(settings.principal)
    if not keys:
        return Check.fail("keytab", f"{path} holds no key for {settings.principal} (it holds"
                                    f" {', '.join(sorted(set(principals))) or 'nothing'})",
                          f"export the keys of {settings.principal} into it, or set [kerberos] principal to one it holds")
    return Check.ok("keytab", f"{path} holds {keys} key(s) for {settings.principal}")

"""gateway diagnose's pure parts: which destinations of the pushed config are dialled, the report
and its exit status, and the Kerberos plugin's reading of krb5.conf and keytabs."""

from __future__ import annotations

import struct

import pytest

from gateway.diagnose import SKIP, Check, app_targets, report
from gateway_kerberos_sso.diagnose import keytab_principals, realm_kdcs


def test_a_listen_apps_destination_and_a_private_apps_single_hosts_are_dialled():
    """A plain app's host:port is dialled; of a private app, one host or address with a few ports; ranges, wildcards and UDP are skipped."""
    config = {"apps": [
        {"name": "wiki", "host": "wiki.corp", "port": 8080, "destination": "wiki.corp:8080"},
        {"name": "ops", "segments": [
            {"destination": "db.corp", "ports": "5432", "protocol": "tcp"},
            {"destination": "10.0.0.5", "ports": "22,80", "protocol": "tcp"},
            {"destination": "10.0.0.0/24", "ports": "22", "protocol": "tcp"},
            {"destination": "*.corp", "ports": "443", "protocol": "tcp"},
            {"destination": "dns.corp", "ports": "53", "protocol": "udp"},
            {"destination": "big.corp", "ports": "8000-8100", "protocol": "tcp"},
        ]},
    ]}
    targets = app_targets(config)
    dialled = [t for t in targets if not isinstance(t, Check)]
    assert dialled == [("app wiki", "wiki.corp", 8080), ("app ops", "db.corp", 5432), ("app ops", "10.0.0.5", 22),
                       ("app ops", "10.0.0.5", 80)]
    skipped = [t.detail for t in targets if isinstance(t, Check)]
    assert len(skipped) == 4 and all("not dialled" in d for d in skipped)


def test_unreadable_segments_fail_their_app_line():
    """Segments this connector cannot read fail that app's line, saying to upgrade."""
    [check] = app_targets({"apps": [{"name": "x", "segments": [{"destination": "", "ports": "1", "protocol": "tcp"}]}]})
    assert check.failed and "upgrade this connector" in check.fix


def test_the_report_prints_one_line_per_check_and_fails_when_one_failed():
    """Each check is one line (a failure with its fix); the status is 1 with a failure, 0 without."""
    lines: list[str] = []
    checks = [Check.ok("dns", "gw resolves"), Check.fail("tcp", "refused", "start it"), Check("clock", SKIP, "n/a")]
    assert report(checks, lines.append) == 1
    assert lines == ["ok    dns           gw resolves", "FAIL  tcp           refused; fix: start it",
                     "skip  clock         n/a", "3 checks, 1 failed: tcp"]
    assert report(checks[:1], [].append) == 0


KRB5_CONF = """
[libdefaults]
  default_realm = CORP.TEST   # kdc = not.this:1
[realms]
  OTHER.TEST = {
    kdc = other-kdc.test
  }
  CORP.TEST = {
    kdc = kdc1.corp.test
    kdc = 10.0.0.9:8888 ; a comment
    admin_server = kdc1.corp.test
    auth_to_local = {
      kdc = nested.not.a.kdc
    }
  }
[domain_realm]
  kdc = not.in.realms
"""


def test_the_realms_kdcs_are_read_from_krb5_conf():
    """Only the kdc entries of the realm's block count, port 88 unless given; comments and nested blocks are ignored."""
    assert realm_kdcs(KRB5_CONF, "CORP.TEST") == [("kdc1.corp.test", 88), ("10.0.0.9", 8888)]
    assert realm_kdcs(KRB5_CONF, "OTHER.TEST") == [("other-kdc.test", 88)]
    assert realm_kdcs(KRB5_CONF, "NONE.TEST") == []


def _entry(principal: str) -> bytes:
    name, _, realm = principal.rpartition("@")
    parts = name.split("/")
    entry = struct.pack(">H", len(parts)) + struct.pack(">H", len(realm)) + realm.encode()
    for part in parts:
        entry += struct.pack(">H", len(part)) + part.encode()
    return entry + struct.pack(">iIBHH", 1, 0, 1, 18, 2) + b"kk"


def test_keytab_principals_are_read_past_holes():
    """Every entry's principal is read; a hole (negative size) left by a removed entry is skipped."""
    first, second = _entry("HTTP/conn.corp.test@CORP.TEST"), _entry("host/conn@CORP.TEST")
    data = (b"\x05\x02" + struct.pack(">i", len(first)) + first + struct.pack(">i", -5) + bytes(5)
            + struct.pack(">i", len(second)) + second)
    assert keytab_principals(data) == ["HTTP/conn.corp.test@CORP.TEST", "host/conn@CORP.TEST"]


@pytest.mark.parametrize("data, expected", [
    (b"\x05\x01rest", "not a keytab"),
    (b"\x05\x02" + struct.pack(">i", 100) + b"short", "ends in the middle of an entry"),
])
def test_a_file_that_is_no_keytab_is_refused_saying_why(data, expected):
    """Another format, or a keytab cut short, is a ValueError saying which."""
    with pytest.raises(ValueError, match=expected):
        keytab_principals(data)

"""A throwaway MIT Kerberos realm on 127.0.0.1 for tests (the session fixture ``kdc``, registered
in conftest.py): slapd with the Kerberos schema as the KDC's database, because only the LDAP
back end can do S4U2Proxy (constrained delegation; DB2 answers "KDC can't fulfill requested
option"), and krb5kdc, both on free ports, in the foreground, everything in one directory.

Ported from the recipe shared/recipes/krb5_realm.sh (its README lists the pitfalls met there).
Nothing outside the directory is touched: the realm has its own KRB5_CONFIG (never
/etc/krb5.conf), ccache and replay cache, and only the processes started here are stopped.

Principals (realm EXAMPLE.TEST), each with a keytab in ``realm.keytab(principal)``:

- ``alice``, ``bob`` (passwords ``alice-pw``, ``bob-pw``): users;
- ``HTTP/connector.example.test``: the connector's delegating account, with
  ``+ok_to_auth_as_delegate`` (protocol transition) and ``krbAllowedToDelegateTo``
  ``HTTP/backend.example.test`` and ``cifs/smb.example.test``;
- ``HTTP/backend.example.test``: a web back end; ``cifs/smb.example.test``: an SMB server
  (``+no_auth_data_required``: a standalone smbd refuses tickets with a PAC);
- ``HTTP/other.example.test``: a back end the connector may *not* delegate to;
- ``HTTP/noflag.example.test``: a delegating account allowed to delegate to the back end but
  without ``ok_to_auth_as_delegate``;
- ``HTTP/rotated.example.test``: its keytab holds a key the KDC no longer has (a key changed
  after the keytab was written: a stale kvno).

``negotiate_apache`` is a real back end that accepts only Negotiate: Apache httpd with
mod_auth_gssapi and the keytab of ``HTTP/backend.example.test`` (recipe apache_gssapi.sh).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from components import require
from gateway_harness import HOST, free_port, stop_process, wait_until

REALM = "EXAMPLE.TEST"
BASE_DN = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{BASE_DN}"
LDAP_PASSWORD = "ldap-secret"
KERBEROS_SCHEMA = Path("/usr/share/doc/krb5-kdc-ldap/kerberos.schema.gz")

CONNECTOR = "HTTP/connector.example.test"
BACKEND = "HTTP/backend.example.test"
CIFS = "cifs/smb.example.test"
OTHER = "HTTP/other.example.test"
NOFLAG = "HTTP/noflag.example.test"
ROTATED = "HTTP/rotated.example.test"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def principal(name: str) -> str:
    """`name` with the realm: ``alice`` -> ``alice@EXAMPLE.TEST``."""
    return name if "@" in name else f"{name}@{REALM}"


def listening(proc: subprocess.Popen, port: int, log: Callable[[], str]) -> bool:
    """Whether `proc` accepts connections on HOST:`port` yet; an AssertionError with its log if it exited."""
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}): {log()}")
    try:
        socket.create_connection((HOST, port), 0.5).close()
        return True
    except OSError:
        return False


class KerberosRealm:
    """slapd + krb5kdc for REALM under `root`, with the principals of the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.programs = {name: require(name) for name in ("slapd", "kdb5_ldap_util", "kadmin.local",
                                                          "krb5kdc", "ldapmodify")}
        require("kinit")  # krb5-user: the client library's tools, also what an admin checks with
        self.kdc_port = free_port()
        self.ldap_port = free_port()
        self.ldap_url = f"ldap://{HOST}:{self.ldap_port}/"
        self.krb5_conf = root / "krb5.conf"
        self.kdc_conf = root / "kdc.conf"
        self.env = {**os.environ, "KRB5_CONFIG": str(self.krb5_conf), "KRB5_KDC_PROFILE": str(self.kdc_conf),
                    "KRB5CCNAME": f"FILE:{root / 'ccache'}", "KRB5RCACHEDIR": str(root / "rcache")}
        self.slapd: subprocess.Popen | None = None
        self.krb5kdc: subprocess.Popen | None = None
        (root / "rcache").mkdir(parents=True)
        self._write_ldap_config()
        self._write_kerberos_config()
        try:
            self._start_slapd()
            self._create_realm()
            self._start_kdc()
        except BaseException:
            self.stop()
            raise

    # -- set-up ------------------------------------------------------------------------------

    def _write_ldap_config(self) -> None:
        ldap = self.root / "ldap"
        ldap.mkdir()
        schema = ldap / "kerberos.schema"
        schema.write_bytes(gzip.decompress(KERBEROS_SCHEMA.read_bytes()))
        (ldap / "slapd.conf").write_text(f"""\
include   /etc/ldap/schema/core.schema
include   /etc/ldap/schema/cosine.schema
include   /etc/ldap/schema/inetorgperson.schema
include   /etc/ldap/schema/nis.schema
include   {schema}
pidfile   {ldap / 'slapd.pid'}
modulepath /usr/lib/ldap
moduleload back_mdb
database  mdb
maxsize   104857600
suffix    "{BASE_DN}"
rootdn    "{ROOT_DN}"
rootpw    {LDAP_PASSWORD}
directory {ldap}
index     krbPrincipalName eq,pres,sub
""")
        (ldap / "base.ldif").write_text(f"""\
dn: {BASE_DN}
objectClass: domain
dc: example

dn: cn=krbContainer,{BASE_DN}
objectClass: krbContainer
cn: krbContainer
""")

    def _write_kerberos_config(self) -> None:
        # udp_preference_limit = 1: TCP to the KDC (S4U tickets carry PACs and outgrow UDP).
        self.krb5_conf.write_text(f"""\
[libdefaults]
  default_realm = {REALM}
  dns_lookup_kdc = false
  dns_lookup_realm = false
  dns_canonicalize_hostname = false
  rdns = false
  ignore_acceptor_hostname = false
  forwardable = true
  udp_preference_limit = 1
  default_ccache_name = FILE:{self.root / 'ccache'}
  default_keytab_name = FILE:{self.root / 'default.keytab'}
[realms]
  {REALM} = {{
    kdc = {HOST}:{self.kdc_port}
  }}
[domain_realm]
  .example.test = {REALM}
  example.test = {REALM}
[dbmodules]
  {REALM} = {{
    db_library = kldap
    ldap_kerberos_container_dn = cn=krbContainer,{BASE_DN}
    ldap_kdc_dn = {ROOT_DN}
    ldap_kadmind_dn = {ROOT_DN}
    ldap_service_password_file = {self.root / 'ldap' / 'service.pw'}
    ldap_servers = {self.ldap_url}
  }}
""")
        self.kdc_conf.write_text(f"""\
[kdcdefaults]
  kdc_listen = {HOST}:{self.kdc_port}
  kdc_tcp_listen = {HOST}:{self.kdc_port}
[realms]
  {REALM} = {{
    acl_file = {self.root / 'kadm5.acl'}
    max_life = 10h
    max_renewable_life = 7d
    supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
  }}
[logging]
  kdc = FILE:{self.root / 'kdc.log'}
""")
        (self.root / "kadm5.acl").write_text(f"*/admin@{REALM} *\n")

    def _run(self, *argv: str, stdin: str | None = None) -> str:
        result = subprocess.run(argv, input=stdin, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    def _start_slapd(self) -> None:
        ldap = self.root / "ldap"
        slapadd = Path(self.programs["slapd"]).with_name("slapadd")
        self._run(str(slapadd), "-f", str(ldap / "slapd.conf"), "-l", str(ldap / "base.ldif"))
        # -d 0 keeps slapd in the foreground: its PID is ours to stop.
        self.slapd = self._spawn("slapd", self.programs["slapd"], "-d", "0", "-f", str(ldap / "slapd.conf"),
                                 "-h", self.ldap_url)
        wait_until(lambda: listening(self.slapd, self.ldap_port, lambda: self.log("slapd")), 20, "slapd to listen")

    def _create_realm(self) -> None:
        util = self.programs["kdb5_ldap_util"]
        self._run(util, "-H", self.ldap_url, "stashsrvpw", "-f", str(self.root / "ldap" / "service.pw"), ROOT_DN,
                  stdin=f"{LDAP_PASSWORD}\n{LDAP_PASSWORD}\n")
        self._run(util, "-H", self.ldap_url, "-D", ROOT_DN, "-w", LDAP_PASSWORD,
                  "create", "-P", "master-pw", "-r", REALM, "-s", "-subtrees", BASE_DN)
        for user, password in USERS.items():
            self.kadmin(f"addprinc -pw {password} {user}")
        self.kadmin(f"addprinc -randkey +ok_to_auth_as_delegate {CONNECTOR}")
        self.kadmin(f"addprinc -randkey {NOFLAG}")
        self.kadmin(f"addprinc -randkey +ok_to_auth_as_delegate {ROTATED}")
        for target in (BACKEND, OTHER):
            self.kadmin(f"addprinc -randkey {target}")
        self.kadmin(f"addprinc -randkey +no_auth_data_required {CIFS}")
        for name in (CONNECTOR, NOFLAG, ROTATED, BACKEND, OTHER, CIFS):
            self.kadmin(f"ktadd -k {self.keytab(name)} {name}")
        for user in USERS:
            self.kadmin(f"ktadd -norandkey -k {self.keytab(user)} {user}")
        self.kadmin(f"cpw -randkey {ROTATED}")  # the KDC moves on; rotated's keytab keeps the old key
        self.allow_delegation(CONNECTOR, BACKEND)
        self.allow_delegation(CONNECTOR, CIFS)
        self.allow_delegation(NOFLAG, BACKEND)

    def _start_kdc(self) -> None:
        self.krb5kdc = self._spawn("krb5kdc", self.programs["krb5kdc"], "-n")
        wait_until(lambda: listening(self.krb5kdc, self.kdc_port, lambda: self.log("krb5kdc")), 20,
                   "krb5kdc to listen")

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen:
        with open(self.root / f"{name}.out", "ab") as out:
            return subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    # -- what tests use ----------------------------------------------------------------------

    def keytab(self, name: str) -> Path:
        """The keytab of principal `name` (``HTTP/backend.example.test`` or ``alice``)."""
        return self.root / (name.split("@")[0].replace("/", "_") + ".keytab")

    def log(self, name: str = "kdc") -> str:
        """The end of a log of the realm: ``kdc`` (krb5kdc's log), ``krb5kdc`` or ``slapd`` (their output)."""
        path = self.root / ("kdc.log" if name == "kdc" else f"{name}.out")
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kadmin(self, query: str) -> str:
        """Run one kadmin.local query on the realm (``modprinc -ok_to_auth_as_delegate X``)."""
        return self._run(self.programs["kadmin.local"], "-r", REALM, "-q", query)

    def allow_delegation(self, delegating: str, target: str) -> None:
        """Let `delegating` do S4U2Proxy to `target` (classic constrained delegation)."""
        self._delegation(delegating, target, "add")

    def forbid_delegation(self, delegating: str, target: str) -> None:
        """Take `target` off `delegating`'s krbAllowedToDelegateTo again."""
        self._delegation(delegating, target, "delete")

    def _delegation(self, delegating: str, target: str, change: str) -> None:
        dn = f"krbPrincipalName={principal(delegating)},cn={REALM},cn=krbContainer,{BASE_DN}"
        self._run(self.programs["ldapmodify"], "-x", "-H", self.ldap_url, "-D", ROOT_DN, "-w", LDAP_PASSWORD,
                  stdin=f"dn: {dn}\nchangetype: modify\n{change}: krbAllowedToDelegateTo\n"
                        f"krbAllowedToDelegateTo: {principal(target)}\n")

    @contextlib.contextmanager
    def kdc_stopped(self) -> Iterator[None]:
        """krb5kdc is stopped inside the block and started again (same port) after it."""
        stop_process(self.krb5kdc)
        try:
            yield
        finally:
            self._start_kdc()

    def stop(self) -> None:
        """Stop krb5kdc and slapd: only the processes this realm started."""
        for proc in (self.krb5kdc, self.slapd):
            if proc is not None:
                stop_process(proc)



class NegotiateApache:
    """Apache httpd with mod_auth_gssapi on a free port of 127.0.0.1 (recipe apache_gssapi.sh):
    ``GET /whoami`` answers ``user=<REMOTE_USER>`` after Negotiate with the keytab of `spn`,
    else 401 ``WWW-Authenticate: Negotiate``; ``GET /private`` is a static file behind the same
    Negotiate, ``GET /bound`` and ``GET /bound-whoami`` the same authenticated once per
    connection (``GssapiConnectionBound``, as IIS does for Kerberos by default: later requests on
    the connection need no token); ``GET /open`` needs nothing. ``servers``: prefork processes kept (one per
    keep-alive connection a load test holds); ``debug``: mod_auth_gssapi's debug log (tests);
    ``replay_cache``: off for a bench only.

    Apache's prefork parent signals its whole process group when it stops, so it gets a
    session of its own. Run as root, its workers are www-data: `root` must be traversable by
    them (pytest's basetemp is 0700; use a ``tempfile.mkdtemp`` made 0711), and the keytab,
    krb5.conf and replay cache are copied in with www-data's group.
    """

    def __init__(self, realm: KerberosRealm, spn: str, root: Path, servers: int = 1, debug: bool = True,
                 replay_cache: bool = True) -> None:
        self.binary = require("apache2")
        modules = Path(require("mod_auth_gssapi")).parent
        self.root = root
        self.port = free_port()
        for sub in ("htdocs", "cgi", "logs", "run", "rcache"):
            (root / sub).mkdir(parents=True)
        keytab, krb5_conf = root / "http.keytab", root / "krb5.conf"
        keytab.write_bytes(realm.keytab(spn).read_bytes())
        krb5_conf.write_text(realm.krb5_conf.read_text())
        user = ""
        os.chmod(root, 0o755)
        for sub in ("htdocs", "cgi"):
            os.chmod(root / sub, 0o755)
        krb5_conf.chmod(0o644)
        if os.geteuid() == 0:
            user = "User www-data\nGroup www-data"
            shutil.chown(keytab, group="www-data")
            keytab.chmod(0o640)
            shutil.chown(root / "rcache", group="www-data")
            (root / "rcache").chmod(0o770)
        whoami = root / "cgi" / "whoami"
        whoami.write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nprintf 'user=%s\\n' \"$REMOTE_USER\"\n")
        whoami.chmod(0o755)
        (root / "htdocs" / "open").write_text("ok\n")
        (root / "htdocs" / "private").write_text("private\n")   # a static file behind Negotiate (bench)
        (root / "htdocs" / "bound").write_text("bound\n")       # the same, authenticated once per connection
        negotiate = (f"  AuthType GSSAPI\n  AuthName \"Kerberos\"\n  GssapiCredStore keytab:{keytab}\n"
                     "  GssapiAllowedMech krb5\n  GssapiBasicAuth Off\n  GssapiLocalName Off\n  Require valid-user\n")
        conf = root / "httpd.conf"
        conf.write_text(f"""\
ServerRoot "{root}"
ServerName backend.example.test
Listen {HOST}:{self.port}
PidFile {root}/run/httpd.pid
DefaultRuntimeDir {root}/run
Mutex file:{root}/run default
ErrorLog {root}/logs/error.log
LogLevel {"info auth_gssapi:debug" if debug else "warn"}
LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule authz_user_module {modules}/mod_authz_user.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule cgi_module {modules}/mod_cgi.so
LoadModule env_module {modules}/mod_env.so
LoadModule auth_gssapi_module {modules}/mod_auth_gssapi.so
{user}
StartServers {servers}
MinSpareServers {servers}
MaxSpareServers {servers + 1}
LogFormat "%h \\"%r\\" %>s user=%u" simple
CustomLog {root}/logs/access.log simple
PassEnv KRB5_CONFIG
SetEnv KRB5RCACHEDIR {root}/rcache
DocumentRoot {root}/htdocs
<Directory />
  Require all granted
</Directory>
ScriptAlias /whoami {whoami}
ScriptAlias /bound-whoami {whoami}
<LocationMatch "^/(whoami|private)$">
{negotiate}</LocationMatch>
<LocationMatch "^/bound(-whoami)?$">
{negotiate}  GssapiConnectionBound On
</LocationMatch>
""")
        env = {**os.environ, "KRB5_CONFIG": str(krb5_conf), "KRB5RCACHEDIR": str(root / "rcache")}
        if not replay_cache:
            env["KRB5RCACHETYPE"] = "none"   # a bench: no lock file shared by every worker
        with open(root / "logs" / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-f", str(conf), "-DFOREGROUND"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_until(lambda: listening(self.proc, self.port, self.log), 20, "apache2 to listen")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return "".join((self.root / "logs" / name).read_text(errors="replace")[-2000:]
                       for name in ("stdout.log", "error.log") if (self.root / "logs" / name).exists())

    def stop(self) -> None:
        """SIGTERM to the parent, which stops its own workers."""
        stop_process(self.proc)

KRB5_VARIABLES = ("KRB5_CONFIG", "KRB5CCNAME", "KRB5RCACHEDIR")


@pytest.fixture(scope="session")
def kdc(tmp_path_factory) -> Iterator[KerberosRealm]:
    """A running realm for the whole session; this process's KRB5_CONFIG, KRB5CCNAME and
    KRB5RCACHEDIR point into it while it runs (python-gssapi reads them per call)."""
    realm = KerberosRealm(tmp_path_factory.mktemp("kdc"))
    saved = {name: os.environ.get(name) for name in KRB5_VARIABLES}
    os.environ.update({name: realm.env[name] for name in KRB5_VARIABLES})
    try:
        yield realm
    finally:
        realm.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def negotiate_apache(kdc) -> Iterator[NegotiateApache]:
    """Apache + mod_auth_gssapi accepting tickets for HTTP/backend.example.test of the ``kdc`` realm."""
    root = Path(tempfile.mkdtemp(prefix="gateway-httpd."))
    os.chmod(root, 0o711)
    server = NegotiateApache(kdc, BACKEND, root / "httpd")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

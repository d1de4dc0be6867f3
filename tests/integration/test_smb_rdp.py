"""The smb and rdp plugins between real clients (smbclient, xfreerdp) and real servers (Samba's
smbd, FreeRDP's shadow server), through a real service and connector: what passes untouched,
what is refused with which reason, and the session facts the connector records."""

from __future__ import annotations

import hashlib
import os

import pytest

from gateway_harness import GATEWAY, HOST, Gateway, connect, free_port, wait_until
from smb_rdp_harness import RDP_USER, SMB_PASS, RdpServer, Samba
from components import needs

pytestmark = needs("smbd", "smbclient", "xfreerdp", "freerdp-shadow", "winpr-hash", "Xvfb")

# smbclient 4.17 speaks SMB1 only when told; with this alone it opens with the SMB1-style
# multi-protocol NEGOTIATE (SMB1 dialects and SMB 2.002/2.???), with -m NT1 too it speaks SMB1.
SMB1_CLIENT = "--option=client min protocol=NT1"

SMB_APPS = {
    "files": {},
    "files-smb1": {"allow_smb1": True},
    "files-signed": {"require_signing": True},
    "files-encrypted": {"require_encryption": True},
}


class Setup:
    """One service and one connector for the module: apps for each SMB policy and for RDP."""

    def __init__(self, gw: Gateway, samba: Samba, rdp: RdpServer) -> None:
        self.gw, self.samba, self.rdp = gw, samba, rdp
        apps = [{"name": name, "destination": f"{HOST}:{samba.port}", "protocol": "smb", "options": options}
                for name, options in SMB_APPS.items()]
        apps.append({"name": "desktop", "destination": f"{HOST}:{rdp.port}", "protocol": "rdp"})
        self.service = gw.service(apps)
        self.connector = gw.connector(self.service)

    def port(self, app: str) -> int:
        return self.service.app_port(app)

    def mark(self) -> int:
        """Where the connector's log ends now: facts() reads only what comes after."""
        return len(self.connector.log())

    def service_record(self, app: str, *words: str) -> str:
        """The service's session record of ``app`` carrying every one of ``words`` (the facts the
        connector reported), waited for."""
        def line() -> str | None:
            return next((l for l in self.service.log().splitlines()
                         if "session: user" in l and f" app {app} " in l and all(w in l for w in words)), None)
        return wait_until(line, 30, f"the service's session record of app {app} with {words}")

    def facts(self, since: int, app: str, count: int = 1) -> list[str]:
        """The connector's session_facts lines for ``app`` logged after ``since`` (waits for ``count``)."""
        def lines() -> list[str]:
            found = [line for line in self.connector.log()[since:].splitlines()
                     if f"app {app} (" in line and "session from" in line]
            return found if len(found) >= count else []
        return wait_until(lines, 30, f"{count} session record(s) of app {app} in the connector's log")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("smb-rdp")
    samba = rdp = None
    gw = Gateway(root / "gw")
    (root / "gw").mkdir()
    try:
        samba = Samba(root / "samba")
        rdp = RdpServer(root / "rdp")
        yield Setup(gw, samba, rdp)
    finally:
        gw.cleanup()
        for server in (rdp, samba):
            if server is not None:
                server.stop()
    gw.assert_no_secret_in_logs()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smb_put_get_list_through_the_connector(setup, tmp_path):
    """smbclient puts a 256 MiB file through the connector, lists it, gets it back with the same sha256;
    the connector records dialect, user, signing and share."""
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(256 * 1024 * 1024))
    back = tmp_path / "down.bin"
    since = setup.mark()
    result = setup.samba.client(setup.port("files"), "-W", "TESTGROUP", command=f"put {source} up.bin; ls; get up.bin {back}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up.bin" in result.stdout
    assert sha256(back) == sha256(source) == sha256(setup.samba.share / "up.bin")
    for path in (source, back, setup.samba.share / "up.bin"):   # 768 MiB of tmp space back
        path.unlink()
    line = setup.facts(since, "files")[0]
    assert "spliced" in line and "dialect=3.1.1" in line, line
    assert f"user={setup.samba.user}" in line and "domain=TESTGROUP" in line, line
    assert r"share=\\127.0.0.1\share" in line and "authenticated=True" in line, line
    setup.service_record("files", "dialect=3.1.1", f"user={setup.samba.user}", r"share=\\127.0.0.1\share")


def test_smb3_encryption_keeps_working(setup, tmp_path):
    """smbclient -e (SMB3 encryption) passes through untouched, also where the app requires
    encryption; the session is recorded as encrypted."""
    source = tmp_path / "enc.bin"
    source.write_bytes(os.urandom(1024 * 1024))
    back = tmp_path / "enc-back.bin"
    since = setup.mark()
    for app in ("files", "files-encrypted"):
        result = setup.samba.client(setup.port(app), "--client-protection=encrypt", command=f"put {source} enc.bin; get enc.bin {back}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert sha256(back) == sha256(source)
        line = setup.facts(since, app)[0]
        assert "spliced" in line and "encrypted=True" in line, line


@needs(modules=("smbclient",))
def test_smbprotocol_signed_and_encrypted_sessions_through_the_connector(setup):
    """A second client, smbprotocol (pure Python), writes and reads back 16 MiB with signing
    required and then with SMB3 encryption, through the apps that require each."""
    import smbclient

    payload = os.urandom(16 * 1024 * 1024)
    for app, encrypt in (("files-signed", False), ("files-encrypted", True)):
        since = setup.mark()
        port = setup.port(app)
        cache: dict = {}
        smbclient.register_session(HOST, username=setup.samba.user, password=SMB_PASS, port=port,
                                   encrypt=encrypt, require_signing=True, connection_cache=cache,
                                   auth_protocol="ntlm")
        name = rf"\\{HOST}\share\smbprotocol-{app}.bin"
        try:
            with smbclient.open_file(name, mode="wb", port=port, connection_cache=cache) as f:
                f.write(payload)
            with smbclient.open_file(name, mode="rb", port=port, connection_cache=cache) as f:
                assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(payload).hexdigest()
        finally:
            smbclient.reset_connection_cache(connection_cache=cache)
        line = setup.facts(since, app)[0]
        assert "spliced" in line and "signing_required=True" in line, line
        assert ("encrypted=True" in line) == encrypt, line


def test_smb_unencrypted_session_refused_where_encryption_is_required(setup):
    """A session without encryption to an app with require_encryption is closed before the share
    is connected, with the reason logged."""
    since = setup.mark()
    result = setup.samba.client(setup.port("files-encrypted"))
    assert result.returncode != 0, result.stdout
    line = setup.facts(since, "files-encrypted")[0]
    assert "refused" in line and "options.require_encryption" in line, line


def test_smb1_refused_by_default_and_allowed_with_allow_smb1(setup):
    """smbclient -m NT1 is refused (logged: SMB1 is not allowed) on a default app and reaches the
    server on an app with allow_smb1."""
    since = setup.mark()
    refused = setup.samba.client(setup.port("files"), "-m", "NT1", SMB1_CLIENT)
    assert refused.returncode != 0, refused.stdout
    line = setup.facts(since, "files")[0]
    assert "refused" in line and "SMB1 is not allowed" in line and "code=smb1" in line, line
    allowed = setup.samba.client(setup.port("files-smb1"), "-m", "NT1", SMB1_CLIENT)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    line = setup.facts(since, "files-smb1")[0]
    assert "spliced" in line and "dialect=SMB1" in line, line


def test_smb_multiprotocol_negotiate_refused_by_default(setup):
    """A client that also offers SMB1 (the SMB1-style multi-protocol NEGOTIATE) is refused by
    default: smbclient with client min protocol NT1 opens that way."""
    since = setup.mark()
    result = setup.samba.client(setup.port("files"), SMB1_CLIENT)
    assert result.returncode != 0, result.stdout
    line = setup.facts(since, "files")[0]
    assert "multi-protocol NEGOTIATE" in line and "refused" in line, line


def test_smb_unsigned_session_refused_where_signing_is_required(setup):
    """An app with require_signing refuses a session neither side requires signing for, and lets
    through one whose client requires it (--client-protection=sign)."""
    since = setup.mark()
    refused = setup.samba.client(setup.port("files-signed"))
    assert refused.returncode != 0, refused.stdout
    line = setup.facts(since, "files-signed")[0]
    assert "refused" in line and "options.require_signing" in line, line
    signed = setup.samba.client(setup.port("files-signed"), "--client-protection=sign",
)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    line = setup.facts(since, "files-signed", 2)[1]
    assert "spliced" in line and "signing_required=True" in line, line


def closed_after(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to the app's port; what comes back before the connection closes."""
    with connect(port) as sock:
        sock.sendall(payload)
        sock.settimeout(30)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def test_malformed_smb_closed_with_a_reason(setup):
    """Bytes that are not SMB, and an oversized message before the session, close the connection
    (nothing reaches the client) with the reason in the connector's log."""
    since = setup.mark()
    assert closed_after(setup.port("files"), b"\x00\x00\x00\x10" + b"GET / HTTP/1.1\r\n") == b""
    assert closed_after(setup.port("files"), b"\x00\xff\xff\xff" + b"\xfeSMB" * 100) == b""
    lines = setup.facts(since, "files", 2)
    assert "refused" in lines[0] and "which is not SMB" in lines[0], lines[0]
    assert "refused" in lines[1] and "code=too_large" in lines[1], lines[1]


def test_rdp_client_without_nla_gets_hybrid_required(setup, tmp_path):
    """xfreerdp /sec:rdp (no CredSSP offered) gets the Negotiation Failure from the connector:
    the client reports HYBRID_REQUIRED_BY_SERVER, the connector logs the refusal."""
    since = setup.mark()
    code, output = setup.rdp.client(setup.port("desktop"), "/sec:rdp", "+auth-only", work=tmp_path / "x")
    assert code != 0, output
    assert "HYBRID_REQUIRED_BY_SERVER" in output, output
    line = setup.facts(since, "desktop")[0]
    assert "refused" in line and "code=nla_required" in line and f"cookie_user={RDP_USER}" in line, line


def test_rdp_full_session_passes_with_cookie_user_and_protocol(setup, tmp_path):
    """A full xfreerdp session (NLA) through the connector reaches CONNECTION_STATE_ACTIVE; the
    connector records the cookie user and the selected protocol."""
    since = setup.mark()
    code, output = setup.rdp.client(setup.port("desktop"), "/sec:nla", "/w:800", "/h:600", "/log-level:DEBUG",
                                     work=tmp_path / "x", until="--> CONNECTION_STATE_ACTIVE")
    assert code is None, output[-3000:]
    line = setup.facts(since, "desktop")[0]
    assert "spliced" in line and f"cookie_user={RDP_USER}" in line and "selected_protocol=credssp" in line, line
    setup.service_record("desktop", f"cookie_user={RDP_USER}", "selected_protocol=credssp")


def test_malformed_rdp_closed_with_a_reason(setup):
    """A TPKT longer than any Connection Request, and bytes that are no TPKT, close the connection
    with the reason in the connector's log."""
    since = setup.mark()
    assert closed_after(setup.port("desktop"), b"\x03\x00\xff\xff" + b"\x00" * 64) == b""
    assert closed_after(setup.port("desktop"), b"SSH-2.0-OpenSSH_9.2\r\n") == b""
    lines = setup.facts(since, "desktop", 2)
    assert "refused" in lines[0] and "code=too_large" in lines[0], lines[0]
    assert "refused" in lines[1] and "TPKT" in lines[1], lines[1]


@pytest.mark.parametrize("protocol, option", [("smb", 'allow_smb1 = "yes"'), ("rdp", "require_nla = 0")])
def test_a_bad_option_stops_check_config_naming_the_key(setup, tmp_path, protocol, option):
    """`gateway check-config` (and so the service) refuses an smb/rdp app whose option is not a boolean."""
    config = tmp_path / "svc.toml"
    config.write_text(f"""[service]
state_dir = "{tmp_path / 'state'}"
listen = "tcp:{free_port()}:interface={HOST}"

[[apps]]
name = "app1"
protocol = "{protocol}"
listen = "tcp:{free_port()}:interface={HOST}"
destination = "{HOST}:9"
options = {{ preauth = "none", {option} }}
""")
    result = setup.gw.cli("check-config", str(config))
    key = option.split(" ")[0]
    assert result.returncode == 1 and f"app app1: options.{key}: expected true or false" in result.stderr, result.stderr


def test_private_smb_app_through_gateway_access_names_the_user(setup, gw, tmp_path):
    """A private app with protocol smb, reached with gateway access tcp by a signed-in user: the
    connector inspects the checked address it dials, lets SMB3 through and refuses SMB1, and its
    log names the user."""
    from test_access_private import _accepts, publish, sign_in_with_token

    svc = gw.service(start=False)
    publish(svc, {"name": "files-private", "protocol": "smb", "options": {"allowed_users": ["alice"]},
                  "segments": [{"destination": HOST, "ports": str(setup.samba.port)}]})
    svc.start()
    conn = gw.connector(svc)
    env = sign_in_with_token(gw, svc, tmp_path / "home")
    port = free_port()
    gw.spawn("access", [GATEWAY, "access", "tcp", "--service", svc.address, "--app", "files-private",
                        "--listen", f"{HOST}:{port}"], env=env)
    wait_until(lambda: _accepts(port), 30, "gateway access tcp to listen")
    listed = setup.samba.client(port)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    refused = setup.samba.client(port, "-m", "NT1", SMB1_CLIENT)
    assert refused.returncode != 0, refused.stdout
    def decided() -> list[str]:   # the port probe above leaves a "closed" record: not counted
        found = [line for line in conn.log().splitlines()
                 if "app files-private (smb)" in line and (" spliced: " in line or " refused: " in line)]
        return found if len(found) >= 2 else []

    lines = wait_until(decided, 30, "two session records of the private app")
    assert "(user alice) spliced" in lines[0] and "dialect=3.1.1" in lines[0], lines[0]
    assert "(user alice) refused" in lines[1] and "code=smb1" in lines[1], lines[1]
    # the service's session record: who, what, and what the smb plugin read on the connector
    record = wait_until(lambda: next((l for l in svc.log().splitlines() if "session: user alice app files-private"
                                      in l and "dialect=3.1.1" in l), None), 30, "the service's session record")
    assert "share=" in record and "decision=spliced" in record, record


def test_rdp_server_that_selects_no_nla_is_refused(gw, backends):
    """A server that answers a client offering TLS and CredSSP by selecting TLS is refused under
    require_nla: its Connection Confirm never reaches the client, which gets the Negotiation
    Failure and FIN instead (the server side here is a socket that answers like that)."""
    from gateway_rdp.codec import PROTOCOL_HYBRID, PROTOCOL_SSL, encode_connection_confirm, \
        encode_connection_request, negotiation_failure

    request = encode_connection_request("carol", requested=PROTOCOL_SSL | PROTOCOL_HYBRID)

    def tls_only(conn, backend):
        got = b""
        while len(got) < len(request) and (chunk := conn.recv(4096)):
            got += chunk
        backend.record(got)
        conn.sendall(encode_connection_confirm(PROTOCOL_SSL))
        conn.recv(1)   # until the connector closes

    server = backends(tls_only)
    svc = gw.service([{"name": "desktop", "destination": server.destination, "protocol": "rdp"}])
    conn = gw.connector(svc)
    assert closed_after(svc.app_port("desktop"), request) == negotiation_failure()
    assert server.wait_results(1, 30) == [request]
    line = wait_until(lambda: [x for x in conn.log().splitlines() if "app desktop (rdp)" in x], 30,
                      "the session record")[0]
    assert "refused" in line and "code=nla_not_selected" in line and "the server selected tls" in line, line

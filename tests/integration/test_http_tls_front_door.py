"""The HTTPS front door through real processes: SNI certificates, wildcard and path-prefix routing,
the plain listener's redirect, old TLS refused, certificates re-read on SIGHUP."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import time

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway_harness import HOST, free_port, http_request, read_head, toml_table, wait_until
from testca import CA


def named_handler(name: str):
    """A back end answering every request with its name, the method and target it got."""

    def handler(conn: socket.socket, backend) -> None:
        head, _ = read_head(conn)
        method, target = head.split(b"\r\n", 1)[0].split(b" ")[:2]
        body = b"%s %s %s" % (name.encode(), method, target)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    return handler


class Front:
    """The service's two front-door ports and the CA its certificates chain to."""

    def __init__(self, ca: CA, http_port: int, tls_port: int) -> None:
        self.ca = ca
        self.http = http_port
        self.tls = tls_port

    def tls_socket(self, sni: str | None, verify: bool = True, context: ssl.SSLContext | None = None):
        if context is None:
            context = ssl.create_default_context(cafile=str(self.ca.pem_path))
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((HOST, self.tls), timeout=30)
        try:
            return context.wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise

    def get(self, sni: str | None, host: str, path: str, verify: bool = True) -> tuple[int, dict, bytes, str]:
        """One https request with SNI `sni` and Host `host`: (status, headers, body, CN of the server's cert)."""
        tls = self.tls_socket(sni, verify)
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        c = http.client.HTTPConnection(HOST, self.tls, timeout=30)
        c.sock = tls
        try:
            r, body = http_request(self.tls, host, path, conn=c)
            return r.status, dict(r.getheaders()), body, cn
        finally:
            c.close()

    def plain(self, host: str, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
        r, body = http_request(self.http, host, path, method)
        return r.status, dict(r.getheaders()), body


def start(gw, backends, tmp_path) -> tuple[Front, object, dict[str, object]]:
    """A service with five https apps and one http app on two front-door ports, and a connector."""
    ca = CA(tmp_path / "certs")
    http_port, tls_port = free_port(), free_port()
    ends = {name: backends(named_handler(name)) for name in ("a", "b", "wild", "wiki", "crm", "plain")}
    apps = [
        ("a", f"https://a.example.test:{tls_port}/"),
        ("b", f"https://b.example.test:{tls_port}/"),
        ("wild", f"https://*.apps.example.test:{tls_port}/"),
        ("wiki", f"https://paths.example.test:{tls_port}/wiki/"),
        ("crm", f"https://paths.example.test:{tls_port}/crm/"),
        ("plain", f"http://plain.example.test:{http_port}/"),
    ]
    certificates = [ca.issue("cert-a", ["a.example.test", "paths.example.test"]).as_table(),
                    ca.issue("cert-b", ["b.example.test"]).as_table(),
                    ca.issue("cert-star", ["*.apps.example.test"]).as_table()]
    web_apps = []
    for name, url in apps:
        path = url.split(":", 2)[2].partition("/")[2]  # the prefix, kept the same inside
        web_apps.append({"name": name, "external_url": url, "internal_url": f"http://{ends[name].destination}/{path}"})
    svc = gw.service(start=False)
    more = "".join("\n" + toml_table("http.certificates", entry, array=True) for entry in certificates)
    svc.add_front_door(http_port, web_apps, http={"tls_listen": f"tcp:{tls_port}:interface={HOST}"}, more=more)
    svc.start()
    gw.connector(svc)
    front = Front(ca, http_port, tls_port)
    wait_until(lambda: front.get("a.example.test", f"a.example.test:{tls_port}", "/")[0] == 200, 30,
               "the https front door to reach app a")
    return front, svc, ends


def test_sni_serves_each_domain_its_certificate(gw, backends, tmp_path):
    """Two names get two certificates (verified against the test CA) and reach their own back ends;
    no SNI or an unknown name gets the default certificate, and an unknown Host a 404."""
    front, svc, _ = start(gw, backends, tmp_path)
    t = front.tls
    status, _, body, cn = front.get("a.example.test", f"a.example.test:{t}", "/x?q=1")
    assert (status, body, cn) == (200, b"a GET /x?q=1", "cert-a")
    status, _, body, cn = front.get("b.example.test", f"b.example.test:{t}", "/y")
    assert (status, body, cn) == (200, b"b GET /y", "cert-b")
    status, _, body, cn = front.get("unknown.example.test", f"unknown.example.test:{t}", "/", verify=False)
    assert (status, cn) == (404, "cert-a") and b"There is no application at this address." in body
    status, _, body, cn = front.get(None, f"b.example.test:{t}", "/z", verify=False)
    assert (status, body, cn) == (200, b"b GET /z", "cert-a")
    assert "https front door on" in svc.log() and "BEGIN" not in svc.log()


def test_wildcard_and_path_prefix_apps(gw, backends, tmp_path):
    """A *. app answers two subdomains under its wildcard certificate; two path prefixes on one host
    reach two back ends; the prefix without its slash redirects to it."""
    front, _, _ = start(gw, backends, tmp_path)
    t = front.tls
    for sub in ("x.apps.example.test", "y.apps.example.test"):
        status, _, body, cn = front.get(sub, f"{sub}:{t}", "/page")
        assert (status, body, cn) == (200, b"wild GET /page", "cert-star"), sub
    status, _, body, _ = front.get("paths.example.test", f"paths.example.test:{t}", "/wiki/Main_Page")
    assert (status, body) == (200, b"wiki GET /wiki/Main_Page")
    status, _, body, _ = front.get("paths.example.test", f"paths.example.test:{t}", "/crm/accounts?id=7")
    assert (status, body) == (200, b"crm GET /crm/accounts?id=7")
    status, headers, _, _ = front.get("paths.example.test", f"paths.example.test:{t}", "/wiki?x=1")
    assert (status, headers["Location"]) == (308, "/wiki/?x=1")
    status, _, _, _ = front.get("paths.example.test", f"paths.example.test:{t}", "/other/")
    assert status == 404
    status, _, _, _ = front.get("paths.example.test", f"paths.example.test:{t}", "/wiki/../crm/")
    assert status == 400


def test_plain_listener_redirects_https_apps_and_serves_http_apps(gw, backends, tmp_path):
    """On the plain port an https app's URL is a 308 to https (same path and query); an http app is served."""
    front, _, _ = start(gw, backends, tmp_path)
    status, headers, _ = front.plain(f"a.example.test:{front.http}", "/x?q=1")
    assert (status, headers["Location"]) == (308, f"https://a.example.test:{front.tls}/x?q=1")
    status, headers, _ = front.plain(f"z.apps.example.test:{front.http}", "/p", method="POST")
    assert (status, headers["Location"]) == (308, f"https://z.apps.example.test:{front.tls}/p")
    status, _, body = front.plain(f"plain.example.test:{front.http}", "/hello")
    assert (status, body) == (200, b"plain GET /hello")
    assert front.plain(f"nothing.example.test:{front.http}", "/")[0] == 404
    # and the https port does not serve the http app
    assert front.get(None, f"plain.example.test:{front.http}", "/", verify=False)[0] == 404


def test_tls_1_1_client_is_refused(gw, backends, tmp_path):
    """A client limited to TLS 1.1 gets no handshake; the same client allowed TLS 1.2 gets one."""
    front, _, _ = start(gw, backends, tmp_path)

    def client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(front.ca.pem_path))
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the client itself would speak TLS 1.1
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
        return context

    try:
        front.tls_socket("a.example.test", context=client(ssl.TLSVersion.TLSv1_1)).close()
        refused = None
    except (ssl.SSLError, ConnectionError) as e:
        refused = e
    assert refused is not None, "a TLS 1.1 handshake succeeded"
    with front.tls_socket("a.example.test", context=client(ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"


def test_certificates_are_reread_on_sighup(gw, backends, tmp_path):
    """A renewed certificate file is served after SIGHUP; a broken one is refused and the running one kept."""
    front, svc, _ = start(gw, backends, tmp_path)
    t = front.tls
    front.ca.issue("cert-b-renewed", ["b.example.test"], file="cert-b")
    assert front.get("b.example.test", f"b.example.test:{t}", "/")[3] == "cert-b"  # not before the signal
    svc.proc.signal(signal.SIGHUP)
    wait_until(lambda: front.get("b.example.test", f"b.example.test:{t}", "/")[3] == "cert-b-renewed", 30,
               "the renewed certificate to be served")
    (front.ca.dir / "cert-b.key").write_bytes(b"broken")
    svc.proc.signal(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in svc.log(), 30, "the broken reload to be refused")
    assert "cert-b.key holds no PEM private key" in svc.log()
    status, _, body, cn = front.get("b.example.test", f"b.example.test:{t}", "/still")
    assert (status, body, cn) == (200, b"b GET /still", "cert-b-renewed")


def test_https_client_that_stops_reading_is_cut_off(gw, backends, tmp_path):
    """[http] send_timeout over TLS: a client that reads slowly keeps its download; once it takes
    nothing, the front door closes the connection and the back end sees its connection end."""
    ca = CA(tmp_path / "certs")
    size = 48 * 1024 * 1024
    ended = []

    def big(conn: socket.socket, backend) -> None:
        read_head(conn)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // (1 << 20)):
                conn.sendall(b"b" * (1 << 20))
            ended.append("sent all")
        except OSError:
            ended.append("cut")

    end = backends(big)
    tls_port = free_port()
    svc = gw.service(start=False)
    svc.add_front_door(free_port(), [{"name": "big", "external_url": f"https://big.example.test:{tls_port}/",
                                      "internal_url": f"http://{end.destination}/"}],
                       http={"tls_listen": f"tcp:{tls_port}:interface={HOST}", "send_timeout": 1},
                       more="\n" + toml_table("http.certificates", ca.issue("big", ["big.example.test"]).as_table(),
                                              array=True))
    svc.start()
    gw.connector(svc)
    front = Front(ca, 0, tls_port)
    wait_until(lambda: "https front door on" in svc.log(), 30, "the https front door")
    tls = wait_until(lambda: _downloading(front, tls_port), 30, "a download through the https front door")
    cut = f"from {HOST}:{tls.getsockname()[1]}: the client took no response bytes for 1 s"
    for _ in range(15):             # 3 s of slow but steady reading: longer than send_timeout
        tls.recv(64 * 1024)
        time.sleep(0.2)
    assert cut not in svc.log()
    wait_until(lambda: cut in svc.log(), 15, "the service to cut off the client that stopped reading")
    wait_until(lambda: ended, 15, "the back end to see its connection end")
    assert ended == ["cut"]
    tls.close()


def _downloading(front: Front, port: int):
    """A TLS socket with a GET /big sent and the response head read, or None."""
    tls = front.tls_socket("big.example.test")
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    tls.sendall(f"GET /big HTTP/1.1\r\nHost: big.example.test:{port}\r\n\r\n".encode())
    head = tls.recv(4096)
    if head.startswith(b"HTTP/1.1 200 "):
        return tls
    tls.close()
    return None

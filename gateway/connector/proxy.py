"""Reaching the service through an HTTP CONNECT forward proxy, with mutual TLS end to end.

The proxy only ever sees a CONNECT request and then opaque TLS bytes: :class:`ConnectEndpoint`
is an ``IStreamClientEndpoint`` that dials the proxy, asks it for a tunnel to the service
(with Basic credentials when configured) and hands the raw tunnel to whatever protocol the
caller connects, normally ``wrapClientTLS(options, ConnectEndpoint(...))``, so the connector's
TLS handshake and client certificate go to the service itself, as buildbot worker does.

Which proxy to use (:func:`choose_proxy`): ``[connector] proxy`` when the file sets it (``""``
for none), else ``https_proxy`` / ``HTTPS_PROXY`` from the environment unless ``no_proxy`` /
``NO_PROXY`` names the service's host. A proxy that inspects TLS replaces the service's
certificate; :class:`UntrustedPeerRecorder` notices the certificate the handshake refused and
:func:`untrusted_certificate_message` says, by name, what happened and what to do.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from attrs import define, field, frozen
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import __version__
from gateway.errors import GatewayError, describe_failure
from gateway.segments import host_port

# The proxy's answer to CONNECT is a status line and a few headers; more than this is not one.
MAX_ANSWER_HEAD = 16 * 1024
# How long the proxy may take to answer CONNECT (it dials the service meanwhile).
CONNECT_TIMEOUT = 30.0
# A password file holds one line; anything bigger is the wrong file.
MAX_PASSWORD_FILE = 4096
# What may stand in a CONNECT request line as the host: a DNS name, an IPv4 or IPv6 address.
_TARGET_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|[0-9A-Fa-f:.]{2,45}")
ENVIRONMENT_PROXY = ("https_proxy", "HTTPS_PROXY")
ENVIRONMENT_NO_PROXY = ("no_proxy", "NO_PROXY")


class ProxyError(GatewayError):
    """The forward proxy could not be used: unreachable, refused the credentials or the CONNECT."""


@frozen
class ProxyURL:
    """``http://[user@]host[:port]`` as read from the config or the environment."""

    host: str
    port: int
    username: str = ""
    # Only from the environment (HTTPS_PROXY=http://user:pass@...); the config file refuses one.
    password: str = field(default="", repr=False)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)


def parse_proxy_url(text: str, allow_password: bool = False) -> ProxyURL:
    """A proxy URL, or ValueError saying what was expected (never echoing a password)."""
    if "://" not in text:
        text = "http://" + text   # HTTPS_PROXY=proxy:3128 is common; curl reads it as http
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"an http://HOST:PORT proxy URL ({e})") from None
    if parts.scheme.lower() != "http":
        raise ValueError(f"an http:// proxy URL (the connector speaks CONNECT to the proxy in plain HTTP;"
                         f" TLS runs inside the tunnel), not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("an http://HOST:PORT proxy URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("an http://HOST:PORT proxy URL without a path, query or fragment")
    if parts.password is not None and not allow_password:
        raise ValueError("a proxy URL without a password (put the user in the URL, http://USER@HOST:PORT, and"
                         " the password in proxy_password_file, so it stays out of the config)")
    return ProxyURL(host=parts.hostname, port=port or 3128, username=unquote(parts.username or ""),
                    password=unquote(parts.password or ""))


def bypassed(no_proxy: str, host: str, port: int) -> bool:
    """Whether a ``NO_PROXY`` list (as curl and Go read it) names ``host:port``."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.count(":") == 1 or entry.startswith("["):
            name, _, entry_port = entry.rpartition(":")
            if not entry_port.isdigit():
                name, entry_port = entry, None
        if entry_port is not None and int(entry_port) != port:
            continue
        name = name.strip("[]").rstrip(".")
        if _in_network(host, name):
            return True
        domain = name.lstrip("*").lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def _in_network(host: str, entry: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


@frozen
class ProxySettings:
    """The proxy the connector dials the service through, and where that choice came from."""

    url: ProxyURL
    source: str                      # "[connector] proxy" or "HTTPS_PROXY"
    password_file: Path | None = None

    @property
    def address(self) -> str:
        return self.url.address

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) for Basic auth, the password read now (it may have been rotated)."""
        if not self.url.username:
            return None
        if self.password_file is None:
            return self.url.username, self.url.password
        return self.url.username, read_password_file(self.password_file)


def read_password_file(path: Path) -> str:
    """The first line of a proxy password file; ProxyError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as e:
        raise ProxyError(f"cannot read the proxy password file {path}: {e.strerror}; check that it exists"
                         " and that the connector's user may read it") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise ProxyError(f"the proxy password file {path} is larger than {MAX_PASSWORD_FILE} bytes;"
                         " it should hold the password on one line")
    password = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not password:
        raise ProxyError(f"the proxy password file {path} is empty; write the proxy password in it")
    return password


def choose_proxy(configured: str | None, password_file: Path | None, host: str, port: int,
                 environ: Mapping[str, str] | None = None, source: str = "[connector] proxy",
                 ) -> ProxySettings | None:
    """The proxy to reach ``host:port`` through, or None to dial it directly.

    ``configured`` is the config's (or a command's --proxy) value: None to follow the
    environment, ``""`` for no proxy. ProxyError for an unusable environment value or an
    unreadable password file, so a connector fails at start rather than at each retry.
    """
    environ = os.environ if environ is None else environ
    if configured is None:
        name, value = _first(environ, ENVIRONMENT_PROXY)
        if not value:
            return None
        if bypassed(_first(environ, ENVIRONMENT_NO_PROXY)[1] or "", host, port):
            return None
        try:
            url = parse_proxy_url(value, allow_password=True)
        except ValueError as e:
            raise ProxyError(f"the environment's {name} is not a usable proxy: expected {e}") from None
        settings = ProxySettings(url=url, source=name, password_file=password_file)
    elif not configured:
        return None
    else:
        try:
            url = parse_proxy_url(configured)
        except ValueError as e:
            raise ProxyError(f"{source}: expected {e}") from None
        settings = ProxySettings(url=url, source=source, password_file=password_file)
    if password_file is not None and not settings.url.username:
        raise ProxyError(f"a proxy password file is set but the proxy URL ({settings.source}) names no user:"
                         " write it as http://USER@HOST:PORT")
    settings.credentials()   # the password file must be readable now, not at the first retry
    return settings


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    for name in names:
        if environ.get(name):
            return name, environ[name]
    return names[-1], ""


# -- the CONNECT exchange ------------------------------------------------------------------


def connect_request(host: str, port: int, credentials: tuple[str, str] | None) -> bytes:
    """The CONNECT request head asking the proxy for a tunnel to ``host:port``; ProxyError for
    a host that is not a DNS name or an address (it would end up in the request line)."""
    if not _TARGET_HOST.fullmatch(host) or not 0 < port < 65536:
        raise ProxyError(f"cannot ask a proxy for {host!r}:{port}: the service's host must be a DNS name or an"
                         " IP address (check service_host in connection.toml)")
    target = host_port(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", f"User-Agent: gateway-connector/{__version__}"]
    if credentials is not None:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_problem(head: bytes, proxy: ProxySettings, target: str) -> str | None:
    """None if the proxy's answer head opens the tunnel (2xx), else what went wrong and what to do."""
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return (f"the proxy at {proxy.address} did not answer CONNECT in HTTP ({status_line[:80]!r}):"
                f" check that {proxy.source} names an HTTP proxy")
    status = int(parts[1])
    if 200 <= status < 300:
        return None
    where = f"the proxy at {proxy.address} ({proxy.source})"
    if status in (401, 407):   # 407 is the standard answer; tinyproxy, among others, sends 401
        if not proxy.url.username:
            return (f"{where} asks for credentials ({status_line[:80]!r}): name the user in the proxy URL"
                    " (http://USER@HOST:PORT) and put its password in proxy_password_file")
        return (f"{where} refused the credentials of user {proxy.url.username!r} ({status_line[:80]!r}):"
                f" check the password in {proxy.password_file or 'the proxy URL'} and the user's rights on"
                " the proxy")
    if status == 403:
        return (f"{where} refused to open a tunnel to the service at {target} (403 Forbidden): ask the"
                f" proxy's admin to allow CONNECT to {target}")
    return f"{where} answered CONNECT to {target} with {status_line[:120]!r}"


class _ConnectProtocol(Protocol):
    """Speaks CONNECT on the proxy connection, then passes every byte to the protocol it hands the tunnel to."""

    def __init__(self, endpoint: ConnectEndpoint, factory: Any, done: Deferred) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.done = done
        self.wrapped: Any = None
        self._head = b""
        self._timeout: Any = None

    def connectionMade(self) -> None:
        ep = self.endpoint
        try:
            request = connect_request(ep.host, ep.port, ep.proxy.credentials())
        except ProxyError as e:
            self._fail(str(e))
            return
        self._timeout = ep.reactor.callLater(ep.timeout, self._too_slow)
        self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self.done.called:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_ANSWER_HEAD:
                self._fail(f"the proxy at {self.endpoint.proxy.address} sent more than {MAX_ANSWER_HEAD} bytes"
                           " without ending its answer to CONNECT")
            return
        head, rest = self._head[:end], self._head[end + 4:]
        self._head = b""
        problem = answer_problem(head, self.endpoint.proxy, self.endpoint.target)
        if problem is not None:
            self._fail(problem)
            return
        self._cancel_timeout()
        self.wrapped = self.factory.buildProtocol(self.transport.getPeer())
        if self.wrapped is None:
            self.transport.loseConnection()
            self.done.errback(ProxyError("the connection was refused by its own factory"))
            return
        self.wrapped.makeConnection(self.transport)
        self.done.callback(self.wrapped)
        if rest:
            self.wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancel_timeout()
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self.done.called:
            self.done.errback(ProxyError(
                f"the proxy at {self.endpoint.proxy.address} closed the connection before answering CONNECT"
                f" ({describe_failure(reason)})"))

    def _too_slow(self) -> None:
        self._fail(f"the proxy at {self.endpoint.proxy.address} did not answer CONNECT to"
                   f" {self.endpoint.target} within {self.endpoint.timeout:g}s")

    def _fail(self, message: str) -> None:
        self._cancel_timeout()
        if not self.done.called:
            self.done.errback(ProxyError(message))
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


class _OneProtocol(Factory):
    """Hands out one prepared protocol, quietly (a connector retrying would log two lines a try)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


@implementer(IStreamClientEndpoint)
@define
class ConnectEndpoint:
    """Connects to ``host:port`` through ``proxy`` with an HTTP CONNECT tunnel.

    The Deferred fires with the caller's protocol once the proxy said 2xx; it fails with
    ProxyError naming the proxy (unreachable, 407, 403, no answer within ``timeout``).
    """

    reactor: Any
    proxy: ProxySettings
    host: str
    port: int
    timeout: float = CONNECT_TIMEOUT
    connect_timeout: float = 10.0

    @property
    def target(self) -> str:
        return host_port(self.host, self.port)

    def connect(self, factory: Any) -> Deferred:
        pending: dict[str, Any] = {}

        def cancel(d: Deferred) -> None:
            proto = pending.get("proto")
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            elif "dial" in pending:
                pending["dial"].cancel()

        done: Deferred = Deferred(cancel)
        proto = _ConnectProtocol(self, factory, done)
        pending["proto"] = proto
        inner = HostnameEndpoint(self.reactor, self.proxy.url.host, self.proxy.url.port,
                                 timeout=self.connect_timeout)
        dial = inner.connect(_OneProtocol(proto))
        pending["dial"] = dial

        def unreachable(failure: Failure) -> None:
            if not done.called:
                done.errback(ProxyError(f"could not reach the proxy at {self.proxy.address} ({self.proxy.source}):"
                                        f" {describe_failure(failure)}"))

        dial.addErrback(unreachable)
        return done


def service_endpoint(reactor: Any, host: str, port: int, proxy: ProxySettings | None,
                     timeout: float = 10.0) -> Any:
    """The endpoint reaching the service's tunnel port: direct, or through ``proxy``."""
    if proxy is None:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return ConnectEndpoint(reactor, proxy, host, port, connect_timeout=timeout)


# -- a certificate the pinned CA did not issue -----------------------------------------------


def _name(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else name.rfc4514_string() or "(no name)"


def untrusted_certificate(leaf: x509.Certificate | None, proxy: ProxySettings | None,
                          service: str) -> tuple[str, str]:
    """(what happened, what to do) when the certificate presented for ``service`` does not chain
    to the pinned CA: through a proxy, the proxy is named as the one that replaced it."""
    seen = (f"a certificate for {_name(leaf.subject)!r} issued by {_name(leaf.issuer)!r}"
            if leaf is not None else "a certificate")
    if proxy is not None:
        return (f"the proxy at {proxy.address} replaced the service's certificate (it presented {seen}, which the"
                " service's CA did not issue: the proxy inspects TLS)",
                f"add an exception for the service's host {service} to the proxy's TLS inspection so it passes"
                " the connection through untouched")
    return (f"the service at {service} presented {seen}, which the pinned CA did not issue: something between"
            " this machine and the service replaces certificates (a TLS-inspecting firewall), the address leads"
            " to another service, or the service's CA was replaced",
            "let the connection through untouched, check service_host and service_port in connection.toml, or"
            " register again with a new token if the service has a new CA")


def untrusted_certificate_message(leaf: x509.Certificate | None, proxy: ProxySettings | None,
                                  service: str) -> str:
    """:func:`untrusted_certificate` as one sentence, for a log line or an error."""
    what, fix = untrusted_certificate(leaf, proxy, service)
    return f"{what}; {fix}"


def chains_to(leaf: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``leaf`` was issued by ``ca_cert`` (our CA issues node certificates directly)."""
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except Exception:  # InvalidSignature has no message; ValueError/TypeError for other issuers or key types
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
@define
class UntrustedPeerRecorder:
    """Wraps client TLS options: when the handshake refuses the peer's certificate chain, calls
    ``on_untrusted(leaf)`` with the certificate it presented, so the refusal can name it.

    The verification result is OpenSSL's as before: the callback returns what OpenSSL decided.
    """

    inner: Any
    on_untrusted: Callable[[x509.Certificate | None], None]

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = self.inner.clientConnectionForTLS(tls_protocol)
        mode = connection.get_context().get_verify_mode()
        reported = []

        def verify(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if not ok and not reported:
                reported.append(True)
                chain = conn.get_peer_cert_chain() or [cert]
                try:
                    self.on_untrusted(chain[0].to_cryptography())
                except Exception:  # noqa: BLE001 - a report must never change the TLS decision
                    pass
            return bool(ok)

        connection.set_verify(mode or SSL.VERIFY_PEER, verify)
        return connection

"""The connector's keep-alive connections to web-app back ends, and how it dials new ones.

A back-end connection serves one request at a time. ``backend.py`` takes one from the pool
for a stream, gives it back when the response ended cleanly and the connection can carry
another, and closes it otherwise. Idle connections are bounded per app and back end
(``options.backend_max_idle``) and in time (``options.backend_idle_timeout``); one that the
back end closes or speaks on while idle leaves the pool at once.

A connection belongs to its **owner**, and only a stream of the same owner reuses it: the app
(two apps on one back end never share a connection, since a back end may tell them apart by
what a connection has said before), and, where the back end authenticates per connection (an
app with ``options.sso``, or ``options.backend_connection_per_user``), the signed-in user too.
A per-user app's request with nobody signed in has no owner: its connection serves that stream
(one client connection) and is closed after it, never pooled.

Back-end TLS (``https`` internal URLs) verifies the certificate against the system roots or
``options.backend_ca_file`` and the internal host name, TLS 1.2 or newer. A connection counts
as usable only once the handshake is done, so a certificate problem is a dial failure that
names the problem, and the service can try another connector.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from attrs import define, field, frozen
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.tunnel.splice import QuietFactory, dial_endpoint, tune_socket

from .rules import DEFAULT_PORTS, Origin

log = Logger(namespace="gateway_http.pool")

# Idle connections kept per back end: enough for the concurrency a busy app sees, so a burst of
# requests does not dial anew (bench: 32 held c200 at 1.8k req/s, 256 let it reach 4k).
DEFAULT_MAX_IDLE = 256
DEFAULT_IDLE_TIMEOUT = 30.0

# The usual reasons OpenSSL gives for refusing a chain (X509_V_ERR_*), said the way it says them.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


class BackendConfigError(GatewayError):
    """An app's back-end options are wrong on this connector (unreadable CA file, bad value)."""


@frozen
class Target:
    """Where and how to reach one app's back end; ``key`` says which connections are alike."""

    scheme: str
    host: str
    port: int
    connect_timeout: float
    ca_file: str = ""
    verify: bool = True
    max_idle: int = DEFAULT_MAX_IDLE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    per_user: bool = False

    @property
    def key(self) -> tuple:
        return (self.scheme, self.host, self.port, self.ca_file, self.verify)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def address(self) -> str:
        return Origin(self.scheme, self.host, self.port).url

    @classmethod
    def from_app(cls, app: Any) -> Target:
        """The back end of ``app``: scheme from internal_url (http when there is none), host and
        port as the core checked them, TLS and pool settings from the app's options."""
        options = app.options or {}
        scheme = "http"
        if getattr(app, "internal_url", ""):
            scheme = app.internal_url.split(":", 1)[0].lower()
            if scheme not in DEFAULT_PORTS:
                raise BackendConfigError(f"app {app.name}: internal_url must be http:// or https://, "
                                         f"got {app.internal_url!r}")
        ca_file = options.get("backend_ca_file", "")
        if not isinstance(ca_file, str):
            raise BackendConfigError(f"app {app.name}: options.backend_ca_file: expected a path to a PEM file, "
                                     f"got {ca_file!r}")
        verify = options.get("backend_tls_verify", True)
        if not isinstance(verify, bool):
            raise BackendConfigError(f"app {app.name}: options.backend_tls_verify: expected true or false, "
                                     f"got {verify!r}")
        max_idle = options.get("backend_max_idle", DEFAULT_MAX_IDLE)
        if isinstance(max_idle, bool) or not isinstance(max_idle, int) or max_idle < 0:
            raise BackendConfigError(f"app {app.name}: options.backend_max_idle: expected a whole number >= 0, "
                                     f"got {max_idle!r}")
        idle_timeout = options.get("backend_idle_timeout", DEFAULT_IDLE_TIMEOUT)
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) or not idle_timeout > 0:
            raise BackendConfigError(f"app {app.name}: options.backend_idle_timeout: expected seconds > 0, "
                                     f"got {idle_timeout!r}")
        sso = bool(options.get("sso"))
        per_user = options.get("backend_connection_per_user", sso)
        if not isinstance(per_user, bool):
            raise BackendConfigError(f"app {app.name}: options.backend_connection_per_user: expected true or false, "
                                     f"got {per_user!r}")
        if sso and not per_user:
            raise BackendConfigError(f"app {app.name}: options.backend_connection_per_user = false cannot apply with "
                                     f"options.sso (a connection signed in as one user is never given to another);"
                                     f" remove it")
        return cls(scheme, app.host, int(app.port), float(app.connect_timeout), ca_file, verify,
                   max_idle, float(idle_timeout), per_user)

    def owner(self, app_name: str, metadata: dict) -> tuple | None:
        """Who may reuse a connection a stream of ``app_name`` used: the app, with per-user
        connections the app and the signed-in user (the identity's subject); None when the
        connection must serve this stream only (per-user, nobody signed in)."""
        if not self.per_user:
            return (app_name,)
        identity = metadata.get("identity")
        subject = identity.get("sub") if isinstance(identity, dict) else None
        if not isinstance(subject, str) or not subject:
            return None
        return (app_name, subject)


def check_options(app: Any) -> None:
    """Raise BackendConfigError for back-end options that cannot work (the CA file is read here)."""
    target = Target.from_app(app)
    if target.tls and target.ca_file:
        _load_trust(target.ca_file)


def _load_trust(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BackendConfigError(f"options.backend_ca_file {path!r} cannot be read: {e.strerror}") from None
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    try:
        certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise BackendConfigError(f"options.backend_ca_file {path!r} holds a certificate that does not load: {e}") \
            from None
    if not certificates:
        raise BackendConfigError(f"options.backend_ca_file {path!r} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS 1.2+ with SNI but without certificate checks (``options.backend_tls_verify = false``)."""

    def __init__(self, hostname: str) -> None:
        self._ctx = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()
        self._sni = None if isIPAddress(hostname) or isIPv6Address(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingTLS:
    """optionsForClientTLS (SNI, TLS 1.2+, trust), with a verify callback that also writes down
    why OpenSSL refused a chain, so the error can name the certificate problem.

    Twisted checks the host name in its own per-connection verify callback; replacing that
    callback means doing the same check here, with service_identity as Twisted does.
    """

    def __init__(self, hostname: str, trust: Any) -> None:
        self._inner = ssl.optionsForClientTLS(
            hostname, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})
        is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._identity = IPAddress_ID(hostname) if is_ip else DNS_ID(hostname)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        identity = self._identity

        def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            wrapped = getattr(tlsProtocol, "wrappedProtocol", None)
            if not ok and isinstance(wrapped, BackendConnection) and wrapped.verify_error is None:
                subject = cert.get_subject().CN if cert is not None else None
                wrapped.verify_error = _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}") + (
                    f" (certificate {subject!r})" if subject else "")
            if depth != 0:
                return bool(ok)
            try:
                verify_service_identity(extract_patterns(cert), [identity], [])
            except Exception:
                # A VerificationError, or anything else: an exception must not escape an
                # OpenSSL callback (it would vanish), so the handshake fails with it instead.
                tlsProtocol.failVerification(Failure())
                return False
            return bool(ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def describe_failure(failure: Failure, target: Target, conn: BackendConnection | None = None) -> str:
    """Why a dial failed, for people: the certificate problem when there was one."""
    if failure.check(VerificationError):
        return (f"the TLS certificate of {target.address} does not match the host name {target.host!r}"
                f" ({failure.value})")
    if failure.check(SSL.Error):
        detail = conn.verify_error if conn is not None else None
        if detail:
            trust = f"the CA in {target.ca_file}" if target.ca_file else "the system's trusted CAs"
            return f"the TLS certificate of {target.address} is not trusted: {detail} (checked against {trust})"
        return f"the TLS handshake with {target.address} failed: {_ssl_error_text(failure.value)}"
    if failure.check(CancelledError, TimeoutError):
        return f"{target.address} did not connect within {target.connect_timeout:g}s"
    return f"{target.address}: {failure.getErrorMessage()}"


def _ssl_error_text(error: SSL.Error) -> str:
    try:
        return "; ".join(part[2] for part in error.args[0]) or repr(error)
    except (IndexError, TypeError):
        return repr(error)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class BackendConnection(Protocol):
    """One socket to a back end. ``user`` gets its events while a request uses it; idle, the pool does."""

    def __init__(self, pool: BackendPool, target: Target, owner: tuple | None) -> None:
        self.pool = pool
        self.target = target
        self.owner = owner    # Target.owner: who may reuse this connection (None: nobody)
        self.ready: Deferred = Deferred()
        self.user: Any = None
        self.reused = False
        self.connected_ok = False
        self.lost = False
        self.verify_error: str | None = None
        self.idle_timer: Any = None

    @property
    def usable(self) -> bool:
        return self.connected_ok and not self.lost and not getattr(self.transport, "disconnecting", False)

    def connectionMade(self) -> None:
        tune_socket(self.transport)
        if not self.target.tls:
            self._ready()

    def handshakeCompleted(self) -> None:
        self._ready()

    def _ready(self) -> None:
        self.connected_ok = True
        if not self.ready.called:
            self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self.user is not None:
            self.user.backend_data(data)
        else:
            # Bytes nobody asked for on an idle connection: its framing can no longer be trusted.
            log.info("idle connection to {address} sent {count} bytes with no request pending; closed",
                     address=self.target.address, count=len(data))
            self.pool.discard(self)

    def readConnectionLost(self) -> None:
        if self.user is not None:
            self.user.backend_read_closed()
        else:
            self.pool.discard(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = True
        reason = reason or Failure(ConnectionDone())
        if not self.ready.called:
            self.ready.errback(reason)
            return
        if self.user is not None:
            self.user.backend_lost(reason)
        else:
            self.pool.forget(self)


def _pool_key(conn: BackendConnection) -> tuple:
    return (conn.target.key, conn.owner)


def _app_key(conn: BackendConnection) -> tuple:
    """The per-user connections of one app to one back end, which share its backend_max_idle."""
    return (conn.target.key, conn.owner[0])


def _per_user(conn: BackendConnection) -> bool:
    return len(conn.owner) > 1


@define
class BackendPool:
    """Idle keep-alive connections per back end (scheme, host, port, TLS settings) and owner
    (the app, and for per-user connections the user)."""

    reactor: Any
    idle: dict[tuple, deque] = field(factory=dict)
    dials: int = 0
    _creators: dict[tuple, tuple[Any, Any]] = field(factory=dict)
    # The idle per-user connections of each app and back end, oldest first: backend_max_idle
    # bounds them all together, however many users there are.
    _per_app: dict[tuple, deque] = field(factory=dict)

    def acquire(self, target: Target, owner: tuple | None) -> Deferred:
        """A connection to ``target`` for ``owner``: the most recently used idle one of that
        owner, else a new one.

        The newest idle connection is the least likely to have been timed out by the back end.
        """
        idle = self.idle.get((target.key, owner)) if owner is not None else None
        while idle:
            conn = self._take(idle)
            if conn.usable:
                conn.reused = True
                return _succeed(conn)
            conn.transport.abortConnection()
        return self.dial(target, owner)

    def _take(self, idle: deque) -> BackendConnection:
        conn = idle.pop()
        if not idle:
            del self.idle[_pool_key(conn)]
        self._unpark(conn)
        if _per_user(conn):
            self._per_app[_app_key(conn)].remove(conn)
        return conn

    def dial(self, target: Target, owner: tuple | None) -> Deferred:
        """A new connection for ``owner``, firing once usable (TLS handshake done) or failing with why not."""
        self.dials += 1
        endpoint = self.endpoint(target)
        conn = BackendConnection(self, target, owner)
        result: Deferred = Deferred()
        connecting = endpoint.connect(QuietFactory.forProtocol(lambda: conn))

        # One deadline for TCP and TLS together: the service waits connect_timeout (plus a grace).
        def too_slow() -> None:
            if not result.called:
                what = "finish the TLS handshake" if conn.transport is not None else "connect"
                result.errback(Failure(GatewayError(
                    f"{target.address} did not {what} within {target.connect_timeout:g}s")))
            if conn.transport is not None and not conn.lost:
                conn.transport.abortConnection()
            connecting.cancel()

        deadline = self.reactor.callLater(target.connect_timeout, too_slow)

        def done(value: Any) -> None:
            if deadline.active():
                deadline.cancel()
            if result.called:
                if isinstance(value, BackendConnection) and not value.lost:
                    value.transport.abortConnection()
                return
            if isinstance(value, Failure):
                result.errback(Failure(GatewayError(describe_failure(value, target, conn))))
            else:
                result.callback(value)

        connecting.addCallbacks(lambda _: conn.ready, lambda f: f)
        connecting.addBoth(done)
        return result

    def endpoint(self, target: Target) -> Any:
        """The client endpoint for a new connection to ``target`` (TLS-wrapped for https)."""
        endpoint: Any = dial_endpoint(self.reactor, target.host, target.port, target.connect_timeout)
        if target.tls:
            endpoint = wrapClientTLS(self._creator(target), endpoint)
        return endpoint

    def _creator(self, target: Target) -> Any:
        """The TLS connection creator for a target, rebuilt when its CA file changes."""
        stamp = None
        if target.ca_file:
            try:
                stamp = os.stat(target.ca_file).st_mtime_ns
            except OSError as e:
                raise BackendConfigError(
                    f"options.backend_ca_file {target.ca_file!r} cannot be read: {e.strerror}") from None
        cached = self._creators.get(target.key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if not target.verify:
            creator: Any = _UnverifiedTLS(target.host)
        else:
            creator = _VerifyingTLS(target.host, _load_trust(target.ca_file) if target.ca_file else None)
        self._creators[target.key] = (stamp, creator)
        return creator

    def release(self, conn: BackendConnection) -> None:
        """Take back a connection that finished a response cleanly; close it if it cannot wait
        (or has no owner to wait for)."""
        conn.user = None
        target = conn.target
        if not conn.usable or target.max_idle == 0 or conn.owner is None:
            self._close(conn)
            return
        if _per_user(conn):
            same_app = self._per_app.setdefault(_app_key(conn), deque())
            if len(same_app) >= target.max_idle:
                self.discard(same_app[0])
            same_app.append(conn)
        else:
            full = self.idle.get(_pool_key(conn))
            if full is not None and len(full) >= target.max_idle:
                self.discard(full[0])
        self.idle.setdefault(_pool_key(conn), deque()).append(conn)
        conn.transport.resumeProducing()  # an idle connection reads, so a close by the back end is seen
        conn.idle_timer = self.reactor.callLater(target.idle_timeout, self.discard, conn)

    def discard(self, conn: BackendConnection) -> None:
        """Drop an idle connection (timed out, or the back end spoke or closed) and close it."""
        self.forget(conn)
        self._close(conn)

    def forget(self, conn: BackendConnection) -> None:
        self._unpark(conn)
        if conn.owner is None:
            return
        for table, key in ((self.idle, _pool_key(conn)), (self._per_app, _app_key(conn) if _per_user(conn) else None)):
            queue = table.get(key)
            if queue is None:
                continue
            try:
                queue.remove(conn)
            except ValueError:
                pass
            if not queue:
                del table[key]

    def _unpark(self, conn: BackendConnection) -> None:
        if conn.idle_timer is not None and conn.idle_timer.active():
            conn.idle_timer.cancel()
        conn.idle_timer = None

    @staticmethod
    def _close(conn: BackendConnection) -> None:
        if not conn.lost and conn.transport is not None:
            conn.transport.loseConnection()

    def idle_count(self, target: Target | None = None) -> int:
        return sum(len(q) for key, q in self.idle.items() if target is None or key[0] == target.key)


def _succeed(value: Any) -> Deferred:
    d: Deferred = Deferred()
    d.callback(value)
    return d

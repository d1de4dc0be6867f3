"""The connector's half of a web app: one stream, one HTTP/1.1 exchange with a pooled back end.

The service sends a request head (already translated) and its body on the stream; this module
takes a keep-alive connection from the pool (``pool.py``), accepts the stream only once that
connection is usable, adds single sign-on headers when the app asks for them, relays the body
and relays the back end's answer verbatim: interim 1xx responses, the final head, the body as
the back end framed it. Heads and framing are parsed only to know where the response ends, so
the connection can go back to the pool; a 101 to an upgrade request turns the exchange into a
plain two-way splice. docs/protocol.md ("Web-app streams") is the contract.

Backpressure: the back-end socket is the stream's producer (a slow tunnel pauses reading from
the back end) and the stream is the socket's producer (a slow back end withholds window credit
from the service). Buffers are bounded: a head is at most rules.MAX_HEAD; bytes that arrive
while SSO credentials are fetched are bounded by the stream window, which is not extended
while the stream is paused.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import logs
from gateway.oplogs import session as sessionlog
from gateway.errors import GatewayError
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import is_reset

from . import rules
from .pool import BackendConfigError, BackendConnection, BackendPool, Target
from .rules import ChunkDecoder, HTTPError

log = Logger(namespace="gateway_http.backend")

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# What the user reads when single sign-on fails: nothing of the provider's internals (the
# connector's log has the cause and the fix under the same correlation id).
SSO_FAILED = "Single sign-on to the application failed. Try again later, or give the correlation id to your helpdesk."
MAX_SSO_RETRIES = 2   # a request sent again for an SSO provider's on_response (a 401 challenge, stale credentials)


class Backends:
    """Everything the connector keeps for web apps: the back-end pool and the SSO providers."""

    def __init__(self, reactor: Any, sso_providers: dict[str, Any] | None = None) -> None:
        self.reactor = reactor
        self.pool = BackendPool(reactor)
        self.sso_providers: dict[str, Any] = sso_providers if sso_providers is not None else {}
        self._warned_unverified: set[str] = set()

    def serve(self, stream: Any, app: Any) -> None:
        request_id = stream.metadata.get("request_id")
        try:
            target = Target.from_app(app)
            provider = self._provider(app, stream.metadata)
        except BackendConfigError as e:
            log.error("request {request_id} for app {app}: {reason}", request_id=request_id, app=app.name,
                      reason=str(e))
            stream.reset(ResetCode.CONNECT_FAILED, f"connector: {e}")
            return
        if target.tls and not target.verify and app.name not in self._warned_unverified:
            self._warned_unverified.add(app.name)
            log.warn("app {app}: options.backend_tls_verify is false: the certificate of {address} is not"
                     " checked, so anyone on the path to it can read and change this app's traffic",
                     app=app.name, address=target.address)
        exchange = Exchange(self, stream, app, target, provider)
        try:
            dialing = self.pool.acquire(target, exchange.owner)
        except BackendConfigError as e:
            exchange.refuse(str(e))
            return
        dialing.addCallbacks(exchange.connected, lambda f: exchange.refuse(f.getErrorMessage()))

    def _provider(self, app: Any, metadata: dict) -> Any:
        """The SSO provider ``app`` asks for (None if none), refusing what cannot work before dialing."""
        name = (app.options or {}).get("sso")
        if not name:
            return None
        provider = self.sso_providers.get(name)
        if provider is None:
            known = ", ".join(sorted(self.sso_providers)) or "none"
            raise BackendConfigError(f"app {app.name}: options.sso names the SSO provider {name!r}, which no plugin"
                                     f" on this connector provides (loaded: {known})")
        if not isinstance(metadata.get("identity"), dict):
            raise BackendConfigError(f"app {app.name} signs users in to its back end with SSO provider {name!r},"
                                     " but the request carries no signed-in user: give the app oidc pre-authentication")
        return provider


def check_sso(app: Any, providers: dict[str, Any]) -> str | None:
    """A sentence saying why ``app``'s options.sso cannot work on this connector, or None."""
    name = (app.options or {}).get("sso")
    if not name:
        return None
    if not isinstance(name, str):
        return f"app {app.name}: options.sso: expected the name of an SSO provider, got {name!r}"
    if name not in providers:
        known = ", ".join(sorted(providers)) or "none"
        return (f"app {app.name}: options.sso names the SSO provider {name!r}, which no plugin on this connector"
                f" provides (loaded: {known}); its requests will fail with 502")
    check_app = getattr(providers[name], "check_app", None)
    return check_app(app) if check_app is not None else None


def serve_stream(stream: Any, app: Any, reactor: Any, backends: Backends | None = None) -> None:
    """Serve one web-app stream (a throwaway pool when the caller keeps none)."""
    (backends or Backends(reactor)).serve(stream, app)


@implementer(IHalfCloseableProtocol)
class Exchange(Protocol):
    """The protocol on one web-app stream: its requests to the back end, one after the other,
    and the answers back (one client connection's keep-alive requests share a stream)."""

    def __init__(self, backends: Backends, stream: Any, app: Any, target: Target, provider: Any) -> None:
        self.backends = backends
        self.stream = stream
        self.app = app
        self.target = target
        self.provider = provider
        self.request_id = stream.metadata.get("request_id")
        self.owner = target.owner(app.name, stream.metadata)   # who may reuse its back-end connections
        self.conn: BackendConnection | None = None
        self._next_exchange()
        self._sso_call: Any = None
        self._holds: set[str] = set()

    def _next_exchange(self) -> None:
        """Ready for a (next) request on this stream."""
        # request (service -> back end): head, wait (SSO credentials, a connection), body, sent
        self.phase = "head"
        self.req_buf = b""
        self.request: rules.Request | None = None
        self.upgrade = False
        self.body_length: int | None = 0
        self.req_left = 0
        self.req_decoder: ChunkDecoder | None = None
        self.held: list[bytes] = []
        self.head_bytes = b""
        self.extra_sent = False
        # response (back end -> service): head, body, tunnel, done
        self.resp = "head"
        self.resp_buf = b""
        self.resp_status = 0
        self.resp_framing: int | None = 0
        self.resp_left = 0
        self.resp_decoder: ChunkDecoder | None = None
        self.resp_keep_alive = False
        self.relayed = False
        self.retried = False
        self.over = False
        self.sso_sent: Any = None      # what the SSO provider's credentials() gave for this request
        self.sso_retries = 0

    # -- getting a connection ------------------------------------------------------------

    def connected(self, conn: BackendConnection) -> None:
        if self.stream.closed:
            # The service gave up waiting; the connection is untouched and can serve another.
            self.backends.pool.release(conn)
            return
        self._use(conn)
        self.stream.attach(self)
        self.stream.accept()

    def refuse(self, why: str) -> None:
        reason = f"connector could not connect to {self.app.destination}: {why}"
        log.warn("request {request_id} for app {app}: {reason}", request_id=self.request_id, app=self.app.name,
                 reason=reason)
        self.stream.reset(ResetCode.CONNECT_FAILED, reason)

    def _use(self, conn: BackendConnection) -> None:
        self.conn = conn
        conn.user = self
        # Each side paces the other: a full socket pauses the stream, a full stream the socket.
        conn.transport.registerProducer(_StreamReader(self), True)
        self.stream.registerProducer(conn.transport, True)

    def _hold(self, why: str) -> None:
        """Stop reading the stream (withholding window credit) while ``why`` lasts."""
        if not self._holds:
            self.stream.pauseProducing()
        self._holds.add(why)

    def _release(self, why: str) -> None:
        if why in self._holds:
            self._holds.discard(why)
            if not self._holds and not self.stream.closed:
                self.stream.resumeProducing()

    def _let_go(self) -> BackendConnection | None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.user = None
            if not conn.lost:
                conn.transport.unregisterProducer()
                conn.transport.resumeProducing()
            self.stream.unregisterProducer()
        self._release("backend")
        return conn

    # -- the stream (service -> back end) ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return  # the response already ended: the rest of the request has nowhere to go
        if self.phase == "head":
            self.req_buf += data
            end = self.req_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.req_buf) > rules.MAX_HEAD:
                    self._fail(ResetCode.INTERNAL_ERROR, "the request head from the service is larger than"
                               f" {rules.MAX_HEAD} bytes")
                return
            head, rest = self.req_buf[:end], self.req_buf[end + 4:]
            self.req_buf = b""
            self._request_head(head, rest)
        elif self.phase == "wait":
            self.held.append(data)
        elif self.phase == "body":
            self._request_body(data)
        else:
            self._after_request(data)

    def _request_head(self, head: bytes, rest: bytes) -> None:
        try:
            request = rules.parse_request_head(head)
            self.body_length = rules.request_body_length(request)
        except HTTPError as e:
            self._fail(ResetCode.INTERNAL_ERROR, f"the service sent a bad request head: {e.message} ({e.status})")
            return
        # Names are looked up in the parsed head's index (lower-case, built once), not by
        # lowering every field again: this runs for every request.
        ids = rules.values(request, rules.REQUEST_ID_HEADER)
        if ids:
            self.request_id = ids[-1].decode("latin-1")   # this request's, when the stream carries several
        connection = {t.strip().lower() for v in rules.values(request, b"connection") for t in v.split(b",")}
        self.upgrade = b"upgrade" in connection and bool(rules.values(request, b"upgrade"))
        if b"connection" in request.index or (not self.upgrade and b"upgrade" in request.index):
            # Older services send Connection: close; back-end connections are ours to keep alive.
            headers = [(k, v) for name, (k, v) in zip(request.names, request.headers)
                       if name != b"connection" and (self.upgrade or name != b"upgrade")]
            if self.upgrade:
                headers.append((b"Connection", b"Upgrade"))
            request = rules.Request(request.method, request.target, request.version, headers)
        self.request = request
        if self.body_length is None:
            self.req_decoder = ChunkDecoder(400)
        else:
            self.req_left = self.body_length
        self.held = [rest] if rest else []
        self._send_head()

    def _send_head(self) -> None:
        """Get SSO credentials when the app uses a provider, then a connection, then write the head."""
        self.phase = "wait"
        self._hold("request")
        if self.provider is None:
            self._credentials([])
            return
        identity = self.stream.metadata.get("identity")
        self._sso_call = maybeDeferred(self.provider.credentials, self.app, identity, self.request)
        self._sso_call.addCallbacks(self._credentials, self._sso_failed)

    def _sso_failed(self, failure: Failure) -> None:
        """The provider could not sign the user in: a 502 page with the correlation id (the provider
        logs cause and fix itself when its error is a GatewayError)."""
        self._sso_call = None
        if self.stream.closed or self.over:
            return
        provider = self.app.options.get("sso")
        if failure.check(GatewayError):
            log.warn("request {request_id} for app {app}: SSO provider {provider} failed: {why}",
                     request_id=self.request_id, app=self.app.name, provider=provider, why=failure.getErrorMessage())
        else:
            log.failure("request {request_id} for app {app}: SSO provider {provider} failed", failure,
                        request_id=self.request_id, app=self.app.name, provider=provider)
        self._answer(502, SSO_FAILED)

    def _answer(self, status: int, message: str) -> None:
        """End the exchange with an error page of our own (nothing of the back end's was relayed)."""
        self.over = True
        conn = self._let_go()
        if conn is not None and not conn.lost:
            conn.transport.abortConnection()
        if self.stream.closed:
            return
        self._holds.clear()
        self.stream.resumeProducing()   # whatever still comes is dropped; let it flow so the stream ends
        self.stream.write(rules.error_page(status, message, self.request_id or "-"))
        self.stream.loseConnection()

    def _credentials(self, credentials: list) -> None:
        self._sso_call = None
        if self.stream.closed or self.over:
            return
        request = self.request
        if self.provider is None:
            headers = request.headers   # nothing to strip or add (and nothing to copy)
        else:
            strip = {name.lower() for name in getattr(self.provider, "strip_headers", ())}
            try:
                headers = _with_credentials(
                    [(k, v) for name, (k, v) in zip(request.names, request.headers) if name not in strip],
                    credentials)
            except ValueError as e:
                self._fail(ResetCode.INTERNAL_ERROR, f"SSO provider {self.app.options.get('sso')!r}: {e}")
                return
        self.sso_sent = credentials
        self.head_bytes = rules.head_bytes(b" ".join((request.method, request.target, request.version)), headers)
        if self.conn is not None and self.conn.usable:
            self._write_request()
        else:
            # The pooled connection closed while we waited for the head: dial a new one.
            stale = self._let_go()
            if stale is not None and not stale.lost:
                stale.transport.abortConnection()
            self.backends.pool.dial(self.target, self.owner).addCallbacks(self._redialed, self._redial_failed)

    def _redialed(self, conn: BackendConnection) -> None:
        if self.stream.closed or self.over:
            self.backends.pool.release(conn)
            return
        self._use(conn)
        self._write_request()

    def _redial_failed(self, failure: Failure) -> None:
        if not self.stream.closed and not self.over:
            self._broken(f"could not connect again to {self.target.address}: {failure.getErrorMessage()}")

    def _write_request(self) -> None:
        self.conn.transport.write(self.head_bytes)
        self.phase = "body"
        held, self.held = self.held, []
        if self.body_length == 0 and self.req_decoder is None:
            self._request_sent()
        for data in held:
            self.dataReceived(data)
        self._release("request")

    def _request_body(self, data: bytes) -> None:
        if self.req_decoder is not None:
            try:
                _, rest = self.req_decoder.feed(data)
            except HTTPError as e:
                self._fail(ResetCode.INTERNAL_ERROR, f"the service sent a badly chunked request body: {e.message}")
                return
            used = len(data) - len(rest)
            self._to_backend(data[:used])
            if self.req_decoder.done:
                self._request_sent()
                if rest:
                    self._after_request(rest)
        else:
            n = min(self.req_left, len(data))
            self._to_backend(data[:n] if n < len(data) else data)
            self.req_left -= n
            if self.req_left == 0:
                self._request_sent()
                if n < len(data):
                    self._after_request(data[n:])

    def _request_sent(self) -> None:
        self.phase = "sent"

    def _after_request(self, data: bytes) -> None:
        if self.resp == "tunnel" or self.upgrade:
            # Bytes for the upgraded protocol; if the back end refuses the upgrade they taint
            # the connection, which then is not pooled.
            self.extra_sent = True
            self._to_backend(data)
            return
        self._fail(ResetCode.INTERNAL_ERROR, "the service sent bytes after the end of the request")

    def _to_backend(self, data: bytes) -> None:
        if data and self.conn is not None and not self.conn.lost:
            self.conn.transport.write(data)

    def readConnectionLost(self) -> None:
        """The service sends nothing more on this stream."""
        if self.resp == "tunnel":
            self._half_close_backend()
            return
        if self.over:
            return
        if self.phase == "head" and not self.req_buf:
            # Nothing was asked: the connection is as good as new.
            conn = self._let_go()
            if conn is not None:
                self.backends.pool.release(conn)
            self.over = True
            self.stream.loseConnection()
            return
        if self.phase != "sent":
            self._fail(ResetCode.CANCELLED, "the service ended the stream in the middle of the request")

    def writeConnectionLost(self) -> None:
        pass

    def tunnel_draining(self) -> None:
        """The connector drains (GO_AWAY sent): a stream between requests takes no next one.

        Held open it would hold the drain until drain_timeout. It is reset with GOING_AWAY,
        which promises the service that no request on it was forwarded (a request head may
        be on its way: it is dropped), so the front door can send that request elsewhere.
        """
        if self.phase != "head" or self.over or self.stream.closed:
            return
        self.over = True
        self.phase = "drained"
        conn = self._let_go()
        if conn is not None:
            self.backends.pool.release(conn)
        self.stream.reset(ResetCode.GOING_AWAY, "the connector is draining: no request on this stream was"
                                                " forwarded to the back end")

    def connectionLost(self, reason: Failure = None) -> None:
        """The stream ended: cleanly after the exchange, or reset (client gone, service timeout)."""
        if self._sso_call is not None:
            call, self._sso_call = self._sso_call, None
            call.cancel()
        clean = reason is None or reason.check(ConnectionDone)
        if self.phase == "drained":
            return   # our own reset (tunnel_draining): nothing was in flight
        if self.resp == "tunnel" and clean:
            conn = self._let_go()
            if conn is not None and not conn.lost:
                conn.transport.loseConnection()
            return
        if self.over and clean:
            return
        self.over = True
        conn = self._let_go()
        if conn is not None and not conn.lost:
            conn.transport.abortConnection()
        if reason is not None and is_reset(reason):
            log.info("request {request_id} for app {app}: the service reset the stream ({reason});"
                     " back-end connection aborted", request_id=self.request_id, app=self.app.name,
                     reason=reason.getErrorMessage())

    # -- the back end (back end -> service) ----------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self.resp == "tunnel":
            self.stream.write(data)
            return
        if self.phase in ("head", "wait"):
            self._stray_bytes(len(data))
            return
        try:
            while data and self.resp == "head":
                data = self._response_head(data)
            if data and self.resp == "body":
                self._response_body(data)
        except HTTPError as e:
            self._broken(e.message)

    def _response_head(self, data: bytes) -> bytes:
        """Buffer and relay one head; return the bytes after it."""
        self.resp_buf += data
        end = self.resp_buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.resp_buf) > rules.MAX_HEAD:
                raise HTTPError(502, f"the back end's response head is larger than {rules.MAX_HEAD} bytes")
            if rules.bare_lf(self.resp_buf):
                raise HTTPError(502, "the back end's response head has a line ending in LF alone (not CRLF)")
            return b""
        head, rest = self.resp_buf[:end + 4], self.resp_buf[end + 4:]
        self.resp_buf = b""
        response = rules.parse_response_head(head[:-4])
        if response.status == 101:
            if not self.upgrade:
                raise HTTPError(502, "the back end switched protocols without an upgrade request")
            self._relay(head)
            self.resp = "tunnel"
            if rest:
                self.stream.write(rest)
            return b""
        if 100 <= response.status < 200:
            self._relay(head)  # 100 Continue and friends reach the client; another head follows
            return rest
        if self._sso_response(response):
            return b""
        self.resp_status = response.status
        self.resp_framing = rules.response_body_length(response, self.request.method)
        connection = {t.strip().lower() for v in rules.values(response, b"connection") for t in v.split(b",")}
        self.resp_keep_alive = response.version == b"HTTP/1.1" and b"close" not in connection
        self._relay(head)
        self.resp = "body"
        if self.resp_framing is None:
            self.resp_decoder = ChunkDecoder(502)
        elif self.resp_framing == 0:
            self._response_done(rest)
            return b""
        else:
            self.resp_left = self.resp_framing
        return rest

    def _sso_response(self, response: rules.Response) -> bool:
        """Let the SSO provider judge the final response head before any of it is relayed (its
        optional on_response): True when the exchange went another way (sent again, or a 502)."""
        judge = getattr(self.provider, "on_response", None)
        if judge is None or self.sso_sent is None:
            return False
        identity = self.stream.metadata.get("identity")
        try:
            again = judge(self.app, identity, self.request, self.sso_sent, response)
        except Exception:
            self._sso_failed(Failure())
            return True
        if again is None:
            return False
        if self.sso_retries >= MAX_SSO_RETRIES or self.body_length != 0 or self.req_decoder is not None:
            log.warn("request {request_id} for app {app}: the SSO provider asked to send the request again,"
                     " which a request with a body, or a third time, cannot be", request_id=self.request_id,
                     app=self.app.name)
            self._answer(502, SSO_FAILED)
            return True
        # Sent again on a new connection: the rest of this answer (its body) goes with the old one.
        self.sso_retries += 1
        conn = self._let_go()
        if conn is not None and not conn.lost:
            conn.transport.abortConnection()
        self.resp, self.resp_buf, self.sso_sent = "head", b"", None
        self.phase = "wait"
        self._hold("request")
        self._sso_call = maybeDeferred(lambda: again)
        self._sso_call.addCallbacks(self._credentials, self._sso_failed)
        return True

    def _response_body(self, data: bytes) -> None:
        if self.resp_framing == -1:
            self._relay(data)
        elif self.resp_decoder is not None:
            _, rest = self.resp_decoder.feed(data)
            self._relay(data[:len(data) - len(rest)])
            if self.resp_decoder.done:
                self._response_done(rest)
        else:
            n = min(self.resp_left, len(data))
            self._relay(data[:n] if n < len(data) else data)
            self.resp_left -= n
            if self.resp_left == 0:
                self._response_done(data[n:])

    def _relay(self, data: bytes) -> None:
        if data:
            self.relayed = True
            self.stream.write(data)

    def _response_done(self, extra: bytes) -> None:
        self.resp = "done"
        self.over = True
        if logs.enabled(LogLevel.info):   # the connector's access line; not even built when dropped
            log.info("request {request_id} {method} {target} for app {app} to {address}: {status}",
                     request_id=self.request_id, method=self.request.method.decode("latin-1"),
                     target=self.request.target.decode("latin-1")[:200], app=self.app.name,
                     address=self.target.address, status=self.resp_status)
        session_log = sessionlog.current
        if session_log is not None and session_log.on[sessionlog.CONNECTOR]:
            meta = self.stream.metadata
            sessionlog.http_request(sessionlog.CONNECTOR, request_id=self.request_id, method=self.request.method,
                                    target=self.request.target, status=self.resp_status, app=self.app.name,
                                    user=meta.get("user"), backend=self.target.address)
        reusable = (self.phase == "sent" and self.resp_keep_alive and not extra and not self.extra_sent
                    and self.request.version == b"HTTP/1.1")
        if (self.phase == "sent" and not self.stream.closed and not self.stream.disconnecting
                and not _draining(self.stream)):
            # The stream may carry the client connection's next request: keep a reusable back-end
            # connection paired with it (no pool round trip), else dial when that request comes.
            # (Not while the connector drains: the service, told by the GO_AWAY that went before
            # this response's end, sends no next request here.)
            if not reusable:
                conn = self._let_go()
                if conn is not None and not conn.lost:
                    conn.transport.loseConnection()
            self._next_exchange()
            self._release("request")
            return
        conn = self._let_go()
        self._holds.clear()
        self.stream.resumeProducing()  # whatever still comes is dropped; let it flow so the stream ends
        self.stream.loseConnection()
        if conn is None:
            return
        if reusable:
            self.backends.pool.release(conn)
        elif not conn.lost:
            conn.transport.loseConnection()

    def _stray_bytes(self, count: int) -> None:
        """The back end spoke with no request of ours pending (a body longer than its framing said,
        Node's 408 after idling): its framing can no longer be trusted, so the connection goes and
        the stream's next request gets a new one."""
        conn = self._let_go()
        log.info("app {app}: {address} sent {count} bytes with no request pending; closed that connection",
                 app=self.app.name, address=self.target.address, count=count)
        if conn is not None and not conn.lost:
            conn.transport.abortConnection()

    def backend_read_closed(self) -> None:
        if self.resp == "tunnel":
            self.stream.loseWriteConnection()
        elif self.conn is not None:
            self.conn.transport.loseConnection()  # HTTP has no half-close: treat it as the end

    def backend_lost(self, reason: Failure) -> None:
        conn = self._let_go()
        if self.over and self.resp != "tunnel":
            return
        clean = reason.check(ConnectionDone) is not None
        if self.resp == "tunnel":
            if self.stream.closed:
                return
            if clean:
                self.stream.loseConnection()
            else:
                self.stream.reset(ResetCode.CANCELLED, f"the back end {self.target.address} reset the connection:"
                                  f" {reason.getErrorMessage()}")
            return
        if self.resp == "body" and self.resp_framing == -1 and clean:
            self.resp = "done"  # a body framed by the end of the connection
            self.over = True
            self._holds.clear()
            self.stream.resumeProducing()
            self.stream.loseConnection()
            return
        if self.phase in ("head", "wait"):
            return  # nothing sent yet: a fresh connection is dialed when the head is ready
        if (not self.relayed and not self.resp_buf and conn is not None and conn.reused and not self.retried
                and self.body_length == 0 and self.req_decoder is None):
            # The stale keep-alive race: the back end closed an idle connection as we reused it.
            self.retried = True
            log.info("request {request_id} for app {app}: a kept-alive connection to {address} closed before"
                     " answering; retrying once on a new connection", request_id=self.request_id,
                     app=self.app.name, address=self.target.address)
            self._send_head()
            return
        why = "closed the connection" if clean else f"broke the connection ({reason.getErrorMessage()})"
        self._broken(f"the back end {self.target.address} {why} before a complete response")

    # -- ending badly ----------------------------------------------------------------------

    def _broken(self, why: str) -> None:
        code = ResetCode.CONNECT_FAILED if not self.relayed else ResetCode.CANCELLED
        log.warn("request {request_id} for app {app}: {why}", request_id=self.request_id, app=self.app.name, why=why)
        self._fail(code, why, logged=True)

    def _fail(self, code: int, why: str, logged: bool = False) -> None:
        if not logged:
            log.warn("request {request_id} for app {app}: {why}", request_id=self.request_id, app=self.app.name,
                     why=why)
        self.over = True
        conn = self._let_go()
        if conn is not None and not conn.lost:
            conn.transport.abortConnection()
        if not self.stream.closed:
            self.stream.reset(code, why[:400])

    def _half_close_backend(self) -> None:
        conn = self.conn
        if conn is None or conn.lost:
            return
        conn.transport.unregisterProducer()
        if hasattr(conn.transport, "loseWriteConnection") and not self.target.tls:
            conn.transport.loseWriteConnection()
        else:
            conn.transport.loseConnection()


def _draining(stream: Any) -> bool:
    """This end of the stream's tunnel said GO_AWAY (the connector drains)."""
    return bool(getattr(getattr(stream, "session", None), "going_away", False))


def _with_credentials(headers: rules.Headers, credentials: Any) -> rules.Headers:
    """``headers`` with each header an SSO provider returned set (replacing any of that name)."""
    pairs = list(credentials or [])
    for pair in pairs:
        if (not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(x, bytes) for x in pair)
                or not pair[0] or not set(pair[0]) <= _TOKEN or any(c in pair[1] for c in b"\r\n\0")):
            raise ValueError(f"credentials must be (name, value) byte pairs of valid header fields, got {pair!r}")
    names = {k.lower() for k, _ in pairs}
    return [(k, v) for k, v in headers if k.lower() not in names] + pairs


@implementer(IPushProducer)
class _StreamReader:
    """The stream as the back-end socket's producer.

    Not the stream itself: a socket that closes calls its producer's stopProducing, which on a
    stream is a reset, and a back end closing a kept-alive connection must not cost the stream
    (the exchange decides: retry, end of body, or an error with a message).
    """

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.exchange._hold("backend")

    def resumeProducing(self) -> None:
        self.exchange._release("backend")

    def stopProducing(self) -> None:
        pass

"""The updater's requests to the service: `update` streams on the tunnel port, with the connector's
own certificate (docs/protocol.md, *Update exchange*).

One TLS connection per request, one stream on it. The request is all in the stream's SYN
metadata (``{"kind": "update", "op": ..., ...}``); the service answers with one length-prefixed
JSON message (the control channel's framing) and, for ``op = "wheel"``, the wheel's bytes after
it, then FIN. The decoder (`ReplyDecoder`) does no I/O; `UpdateClient` dials.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Protocol

from gateway import boundedjson
from gateway.connector.proxy import _OneProtocol, service_endpoint
from gateway.errors import GatewayError
from gateway.pki.tls import client_options
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.stream import StreamReset

KIND = "update"
OPS = ("manifest", "wheel", "lease", "release", "health", "event")
REPLY = "update_reply"
WHEEL = "update_wheel"
ERROR = "error"
# The JSON answer is small; a header over this is a broken or hostile service.
MAX_HEADER = 64 * 1024
REQUEST_TIMEOUT = 30.0
# An admin event the updater reports is cut to this many characters (the service cuts it too).
MAX_EVENT_TEXT = 2000


class ExchangeFailed(GatewayError):
    """The service could not be asked, or answered with an error."""


class ReplyDecoder:
    """Feed it the stream's bytes: the header message first, then (wheel) the body to `sink`.

    ``sink(bytes)`` gets body bytes; more than the header's ``size`` (or than ``max_body``) is
    an error, so a service cannot make the updater write without limit.
    """

    def __init__(self, sink: Callable[[bytes], None] | None = None, max_body: int = 0,
                 expected: int | None = None) -> None:
        self.expected = expected
        self.header: dict[str, Any] | None = None
        self.received = 0
        self._buffer = b""
        self._sink = sink
        self._max_body = max_body

    def feed(self, data: bytes) -> None:
        if self.header is None:
            self._buffer += data
            if len(self._buffer) < 4:
                return
            (length,) = struct.unpack("!I", self._buffer[:4])
            if length > MAX_HEADER:
                raise ExchangeFailed(f"the service's answer header is {length} bytes (the limit is {MAX_HEADER})")
            if len(self._buffer) < 4 + length:
                return
            self.header = _decode(self._buffer[4:4 + length])
            data, self._buffer = self._buffer[4 + length:], b""
        if data:
            self._body(data)

    def _body(self, data: bytes) -> None:
        limit = self.expected_size
        self.received += len(data)
        if self._sink is None or limit is None or self.received > limit:
            raise ExchangeFailed(f"the service sent more than the {limit or 0} bytes it announced")
        self._sink(data)

    @property
    def expected_size(self) -> int | None:
        if self.header is None or self.header.get("type") != WHEEL:
            return None
        size = self.header.get("size")
        if self.expected is not None and size != self.expected:
            raise ExchangeFailed(f"wrong size: the service announced a wheel of {size!r} bytes, the signed manifest"
                                 f" says {self.expected}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > self._max_body:
            raise ExchangeFailed(f"the service announced a wheel of {size!r} bytes (this updater takes at most"
                                 f" {self._max_body}, max_wheel_bytes)")
        return size


def _decode(data: bytes) -> dict[str, Any]:
    try:
        value = boundedjson.loads(data)
    except ValueError as e:
        raise ExchangeFailed(f"the service's answer is not JSON: {e}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ExchangeFailed("the service's answer is not a JSON object with a type")
    if value["type"] == ERROR:
        raise ExchangeFailed(f"the service refused: {value.get('message')}")
    return value


def encode_header(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack("!I", len(data)) + data


class _Reply(Protocol):
    def __init__(self, decoder: ReplyDecoder, done: Deferred, want_body: bool) -> None:
        self.decoder = decoder
        self.done = done
        self.want_body = want_body

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            self.decoder.feed(data)
        except ExchangeFailed as e:
            self.done.errback(e)
            self.transport.abortConnection()
            return
        if self.decoder.header is not None and not self.want_body:
            self.done.callback(self.decoder.header)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        decoder = self.decoder
        if decoder.header is None:
            self.done.errback(ExchangeFailed("the service closed the update stream without an answer"))
        elif decoder.received != decoder.expected_size:
            self.done.errback(ExchangeFailed(f"the wheel transfer ended after {decoder.received} of"
                                             f" {decoder.expected_size} bytes"))
        else:
            self.done.callback(decoder.header)


class UpdateClient:
    """Asks the service, as the connector whose identity `identity()` returns, through the forward
    proxy `proxy(identity)` returns (None: directly), as the connector reaches it."""

    def __init__(self, reactor: Any, identity: Callable[[], Any], timeout: float = REQUEST_TIMEOUT,
                 proxy: Callable[[Any], Any] | None = None) -> None:
        self.reactor = reactor
        self.identity = identity
        self.timeout = timeout
        self.proxy = proxy

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        """The service's JSON answer to `op`."""
        return await self._exchange({"kind": KIND, "op": op, **params}, ReplyDecoder(), want_body=False,
                                    timeout=self.timeout)

    async def fetch_wheel(self, name: str, destination: Path, sha256: str, size: int, max_bytes: int,
                          timeout: float) -> None:
        """Download the published wheel `name` to `destination`, checked against `sha256` and `size`.

        On any failure the partial file is removed and ExchangeFailed says what went wrong.
        """
        digest = hashlib.sha256()
        partial = destination.with_name(destination.name + ".part")
        with open(partial, "wb") as out:
            def sink(data: bytes) -> None:
                digest.update(data)
                out.write(data)

            try:
                header = await self._exchange({"kind": KIND, "op": "wheel", "name": name},
                                              ReplyDecoder(sink, max_body=max_bytes, expected=size),
                                              want_body=True, timeout=timeout)
            except BaseException:
                out.close()
                partial.unlink(missing_ok=True)
                raise
        got = digest.hexdigest()
        if header.get("size") != size or got != sha256:
            partial.unlink(missing_ok=True)
            raise ExchangeFailed(f"wrong hash: the wheel {name} the service sent has sha256 {got}"
                                 f" ({header.get('size')} bytes), the signed manifest says {sha256} ({size} bytes)")
        partial.replace(destination)

    async def _exchange(self, metadata: dict[str, Any], decoder: ReplyDecoder, want_body: bool,
                        timeout: float) -> dict[str, Any]:
        try:
            ident = self.identity()
            proxy = self.proxy(ident) if self.proxy is not None else None
        except GatewayError as e:   # not registered, an expired certificate, a bad proxy: said like any failure
            raise ExchangeFailed(str(e)) from None
        where = f"{ident.service_host}:{ident.service_port}"
        session = TunnelSession(self.reactor, TunnelSettings(), is_client=True, tunnel_id=f"update/{metadata['op']}")
        handshake: Deferred = Deferred()
        session.on_handshake = lambda s: handshake.called or handshake.callback(s)
        session.on_lost.append(lambda s, reason: handshake.called or handshake.errback(reason))
        tls = client_options(ident.ca_cert, ident.cert, ident.key, ident.server_name)
        endpoint = wrapClientTLS(tls, service_endpoint(self.reactor, ident.service_host, ident.service_port, proxy))
        done: Deferred = Deferred()
        expired = self.reactor.callLater(timeout, lambda: done.called or done.errback(
            ExchangeFailed(f"no answer from the service at {where} to {metadata['op']!r} within {timeout:g}s")))
        try:
            try:
                await endpoint.connect(_OneProtocol(session))
                await handshake
                stream = await session.open_stream(metadata)
            except StreamReset as e:
                raise ExchangeFailed(f"the service refused the {metadata['op']!r} request: {e.reason}") from None
            except Exception as e:
                if session.go_away_reason is not None:   # the service refused this certificate: say why
                    raise ExchangeFailed(f"the service at {where} refused this connector:"
                                         f" {session.go_away_reason[1]}") from None
                raise ExchangeFailed(f"could not reach the service at {where}: {_describe(e)}") from None
            stream.attach(_Reply(decoder, done, want_body))
            return await done
        finally:
            if expired.active():
                expired.cancel()
            if session.transport is not None:
                session.close()


def _describe(e: BaseException) -> str:
    value = getattr(e, "value", e)
    return str(value) or type(value).__name__

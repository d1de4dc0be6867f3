"""`gateway connector register`: trade a one-time token for a client certificate."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol, wrapClientTLS

from gateway.connector.identity import CA_FILE, CERT_FILE, KEY_FILE, write_settings
from gateway.connector.proxy import ProxySettings, service_endpoint, untrusted_certificate_message
from gateway.control import messages as m
from gateway.control.messages import ControlChannel
from gateway.errors import EnrolmentError
from gateway.pki import keys
from gateway.pki.tls import enrolment_client_options, presents_ca, verify_enrolment_peer
from gateway.pki.tokens import EnrolmentToken
from gateway.tunnel.session import TunnelSession, TunnelSettings

ENROL_TIMEOUT = 30.0


def parse_service(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnrolmentError(f"--service must be HOST:PORT (for example 127.0.0.1:8443), got {text!r}")
    return host, int(port)


async def register(
    reactor: Any, service: str, token_text: str, state_dir: Path, server_name: str | None = None,
    name: str | None = None, proxy: ProxySettings | None = None,
) -> dict[str, Any]:
    """Enrol with the service (through ``proxy`` if set) and write the connector's state
    directory; returns the result."""
    token = EnrolmentToken.parse(token_text)
    host, port = parse_service(service)
    server_name = server_name or host
    name = name or socket.gethostname()
    key = keys.generate_key()
    csr = keys.make_csr(key, name)

    result, ca_cert = await pinned_request(
        reactor, host, port, server_name, token.ca_fingerprint, {"kind": "enrol"},
        {"type": m.ENROL_REQUEST, "token_id": token.token_id, "secret": token.secret,
         "csr": csr.decode(), "name": name},
        proxy=proxy,
    )
    if result.get("type") != m.ENROL_RESULT:
        raise EnrolmentError(f"the service refused the enrolment: {result.get('message', result)}")
    cert = keys.load_cert(result["certificate"].encode())
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise EnrolmentError("the service returned a certificate for another key; refusing it")
    served_ca = keys.load_cert(result["ca"].encode())
    if keys.fingerprint(served_ca) != keys.fingerprint(ca_cert):
        raise EnrolmentError("the service returned a CA that differs from the one the token pins")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    keys.write_private(state_dir / KEY_FILE, keys.key_pem(key))
    keys.write_public(state_dir / CERT_FILE, keys.cert_pem(cert))
    keys.write_public(state_dir / CA_FILE, keys.cert_pem(ca_cert))
    write_settings(
        state_dir, service_host=host, service_port=port, server_name=server_name,
        connector_id=result["connector_id"], group=result["group"], name=result.get("name", name),
    )
    return result


async def pinned_request(
    reactor: Any, host: str, port: int, server_name: str, ca_fingerprint: str,
    metadata: dict[str, Any], message: dict[str, Any], timeout: float = ENROL_TIMEOUT,
    proxy: ProxySettings | None = None,
) -> tuple[dict[str, Any], Any]:
    """One request and its answer on a stream of a tunnel-port connection without a client
    certificate, once the service proved it holds the CA ``ca_fingerprint`` pins.

    Returns (the answer, the CA certificate). Enrolment and ``gateway login`` both use it;
    EnrolmentError says what went wrong (unreachable, another CA, no answer).
    """
    session = TunnelSession(reactor, TunnelSettings(), is_client=True, tunnel_id=metadata.get("kind", "enrol"))
    handshake: Deferred = Deferred()
    session.on_handshake = lambda s: handshake.callback(s)
    session.on_lost.append(lambda s, reason: handshake.called or handshake.errback(reason))
    endpoint = wrapClientTLS(enrolment_client_options(), service_endpoint(reactor, host, port, proxy))
    timeout_call = reactor.callLater(timeout, lambda: session.transport and session.transport.abortConnection())
    try:
        try:
            await connectProtocol(endpoint, session)
            await handshake
        except EnrolmentError:
            raise
        except Exception as e:
            raise EnrolmentError(f"could not reach the service at {host}:{port}: {_describe(e)}") from None
        try:
            ca_cert = verify_enrolment_peer(session.transport, ca_fingerprint, server_name)
        except EnrolmentError as e:
            if proxy is None or presents_ca(session.transport, ca_fingerprint):
                raise
            # Through a proxy, a certificate without the pinned CA is most likely the proxy's own.
            leaf = session.transport.getPeerCertificate()
            leaf = leaf.to_cryptography() if leaf is not None else None
            raise EnrolmentError(f"{untrusted_certificate_message(leaf, proxy, f'{host}:{port}')} ({e})") from None
        # Only now, with the service proven to hold the pinned CA, does the secret leave.
        stream = await session.open_stream(metadata)
        reply: Deferred = Deferred()
        channel = ControlChannel(lambda msg: reply.called or reply.callback(msg),
                                 lambda reason: reply.called or reply.errback(
                                     EnrolmentError("the service closed the connection without an answer")))
        stream.attach(channel)
        channel.send(message)
        return await reply, ca_cert
    finally:
        if timeout_call.active():
            timeout_call.cancel()
        if session.transport is not None:
            session.close()


def _describe(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if hasattr(e, "value") and hasattr(e.value, "args"):
        text = str(e.value)
    return text



"""The connector's half of certificate renewal: when, how, and dialling with the current certificate.

The decision logic (`renewal_time`, `retry_delay`) is pure; `CertificateRenewer` schedules it on
an injected clock and talks `renew_request` / `renew_result` on a tunnel's control channel.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from attrs import define, field
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.connector.identity import ConnectorIdentity, install_certificate
from gateway.connector.targets import Target
from gateway.connector.proxy import (
    ProxySettings,
    UntrustedPeerRecorder,
    service_endpoint,
    untrusted_certificate_message,
)
from gateway.control import messages as m
from gateway.errors import describe_failure
from gateway.pki import keys
from gateway.pki.tls import client_options

if TYPE_CHECKING:
    from gateway.connector.node import ConnectorNode, TunnelClient

# Renew once this fraction of the certificate's lifetime (not_after - not_before) has passed.
RENEW_FRACTION = 2 / 3
# A failed renewal is retried after a tenth of the remaining lifetime, within these bounds.
RETRY_MIN = 1.0
RETRY_MAX = 300.0
# No renew_result within this long counts as a failure.
REPLY_TIMEOUT = 30.0
# Never renew twice within this long, whatever the new certificate says.
MIN_INTERVAL = 10.0
# The `code` of the service's `error` reply to a renew_request (gateway/service/renewal.py).
RENEWAL_REFUSED = "renewal_refused"


# Clocks further apart than this break certificate dates and Kerberos tickets: the connector
# warns at each tunnel's welcome, `gateway diagnose` fails its clock check.
MAX_CLOCK_SKEW = 60.0


def clock_skew_warning(service_time: object, now: float, limit: float = MAX_CLOCK_SKEW) -> str | None:
    """What to tell the admin when the welcome's ``time`` is more than ``limit`` seconds from ours, else None."""
    if isinstance(service_time, bool) or not isinstance(service_time, (int, float)):
        return None   # an older service sends no time
    skew = now - float(service_time)
    if abs(skew) <= limit:
        return None
    return (f"this machine's clock is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} the service's:"
            " certificates and Kerberos tickets need clocks within a minute; synchronise it (timedatectl"
            " set-ntp true, chrony or systemd-timesyncd)")


def renewal_time(not_before: datetime, not_after: datetime) -> datetime:
    """When a certificate valid from `not_before` to `not_after` should be renewed."""
    return not_before + (not_after - not_before) * RENEW_FRACTION


def retry_delay(now: datetime, not_after: datetime) -> float:
    """Seconds to wait after a failed renewal: a tenth of what is left, at least 1 s, at most 5 min."""
    remaining = (not_after - now).total_seconds()
    return max(RETRY_MIN, min(RETRY_MAX, remaining / 10))


def _clock_now(clock: Any) -> datetime:
    return datetime.fromtimestamp(clock.seconds(), UTC)


@define
class IdentityEndpoint:
    """A client endpoint that builds its TLS options from the node's identity at each connect,
    so tunnels dialled after a renewal present the new certificate; through ``proxy`` when set
    (TLS inside the CONNECT tunnel, so mutual TLS is end to end). It dials ``target`` (a node
    from the service's list, or one address of the service's name), else the registered service
    address; the certificate is checked for the registered server name on every node (every
    node's certificate lists the service's names)."""

    node: ConnectorNode
    reactor: Any
    timeout: float = 10.0
    proxy: ProxySettings | None = None
    target: Target | None = None
    _last_serial: str | None = field(default=None, init=False)
    log = Logger()

    def connect(self, factory: Any) -> Any:
        ident = self.node.identity
        serial = keys.serial_hex(ident.cert)
        if serial != self._last_serial:
            self._last_serial = serial
            self.log.info("dialling new tunnels with certificate serial {serial} (valid until {not_after})",
                          serial=serial, not_after=ident.not_after.isoformat(), connector_id=ident.connector_id)
        tls = UntrustedPeerRecorder(client_options(ident.ca_cert, ident.cert, ident.key, ident.server_name),
                                    self._untrusted)
        host, port = (self.target.host, self.target.port) if self.target else (ident.service_host, ident.service_port)
        inner = service_endpoint(self.reactor, host, port, self.proxy, self.timeout)
        return wrapClientTLS(tls, inner).connect(factory).addErrback(self._unreachable)

    def __repr__(self) -> str:
        # ClientService logs "Scheduling retry N to connect <endpoint> in S seconds": name the
        # service address (and the proxy), not the object graph.
        ident = self.node.identity
        where = self.target.address if self.target else f"{ident.service_host}:{ident.service_port}"
        node = f" (node {self.target.node_id})" if self.target and self.target.node_id else ""
        via = f" through the proxy at {self.proxy.address}" if self.proxy else ""
        return f"the service at {where}{node}{via}"

    def to(self, target: Target) -> IdentityEndpoint:
        """The same endpoint dialling ``target``."""
        return IdentityEndpoint(self.node, self.reactor, self.timeout, self.proxy, target)

    def _unreachable(self, failure: Failure) -> Failure:
        # ClientService only says it retries; the admin needs the reason (the proxy's above all).
        if not failure.check(CancelledError, ConnectingCancelledError):
            where = f" at {self.target.address}" + (f" (node {self.target.node_id})" if self.target.node_id else "") \
                if self.target else ""
            self.log.warn("could not reach the service{where}: {reason}", where=where,
                          reason=describe_failure(failure), connector_id=self.node.identity.connector_id)
        return failure

    def _untrusted(self, leaf: Any) -> None:
        ident = self.node.identity
        self.log.error("tunnel to the service refused: {reason}", event="untrusted_certificate",
                       reason=untrusted_certificate_message(leaf, self.proxy, self.target.address if self.target
                                                            else f"{ident.service_host}:{ident.service_port}"),
                       connector_id=ident.connector_id)


class CertificateRenewer(Service):
    """Renews the connector's certificate at two thirds of its lifetime; retries with backoff on failure.

    A failure never touches the tunnels: they keep the certificate they were made with.
    """

    log = Logger()

    def __init__(self, node: ConnectorNode, clock: Any) -> None:
        self.node = node
        self.clock = clock
        self._call: Any = None
        self._timeout: Any = None
        self._pending: tuple[Any, TunnelClient] | None = None
        self.renewals = 0
        self.failures = 0

    @property
    def ctx(self) -> dict[str, Any]:
        return {"connector_id": self.node.identity.connector_id}

    # -- scheduling --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        ident = self.node.identity
        due = renewal_time(ident.cert.not_valid_before_utc, ident.not_after)
        delay = max(0.0, (due - _clock_now(self.clock)).total_seconds())
        self.log.info("certificate {serial} valid until {not_after}; renewal due at {due}",
                      serial=keys.serial_hex(ident.cert), not_after=ident.not_after.isoformat(),
                      due=due.isoformat(), **self.ctx)
        self._schedule(delay)

    def stopService(self) -> None:
        super().stopService()
        for call in (self._call, self._timeout):
            if call is not None and call.active():
                call.cancel()
        self._call = self._timeout = None
        self._pending = None

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.clock.callLater(delay, self.renew_now)

    # -- one attempt -------------------------------------------------------------------

    def renew_now(self) -> None:
        """Send a renew_request with a new key's CSR on a live tunnel (or schedule a retry)."""
        if self._pending is not None:
            return
        client = next((t for t in self.node.tunnels.values() if t.control is not None), None)
        if client is None:
            # Normal right after a start with a renewal already due: wait for a tunnel.
            delay = retry_delay(_clock_now(self.clock), self.node.identity.not_after)
            self.log.info("certificate renewal due, but no tunnel to the service is up; trying again in {delay:.0f}s",
                          delay=delay, **self.ctx)
            self._schedule(delay)
            return
        ident = self.node.identity
        key = keys.generate_key()
        self._pending = (key, client)
        self._timeout = self.clock.callLater(REPLY_TIMEOUT, self._failed,
                                             f"no answer from the service within {REPLY_TIMEOUT:.0f}s")
        self.log.info("renewing certificate {serial} (valid until {not_after}) over tunnel {tunnel_id}",
                      serial=keys.serial_hex(ident.cert), not_after=ident.not_after.isoformat(),
                      tunnel_id=client.tunnel_id, **self.ctx)
        client.control.send({"type": m.RENEW_REQUEST, "csr": keys.make_csr(key, ident.connector_id).decode()})

    def on_result(self, client: TunnelClient, message: dict[str, Any]) -> None:
        """control handler for `renew_result`: check, store and start using the new certificate."""
        if self._pending is None:
            self.log.warn("ignoring a renew_result nobody asked for", **self.ctx)
            return
        key, _ = self._pending
        ident = self.node.identity
        try:
            cert = keys.load_cert(str(message["certificate"]).encode())
            problem = _check_certificate(cert, key, ident)
        except (KeyError, ValueError) as e:
            problem = f"the service sent an unreadable certificate ({e})"
        if problem is not None:
            self._failed(problem)
            return
        try:
            new = install_certificate(ident, cert, key)
        except OSError as e:
            self._failed(f"could not write the new certificate to {ident.state_dir}: {e}")
            return
        self._clear_pending()
        self.node.identity = new
        self.renewals += 1
        now = _clock_now(self.clock)
        due = renewal_time(cert.not_valid_before_utc, new.not_after)
        self.log.info(
            "certificate renewed: serial {old_serial} -> {serial}, valid until {not_after}; new tunnels use it,"
            " open tunnels keep the old one until they close; next renewal at {due}",
            old_serial=keys.serial_hex(ident.cert), serial=keys.serial_hex(cert),
            not_after=new.not_after.isoformat(), due=due.isoformat(), event="certificate_renewed", **self.ctx,
        )
        self._schedule(max(MIN_INTERVAL, (due - now).total_seconds()))

    def on_error(self, client: TunnelClient, message: dict[str, Any]) -> None:
        """control handler for `error`: a refused renewal, or else the usual tunnel refusal."""
        if message.get("code") == RENEWAL_REFUSED:
            self._failed(str(message.get("message", "refused")))
            return
        from gateway.connector.node import TunnelRefused

        client._fail(Failure(TunnelRefused(f"the service refused the tunnel: {message.get('message')}")))

    def _failed(self, reason: str) -> None:
        self._clear_pending()
        self.failures += 1
        ident = self.node.identity
        now = _clock_now(self.clock)
        delay = retry_delay(now, ident.not_after)
        self.log.error(
            "certificate renewal failed: {reason}; still using certificate {serial} (valid until {not_after});"
            " retrying in {delay:.0f}s",
            reason=reason, serial=keys.serial_hex(ident.cert), not_after=ident.not_after.isoformat(),
            delay=delay, **self.ctx,
        )
        if self.running:
            self._schedule(delay)

    def _clear_pending(self) -> None:
        self._pending = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


def _check_certificate(cert: Any, key: Any, ident: ConnectorIdentity) -> str | None:
    if cert.public_key() != key.public_key():
        return "the service returned a certificate for another key"
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [ident.connector_id]:
        return f"the service returned a certificate for {names!r}, not for this connector"
    try:
        cert.verify_directly_issued_by(ident.ca_cert)
    except Exception as e:  # InvalidSignature, ValueError, TypeError; the first has no message
        return f"the returned certificate is not signed by the pinned CA ({type(e).__name__})"
    if cert.not_valid_after_utc <= ident.not_after:
        return "the returned certificate expires no later than the current one"
    return None

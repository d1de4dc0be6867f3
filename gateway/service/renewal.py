"""The service's half of certificate renewal: `renew_request` on a tunnel's control channel."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.control import messages as m
from gateway.errors import GatewayError
from gateway.pki import keys
from gateway.store.records import CertificateRecord

if TYPE_CHECKING:
    from gateway.service.tunnels import TunnelHandler

log = Logger(namespace="gateway.service.renewal")

# The `code` of an `error` reply to a renew_request; the connector tells it from tunnel refusals.
RENEWAL_REFUSED = "renewal_refused"
# A certificate past this share of its lifetime is due (the connector renews at two thirds;
# half leaves room for clocks that disagree) and may renew more often than renewal_min_interval.
DUE_FRACTION = 0.5
# ... but even a due certificate renews at most once per this many seconds per connector
# (a lost reply is retried after 30 s by the connector).
DUE_MIN_INTERVAL = 10.0


def too_soon(identity: Any, last: float | None, now: datetime, min_interval: float) -> str | None:
    """Why a renewal now would come too soon after this connector's last one (at `last`), or None."""
    if last is None:
        return None
    due = identity.not_before is not None and (
        now >= identity.not_before + (identity.not_after - identity.not_before) * DUE_FRACTION)
    interval = DUE_MIN_INTERVAL if due else min_interval
    since = now.timestamp() - last
    if since >= interval:
        return None
    why = "" if due else f" and its certificate is not due yet (renewal_min_interval = {interval:g} s)"
    return f"this connector renewed {since:.0f} s ago{why}; try again in {math.ceil(interval - since)} s"


def handle_renew_request(handler: TunnelHandler, message: dict[str, Any], now: datetime | None = None) -> Any:
    """Issue a new certificate to the connector this tunnel authenticated as, for the key in the CSR.

    Only called on an `up` tunnel, i.e. one whose certificate and connector the store accepted.
    The connector id comes from the tunnel's verified certificate, never from the message. The
    store re-checks in the same transaction that the presented certificate is still valid (not
    revoked, connector not deleted). The presented certificate stays valid until it expires; any
    other of the connector's certificates is revoked. Renewals are rate-limited per connector
    (see too_soon), so a connector cannot make the service write certificates without end.
    """
    node = handler.node
    identity = handler.identity
    ctx = handler.ctx
    now = now or datetime.now(UTC)
    lifetime = node.config.service.certificate_lifetime
    ca = node.ca
    csr = message.get("csr")
    if identity is None or not isinstance(csr, str):
        return _reply_error(handler, "malformed renew_request: expected a PEM csr")
    last_renewals = node.last_renewals
    wait = too_soon(identity, last_renewals.get(identity.connector_id), now,
                    node.config.service.renewal_min_interval)
    if wait is not None:
        return _reply_error(handler, wait)
    last_renewals[identity.connector_id] = now.timestamp()

    def issue() -> tuple[CertificateRecord, Any]:
        cert = ca.issue_client_certificate(csr.encode(), identity.connector_id, now, lifetime)
        record = CertificateRecord(serial_hex=keys.serial_hex(cert), connector_id=identity.connector_id,
                                   not_after=cert.not_valid_after_utc)
        return record, cert

    def issued(cert: Any) -> None:
        log.info(
            "renewed the certificate of connector {connector_id}: serial {serial} valid until {not_after};"
            " the old serial {old_serial} stays valid until {old_not_after}; older ones are revoked",
            serial=keys.serial_hex(cert), not_after=cert.not_valid_after_utc.isoformat(),
            old_serial=identity.serial_hex, old_not_after=identity.not_after.isoformat(), event="certificate_renewed",
            **ctx,
        )
        if handler.control is not None:
            handler.control.send({"type": m.RENEW_RESULT, "certificate": keys.cert_pem(cert).decode()})

    def refused(failure: Failure) -> None:
        if failure.check(GatewayError):
            reason = str(failure.value)
        else:
            log.failure("renewal for connector {connector_id} failed", failure, **ctx)
            reason = "internal error on the service; see its log"
        _reply_error(handler, reason)

    return node.store.renew_certificate(identity.serial_hex, identity.connector_id, issue, now).addCallbacks(
        issued, refused
    )


def _reply_error(handler: TunnelHandler, reason: str) -> None:
    log.warn("certificate renewal for connector {connector_id} refused: {reason}", reason=reason, **handler.ctx)
    if handler.control is not None:
        handler.control.send({"type": m.ERROR, "code": RENEWAL_REFUSED,
                              "message": f"certificate renewal refused: {reason}"})

"""`gateway diagnose`: on a connector machine, check everything its tunnels and apps need.

One :class:`Check` per line, in the order a tunnel needs them: the connector's certificate, the
proxy, DNS of the service, TCP reach, the TLS handshake and the service's certificate against
the pinned CA, the service accepting this connector's certificate, the clock against the
service's, each destination of the group's apps (from the config the service sends), then what
plugins add (the Kerberos plugin: KDC reach and keytab). A failed check says what to do; a
check that cannot run because an earlier one failed is skipped, saying so.

The service side: a hello with ``"diagnose": true`` passes the checks a tunnel's does and gets
the welcome (with the service's ``time``) and the group's config, and never becomes a tunnel
(gateway/service/tunnels.py). Only the reactor does I/O; it is a parameter.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime
from typing import Any, Callable, Mapping

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway import PROTOCOL_VERSION, __version__, plugins
from gateway.config import GatewayConfig
from gateway.connector import destinations
from gateway.connector.identity import ConnectorIdentity, NotRegistered
from gateway.connector.proxy import (
    ProxyError,
    ProxySettings,
    chains_to,
    choose_proxy,
    service_endpoint,
    untrusted_certificate,
)
from gateway.connector.renewal import MAX_CLOCK_SKEW, renewal_time
from gateway.control import messages as m
from gateway.control.messages import ControlChannel
from gateway.errors import ConfigError, EnrolmentError, describe_failure
from gateway.pki import keys
from gateway.pki.tls import check_service_certificate, probe_client_options
from gateway.segments import HostName, Network, Where, host_port, parse_segments
from gateway.tunnel.session import TunnelSession, TunnelSettings

OK, FAIL, SKIP = "ok", "FAIL", "skip"
MAX_SKEW = MAX_CLOCK_SKEW
# How long one network check may take (DNS, a TCP connect, the service's answers).
TIMEOUT = 10.0
# A private app segment's ports checked one by one up to this many; a wider range is not dialled.
MAX_PORTS_PER_SEGMENT = 4


@frozen
class Check:
    """One line of the report: a check's name, ok / FAIL / skip, what was found, and for a failure what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @classmethod
    def ok(cls, name: str, detail: str) -> Check:
        return cls(name, OK, detail)

    @classmethod
    def fail(cls, name: str, detail: str, fix: str) -> Check:
        return cls(name, FAIL, detail, fix)

    @classmethod
    def skip(cls, name: str, detail: str) -> Check:
        return cls(name, SKIP, detail)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<12}  {self.detail}"
        return f"{text}; fix: {self.fix}" if self.failed and self.fix else text


def _fail(failure: Failure) -> str:
    return describe_failure(failure)


# -- the connector's own certificate -------------------------------------------------------


def certificate_check(identity: ConnectorIdentity, now: datetime) -> Check:
    """The client certificate's dates: valid now, days left, and whether renewal is overdue."""
    cert = identity.cert
    left = identity.not_after - now
    who = f"connector {identity.connector_id[:12]} ({identity.name or '?'}, group {identity.group or '?'})"
    if now < cert.not_valid_before_utc:
        return Check.fail("certificate", f"{who}: the client certificate is valid only from"
                                         f" {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                          "check this machine's clock (timedatectl; chrony or systemd-timesyncd)")
    due = renewal_time(cert.not_valid_before_utc, identity.not_after)
    text = (f"{who}: client certificate {keys.serial_hex(cert)[:16]} valid until"
            f" {identity.not_after:%Y-%m-%d %H:%M} UTC ({left.days} days left)")
    if now > due:
        text += f"; renewal was due at {due:%Y-%m-%d %H:%M} UTC and the running connector retries it"
    return Check.ok("certificate", text)


def _registration_failure(error: NotRegistered, state_dir: Any) -> Check:
    detail, _, _ = str(error).partition("; ")
    return Check.fail("certificate", detail, f"get a new token from the service's admin and run gateway connector"
                                             f" register --service HOST:PORT --token-file FILE --state-dir {state_dir}")


# -- names and TCP -------------------------------------------------------------------------


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def resolve(reactor: Any, host: str, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to here (an address resolves to itself); raises on failure."""
    if _is_address(host):
        return [host.strip("[]")]
    d = destinations.resolve(reactor.nameResolver, host, "tcp")
    d.addTimeout(timeout, reactor)
    addresses = await d
    if not addresses:
        raise LookupError(f"no address for {host}")
    return list(addresses)


async def reach(reactor: Any, endpoint: Any, timeout: float) -> None:
    """Connect with ``endpoint`` and close again; raises what the connection failed with."""
    d = connectProtocol(endpoint, Protocol())
    d.addTimeout(timeout, reactor)
    protocol = await d
    protocol.transport.loseConnection()


def _tcp_problem(failure: Failure, where: str, timeout: float) -> str:
    if failure.check(ConnectionRefusedError):
        return f"nothing accepts connections at {where} (connection refused)"
    if failure.check(ConnectTimeout) or failure.check(TimeoutError) or "timed out" in _fail(failure).lower():
        return f"no answer from {where} within {timeout:g}s (a firewall may drop the packets)"
    return f"cannot connect to {where}: {_fail(failure)}"


# -- the service: one connection for TLS, the certificate, the clock and the config ---------


@define
class ServiceProbe:
    """What one diagnose connection to the service found."""

    leaf: Any = None                  # the certificate the service presented
    handshake_error: str | None = None
    welcome: dict | None = None
    config: dict | None = None
    refused: str | None = None        # the service's `error` message or GO_AWAY reason
    sent_at: float = 0.0
    answered_at: float = 0.0
    done: Deferred = field(factory=Deferred)

    def finish(self) -> None:
        if not self.done.called:
            self.done.callback(self)


async def probe_service(reactor: Any, identity: ConnectorIdentity, proxy: ProxySettings | None,
                        timeout: float) -> ServiceProbe:
    """TLS to the service presenting the connector's certificate (the service's own examined,
    not trusted), then hello with ``diagnose: true``: the welcome and the group's config."""
    probe = ServiceProbe()
    session = TunnelSession(reactor, TunnelSettings(), is_client=True, tunnel_id="diagnose")

    def handshake(s: TunnelSession) -> None:
        chain = s.transport.getHandle().get_peer_cert_chain() or []
        probe.leaf = chain[0].to_cryptography() if chain else None
        if probe.leaf is None or not chains_to(probe.leaf, identity.ca_cert):
            probe.finish()
            return
        s.open_stream({"kind": "control"}).addCallbacks(control_open, lambda f: lost(s, f))

    def control_open(stream: Any) -> None:
        channel = ControlChannel(message, lambda reason: probe.finish())
        stream.attach(channel)
        probe.sent_at = reactor.seconds()
        channel.send({"type": m.HELLO, "protocol_version": PROTOCOL_VERSION, "software_version": __version__,
                      "connector_id": identity.connector_id, "capabilities": list(m.CAPABILITIES),
                      "hostname": os.uname().nodename, "diagnose": True})

    def message(msg: dict[str, Any]) -> None:
        if msg["type"] == m.WELCOME:
            probe.answered_at = reactor.seconds()
            probe.welcome = msg
        elif msg["type"] == m.CONFIG:
            probe.config = msg
            probe.finish()
        elif msg["type"] == m.ERROR:
            probe.refused = str(msg.get("message"))
            probe.finish()

    def lost(s: TunnelSession, reason: Failure) -> None:
        if s.go_away_reason is not None and probe.refused is None and probe.welcome is None:
            probe.refused = s.go_away_reason[1]
        if probe.leaf is None and probe.handshake_error is None:
            probe.handshake_error = _fail(reason)
        probe.finish()

    session.on_handshake = handshake
    session.on_lost.append(lost)
    endpoint = wrapClientTLS(probe_client_options(identity.cert, identity.key),
                             service_endpoint(reactor, identity.service_host, identity.service_port, proxy))
    def too_slow() -> None:
        if probe.welcome is None and probe.refused is None:
            probe.handshake_error = probe.handshake_error or f"no answer from the service within {timeout:g}s"
        probe.finish()

    deadline = reactor.callLater(timeout, too_slow)
    try:
        try:
            await connectProtocol(endpoint, session)
        except Exception as e:  # noqa: BLE001 - reported as the TLS check's failure
            probe.handshake_error = describe_failure(Failure(e))
            probe.finish()
        await probe.done
    finally:
        if deadline.active():
            deadline.cancel()
        if session.transport is not None:
            session.transport.abortConnection()
    return probe


def tls_check(probe: ServiceProbe, identity: ConnectorIdentity, proxy: ProxySettings | None,
              now: datetime) -> Check:
    service = host_port(identity.service_host, identity.service_port)
    if probe.leaf is None:
        return Check.fail("tls", f"no TLS handshake with {service}: {probe.handshake_error or 'no certificate'}",
                          f"check that {service} is the service's tunnel port ([service] listen)")
    if not chains_to(probe.leaf, identity.ca_cert):
        what, fix = untrusted_certificate(probe.leaf, proxy, service)
        return Check.fail("tls", what, fix)
    try:
        check_service_certificate(probe.leaf, identity.server_name, now)
    except EnrolmentError as e:
        text, _, fix = str(e).partition(": ")
        return Check.fail("tls", text, fix or "ask the service's admin")
    return Check.ok("tls", f"{service}: the service's certificate for {identity.server_name!r} was issued by the"
                           f" pinned CA {keys.fingerprint(identity.ca_cert)[:23]}…, valid until"
                           f" {probe.leaf.not_valid_after_utc:%Y-%m-%d}")


def acceptance_check(probe: ServiceProbe, identity: ConnectorIdentity) -> Check:
    if probe.welcome is not None:
        w = probe.welcome
        return Check.ok("service", f"node {w.get('node_id')} (gateway {w.get('software_version')}) accepted"
                                   f" connector {identity.connector_id[:12]} in group {w.get('group')!r}")
    reason = probe.refused or probe.handshake_error or "the service closed the connection without a welcome"
    return Check.fail("service", f"the service refused this connector's certificate: {reason}",
                      "get a new token from the service's admin and register this connector again"
                      f" (gateway connector register ... --state-dir {identity.state_dir})")


def clock_check(probe: ServiceProbe, max_skew: float) -> Check:
    service_time = (probe.welcome or {}).get("time")
    if not isinstance(service_time, (int, float)):
        return Check.skip("clock", "the service does not send its time (an older gateway): not checked")
    skew = (probe.sent_at + probe.answered_at) / 2 - float(service_time)
    if abs(skew) > max_skew:
        side = "ahead of" if skew > 0 else "behind"
        return Check.fail("clock", f"this machine's clock is {abs(skew):.0f}s {side} the service's",
                          "synchronise it (timedatectl set-ntp true, chrony or systemd-timesyncd): certificates"
                          f" and Kerberos tickets need clocks within {max_skew:g}s")
    return Check.ok("clock", f"within {abs(skew):.1f}s of the service's (round trip"
                             f" {probe.answered_at - probe.sent_at:.3f}s)")


# -- the group's apps ----------------------------------------------------------------------


def app_targets(config: Mapping[str, Any]) -> list[tuple[str, str, int] | Check]:
    """(check name, host, port) to dial for each app of the config message, or a skip line."""
    targets: list[tuple[str, str, int] | Check] = []
    for i, app in enumerate(config.get("apps") or []):
        name = f"app {app.get('name')}"
        if "segments" not in app:
            targets.append((name, str(app.get("host")), int(app.get("port", 0))))
            continue
        try:
            segments = parse_segments(app["segments"], Where("the service's config message", f"apps[{i}].segments"))
        except ConfigError as e:
            targets.append(Check.fail(name, f"the service sent segments this connector cannot read: {e}",
                                      "upgrade this connector to the service's gateway version"))
            continue
        for segment in segments:
            ports = [p for r in segment.ports for p in range(r.first, r.last + 1)][:MAX_PORTS_PER_SEGMENT + 1]
            single = isinstance(segment.destination, HostName) or (
                isinstance(segment.destination, Network)
                and segment.destination.network.prefixlen == segment.destination.network.max_prefixlen)
            if segment.protocol != "tcp" or not single or len(ports) > MAX_PORTS_PER_SEGMENT:
                targets.append(Check.skip(name, f"segment {segment}: a range, a wildcard or UDP: not dialled"))
                continue
            host = str(segment.destination)
            targets.extend((name, host, port) for port in ports)
    return targets


async def destination_check(reactor: Any, name: str, host: str, port: int, timeout: float) -> Check:
    where = host_port(host, port)
    try:
        await resolve(reactor, host, timeout)
    except Exception as e:  # noqa: BLE001 - any resolver failure is this check's
        return Check.fail(name, f"{host} does not resolve on this connector: {describe_failure(Failure(e))}",
                          "check the name in the app's destination and this machine's DNS (resolv.conf)")
    try:
        await reach(reactor, HostnameEndpoint(reactor, host, port, timeout=timeout), timeout)
    except Exception as e:  # noqa: BLE001
        return Check.fail(name, _tcp_problem(Failure(e), where, timeout),
                          f"check that the back end runs at {where} and that this connector may reach it"
                          " (firewall, routes)")
    return Check.ok(name, f"{where} accepts connections")


# -- the whole run -------------------------------------------------------------------------


async def run(reactor: Any, config: GatewayConfig, pm: Any, environ: Mapping[str, str] | None = None,
              max_skew: float = MAX_SKEW, timeout: float = TIMEOUT) -> list[Check]:
    """Every check for the connector ``config`` describes, in order."""
    checks = await _service_checks(reactor, config, environ, max_skew, timeout)
    checks += await _plugin_checks(reactor, config, pm)
    return checks


async def _service_checks(reactor: Any, config: GatewayConfig, environ: Mapping[str, str] | None,
                          max_skew: float, timeout: float) -> list[Check]:
    checks: list[Check] = []
    connector = config.connector
    now = datetime.fromtimestamp(reactor.seconds(), UTC)
    try:
        identity = ConnectorIdentity.load(connector.state_dir, now=now)
    except NotRegistered as e:
        return [_registration_failure(e, connector.state_dir)]
    checks.append(certificate_check(identity, now))
    host, port = identity.service_host, identity.service_port
    service = host_port(host, port)

    try:
        proxy = choose_proxy(connector.proxy, connector.proxy_password_file, host, port, environ)
    except ProxyError as e:
        checks.append(Check.fail("proxy", str(e), "fix [connector] proxy and proxy_password_file, or HTTPS_PROXY"))
        return checks
    if proxy is None:
        checks.append(Check.ok("proxy", "none: the service is dialled directly"))
    else:
        try:
            addresses = await resolve(reactor, proxy.url.host, timeout)
        except Exception as e:  # noqa: BLE001
            checks.append(Check.fail("proxy", f"the proxy's name {proxy.url.host} ({proxy.source}) does not resolve:"
                                              f" {describe_failure(Failure(e))}",
                                     f"check the proxy's host name in {proxy.source} and this machine's DNS"))
            return checks
        checks.append(Check.ok("proxy", f"through the proxy at {proxy.address} ({proxy.source};"
                                        f" {', '.join(addresses[:3])})"))

    try:
        addresses = await resolve(reactor, host, timeout)
        checks.append(Check.ok("dns", f"{host} resolves to {', '.join(addresses[:4])}"
                                      if not _is_address(host) else f"{host} is an address"))
    except Exception as e:  # noqa: BLE001
        problem = f"{host} does not resolve on this machine: {describe_failure(Failure(e))}"
        if proxy is None:
            checks.append(Check.fail("dns", problem, "check service_host in connection.toml and this machine's DNS"
                                                     " (resolv.conf)"))
            return checks
        checks.append(Check.skip("dns", f"{problem}; the proxy at {proxy.address} resolves it"))

    try:
        await reach(reactor, service_endpoint(reactor, host, port, proxy, timeout), timeout)
    except ProxyError as e:
        checks.append(Check.fail("tcp", str(e), f"check {proxy.source} and the proxy's rules for {service}"))
        return checks
    except Exception as e:  # noqa: BLE001
        checks.append(Check.fail("tcp", _tcp_problem(Failure(e), service, timeout),
                                 f"check that the service listens at {service} and that a firewall lets this"
                                 " machine reach it"))
        return checks
    checks.append(Check.ok("tcp", f"{service} accepts connections"
                                  + (f" (through the proxy at {proxy.address})" if proxy else "")))

    probe = await probe_service(reactor, identity, proxy, timeout)
    checks.append(tls_check(probe, identity, proxy, now))
    if checks[-1].failed:
        return checks
    checks.append(acceptance_check(probe, identity))
    if checks[-1].failed:
        return checks
    checks.append(clock_check(probe, max_skew))
    if probe.config is None:
        checks.append(Check.fail("apps", "the service sent no config", "run gateway diagnose again; if it"
                                 " persists, look at the service's log"))
        return checks
    targets = app_targets(probe.config)
    if not targets:
        checks.append(Check.skip("apps", f"group {probe.config.get('group')!r} has no apps yet"))
    results = await gatherResults([
        maybeDeferred(lambda t=t: t) if isinstance(t, Check)
        else ensureDeferred(destination_check(reactor, *t, timeout))
        for t in targets
    ])
    checks.extend(results)
    return checks


async def _plugin_checks(reactor: Any, config: GatewayConfig, pm: Any) -> list[Check]:
    checks: list[Check] = []
    for name, check in plugins.diagnose_checks(pm, config):
        try:
            result = check(reactor)
            found = await (ensureDeferred(result) if not isinstance(result, (list, Deferred)) else
                           maybeDeferred(lambda r=result: r))
            checks.extend(found)
        except Exception as e:  # noqa: BLE001 - a plugin's failure is its check failing
            checks.append(Check.fail(name, f"the check failed: {describe_failure(Failure(e))}",
                                     "see the plugin's documentation"))
    return checks


def report(checks: list[Check], write: Callable[[str], Any]) -> int:
    """Write one line per check and a summary; the exit status: 1 if any check failed."""
    for check in checks:
        write(check.line())
    failed = [c for c in checks if c.failed]
    write(f"{len(checks)} checks, {len(failed)} failed" + (f": {', '.join(c.name for c in failed)}" if failed else ""))
    return 1 if failed else 0

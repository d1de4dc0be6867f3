"""Certificate renewal: the connector's timing and swap, the service's handler, the store, the files."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from cryptography import x509
from twisted.internet.defer import succeed, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from gateway.config import parse_config
from gateway.connector import renewal
from gateway.connector.identity import (
    CERT_FILE, KEY_FILE, NEXT_KEY_FILE, ConnectorIdentity, NotRegistered, install_certificate, write_settings,
)
from gateway.connector.renewal import (
    RENEWAL_REFUSED, REPLY_TIMEOUT, CertificateRenewer, IdentityEndpoint, renewal_time, retry_delay,
)
from gateway.control import messages as m
from gateway.errors import ConfigError, GatewayError
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway.pki.tokens import hash_secret
from gateway.service.renewal import handle_renew_request
from gateway.store.records import CertificateRecord, ConnectorRecord, TokenRecord
from gateway.store.sqlite import SQLiteStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIFETIME = timedelta(hours=3)
CONNECTOR_ID = "c0ffee00"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def ca():
    return CertificateAuthority.create(T0 - timedelta(days=1))


def issue(ca, key, now=T0, lifetime=LIFETIME, connector_id=CONNECTOR_ID):
    return ca.issue_client_certificate(keys.make_csr(key, "x"), connector_id, now, lifetime)


def make_identity(tmp_path, ca, now=T0, lifetime=LIFETIME):
    key = keys.generate_key()
    cert = issue(ca, key, now, lifetime)
    keys.write_private(tmp_path / KEY_FILE, keys.key_pem(key))
    keys.write_public(tmp_path / CERT_FILE, keys.cert_pem(cert))
    keys.write_public(tmp_path / "ca.pem", keys.cert_pem(ca.cert))
    write_settings(tmp_path, service_host="127.0.0.1", service_port=8443, server_name="127.0.0.1",
                   connector_id=CONNECTOR_ID, group="default", name="test")
    return ConnectorIdentity.load(tmp_path, now=now)


class FakeControl:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class FakeClient:
    def __init__(self, tunnel_id="c0ffee00/t1"):
        self.tunnel_id = tunnel_id
        self.control = FakeControl()
        self.failed = []

    def _fail(self, failure):
        self.failed.append(failure)


def clock_at(when: datetime) -> Clock:
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


def renewer_for(identity, clock, tunnels=1):
    node = SimpleNamespace(identity=identity, tunnels={f"t{i}": FakeClient(f"t{i}") for i in range(tunnels)})
    renewer = CertificateRenewer(node, clock)
    renewer.startService()
    return node, renewer


def requests(node):
    return [msg for client in node.tunnels.values() for msg in client.control.sent if msg["type"] == m.RENEW_REQUEST]


def answer(ca, node, clock):
    """The service's renew_result for the last renew_request, issued at the clock's time."""
    csr = requests(node)[-1]["csr"].encode()
    now = datetime.fromtimestamp(clock.seconds(), UTC)
    cert = ca.issue_client_certificate(csr, CONNECTOR_ID, now, LIFETIME)
    return {"type": m.RENEW_RESULT, "certificate": keys.cert_pem(cert).decode()}


# -- the pure decisions -----------------------------------------------------------------------


def test_renewal_time_is_two_thirds_of_the_lifetime():
    """A certificate valid for 90 days is renewed 60 days after not_before."""
    assert renewal_time(T0, T0 + timedelta(days=90)) == T0 + timedelta(days=60)


def test_retry_delay_is_a_tenth_of_what_is_left_within_bounds():
    """Retries come after a tenth of the remaining lifetime, never sooner than 1 s nor later than 5 min."""
    assert retry_delay(T0, T0 + timedelta(seconds=200)) == 20
    assert retry_delay(T0, T0 + timedelta(days=30)) == 300
    assert retry_delay(T0, T0 + timedelta(seconds=3)) == 1
    assert retry_delay(T0, T0 - timedelta(seconds=3)) == 1


# -- the connector's scheduler ----------------------------------------------------------------


def test_renews_at_two_thirds_and_not_before(tmp_path, ca):
    """No renew_request until two thirds of the lifetime passed; then one, with a CSR for a new key."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, _ = renewer_for(identity, clock)
    due = renewal_time(identity.cert.not_valid_before_utc, identity.not_after)
    clock.advance((due - T0).total_seconds() - 1)
    assert requests(node) == []
    clock.advance(1)
    [request] = requests(node)
    csr = x509.load_pem_x509_csr(request["csr"].encode())
    assert csr.is_signature_valid and csr.public_key() != identity.key.public_key()


def test_successful_renewal_swaps_identity_writes_files_and_schedules_the_next(tmp_path, ca):
    """A renew_result replaces the key (0600) and certificate on disk and in memory, and re-arms the timer."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, renewer = renewer_for(identity, clock)
    clock.advance(LIFETIME.total_seconds() * 2 / 3)
    client = node.tunnels["t0"]
    renewer.on_result(client, answer(ca, node, clock))
    new = node.identity
    assert keys.serial_hex(new.cert) != keys.serial_hex(identity.cert)
    assert new.not_after > identity.not_after
    on_disk = ConnectorIdentity.load(tmp_path, now=datetime.fromtimestamp(clock.seconds(), UTC))
    assert keys.serial_hex(on_disk.cert) == keys.serial_hex(new.cert)
    assert on_disk.key.public_key() == new.key.public_key()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    assert renewer.renewals == 1
    # The next renewal comes two thirds into the new certificate's life, not before.
    due = renewal_time(new.cert.not_valid_before_utc, new.not_after)
    clock.advance((due - datetime.fromtimestamp(clock.seconds(), UTC)).total_seconds() - 1)
    assert len(requests(node)) == 1
    clock.advance(1)
    assert len(requests(node)) == 2


def test_refused_renewal_is_retried_and_keeps_the_identity(tmp_path, ca):
    """An error with code renewal_refused keeps the old certificate and retries after retry_delay."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, renewer = renewer_for(identity, clock)
    clock.advance(LIFETIME.total_seconds() * 2 / 3)
    renewer.on_error(node.tunnels["t0"], {"type": m.ERROR, "code": RENEWAL_REFUSED, "message": "no"})
    assert node.identity is identity and renewer.failures == 1
    assert node.tunnels["t0"].failed == []
    delay = retry_delay(datetime.fromtimestamp(clock.seconds(), UTC), identity.not_after)
    clock.advance(delay - 0.5)
    assert len(requests(node)) == 1
    clock.advance(0.5)
    assert len(requests(node)) == 2


def test_no_answer_counts_as_a_failure_and_is_retried(tmp_path, ca):
    """Without a renew_result within REPLY_TIMEOUT the renewer gives up on that attempt and tries again."""
    identity = make_identity(tmp_path, ca, lifetime=timedelta(days=90))
    clock = clock_at(T0 + timedelta(days=61))
    node, renewer = renewer_for(identity, clock)
    clock.advance(0)
    assert len(requests(node)) == 1
    clock.advance(REPLY_TIMEOUT)
    assert renewer.failures == 1
    clock.advance(renewal.RETRY_MAX)
    assert len(requests(node)) == 2


def test_without_a_tunnel_the_renewal_waits_and_retries(tmp_path, ca):
    """Renewal due with no tunnel up: nothing is sent, and it is tried again later."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, renewer = renewer_for(identity, clock, tunnels=0)
    clock.advance(LIFETIME.total_seconds() * 2 / 3)
    assert renewer.failures == 0 and len(clock.getDelayedCalls()) == 1
    node.tunnels["t9"] = FakeClient("t9")
    clock.advance(retry_delay(datetime.fromtimestamp(clock.seconds(), UTC), identity.not_after))
    assert len(requests(node)) == 1


def test_certificate_for_another_key_is_refused(tmp_path, ca):
    """A renew_result whose certificate is not for the key just made is a failure; nothing is written."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, renewer = renewer_for(identity, clock)
    clock.advance(LIFETIME.total_seconds() * 2 / 3)
    other = issue(ca, keys.generate_key(), now=datetime.fromtimestamp(clock.seconds(), UTC))
    before = (tmp_path / CERT_FILE).read_bytes()
    renewer.on_result(node.tunnels["t0"], {"type": m.RENEW_RESULT, "certificate": keys.cert_pem(other).decode()})
    assert node.identity is identity and renewer.failures == 1
    assert (tmp_path / CERT_FILE).read_bytes() == before


def test_certificate_from_another_ca_is_refused(tmp_path, ca):
    """A renewed certificate not signed by the pinned CA is refused."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    node, renewer = renewer_for(identity, clock)
    clock.advance(LIFETIME.total_seconds() * 2 / 3)
    rogue = CertificateAuthority.create(T0)
    renewer.on_result(node.tunnels["t0"], answer(rogue, node, clock))
    assert node.identity is identity and renewer.failures == 1


def test_other_errors_still_refuse_the_tunnel(tmp_path, ca):
    """An error that is not about renewal fails the tunnel as before (the handler replaces the default)."""
    identity = make_identity(tmp_path, ca)
    node, renewer = renewer_for(identity, clock_at(T0))
    client = node.tunnels["t0"]
    renewer.on_error(client, {"type": m.ERROR, "code": "not_authorized", "message": "deleted"})
    [failure] = client.failed
    assert "the service refused the tunnel: deleted" in str(failure.value)
    assert renewer.failures == 0


def test_stop_cancels_the_timer(tmp_path, ca):
    """A stopped renewer leaves no delayed call behind."""
    identity = make_identity(tmp_path, ca)
    clock = clock_at(T0)
    _, renewer = renewer_for(identity, clock)
    renewer.stopService()
    assert clock.getDelayedCalls() == []


def test_endpoint_uses_the_current_identity_at_each_connect(tmp_path, ca, monkeypatch):
    """Tunnels dialled after the identity changed present the new certificate."""
    identity = make_identity(tmp_path, ca)
    used = []
    monkeypatch.setattr(renewal, "client_options", lambda ca_cert, cert, key, name: used.append(cert) or "tls")
    monkeypatch.setattr(renewal, "wrapClientTLS", lambda tls, inner: SimpleNamespace(connect=succeed))
    node = SimpleNamespace(identity=identity)
    endpoint = IdentityEndpoint(node, MemoryReactorClock())
    endpoint.connect("factory")
    new_cert = issue(ca, keys.generate_key())
    node.identity = install_certificate(identity, new_cert, keys.generate_key())
    endpoint.connect("factory")
    assert [keys.serial_hex(c) for c in used] == [keys.serial_hex(identity.cert), keys.serial_hex(new_cert)]


# -- files ------------------------------------------------------------------------------------


def test_expired_certificate_is_refused_at_start(tmp_path, ca):
    """A connector whose certificate expired while it was off gets NotRegistered naming the date."""
    make_identity(tmp_path, ca)
    with pytest.raises(NotRegistered, match=r"certificate expired on .*register it first"):
        ConnectorIdentity.load(tmp_path, now=T0 + LIFETIME + timedelta(seconds=1))


def test_interrupted_renewal_is_completed_at_load(tmp_path, ca):
    """client.pem renewed but client.key not yet renamed: load picks client.key.next and renames it."""
    make_identity(tmp_path, ca)
    key = keys.generate_key()
    keys.write_private(tmp_path / NEXT_KEY_FILE, keys.key_pem(key))
    keys.write_public(tmp_path / CERT_FILE, keys.cert_pem(issue(ca, key)))
    identity = ConnectorIdentity.load(tmp_path, now=T0)
    assert identity.key.public_key() == key.public_key()
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_key_that_does_not_match_is_damage(tmp_path, ca):
    """A client.key for another certificate (and no client.key.next) is reported as a damaged registration."""
    make_identity(tmp_path, ca)
    keys.write_private(tmp_path / KEY_FILE, keys.key_pem(keys.generate_key()))
    with pytest.raises(NotRegistered, match="damaged"):
        ConnectorIdentity.load(tmp_path, now=T0)


# -- config -----------------------------------------------------------------------------------


def test_lifetime_seconds_overrides_days_and_has_a_minimum():
    """service.certificate_lifetime_seconds overrides the days; below 60 it is a ConfigError."""
    base = {"state_dir": "/tmp/x"}
    assert parse_config({"service": base}, "s.toml").service.certificate_lifetime == timedelta(days=90)
    config = parse_config({"service": {**base, "certificate_lifetime_seconds": 90}}, "s.toml")
    assert config.service.certificate_lifetime == timedelta(seconds=90)
    with pytest.raises(ConfigError, match="certificate_lifetime_seconds"):
        parse_config({"service": {**base, "certificate_lifetime_seconds": 59}}, "s.toml")


def test_short_lifetimes_back_date_less(ca):
    """A 60 s certificate starts 6 s in the past, so two thirds of its life still lie ahead."""
    cert = issue(ca, keys.generate_key(), lifetime=timedelta(seconds=60))
    assert cert.not_valid_before_utc == T0 - timedelta(seconds=6)
    assert renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc) > T0 + timedelta(seconds=30)


# -- the service's handler and the store ------------------------------------------------------


class SyncStore:
    """The ThreadedStore interface over a SQLiteStore, without threads."""

    def __init__(self, store):
        self.store = store

    def renew_certificate(self, *args):
        return maybeDeferred(self.store.renew_certificate, *args)


@pytest.fixture
def service(tmp_path, ca):
    store = SQLiteStore(tmp_path / "gateway.db")
    store.ensure_group("default", T0)
    store.create_token(TokenRecord("tok", hash_secret("s"), "default", T0, T0 + timedelta(hours=1)))
    old = issue(ca, keys.generate_key())

    def enrol(token):
        return (ConnectorRecord(CONNECTOR_ID, "n", "default", T0),
                CertificateRecord(keys.serial_hex(old), CONNECTOR_ID, old.not_valid_after_utc), None)

    store.enrol("tok", "s", T0, enrol)
    config = parse_config({"service": {"state_dir": str(tmp_path), "certificate_lifetime_seconds": 600}}, "s.toml")
    node = SimpleNamespace(config=config, ca=ca, store=SyncStore(store), last_renewals={})
    identity = SimpleNamespace(connector_id=CONNECTOR_ID, serial_hex=keys.serial_hex(old),
                               not_after=old.not_valid_after_utc, not_before=old.not_valid_before_utc)
    handler = SimpleNamespace(node=node, identity=identity, ctx={"connector_id": CONNECTOR_ID, "tunnel_id": "n/t1"},
                              control=FakeControl())
    yield SimpleNamespace(store=store, handler=handler, old=old)
    store.close()


def test_service_issues_a_certificate_for_the_tunnels_connector(service):
    """renew_request on an authenticated tunnel: a new certificate for that connector id, recorded; the old one stays valid."""
    key = keys.generate_key()
    handle_renew_request(service.handler, {"type": m.RENEW_REQUEST, "csr": keys.make_csr(key, "evil").decode()},
                         now=T0 + timedelta(minutes=1))
    [reply] = service.handler.control.sent
    assert reply["type"] == m.RENEW_RESULT
    cert = keys.load_cert(reply["certificate"].encode())
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == f"CN={CONNECTOR_ID}"
    assert cert.not_valid_after_utc == T0 + timedelta(minutes=1, seconds=600)
    assert service.store.certificate_status(keys.serial_hex(cert), CONNECTOR_ID) == "valid"
    assert service.store.certificate_status(keys.serial_hex(service.old), CONNECTOR_ID) == "valid"


def test_service_refuses_a_deleted_connector(service):
    """A connector deleted since its tunnel came up gets error renewal_refused, and no certificate is stored."""
    service.store.delete_connector(CONNECTOR_ID, T0)
    handle_renew_request(service.handler, {"type": m.RENEW_REQUEST, "csr": keys.make_csr(keys.generate_key(), "x").decode()})
    [reply] = service.handler.control.sent
    assert reply["type"] == m.ERROR and reply["code"] == RENEWAL_REFUSED
    assert "connector deleted" in reply["message"]


def test_service_refuses_a_malformed_request(service):
    """A renew_request without a usable CSR is refused with a reason."""
    handle_renew_request(service.handler, {"type": m.RENEW_REQUEST})
    handle_renew_request(service.handler, {"type": m.RENEW_REQUEST, "csr": "not a csr"})
    replies = service.handler.control.sent
    assert [r["code"] for r in replies] == [RENEWAL_REFUSED, RENEWAL_REFUSED]
    assert "unreadable certificate request" in replies[1]["message"]


def test_store_renewal_needs_a_valid_presented_certificate(service):
    """renew_certificate for an unknown serial raises and stores nothing."""
    called = []
    with pytest.raises(GatewayError, match="unknown"):
        service.store.renew_certificate("abc", CONNECTOR_ID, lambda: called.append(1))
    assert called == []


def _renew(service, now):
    csr = keys.make_csr(keys.generate_key(), "n").decode()
    handle_renew_request(service.handler, {"type": m.RENEW_REQUEST, "csr": csr}, now=now)
    return service.handler.control.sent[-1]


def test_service_refuses_a_second_renewal_before_renewal_min_interval(service):
    """A connector whose certificate is not due renews once; a second request an hour later is refused with a wait."""
    first = _renew(service, T0 + timedelta(minutes=1))
    second = _renew(service, T0 + timedelta(minutes=2))
    assert first["type"] == m.RENEW_RESULT
    assert second["type"] == m.ERROR and second["code"] == RENEWAL_REFUSED
    assert "renewal_min_interval = 3600 s" in second["message"] and "try again in 3540 s" in second["message"]
    assert _renew(service, T0 + timedelta(minutes=62))["type"] == m.RENEW_RESULT


def test_a_due_certificate_renews_again_after_the_short_floor(service):
    """Past half its lifetime a certificate may renew again (a lost reply), but not twice within 10 s."""
    due = service.old.not_valid_before_utc + (service.old.not_valid_after_utc - service.old.not_valid_before_utc) * 0.6
    assert _renew(service, due)["type"] == m.RENEW_RESULT
    refused = _renew(service, due + timedelta(seconds=5))
    assert refused["code"] == RENEWAL_REFUSED and "try again in 5 s" in refused["message"]
    assert _renew(service, due + timedelta(seconds=11))["type"] == m.RENEW_RESULT


def test_renewal_revokes_all_but_the_presented_and_the_new_certificate(service):
    """Each renewal revokes the connector's other certificates: at most two stay valid."""
    service.handler.node.config = parse_config(
        {"service": {"state_dir": "/tmp/x", "certificate_lifetime_seconds": 600, "renewal_min_interval": 0}}, "s.toml")
    issued = []
    for minute in (1, 2, 3):
        reply = _renew(service, T0 + timedelta(minutes=minute))
        issued.append(keys.serial_hex(keys.load_cert(reply["certificate"].encode())))
    status = {serial: service.store.certificate_status(serial, CONNECTOR_ID)
              for serial in [keys.serial_hex(service.old), *issued]}
    assert list(status.values()) == ["valid", "revoked", "revoked", "valid"], status


def test_a_clock_more_than_a_minute_off_the_services_is_warned_about():
    """The welcome's time more than 60 s from ours gives a warning saying which way and how to fix it; none within."""
    assert renewal.clock_skew_warning(1000.0, 1030.0) is None
    assert renewal.clock_skew_warning(None, 1030.0) is None   # an older service sends no time
    ahead = renewal.clock_skew_warning(1000.0, 1000.0 + 7200)
    assert ahead.startswith("this machine's clock is 7200s ahead of the service's") and "set-ntp" in ahead
    assert "90s behind" in renewal.clock_skew_warning(1090.0, 1000.0)


def test_the_endpoint_names_the_service_address_in_clientservices_retry_lines(tmp_path, ca):
    """ClientService logs "Scheduling retry N to connect {endpoint}": the address, not an object dump."""
    from gateway.connector.targets import Target

    identity = make_identity(tmp_path, ca)
    endpoint = IdentityEndpoint(SimpleNamespace(identity=identity), MemoryReactorClock())
    assert repr(endpoint) == f"the service at {identity.service_host}:{identity.service_port}"
    node2 = endpoint.to(Target("127.0.0.1", 9443, "node2"))
    assert repr(node2) == "the service at 127.0.0.1:9443 (node node2)" and "object at" not in repr(node2)

"""The service's half of Private Access without sockets: the access decision, sign-in codes,
the portal redirect, and the stream-to-stream relay over in-memory tunnels."""

import hashlib
from urllib.parse import parse_qs, urlsplit

import pytest
from twisted.internet.task import Clock

from gateway.config import AppConfig
from gateway.segments import Where, parse_segments
from gateway.service.access import AccessRefused, authorize, credential_problem, single_destination
from gateway.pkce import s256
from gateway.service.users import LoginCodes, Refused, parse_request
from gateway.store.sqlite import SQLiteStore
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.splice import splice_streams
from gateway.tunnel.stream import StreamReset

from tests.unit.syncstore import NowStore, result_of
from tests.unit.test_session import Collector, Pair

ALICE = {"sub": "alice-sub", "name": "Alice", "email": "alice@example.test", "email_verified": True,
         "groups": ["staff"]}
BOB = {"sub": "bob-sub", "name": "Bob", "email": "bob@example.test", "email_verified": False, "groups": []}


def private(name, segments, group="default", **options):
    return AppConfig(name=name, listen="", destination="", host="", port=0, group=group,
                     options=options, segments=parse_segments(segments, Where("t", f"{name}.segments")))


APPS = [
    private("ssh", [{"destination": "10.1.0.0/16", "ports": "22"}], allowed_groups=["staff"]),
    private("dns", [{"destination": "10.1.0.53", "ports": 53, "protocol": "udp"}], allowed_users=["alice-sub"]),
    private("wiki", [{"destination": "wiki.corp.example", "ports": "443"}], allowed_users=["alice@example.test"]),
    private("admin", [{"destination": "*.admin.corp.example", "ports": "1-65535"}], allowed_groups=["admins"]),
]


def test_an_assigned_user_reaches_an_address_inside_a_segment():
    """alice (group staff) reaches 10.1.2.3:22 through app ssh and its segment."""
    grant = authorize(APPS, ALICE, "10.1.2.3", 22, "tcp")
    assert grant.app.name == "ssh" and str(grant.segment) == "tcp 10.1.0.0/16:22"
    assert grant.destination == "10.1.2.3:22"


@pytest.mark.parametrize("host,port,transport,code,words", [
    ("10.2.0.1", 22, "tcp", ResetCode.NO_SEGMENT, "no app segment covers 10.2.0.1:22/tcp"),
    ("10.1.2.3", 23, "tcp", ResetCode.NO_SEGMENT, "no app segment covers 10.1.2.3:23/tcp"),
    ("10.1.0.53", 53, "tcp", ResetCode.NO_SEGMENT, "no app segment covers"),
    ("x.admin.corp.example", 80, "tcp", ResetCode.NOT_ASSIGNED, "not assigned to app admin"),
    ("admin.corp.example", 80, "tcp", ResetCode.NO_SEGMENT, "no app segment covers"),
    ("intranet.corp.example", 443, "tcp", ResetCode.NO_SEGMENT, "no app segment covers"),
])
def test_destinations_outside_segments_or_assignments_are_refused_with_their_reason(host, port, transport, code, words):
    """A CIDR, port, transport or name outside every segment is NO_SEGMENT; an unassigned app NOT_ASSIGNED."""
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, host, port, transport)
    assert e.value.code == code and words in str(e.value)


def test_an_unverified_email_does_not_assign():
    """bob's unverified address would match nothing anyway; an unverified copy of alice's does not either."""
    fake = {**BOB, "email": "alice@example.test"}
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, fake, "wiki.corp.example", 443, "tcp")
    assert e.value.code == ResetCode.NOT_ASSIGNED
    assert authorize(APPS, ALICE, "WIKI.corp.example.", 443, "tcp").app.name == "wiki"


def test_an_app_named_with_one_destination_needs_no_host():
    """--app dns without --to reaches its one destination; an app of a whole network asks for --to."""
    grant = authorize(APPS, ALICE, None, None, "udp", app_name="dns")
    assert (grant.host, grant.port) == ("10.1.0.53", 53)
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, None, None, "tcp", app_name="ssh")
    assert e.value.code == ResetCode.NO_SEGMENT and "--to" in str(e.value)
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, "10.9.9.9", 22, "tcp", app_name="ssh")
    assert "no segment of app ssh covers 10.9.9.9:22/tcp" in str(e.value)
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, "10.1.0.1", 22, "tcp", app_name="nope")
    assert "no private app named 'nope'" in str(e.value)
    assert single_destination(APPS[2], "tcp") == ("wiki.corp.example", 443)


def test_a_malformed_destination_is_refused_not_raised():
    """A host that is no host name or address gets NO_SEGMENT with what was wrong."""
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, "bad host!", 22, "tcp")
    assert e.value.code == ResetCode.NO_SEGMENT
    with pytest.raises(AccessRefused):
        authorize(APPS, ALICE, "10.1.0.1", 0, "tcp")
    with pytest.raises(AccessRefused) as e:
        authorize(APPS, ALICE, "10.1.0.1", 22, "sctp")
    assert e.value.code == ResetCode.REFUSED


@pytest.fixture
def codes_store(tmp_path):
    store = SQLiteStore(tmp_path / "gateway.db")
    yield NowStore(store)
    store.close()


def test_sign_in_codes_are_single_use_bound_to_the_verifier_and_short_lived(codes_store):
    """A code works once with its verifier; a wrong verifier spends it; it expires after its lifetime."""
    clock = Clock()
    codes = LoginCodes(codes_store, clock, lifetime=120)
    verifier = "v" * 50
    code = result_of(codes.issue(ALICE, s256(verifier)))
    assert result_of(codes.redeem(code, verifier))["sub"] == "alice-sub"
    with pytest.raises(Refused):
        result_of(codes.redeem(code, verifier))
    code = result_of(codes.issue(ALICE, s256(verifier)))
    with pytest.raises(Refused, match="PKCE"):
        result_of(codes.redeem(code, "w" * 50))
    code = result_of(codes.issue(ALICE, s256(verifier)))
    with pytest.raises(Refused, match="PKCE"):
        result_of(codes.redeem(code, "ü" * 50))   # not even ASCII: refused, not an internal error
    with pytest.raises(Refused):
        result_of(codes.redeem(code, verifier))
    code = result_of(codes.issue(ALICE, s256(verifier)))
    clock.advance(121)
    with pytest.raises(Refused, match="expired"):
        result_of(codes.redeem(code, verifier))


def test_pending_codes_are_bounded_and_kept_hashed(codes_store):
    """More sign-ins than the limit push the oldest codes out; the store holds no code itself."""
    clock = Clock()
    codes = LoginCodes(codes_store, clock, limit=3)
    first = result_of(codes.issue(ALICE, s256("x" * 43)))
    later = []
    for _ in range(3):
        clock.advance(1)
        later.append(result_of(codes.issue(ALICE, s256("x" * 43))))
    rows = codes_store.store._db.execute("SELECT code_hash FROM login_codes").fetchall()
    assert len(rows) == 3 and not {r[0] for r in rows} & {first, *later}
    with pytest.raises(Refused):
        result_of(codes.redeem(first, "x" * 43))
    assert result_of(codes.redeem(later[0], "x" * 43))["sub"] == "alice-sub"


@pytest.mark.parametrize("message,words", [
    ({"type": "enrol_request"}, "expected a user_certificate_request"),
    ({"type": "user_certificate_request", "csr": "x"}, "needs a PEM 'csr' and a 'credential'"),
    ({"type": "user_certificate_request", "csr": "x", "credential": {"kind": "password"}}, "code, token or refresh"),
    ({"type": "user_certificate_request", "csr": "x", "credential": {"kind": "refresh", "id": "a"}}, "'secret'"),
    ({"type": "user_certificate_request", "csr": "x", "credential": {"kind": "token", "token": "t" * 600}}, "'token'"),
])
def test_malformed_certificate_requests_say_what_is_missing(message, words):
    """Each malformed request is refused as bad_request naming the field."""
    with pytest.raises(Refused) as e:
        parse_request(message)
    assert e.value.code == "bad_request" and words in str(e.value)


def test_credential_problems_name_revocation_and_expiry():
    """A revoked, expired or missing credential each gets its own sentence; a good one none."""
    from datetime import UTC, datetime, timedelta

    from gateway.store.records import UserCredentialRecord

    now = datetime.now(UTC)
    record = UserCredentialRecord("c1", "alice-sub", "token", ALICE, "h", now, now + timedelta(days=1))
    assert credential_problem(record, now) is None
    revoked = UserCredentialRecord("c1", "alice-sub", "token", ALICE, "h", now, now + timedelta(days=1), revoked_at=now)
    assert "revoked" in credential_problem(revoked, now)
    assert "personal token expired" in credential_problem(record, now + timedelta(days=2))
    assert "no longer exists" in credential_problem(None, now)


def test_portal_redirects_to_the_loopback_client_with_a_code():
    """A signed-in browser is sent to 127.0.0.1:PORT/callback with a code bound to the challenge."""
    from gateway_http.auth import Identity
    from gateway_http.portal import login_redirect

    issued = []

    class Access:
        url, tunnel, server_name, ca_fingerprint = "http://127.0.0.1:8080", "127.0.0.1:7443", "127.0.0.1", "sha256:ab"

        @staticmethod
        def issue_code(identity, challenge):
            issued.append((identity, challenge))
            return "CODE"

    challenge = s256("v" * 50)
    answer = result_of(login_redirect(
        f"port=5123&state=abcdefgh12&code_challenge={challenge}&code_challenge_method=S256",
        Identity("alice-sub", "Alice", "alice@example.test", ("staff",), email_verified=True), Access))
    assert answer.status == 302
    location = dict(answer.headers)[b"Location"].decode()
    parts = urlsplit(location)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("http", "127.0.0.1", 5123, "/callback")
    query = parse_qs(parts.query)
    assert query["code"] == ["CODE"] and query["state"] == ["abcdefgh12"] and query["tunnel"] == ["127.0.0.1:7443"]
    assert issued[0][1] == challenge and issued[0][0]["groups"] == ["staff"]
    for bad in ("port=80&state=abcdefgh12&code_challenge=" + challenge + "&code_challenge_method=S256",
                "port=5123&state=a&code_challenge=" + challenge + "&code_challenge_method=S256",
                "port=5123&state=abcdefgh12&code_challenge=" + challenge + "&code_challenge_method=plain"):
        assert login_redirect(bad, Identity("alice-sub"), Access).status == 400
    assert len(issued) == 1


def relay():
    """A user's tunnel and a connector's tunnel, the service relaying one stream pair."""
    user, conn = Pair(on_stream=lambda s: None), Pair()
    held = []
    user.server.on_stream = held.append
    user_stream = user.client.open_stream({"kind": "access"})
    user.pump.flush()
    (service_side,) = held
    app_stream = conn.open({"kind": "app"})   # the service opens to the connector
    service_side.accept()
    splice_streams(service_side, app_stream)
    user.pump.flush()
    mine = Collector()
    opened = Pair.successful(user_stream)
    opened.attach(mine)
    (backend, theirs), = conn.accepted
    return user, conn, opened, mine, backend, theirs


def test_relay_carries_bytes_both_ways_and_half_close():
    """4 MiB up and 1 MiB down arrive intact through two tunnels; FIN crosses each way."""
    user, conn, stream, mine, backend, theirs = relay()
    up = bytes(range(256)) * 16384
    for i in range(0, len(up), 65536):
        stream.write(up[i:i + 65536])
        for _ in range(4):
            user.pump.flush()
            conn.pump.flush()
    down = b"d" * (1 << 20)
    backend.write(down)
    for _ in range(50):
        user.pump.flush()
        conn.pump.flush()
    assert hashlib.sha256(theirs.received).digest() == hashlib.sha256(up).digest()
    assert mine.received == down
    stream.loseConnection()
    for _ in range(4):
        user.pump.flush()
        conn.pump.flush()
    assert theirs.eof
    backend.loseConnection()
    for _ in range(4):
        user.pump.flush()
        conn.pump.flush()
    assert mine.lost is not None and not mine.lost.check(StreamReset)


def test_relay_passes_a_reset_on_with_its_code_and_reason():
    """The connector's RST reaches the user with the same code and sentence."""
    user, conn, stream, mine, backend, theirs = relay()
    backend.reset(ResetCode.DESTINATION_REFUSED, "10.9.9.9 is outside app ssh's segments")
    for _ in range(4):
        conn.pump.flush()
        user.pump.flush()
    assert mine.lost.check(StreamReset)
    assert mine.lost.value.code == ResetCode.DESTINATION_REFUSED
    assert mine.lost.value.reason == "10.9.9.9 is outside app ssh's segments"


def test_relay_backpressure_bounds_what_waits_on_the_service():
    """A connector that stops reading makes the user's sender wait: the service holds about a window."""
    user, conn, stream, mine, backend, theirs = relay()
    backend.pauseProducing()
    for _ in range(64):
        stream.write(b"x" * 65536)
        user.pump.flush()
        conn.pump.flush()
    service_user_side = user.server.streams[stream.id]

    def held():
        return sum(s.pending_bytes for s in conn.client.streams.values())   # queued on the service

    before = held()
    for _ in range(64):   # 4 MiB more: none of it may pile up on the service
        stream.write(b"x" * 65536)
        user.pump.flush()
        conn.pump.flush()
    assert held() == before
    # At most what the user's window let in beyond the queue's high-water mark waits here.
    assert before <= service_user_side.target_window + 256 * 1024 + 64 * 1024
    assert stream.pending_bytes >= 4 * 1024 * 1024   # the user's own end holds the rest


def test_session_facts_from_a_connector_are_kept_flat_and_bounded():
    """Facts for an open app stream are kept (flat values only, at most 32 keys, short strings);
    facts for an unknown stream or in the wrong shape change nothing."""
    from types import SimpleNamespace

    from gateway.service.tunnels import MAX_SESSION_FACTS, TunnelHandler

    stream = SimpleNamespace(log_info=object())
    other = SimpleNamespace()   # not an app stream of ours
    handler = SimpleNamespace(session=SimpleNamespace(streams={2: stream, 4: other}))
    facts = {"dialect": "3.1.1", "signed": True, "nested": {"a": 1}, "long": "x" * 300, "n": 7,
             **{f"k{i}": i for i in range(100)}}
    TunnelHandler._session_facts(handler, {"stream_id": 2, "facts": facts})
    assert stream.session_facts["dialect"] == "3.1.1" and stream.session_facts["signed"] is True
    assert "nested" not in stream.session_facts and "long" not in stream.session_facts
    assert len(stream.session_facts) <= MAX_SESSION_FACTS
    TunnelHandler._session_facts(handler, {"stream_id": 4, "facts": facts})
    TunnelHandler._session_facts(handler, {"stream_id": 9, "facts": facts})
    TunnelHandler._session_facts(handler, {"stream_id": 2, "facts": ["not", "a", "dict"]})
    assert not hasattr(other, "session_facts") and stream.session_facts["n"] == 7

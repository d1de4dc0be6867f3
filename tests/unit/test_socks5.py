"""The SOCKS5 server state machine (issue 10 groundwork): RFC 1928 without I/O, every refusal."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access import socks5
from gateway.access.socks5 import (
    MAX_EARLY_DATA,
    AddressType,
    Command,
    Reply,
    Request,
    Socks5Server,
    SocksError,
    Step,
    UdpDatagram,
    decode_reply,
    decode_udp,
    encode_greeting,
    encode_request,
    encode_udp,
)

GREETING = encode_greeting()
SELECTED = b"\x05\x00"
NO_METHOD = b"\x05\xff"


def refusal(code: Reply) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def negotiate(server: Socks5Server, wire: bytes) -> Step:
    step = server.feed(wire)
    assert step.close is False
    return step


def failing(wire: bytes, server: Socks5Server | None = None) -> SocksError:
    server = server or Socks5Server()
    with pytest.raises(SocksError) as info:
        server.feed(wire)
    assert server.state == "closed"
    return info.value


# ---------------------------------------------------------------------------
# The happy paths


def test_connect_to_a_name_keeps_the_name():
    """A CONNECT to a domain name yields the name as sent, unresolved, and the method selection."""
    server = Socks5Server()
    step = negotiate(server, GREETING + encode_request(Command.CONNECT, "db.corp.example", 5432))
    assert step == Step(send=SELECTED, request=Request(Command.CONNECT, "db.corp.example", 5432, AddressType.DOMAIN))
    assert server.state == "waiting"


@pytest.mark.parametrize("host, text, atyp", [
    ("10.1.2.3", "10.1.2.3", AddressType.IPV4),
    ("2001:DB8:0::7", "2001:db8::7", AddressType.IPV6),
    ("::ffff:10.0.0.1", "::ffff:a00:1", AddressType.IPV6),  # left to gateway.segments to normalise
])
def test_connect_to_an_address(host, text, atyp):
    """IPv4 and IPv6 destinations come out as compressed address text with their address type."""
    server = Socks5Server()
    server.feed(GREETING)
    step = server.feed(encode_request(Command.CONNECT, host, 22))
    assert step == Step(request=Request(Command.CONNECT, text, 22, atyp))


def test_success_hands_over_the_bytes_after_the_request_as_payload():
    """Bytes sent right after the request come back as payload once the reply is a success."""
    server = Socks5Server()
    negotiate(server, GREETING + encode_request(Command.CONNECT, "a.example", 80) + b"GET / HTTP/1.1\r\n")
    assert server.feed(b"Host: a\r\n") == Step()
    step = server.reply(Reply.SUCCEEDED, "127.0.0.1", 4000)
    assert step == Step(send=bytes([5, 0, 0, 1, 127, 0, 0, 1]) + (4000).to_bytes(2, "big"),
                        payload=b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert server.state == "established"
    assert server.feed(b"more") == Step(payload=b"more")


def test_udp_associate_replies_with_the_relay_address():
    """UDP ASSOCIATE is a request like CONNECT; the reply carries the relay's address."""
    server = Socks5Server()
    step = negotiate(server, GREETING + encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
    assert step.request == Request(Command.UDP_ASSOCIATE, "0.0.0.0", 0, AddressType.IPV4)
    assert decode_reply(server.reply(Reply.SUCCEEDED, "::1", 5353).send) == (0, "::1", 5353)


@pytest.mark.parametrize("code", [Reply.GENERAL_FAILURE, Reply.NOT_ALLOWED, Reply.NETWORK_UNREACHABLE,
                                  Reply.HOST_UNREACHABLE, Reply.CONNECTION_REFUSED])
def test_a_refused_request_gets_its_code_and_a_close(code):
    """Refusing a request sends the reply code with an empty address and asks for a close."""
    server = Socks5Server()
    negotiate(server, GREETING + encode_request(Command.CONNECT, "x.example", 80) + b"early")
    assert server.reply(code) == Step(send=refusal(code), close=True)
    assert server.state == "closed"
    with pytest.raises(SocksError):
        server.feed(b"more")


def test_the_reply_codes_are_those_of_rfc_1928():
    """REP values are the RFC's: 0 success, 1 general failure, 2 ruleset ... 8 address type."""
    assert [int(c) for c in Reply] == list(range(9))
    assert (Reply.NOT_ALLOWED, Reply.COMMAND_NOT_SUPPORTED, Reply.ADDRESS_TYPE_NOT_SUPPORTED) == (2, 7, 8)


def test_reply_needs_a_waiting_request():
    """reply() before a request arrived, or twice, is a programming error."""
    server = Socks5Server()
    with pytest.raises(RuntimeError):
        server.reply(Reply.SUCCEEDED)
    server.feed(GREETING + encode_request(Command.CONNECT, "a.example", 80))
    server.reply(Reply.SUCCEEDED)
    with pytest.raises(RuntimeError):
        server.reply(Reply.SUCCEEDED)


def test_a_greeting_may_offer_several_methods():
    """A client offering GSSAPI, user/password and no-auth gets no-auth."""
    assert Socks5Server().feed(encode_greeting(b"\x01\x02\x00")) == Step(send=SELECTED)


# ---------------------------------------------------------------------------
# Every refusal


def test_no_acceptable_method_gets_0xff():
    """A greeting without 'no authentication' gets 0xFF and the connection ends."""
    error = failing(encode_greeting(b"\x02"))
    assert error.reply == NO_METHOD and "0x02" in error.reason


def test_a_greeting_with_no_methods_gets_0xff():
    """NMETHODS = 0 offers nothing; it gets 0xFF."""
    assert failing(b"\x05\x00").reply == NO_METHOD


@pytest.mark.parametrize("first, what", [(4, "SOCKS4"), (0x16, "version 22"), (ord("G"), "version 71")])
def test_not_socks5_is_closed_without_a_reply(first, what):
    """SOCKS4, TLS or HTTP bytes end the connection at the first byte, with nothing written."""
    error = failing(bytes([first]))
    assert error.reply == b"" and what in error.reason


def test_bind_is_refused_with_command_not_supported():
    """BIND gets reply 0x07, after the method selection owed for the greeting in the same chunk."""
    error = failing(GREETING + encode_request(Command.BIND, "10.0.0.1", 80))
    assert error.reply == SELECTED + refusal(Reply.COMMAND_NOT_SUPPORTED) and "BIND" in error.reason


@pytest.mark.parametrize("command", [0, 4, 255])
def test_unknown_commands_are_refused_with_command_not_supported(command):
    """Commands other than CONNECT and UDP ASSOCIATE get 0x07."""
    server = Socks5Server()
    server.feed(GREETING)
    error = failing(bytes([5, command, 0]), server)
    assert error.reply == refusal(Reply.COMMAND_NOT_SUPPORTED)


@pytest.mark.parametrize("atyp", [0, 2, 5, 255])
def test_unknown_address_types_are_refused(atyp):
    """Address types other than 1, 3, 4 get 0x08."""
    server = Socks5Server()
    server.feed(GREETING)
    assert failing(bytes([5, 1, 0, atyp]), server).reply == refusal(Reply.ADDRESS_TYPE_NOT_SUPPORTED)


@pytest.mark.parametrize("request_bytes, reason", [
    (bytes([4, 1, 0, 1, 10, 0, 0, 1, 0, 80]), "version 4"),
    (bytes([5, 1, 1, 1, 10, 0, 0, 1, 0, 80]), "reserved byte"),
    (bytes([5, 1, 0, 3, 0, 0, 80]), "empty"),
    (bytes([5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]), "not UTF-8"),
])
def test_malformed_requests_get_a_general_failure(request_bytes, reason):
    """A wrong version, a non-zero reserved byte or a bad name gets 0x01."""
    server = Socks5Server()
    server.feed(GREETING)
    error = failing(request_bytes, server)
    assert error.reply == refusal(Reply.GENERAL_FAILURE) and reason in error.reason


def test_early_data_is_bounded():
    """More than MAX_EARLY_DATA bytes after the request, before the reply, end the connection."""
    server = Socks5Server()
    server.feed(GREETING + encode_request(Command.CONNECT, "a.example", 80) + b"x" * MAX_EARLY_DATA)
    error = failing(b"x", server)
    assert error.reply == refusal(Reply.GENERAL_FAILURE) and "before the reply" in error.reason


def test_early_data_over_the_bound_in_one_chunk_still_owes_the_selection():
    """A single huge chunk gets the method selection and then the refusal."""
    error = failing(GREETING + encode_request(Command.CONNECT, "a.example", 80) + b"x" * (MAX_EARLY_DATA + 1))
    assert error.reply == SELECTED + refusal(Reply.GENERAL_FAILURE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_garbage_only_ever_raises_socks_errors_and_stays_bounded(data, cuts):
    """Random bytes in random chunks either negotiate or raise SocksError; the buffer stays bounded."""
    server = Socks5Server()
    pos = i = 0
    try:
        while pos < len(data):
            server.feed(data[pos:pos + cuts[i % len(cuts)]])
            pos += cuts[i % len(cuts)]
            i += 1
            assert len(server._buffer) <= 257 + 262 + MAX_EARLY_DATA
    except SocksError as e:
        assert server.state == "closed" and isinstance(e.reply, bytes)


# ---------------------------------------------------------------------------
# Arbitrary chunking and round trips

hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=60)
      .filter(lambda t: not _is_ip(t) and len(t.encode()) <= 255),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def canonical(host: str) -> str:
    """How the machine reports a host: addresses in compressed form, names as sent."""
    return str(ipaddress.ip_address(host)) if _is_ip(host) else host


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Command.CONNECT, Command.UDP_ASSOCIATE]), hosts, st.integers(0, 65535),
       st.binary(max_size=300), st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_request_and_payload(command, host, port, early, cuts):
    """However the client's bytes are split, the request and the payload come out the same."""
    wire = GREETING + encode_request(command, host, port) + early
    server = Socks5Server()
    sent, requests, pos, i = b"", [], 0, 0
    while pos < len(wire):
        step = server.feed(wire[pos:pos + cuts[i % len(cuts)]])
        sent += step.send
        requests += [step.request] if step.request else []
        pos += cuts[i % len(cuts)]
        i += 1
    assert sent == SELECTED
    (request,) = requests
    assert (request.command, request.port) == (command, port)
    assert request.host == canonical(host)
    assert server.reply(Reply.SUCCEEDED).payload == early


@settings(max_examples=200, deadline=None)
@given(hosts, st.integers(0, 65535), st.sampled_from(list(Reply)))
def test_replies_round_trip(host, port, code):
    """A reply decodes to the code, address and port it was made with."""
    server = Socks5Server()
    server.feed(GREETING + encode_request(Command.CONNECT, "a.example", 80))
    code_out, host_out, port_out = decode_reply(server.reply(code, host, port).send)
    assert (code_out, port_out) == (code, port)
    assert host_out == canonical(host)


# ---------------------------------------------------------------------------
# UDP ASSOCIATE datagrams


@settings(max_examples=300, deadline=None)
@given(hosts, st.integers(0, 65535), st.binary(max_size=2000))
def test_udp_datagrams_round_trip(host, port, data):
    """encode_udp then decode_udp gives back the address, port and data."""
    datagram = decode_udp(encode_udp(host, port, data))
    assert (datagram.port, datagram.data) == (port, data)
    assert datagram.host == canonical(host)


def test_udp_header_layout():
    """RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA, as RFC 1928 section 7 lays it out."""
    assert encode_udp("10.0.0.53", 53, b"q") == bytes([0, 0, 0, 1, 10, 0, 0, 53, 0, 53]) + b"q"
    assert decode_udp(bytes([0, 0, 0, 3, 3]) + b"dns" + bytes([0, 53]) + b"q") == \
        UdpDatagram("dns", 53, AddressType.DOMAIN, b"q")


@pytest.mark.parametrize("datagram, reason", [
    (bytes([0, 0, 1, 1, 10, 0, 0, 1, 0, 53]) + b"q", "fragment 1"),
    (bytes([0, 1, 0, 1, 10, 0, 0, 1, 0, 53]), "reserved"),
    (bytes([1, 0, 0, 1, 10, 0, 0, 1, 0, 53]), "reserved"),
    (bytes([0, 0, 0]), "shorter than its header"),
    (bytes([0, 0, 0, 1, 10, 0, 0]), "ends inside its address"),
    (bytes([0, 0, 0, 3, 10]) + b"short", "ends inside its address"),
    (bytes([0, 0, 0, 9, 10, 0, 0, 1, 0, 53]), "address type 9"),
    (bytes([0, 0, 0, 3, 0, 0, 53]), "empty"),
])
def test_malformed_or_fragmented_udp_datagrams_are_refused(datagram, reason):
    """Fragments, non-zero reserved bytes, short headers and bad addresses raise SocksError (dropped)."""
    with pytest.raises(SocksError) as info:
        decode_udp(datagram)
    assert reason in info.value.reason and info.value.reply == b""


def test_names_longer_than_255_bytes_cannot_be_encoded():
    """encode_address refuses a name SOCKS5 cannot carry rather than truncating it."""
    with pytest.raises(ValueError):
        socks5.encode_address("a" * 256, 80)
    with pytest.raises(ValueError):
        socks5.encode_address("", 80)


@pytest.mark.parametrize("data", [b"", b"\x04\x00", bytes([5, 0, 0, 1, 0, 0]), bytes([5, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9])])
def test_decode_reply_refuses_what_is_not_one_complete_reply(data):
    """decode_reply wants exactly one complete SOCKS5 reply."""
    with pytest.raises(ValueError):
        decode_reply(data)

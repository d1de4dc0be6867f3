"""App segments (issue 10 groundwork): parsing with named errors, matching on both sides, overlaps."""

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.segments import (
    DestinationError,
    HostName,
    Network,
    PortRange,
    Segment,
    Where,
    Wildcard,
    allows_address,
    match_destination,
    normalise_host,
    overlapping_pair,
    overlaps,
    parse_destination,
    parse_ports,
    parse_segments,
)

WHERE = Where("gw.toml", "apps[2].segments")


def seg(destination, ports=80, protocol="tcp"):
    return parse_segments([{"destination": destination, "ports": ports, "protocol": protocol}], WHERE)[0]


def config_error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_segments(raw, WHERE)
    return info.value


# ---------------------------------------------------------------------------
# Parsing


def test_a_segment_table_parses_into_destination_ports_and_protocol():
    """A table with destination, ports and protocol becomes a Segment with merged port ranges."""
    (s,) = parse_segments([{"destination": "10.0.0.0/8", "ports": "80,443,8000-8100", "protocol": "udp"}], WHERE)
    assert s == Segment(Network(ipaddress.ip_network("10.0.0.0/8")),
                        (PortRange(80, 80), PortRange(443, 443), PortRange(8000, 8100)), "udp")
    assert str(s) == "udp 10.0.0.0/8:80,443,8000-8100"


def test_protocol_defaults_to_tcp():
    """A segment without protocol is a TCP segment."""
    (s,) = parse_segments([{"destination": "db.corp.example", "ports": 5432}], WHERE)
    assert s.protocol == "tcp" and s.destination == HostName("db.corp.example")


@pytest.mark.parametrize("value, expected", [
    (3389, ((3389, 3389),)),
    ("80,443", ((80, 80), (443, 443))),
    ("8000-8100", ((8000, 8100),)),
    (" 80 , 8000 - 8100 ", ((80, 80), (8000, 8100))),
    ([443, "80", "8000-8100"], ((80, 80), (443, 443), (8000, 8100))),
    (["1-10", "5-20", 21, 30], ((1, 21), (30, 30))),
    ("1-65535", ((1, 65535),)),
])
def test_ports_accept_a_port_a_list_a_range_and_mixes(value, expected):
    """Ports come as an int, a string list, a range or an array of those, sorted and merged."""
    assert tuple((r.first, r.last) for r in parse_ports(value)) == expected


@pytest.mark.parametrize("value, detail", [
    (0, "port 0 is outside 1..65535"),
    (65536, "port 65536 is outside 1..65535"),
    ("80,,443", "'' is neither a port nor a range"),
    ("100-90", "range 100-90 runs backwards"),
    ("http", "'http' is neither a port nor a range"),
    ("８０", "'８０' is neither a port nor a range"),
    ([], "the array is empty"),
    (True, "True is not a port"),
    (80.0, "float is neither an integer nor a string"),
    ("-5", "'-5' is neither a port nor a range"),
])
def test_bad_ports_are_refused_naming_the_key(value, detail):
    """Malformed ports raise a ConfigError naming segments[0].ports, the expectation and the problem."""
    error = config_error([{"destination": "10.0.0.1", "ports": value}])
    assert error.file == "gw.toml" and error.key == "apps[2].segments[0].ports"
    assert error.expected.startswith('expected a port, a list or a range such as 3389, "80,443"')
    assert detail in error.expected


@pytest.mark.parametrize("text, destination", [
    ("10.1.2.3", Network(ipaddress.ip_network("10.1.2.3/32"))),
    ("2001:db8::/32", Network(ipaddress.ip_network("2001:db8::/32"))),
    ("2001:DB8::1", Network(ipaddress.ip_network("2001:db8::1/128"))),
    ("::ffff:10.0.0.7", Network(ipaddress.ip_network("10.0.0.7/32"))),
    ("::ffff:10.0.0.0/104", Network(ipaddress.ip_network("10.0.0.0/8"))),
    ("Files.Corp.Example.", HostName("files.corp.example")),
    ("fileserver", HostName("fileserver")),
    ("srv_01.corp.example", HostName("srv_01.corp.example")),
    ("Bücher.example", HostName("xn--bcher-kva.example")),
    ("bücher。example", HostName("xn--bcher-kva.example")),
    ("*.Corp.Example", Wildcard("corp.example")),
    ("*.lan", Wildcard("lan")),
])
def test_destinations_are_normalised(text, destination):
    """Names are lower-cased, IDNA-encoded and lose a trailing dot; mapped IPv6 becomes IPv4."""
    assert parse_destination(text) == destination


@pytest.mark.parametrize("text, detail", [
    ("10.0.0.1/8", "has host bits set"),
    ("10.1", "an IPv4 address a.b.c.d"),
    ("010.0.0.1", "an IPv4 address a.b.c.d"),
    ("fe80::1%eth0", "without a scope id"),
    ("fe80::%eth0/64", "without a scope id"),
    ("a..b", "empty label"),
    (".corp.example", "empty label"),
    ("corp.2130706433", "last label is numeric"),
    ("intranet.0x7f", "last label is numeric"),
    ("-bad.example", "label '-bad'"),
    ("a b.example", "label 'a b'"),
    ("*", "a wildcard only as a whole first label"),
    ("*corp.example", "a wildcard only as a whole first label"),
    ("a.*.example", "a wildcard only as a whole first label"),
    ("*.*.example", "a wildcard only as a whole first label"),
    ("xn--zz.example", "not valid IDNA"),
    ("a" * 64 + ".example", "label"),
    (".".join(["abcdefgh"] * 30), "more than 253"),
])
def test_bad_destinations_are_refused_naming_the_key(text, detail):
    """A malformed destination raises a ConfigError naming segments[0].destination and why."""
    error = config_error([{"destination": text, "ports": 80}])
    assert error.key == "apps[2].segments[0].destination"
    assert error.expected.startswith("expected ") and detail in error.expected


@pytest.mark.parametrize("raw, key, expected", [
    ({"destination": "x", "ports": 1, "protocl": "tcp"}, "apps[2].segments[0].protocl",
     'unknown key "protocl"; did you mean "protocol"?'),
    ({"ports": 1}, "apps[2].segments[0].destination",
     'expected a host name, a wildcard such as "*.corp.example", an IP address or a CIDR, '
     "got nothing (this key is required)"),
    ({"destination": "x"}, "apps[2].segments[0].ports", "got nothing (this key is required)"),
    ({"destination": "x", "ports": 1, "protocol": "sctp"}, "apps[2].segments[0].protocol",
     'expected "tcp" or "udp", got "sctp"'),
    ({"destination": "x", "ports": 1, "protocol": "TCP"}, "apps[2].segments[0].protocol", 'got "TCP"'),
    ({"destination": 10, "ports": 1}, "apps[2].segments[0].destination", "got 10 (an integer)"),
    ({"destination": "", "ports": 1}, "apps[2].segments[0].destination", 'got ""'),
    ("10.0.0.0/8", "apps[2].segments[0]", 'expected a table such as { destination = "10.0.0.0/8"'),
])
def test_bad_segment_tables_are_refused_naming_the_key(raw, key, expected):
    """Unknown keys, missing keys, a bad protocol or a non-table name the exact key path."""
    error = config_error([raw])
    assert error.key == key and expected in error.expected


@pytest.mark.parametrize("raw", [[], {}, "10.0.0.0/8", None])
def test_segments_must_be_a_non_empty_array(raw):
    """An app's segments are a non-empty array; anything else names the segments key itself."""
    error = config_error(raw)
    assert error.key == "apps[2].segments"
    assert error.expected.startswith("expected a non-empty array of segment tables, got")


def test_the_error_reads_like_a_config_error():
    """The message names file, key and expectation like every other config error."""
    error = config_error([{"destination": "10.0.0.0/8", "ports": 1}, {"destination": "x", "ports": "9-1"}])
    assert str(error) == ('gw.toml: apps[2].segments[1].ports: expected a port, a list or a range such as 3389, '
                          '"80,443", "8000-8100" or [80, "8000-8100"] (range 9-1 runs backwards), got "9-1"')


# ---------------------------------------------------------------------------
# The service's check: by name, never resolved


def test_wildcard_matches_deeper_names_but_not_the_domain_itself():
    """*.corp.example matches a.corp.example and a.b.corp.example, not corp.example or xcorp.example."""
    segments = [seg("*.corp.example")]
    assert match_destination(segments, "a.corp.example", 80, "tcp") == segments[0]
    assert match_destination(segments, "A.B.Corp.Example.", 80, "tcp") == segments[0]
    assert match_destination(segments, "corp.example", 80, "tcp") is None
    assert match_destination(segments, "xcorp.example", 80, "tcp") is None


def test_match_needs_the_port_and_the_protocol():
    """A destination matches only on one of the segment's ports and with its protocol."""
    segments = [seg("files.corp.example", "445,8000-8100")]
    assert match_destination(segments, "files.corp.example", 8050, "tcp") == segments[0]
    assert match_destination(segments, "files.corp.example", 8101, "tcp") is None
    assert match_destination(segments, "files.corp.example", 445, "udp") is None


def test_names_are_normalised_before_matching():
    """Upper case, a trailing dot and Unicode forms match the normalised segment."""
    segments = [seg("bücher.example")]
    for asked in ("BÜCHER.example", "xn--bcher-kva.example.", "bücher。example"):
        assert match_destination(segments, asked, 80, "tcp") == segments[0], asked


def test_a_name_never_matches_an_address_segment_on_the_service():
    """The service does not resolve: a name inside a CIDR's zone is not matched by the CIDR."""
    segments = [seg("10.0.0.0/8"), seg("::/0")]
    assert match_destination(segments, "host.corp.example", 80, "tcp") is None
    assert match_destination(segments, "10.2.3.4", 80, "tcp") == segments[0]


def test_an_address_never_matches_a_name_segment():
    """An address asked for is matched only against address segments."""
    assert match_destination([seg("*.corp.example")], "10.0.0.1", 80, "tcp") is None


def test_mapped_ipv6_is_matched_as_ipv4():
    """::ffff:10.0.0.1 is checked as 10.0.0.1 against IPv4 CIDRs."""
    segments = [seg("10.0.0.0/8")]
    assert match_destination(segments, "::ffff:10.0.0.1", 80, "tcp") == segments[0]
    assert match_destination(segments, "::ffff:11.0.0.1", 80, "tcp") is None


@pytest.mark.parametrize("host", ["", "10.1", "2130706433", "0x7f.1", "a..b", "*.corp.example", "fe80::1%eth0",
                                  "127.1", "300.1.2.3"])
def test_malformed_or_ambiguous_hosts_are_refused(host):
    """Hosts that are malformed, wildcards or numeric forms a resolver would read as IPv4 raise."""
    with pytest.raises(DestinationError):
        match_destination([seg("::/0"), seg("0.0.0.0/0"), seg("*.corp.example")], host, 80, "tcp")


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_malformed_ports_are_refused(port):
    """A port outside 1..65535 (or not an int) raises rather than matching nothing."""
    with pytest.raises(DestinationError):
        match_destination([seg("10.0.0.0/8")], "10.0.0.1", port, "tcp")


def test_first_matching_segment_is_returned():
    """When several segments match, the first in order is the one reported."""
    segments = [seg("*.corp.example", 443), seg("www.corp.example", 443)]
    assert match_destination(segments, "www.corp.example", 443, "tcp") is segments[0]


def test_normalise_host_tells_names_from_addresses():
    """normalise_host returns an address object for literals and a lower-case string for names."""
    assert normalise_host("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert normalise_host("WWW.Example.") == "www.example"


# ---------------------------------------------------------------------------
# The connector's check: after its own resolution


def test_a_resolved_address_inside_a_cidr_is_allowed_whatever_the_name():
    """The address the connector dials decides when it lies in an address segment."""
    segments = [seg("10.0.0.0/8")]
    assert allows_address(segments, "anything.example", "10.9.9.9", 80, "tcp") == segments[0]
    assert allows_address(segments, None, "10.9.9.9", 80, "tcp") == segments[0]


def test_a_name_resolving_outside_every_cidr_is_refused():
    """A name that is in no name segment and resolves outside the CIDRs is refused."""
    segments = [seg("10.0.0.0/8")]
    assert allows_address(segments, "evil.example", "192.0.2.1", 80, "tcp") is None


def test_a_named_host_is_allowed_wherever_it_resolves():
    """A segment naming the host (or its wildcard) allows the address it resolved to."""
    segments = [seg("10.0.0.0/8"), seg("*.corp.example")]
    assert allows_address(segments, "wiki.corp.example", "192.0.2.1", 80, "tcp") == segments[1]
    assert allows_address(segments, "corp.example", "192.0.2.1", 80, "tcp") is None


def test_names_never_reach_loopback_link_local_unspecified_or_multicast():
    """A name segment does not allow loopback, link-local, unspecified or multicast answers."""
    segments = [seg("*.corp.example")]
    for address in ("127.0.0.1", "::1", "169.254.169.254", "0.0.0.0", "::", "fe80::1", "224.0.0.1",
                    "::ffff:127.0.0.1"):
        assert allows_address(segments, "x.corp.example", address, 80, "tcp") is None, address


def test_an_address_segment_can_still_allow_loopback():
    """An admin who lists a loopback address in a segment can reach it, by name too."""
    segments = [seg("*.corp.example"), seg("127.0.0.1")]
    assert allows_address(segments, "x.corp.example", "127.0.0.1", 80, "tcp") == segments[1]


def test_the_connector_checks_port_and_protocol():
    """The connector refuses a port or protocol outside the matching segment."""
    segments = [seg("10.0.0.0/8", 53, "udp"), seg("dns.corp.example", 53, "udp")]
    assert allows_address(segments, None, "10.0.0.53", 53, "udp") == segments[0]
    assert allows_address(segments, None, "10.0.0.53", 53, "tcp") is None
    assert allows_address(segments, "dns.corp.example", "192.0.2.1", 54, "udp") is None


def test_mapped_resolved_address_is_checked_as_ipv4():
    """A resolver answer ::ffff:a.b.c.d is checked against the IPv4 segments."""
    segments = [seg("10.0.0.0/8")]
    assert allows_address(segments, None, "::ffff:10.0.0.1", 80, "tcp") == segments[0]
    assert allows_address(segments, None, ipaddress.ip_address("::ffff:11.0.0.1"), 80, "tcp") is None


def test_an_address_literal_as_name_is_allowed_only_by_address_segments():
    """When the name asked for is itself an address, a name segment cannot allow it."""
    segments = [seg("*.corp.example")]
    assert allows_address(segments, "192.0.2.1", "192.0.2.1", 80, "tcp") is None


def test_a_malformed_resolved_address_raises():
    """The connector's check refuses to guess about something that is not an address."""
    with pytest.raises(DestinationError):
        allows_address([seg("10.0.0.0/8")], None, "10.0.0.1%eth0", 80, "tcp")
    with pytest.raises(DestinationError):
        allows_address([seg("10.0.0.0/8")], None, "not-an-address", 80, "tcp")


# ---------------------------------------------------------------------------
# Overlaps


@pytest.mark.parametrize("a, b, expected", [
    (("10.0.0.0/8", 80), ("10.1.0.0/16", "1-100"), True),
    (("10.0.0.0/8", 80), ("11.0.0.0/8", 80), False),
    (("10.0.0.0/8", 80), ("10.0.0.0/8", 81), False),
    (("10.0.0.0/8", 80, "tcp"), ("10.0.0.0/8", 80, "udp"), False),
    (("2001:db8::/32", 80), ("2001:db8:1::5", 80), True),
    (("::/0", 80), ("0.0.0.0/0", 80), False),
    (("a.corp.example", 80), ("A.Corp.Example.", 80), True),
    (("a.corp.example", 80), ("b.corp.example", 80), False),
    (("*.corp.example", 80), ("a.b.corp.example", 80), True),
    (("*.corp.example", 80), ("corp.example", 80), False),
    (("*.corp.example", 80), ("*.b.corp.example", 80), True),
    (("*.corp.example", 80), ("*.xcorp.example", 80), False),
    (("*.corp.example", 80), ("*.corp.example", "80-90"), True),
    (("files.corp.example", 445), ("10.0.0.0/8", 445), False),
])
def test_overlaps(a, b, expected):
    """Two segments overlap when one protocol, some port and some destination are shared."""
    assert overlaps(seg(*a), seg(*b)) is expected
    assert overlaps(seg(*b), seg(*a)) is expected


def test_overlapping_pair_names_both_segments():
    """overlapping_pair returns the first pair that overlaps, so an error can name both."""
    mine = [seg("10.0.0.0/8", 22), seg("*.corp.example", 443)]
    theirs = [seg("192.0.2.0/24", 22), seg("www.corp.example", "400-500")]
    assert overlapping_pair(mine, theirs) == (mine[1], theirs[1])
    assert overlapping_pair(mine, theirs[:1]) is None


# ---------------------------------------------------------------------------
# Properties

ipv4_networks = st.builds(
    lambda addr, prefix: ipaddress.IPv4Network((addr, prefix), strict=False),
    st.integers(0, 2**32 - 1), st.integers(0, 32))
ipv6_networks = st.builds(
    lambda addr, prefix: ipaddress.IPv6Network((addr, prefix), strict=False),
    st.integers(0, 2**128 - 1), st.integers(0, 128)).filter(lambda n: not n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")))
port_ranges = st.tuples(st.integers(1, 65535), st.integers(0, 2000)).map(lambda t: (t[0], min(65535, t[0] + t[1])))
labels = st.sampled_from(["a", "b", "corp", "example", "x-1", "srv"])
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
destinations = st.one_of(
    ipv4_networks.map(str), ipv6_networks.map(str), names, names.map(lambda n: "*." + n))
segments = st.builds(
    lambda d, ports, protocol: seg(d, [f"{a}-{b}" for a, b in ports], protocol),
    destinations, st.lists(port_ranges, min_size=1, max_size=4), st.sampled_from(["tcp", "udp"]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(ipv4_networks, ipv6_networks), st.integers(0, 2**128 - 1))
def test_an_address_matches_a_cidr_exactly_when_it_lies_inside(network, number):
    """Addresses inside a CIDR match it, and addresses outside it do not (checked by integer range)."""
    number %= 2 ** network.max_prefixlen
    address = ipaddress.IPv6Address(number) if network.version == 6 else ipaddress.IPv4Address(number)
    assume(network.version == 4 or address.ipv4_mapped is None)
    inside = int(network.network_address) <= number <= int(network.broadcast_address)
    found = match_destination([seg(str(network))], str(address), 80, "tcp")
    assert (found is not None) is inside
    assert (allows_address([seg(str(network))], None, address, 80, "tcp") is not None) is inside


@settings(max_examples=300, deadline=None)
@given(st.lists(port_ranges, min_size=1, max_size=6), st.integers(1, 65535))
def test_a_port_matches_exactly_when_some_range_holds_it(ranges, port):
    """Merging ranges keeps exactly the ports of the ranges written."""
    segment = seg("10.0.0.0/8", ",".join(f"{a}-{b}" for a, b in ranges))
    inside = any(a <= port <= b for a, b in ranges)
    assert segment.allows_port(port) is inside
    assert (match_destination([segment], "10.0.0.1", port, "tcp") is not None) is inside


@settings(max_examples=300, deadline=None)
@given(segments, segments)
def test_overlaps_is_symmetric(a, b):
    """overlaps(a, b) == overlaps(b, a)."""
    assert overlaps(a, b) == overlaps(b, a)


@settings(max_examples=200, deadline=None)
@given(segments)
def test_a_segment_overlaps_itself(a):
    """Every segment overlaps itself."""
    assert overlaps(a, a)


@settings(max_examples=300, deadline=None)
@given(segments, segments, names)
def test_a_name_matching_both_segments_means_they_overlap(a, b, name):
    """If some name, port and protocol match both segments, overlaps says so."""
    port = a.ports[0].first
    if match_destination([a], name, port, a.protocol) and match_destination([b], name, port, a.protocol):
        assert overlaps(a, b)


@settings(max_examples=300, deadline=None)
@given(st.lists(ipv4_networks, min_size=2, max_size=2), st.integers(1, 65535))
def test_two_cidrs_overlap_exactly_when_they_share_an_address(networks, port):
    """Address segments overlap iff their ranges share an address (the later start is in both)."""
    a, b = (seg(str(n), port) for n in networks)
    witness = max(networks[0].network_address, networks[1].network_address)
    shared = witness in networks[0] and witness in networks[1]
    assert overlaps(a, b) is shared

"""The frame codec: round trips, arbitrary splits, and malformed input."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ProtocolError
from gateway.tunnel import frame
from gateway.tunnel.frame import Flag, FrameDecoder, FrameType, GoAwayCode, ResetCode

frames = st.one_of(
    st.builds(lambda sid, p: (frame.data(sid, p), (FrameType.DATA, Flag.NONE, sid, 0, p)),
              st.integers(1, 2**32 - 1), st.binary(max_size=3000)),
    st.builds(lambda sid, d: (frame.window_update(sid, d), (FrameType.WINDOW_UPDATE, Flag.NONE, sid, d, b"")),
              st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: (frame.ping(v), (FrameType.PING, Flag.SYN, 0, v, b"")), st.integers(0, 2**32 - 1)),
    st.builds(lambda sid: (frame.fin(sid), (FrameType.DATA, Flag.FIN, sid, 0, b"")), st.integers(1, 2**32 - 1)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=20), st.lists(st.integers(1, 500), min_size=1, max_size=50))
def test_frames_survive_any_split(items, cuts):
    """Any sequence of frames decodes to the same frames however the bytes are split."""
    wire = b"".join(w for w, _ in items)
    decoder = FrameDecoder()
    out, pos, i = [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        out.extend(decoder.feed(wire[pos:pos + step]))
        pos += step
        i += 1
    assert [(f.type, f.flags, f.stream_id, f.value, f.payload) for f in out] == [e for _, e in items]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_protocol_errors(data):
    """Random bytes either decode or raise ProtocolError, never anything else."""
    try:
        FrameDecoder().feed(data)
    except ProtocolError as e:
        assert e.code in (GoAwayCode.PROTOCOL_ERROR, GoAwayCode.UNSUPPORTED_VERSION)


def test_reason_and_metadata_round_trip():
    """RST and GO_AWAY carry a code and a sentence; SYN carries a JSON object."""
    (rst,) = FrameDecoder().feed(frame.rst(3, ResetCode.REFUSED, "not allowed: 10.0.0.1:22"))
    assert rst.flags == Flag.RST and frame.decode_reason(rst.payload) == (ResetCode.REFUSED, "not allowed: 10.0.0.1:22")
    (ga,) = FrameDecoder().feed(frame.go_away(GoAwayCode.NOT_AUTHORIZED, "revoked"))
    assert ga.type == FrameType.GO_AWAY and frame.decode_reason(ga.payload) == (GoAwayCode.NOT_AUTHORIZED, "revoked")
    (syn,) = FrameDecoder().feed(frame.syn(5, {"kind": "app", "app": "web"}))
    assert syn.flags == Flag.SYN and frame.decode_metadata(syn.payload) == {"kind": "app", "app": "web"}


def test_header_is_twelve_bytes_big_endian():
    """The header layout matches docs/protocol.md: version, type, flags, stream id, length."""
    wire = frame.window_update(0x01020304, 0x0A0B0C0D, Flag.ACK)
    assert wire == bytes([1, 1, 0, 2, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D])


@pytest.mark.parametrize("bad, message", [
    (struct.pack("!BBHII", 1, 9, 0, 1, 0), "unknown frame type 9"),
    (struct.pack("!BBHII", 1, 0, 0x40, 1, 0), "unknown flags"),
    (struct.pack("!BBHII", 7, 0, 0, 1, 0), "frame version 7"),
    (struct.pack("!BBHII", 1, 0, 0, 1, frame.MAX_PAYLOAD + 1), "exceeds the limit"),
])
def test_malformed_headers_are_named(bad, message):
    """Each malformed header raises a ProtocolError that says what was wrong."""
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(bad)


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1, 2]", b"not json"])
def test_bad_metadata_is_a_protocol_error(payload):
    """SYN metadata that is not a JSON object is refused."""
    with pytest.raises(ProtocolError, match="JSON object"):
        frame.decode_metadata(payload)


def test_oversized_metadata_is_refused_when_encoding():
    """We never send a metadata block over the limit."""
    with pytest.raises(ValueError, match="limit"):
        frame.encode_metadata({"x": "y" * frame.MAX_METADATA})

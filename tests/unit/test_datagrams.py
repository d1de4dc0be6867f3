"""UDP datagrams on a stream (issue 10 groundwork): boundaries kept, bounded buffer, drop-oldest queue."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tunnel.datagrams import (
    MAX_DATAGRAM,
    DatagramDecoder,
    DatagramError,
    DatagramQueue,
    encode_datagram,
)


def test_framing_is_a_two_byte_big_endian_length_then_the_bytes():
    """The layout matches docs/protocol.md: length (2 bytes, network order), datagram."""
    assert encode_datagram(b"abc") == b"\x00\x03abc"
    assert encode_datagram(b"") == b"\x00\x00"
    assert encode_datagram(b"x" * 258)[:2] == b"\x01\x02"


def test_the_largest_datagram_fits_and_one_more_byte_does_not():
    """65,535 bytes is the most a length prefix can say; more raises ValueError."""
    assert DatagramDecoder().feed(encode_datagram(b"x" * MAX_DATAGRAM)) == [b"x" * MAX_DATAGRAM]
    with pytest.raises(ValueError):
        encode_datagram(b"x" * (MAX_DATAGRAM + 1))


def test_empty_datagrams_keep_their_place():
    """A zero-length datagram is a datagram (UDP allows them) and is not merged with its neighbours."""
    wire = encode_datagram(b"a") + encode_datagram(b"") + encode_datagram(b"b")
    assert DatagramDecoder().feed(wire) == [b"a", b"", b"b"]


def test_a_datagram_over_the_decoders_limit_is_refused_at_its_prefix():
    """A prefix above max_datagram raises at once, before its bytes are buffered."""
    decoder = DatagramDecoder(max_datagram=512)
    assert decoder.feed(encode_datagram(b"x" * 512)) == [b"x" * 512]
    with pytest.raises(DatagramError, match="513 bytes is over this end's limit of 512"):
        decoder.feed(b"\x02\x01")


@pytest.mark.parametrize("limit", [-1, MAX_DATAGRAM + 1])
def test_decoder_limit_must_fit_the_prefix(limit):
    """max_datagram outside 0..65535 is a programming error."""
    with pytest.raises(ValueError):
        DatagramDecoder(max_datagram=limit)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=30), st.lists(st.integers(1, 700), min_size=1, max_size=40))
def test_any_chunking_gives_back_the_same_datagrams(datagrams, cuts):
    """However the stream's bytes are split, the same datagrams come out in order."""
    wire = b"".join(encode_datagram(d) for d in datagrams)
    decoder = DatagramDecoder()
    out, pos, i = [], 0, 0
    while pos < len(wire):
        out += decoder.feed(wire[pos:pos + cuts[i % len(cuts)]])
        pos += cuts[i % len(cuts)]
        i += 1
        assert decoder.pending <= 1 + max((len(d) for d in datagrams), default=0)
    assert out == datagrams and decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 2000))
def test_the_partial_buffer_never_exceeds_one_datagram(data, limit):
    """Arbitrary bytes leave at most max_datagram + 1 bytes pending, or raise DatagramError."""
    decoder = DatagramDecoder(max_datagram=limit)
    try:
        decoder.feed(data)
    except DatagramError:
        return
    assert decoder.pending <= limit + 1


# ---------------------------------------------------------------------------
# The queue


def test_the_queue_drops_the_oldest_when_full_and_counts_it():
    """Over max_datagrams the oldest goes first; dropped and dropped_bytes count it."""
    queue = DatagramQueue(max_datagrams=2, max_bytes=100)
    assert queue.push(b"one") == 0 and queue.push(b"two") == 0
    assert queue.push(b"three") == 1
    assert (queue.dropped, queue.dropped_bytes) == (1, 3)
    assert [queue.pop(), queue.pop()] == [b"two", b"three"]
    assert len(queue) == 0 and queue.queued_bytes == 0


def test_the_byte_bound_drops_as_many_old_datagrams_as_needed():
    """A large datagram pushes out enough old ones to fit under max_bytes."""
    queue = DatagramQueue(max_datagrams=10, max_bytes=10)
    for d in (b"aaa", b"bbb", b"ccc"):
        queue.push(d)
    assert queue.push(b"dddddddd") == 3
    assert (queue.dropped, queue.dropped_bytes, queue.queued_bytes, len(queue)) == (3, 9, 8, 1)


def test_a_datagram_bigger_than_the_queue_is_dropped_itself():
    """A datagram over max_bytes cannot fit; it is dropped and the queue keeps what it had."""
    queue = DatagramQueue(max_datagrams=10, max_bytes=10)
    queue.push(b"keep")
    assert queue.push(b"x" * 11) == 1
    assert (queue.dropped, queue.dropped_bytes) == (1, 11) and queue.pop() == b"keep"


def test_pop_on_an_empty_queue_raises_and_clear_is_not_a_drop():
    """pop() on nothing raises IndexError; clear() forgets without counting drops."""
    queue = DatagramQueue(max_datagrams=3, max_bytes=30)
    with pytest.raises(IndexError):
        queue.pop()
    queue.push(b"a")
    queue.clear()
    assert (len(queue), queue.queued_bytes, queue.dropped) == (0, 0, 0)


@pytest.mark.parametrize("args", [(0, 10), (1, -1)])
def test_queue_bounds_must_make_sense(args):
    """A queue that can hold no datagram is a programming error."""
    with pytest.raises(ValueError):
        DatagramQueue(*args)


operations = st.lists(st.one_of(st.binary(max_size=300), st.none()), max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1000), operations)
def test_the_queue_stays_within_bounds_and_counts_drops_exactly(max_datagrams, max_bytes, ops):
    """Against a model: never over either bound, oldest dropped first, every drop counted."""
    queue = DatagramQueue(max_datagrams, max_bytes)
    model: list[bytes] = []
    dropped = dropped_bytes = 0
    for op in ops:
        if op is None:
            if model:
                assert queue.pop() == model.pop(0)
            continue
        before = dropped
        if len(op) > max_bytes:
            dropped, dropped_bytes = dropped + 1, dropped_bytes + len(op)
        else:
            while model and (len(model) >= max_datagrams or sum(map(len, model)) + len(op) > max_bytes):
                old = model.pop(0)
                dropped, dropped_bytes = dropped + 1, dropped_bytes + len(old)
            model.append(op)
        assert queue.push(op) == dropped - before
        assert len(queue) <= max_datagrams and queue.queued_bytes <= max_bytes
        assert (queue.dropped, queue.dropped_bytes) == (dropped, dropped_bytes)
        assert queue.queued_bytes == sum(map(len, model)) and len(queue) == len(model)

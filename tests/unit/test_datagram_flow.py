"""What both ends of a UDP flow share: the sender's bounded queue and the idle timer (Clock)."""

from twisted.internet.task import Clock

from gateway.tunnel.datagram_flow import DatagramSender, IdleTimer
from gateway.tunnel.datagrams import DatagramDecoder


class Stream:
    closed = False

    def __init__(self):
        self.written = b""
        self.producer = None

    def write(self, data):
        self.written += data

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def test_idle_timer_fires_only_after_a_quiet_interval_with_one_timer():
    """Touches postpone idling without adding timers; quiet for the interval, it fires once."""
    clock, fired = Clock(), []
    timer = IdleTimer(clock, 10, lambda: fired.append(clock.seconds()))
    for _ in range(5):
        clock.advance(6)
        timer.touch()
        assert len(clock.getDelayedCalls()) == 1
    assert not fired
    clock.advance(10)
    assert fired == [40.0] and not clock.getDelayedCalls()
    timer.cancel()


def test_sender_queues_until_attached_and_while_paused_dropping_the_oldest():
    """Before the stream and while it pauses us, datagrams wait (bounded); resume sends them in order."""
    sender = DatagramSender(max_datagrams=3, max_bytes=1024)
    for i in range(5):
        sender.send(b"%d" % i)
    stream = Stream()
    sender.attach(stream)
    assert stream.producer is sender
    assert DatagramDecoder().feed(stream.written) == [b"2", b"3", b"4"] and sender.queue.dropped == 2
    sender.pauseProducing()
    sender.send(b"5")
    assert len(sender.queue) == 1
    sender.resumeProducing()
    assert DatagramDecoder().feed(stream.written)[-1] == b"5" and sender.sent == 4
    sender.close()
    assert stream.producer is None and sender.paused

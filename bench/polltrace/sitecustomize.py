"""A reactor-turn tracer for bench runs: off unless GATEWAY_POLLTRACE names a directory.

Put this directory on PYTHONPATH of a twistd process (the service, the connector) and set
GATEWAY_POLLTRACE=DIR: every epoll_wait of its reactor is recorded as (entered, returned,
events) in CLOCK_MONOTONIC seconds, which all processes of the machine share, and written to
DIR/poll.<pid> at exit. bench/polltrace.py reads two such files and says how long each
process sat in epoll_wait and for how much of that both did at once. Nothing in the project
imports this; without the variable it patches nothing.
"""

import os

if os.environ.get("GATEWAY_POLLTRACE"):
    import array
    import atexit
    import time

    from twisted.internet import epollreactor

    _out = os.environ["GATEWAY_POLLTRACE"]
    _turns = array.array("d")
    _LIMIT = 3_000_000   # 1M turns, 24 MB: the record stops growing there
    _init = epollreactor.EPollReactor.__init__

    class _TimedPoller:
        """The reactor's epoll object, with each poll() timed."""

        def __init__(self, poller):
            self._poller = poller

        def __getattr__(self, name):
            return getattr(self._poller, name)

        def poll(self, timeout=-1, maxevents=-1):
            entered = time.monotonic()
            events = self._poller.poll(timeout, maxevents)
            if len(_turns) < _LIMIT:
                _turns.extend((entered, time.monotonic(), len(events)))
            return events

    def _traced_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self._poller = _TimedPoller(self._poller)

    epollreactor.EPollReactor.__init__ = _traced_init

    @atexit.register
    def _write():
        if _turns:
            with open(os.path.join(_out, f"poll.{os.getpid()}"), "wb") as f:
                _turns.tofile(f)

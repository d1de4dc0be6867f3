"""The connector as the updater's child process: started, restarted if it dies, drained on demand.

SIGTERM is the connector's drain (GO_AWAY on every tunnel, open streams finish within
`[connector] drain_timeout`, then it exits 0); after `drain_timeout + stop_timeout` without an
exit the child is killed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

# A child that stayed up this long is healthy again: the restart delay starts over.
STABLE_AFTER = 60.0
MAX_RESTART_DELAY = 60.0


class _Child(ProcessProtocol):
    def __init__(self, ended: Callable[[int | None, int | None], None]) -> None:
        self.ended = ended

    def processEnded(self, reason: Any) -> None:
        self.ended(reason.value.exitCode, reason.value.signal)


class Supervisor:
    """Runs `argv` as a child; while `hold` is false a child that exits is started again."""

    log = Logger()

    def __init__(self, reactor: Any, argv: list[str], restart_delay: float, env: dict[str, str] | None = None,
                 child_fds: dict[int, Any] | None = None) -> None:
        self.reactor = reactor
        self.argv = argv
        self.env = env if env is not None else dict(os.environ)
        self.child_fds = child_fds if child_fds is not None else {0: "w", 1: 1, 2: 2}
        self.restart_delay = restart_delay
        self._delay = restart_delay
        self.process: Any = None
        self.hold = True
        self.starts = 0
        self.last_exit: tuple[int | None, int | None] | None = None
        self._started_at = 0.0
        self._exit_waiters: list[Deferred] = []
        self._restart: Any = None
        # called with (exit code, signal) whenever the child ends, on purpose or not
        self.on_exit: list[Callable[[int | None, int | None], None]] = []

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, restart: bool = True) -> None:
        """Start the child now (if it is not running); with `restart`, start it again whenever it
        dies (without, a death is only reported: the updater's health check watches it)."""
        self.hold = not restart
        self._spawn()

    def _spawn(self) -> None:
        if self.process is not None:
            return
        self.starts += 1
        self._started_at = self.reactor.seconds()
        self.process = self.reactor.spawnProcess(_Child(self._ended), self.argv[0], self.argv, env=self.env,
                                                 childFDs=self.child_fds)
        self.log.info("connector started (pid {pid}): {argv}", pid=self.process.pid, argv=" ".join(self.argv))

    def _ended(self, code: int | None, signal: int | None) -> None:
        self.process = None
        self.last_exit = (code, signal)
        waiters, self._exit_waiters = self._exit_waiters, []
        for listener in list(self.on_exit):
            listener(code, signal)
        for d in waiters:
            d.callback((code, signal))
        if waiters or self.hold:
            self.log.info("connector exited ({status})", status=describe_exit(code, signal))
            return
        if self.reactor.seconds() - self._started_at >= STABLE_AFTER:
            self._delay = self.restart_delay
        self.log.warn("connector exited unexpectedly ({status}); starting it again in {delay:g}s",
                      status=describe_exit(code, signal), delay=self._delay)
        self._restart = self.reactor.callLater(self._delay, self._spawn)
        self._delay = min(self._delay * 2, MAX_RESTART_DELAY)

    def stop(self, timeout: float) -> Deferred:
        """SIGTERM (the connector drains), SIGKILL after `timeout`; fires with (code, signal)
        once the child is gone. The child stays stopped until start()."""
        self.hold = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self.process is None:
            return succeed(self.last_exit)
        d: Deferred = Deferred()
        self._exit_waiters.append(d)
        process = self.process
        process.signalProcess("TERM")
        kill = self.reactor.callLater(timeout, self._kill, process)

        def gone(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        return d.addBoth(gone)

    def _kill(self, process: Any) -> None:
        if self.process is process:
            self.log.warn("connector did not exit after its drain; killing it")
            process.signalProcess("KILL")


def describe_exit(code: int | None, signal: int | None) -> str:
    if signal is not None:
        return f"killed by signal {signal}"
    return f"exit status {code}"

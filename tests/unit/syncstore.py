"""A synchronous store answering as ThreadedStore does, for unit tests of code that uses the
node's store without a reactor or threads."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure


class NowStore:
    """Every method of `store`, returning a Deferred already fired with its result or failure."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        return lambda *args: maybeDeferred(method, *args)


def result_of(d: Any) -> Any:
    """The result a fired Deferred (or a coroutine that awaits only fired ones) holds; raises its
    failure's exception."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]

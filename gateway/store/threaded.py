"""Runs a synchronous store on a one-thread pool so blocking drivers never stall the reactor."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.errors import StoreClosed, StoreUnavailable


def _one_thread_pool() -> ThreadPool:
    # One thread: the store has one connection, and serial calls keep its transactions simple.
    return ThreadPool(minthreads=1, maxthreads=1, name="gateway-store")


@define
class ThreadedStore:
    """The store's methods, each returning a Deferred that fires with the store's result.

    Calls run one at a time, in order, on the pool's single thread.
    """

    store: Any
    reactor: Any
    threadpool: ThreadPool = field(default=None, converter=lambda p: _one_thread_pool() if p is None else p)
    # Told of every call's outcome (gateway.service.changes.StoreHealth: ok() / failed(why)),
    # so a store outage is noticed, and logged, in one place.
    health: Any = None
    _in_flight: int = field(default=0, init=False)
    _closing: Deferred | None = field(default=None, init=False)
    _close_result: Any = field(default=None, init=False)
    _shutdown_trigger: Any = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.reactor.running:
            self._start()
        else:
            self.reactor.callWhenRunning(self._start)
        # "before": the reactor waits for close()'s Deferred, so pending writes finish first.
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)

    @property
    def closed(self) -> bool:
        """Whether close() was called; every later call fails."""
        return self._closing is not None

    def run(self, work, *args) -> Deferred:
        """``work(*args, store)`` with the synchronous store, on the store's thread: a command's
        whole operation (its checks and its writes) as the local `gateway` command runs it.
        Like `enrol`'s `issue`, `work` must not touch the reactor."""
        return self._call(work, *args, self.store)

    def ensure_group(self, name, now) -> Deferred:
        return self._call(self.store.ensure_group, name, now)

    def list_groups(self) -> Deferred:
        return self._call(self.store.list_groups)

    def list_apps(self) -> Deferred:
        return self._call(self.store.list_apps)

    def session_log_switches(self) -> Deferred:
        return self._call(self.store.session_log_switches)

    def get_app(self, name) -> Deferred:
        return self._call(self.store.get_app, name)

    def create_token(self, record) -> Deferred:
        return self._call(self.store.create_token, record)

    def list_tokens(self) -> Deferred:
        return self._call(self.store.list_tokens)

    def enrol(self, token_id, secret, now, issue) -> Deferred:
        """Note: `issue` runs on the store thread, inside the transaction; it must not touch the reactor."""
        return self._call(self.store.enrol, token_id, secret, now, issue)

    def get_connector(self, connector_id) -> Deferred:
        return self._call(self.store.get_connector, connector_id)

    def create_group(self, name, now) -> Deferred:
        return self._call(self.store.create_group, name, now)

    def move_connector(self, connector_id, group) -> Deferred:
        return self._call(self.store.move_connector, connector_id, group)

    def list_connectors(self, *args, **kwargs) -> Deferred:
        return self._call(self.store.list_connectors, *args, **kwargs)

    def delete_connector(self, connector_id, now) -> Deferred:
        return self._call(self.store.delete_connector, connector_id, now)

    def certificate_status(self, serial_hex, connector_id) -> Deferred:
        return self._call(self.store.certificate_status, serial_hex, connector_id)

    def renew_certificate(self, serial_hex, connector_id, issue, now=None) -> Deferred:
        """Note: `issue` runs on the store thread, inside the transaction; it must not touch the reactor."""
        return self._call(self.store.renew_certificate, serial_hex, connector_id, issue, now)

    def touch_connector(self, connector_id, now) -> Deferred:
        return self._call(self.store.touch_connector, connector_id, now)

    def record_status(self, connector_id, status, now) -> Deferred:
        return self._call(self.store.record_status, connector_id, status, now)

    def mark_inactive(self, connector_id, seen_before, now) -> Deferred:
        return self._call(self.store.mark_inactive, connector_id, seen_before, now)

    def create_user_credential(self, record) -> Deferred:
        return self._call(self.store.create_user_credential, record)

    def get_user_credential(self, credential_id) -> Deferred:
        return self._call(self.store.get_user_credential, credential_id)

    def list_user_credentials(self, user=None) -> Deferred:
        return self._call(self.store.list_user_credentials, user)

    def revoke_user_credential(self, credential_id, now) -> Deferred:
        return self._call(self.store.revoke_user_credential, credential_id, now)

    def revoke_user(self, user, now) -> Deferred:
        return self._call(self.store.revoke_user, user, now)

    def redeem_user_secret(self, credential_id, secret, now) -> Deferred:
        return self._call(self.store.redeem_user_secret, credential_id, secret, now)

    def check_admin_token(self, token_id, secret, now) -> Deferred:
        return self._call(self.store.check_admin_token, token_id, secret, now)

    def get_admin_token(self, token_id) -> Deferred:
        return self._call(self.store.get_admin_token, token_id)

    def list_admin_tokens(self) -> Deferred:
        return self._call(self.store.list_admin_tokens)

    def acquire_update_lease(self, group, connector_id, version, expires_at, now, decide) -> Deferred:
        """Note: `decide` runs on the store thread, inside the transaction; it must not touch the reactor."""
        return self._call(self.store.acquire_update_lease, group, connector_id, version, expires_at, now, decide)

    def release_update_lease(self, group, connector_id, failed_version, now) -> Deferred:
        return self._call(self.store.release_update_lease, group, connector_id, failed_version, now)

    def update_halt(self, group) -> Deferred:
        return self._call(self.store.update_halt, group)

    def add_login_code(self, code_hash, code, now, limit) -> Deferred:
        return self._call(self.store.add_login_code, code_hash, code, now, limit)

    def take_login_code(self, code_hash, now) -> Deferred:
        return self._call(self.store.take_login_code, code_hash, now)

    def add_admin_session(self, session_hash, session, now, limit) -> Deferred:
        return self._call(self.store.add_admin_session, session_hash, session, now, limit)

    def get_admin_session(self, session_hash, now) -> Deferred:
        return self._call(self.store.get_admin_session, session_hash, now)

    def end_admin_session(self, session_hash) -> Deferred:
        return self._call(self.store.end_admin_session, session_hash)

    def end_admin_sessions_of(self, token_id) -> Deferred:
        return self._call(self.store.end_admin_sessions_of, token_id)

    def record_node(self, node_id, tunnel_address, started, now) -> Deferred:
        return self._call(self.store.record_node, node_id, tunnel_address, started, now)

    def list_nodes(self, seen_since=None) -> Deferred:
        return self._call(self.store.list_nodes, seen_since)

    def remove_node(self, node_id) -> Deferred:
        return self._call(self.store.remove_node, node_id)

    def close(self) -> Deferred:
        """Close the store after the calls already queued, then stop the thread; safe to call twice."""
        if self._closing is None:
            self._start()  # close() before the reactor ran still needs a thread to close on
            self._closing = deferToThreadPool(self.reactor, self.threadpool, self.store.close)
            self._closing.addBoth(self._stop_pool)
        # Each caller gets its own Deferred, so one caller's callbacks cannot change another's result.
        mine: Deferred = Deferred()
        self._closing.addCallback(lambda _: _fire(mine, self._close_result))
        return mine

    def _call(self, method, *args, **kwargs) -> Deferred:
        if self._closing is not None:
            return fail(StoreClosed("the store is closed: the service is shutting down"))
        if self.health is not None and self.health.down_since is not None and self._in_flight:
            # In an outage each call waits for the connection timeout: one call at a time finds
            # out whether the store is back, the others fail at once instead of piling up.
            return fail(StoreUnavailable(self.health.outage_message()))
        self._in_flight += 1
        d = deferToThreadPool(self.reactor, self.threadpool, method, *args, **kwargs)
        d.addBoth(self._finished)
        if self.health is not None:
            d.addCallbacks(self._answered, self._unanswered)
        return d

    def _finished(self, result: Any) -> Any:
        self._in_flight -= 1
        return result

    def _answered(self, result: Any) -> Any:
        self.health.ok()
        return result

    def _unanswered(self, failure: Failure) -> Failure:
        # Any other failure (a refused change, say) is an answer: the store is there.
        if failure.check(StoreUnavailable):
            self.health.failed(failure.getErrorMessage())
        else:
            self.health.ok()
        return failure

    def _start(self) -> None:
        if not self.threadpool.started and self._closing is None:
            self.threadpool.start()

    def _stop_pool(self, result) -> None:
        # Kept aside, not passed down the shared chain, so a failure is reported to each
        # close() caller and not again as "unhandled" when the shared Deferred is collected.
        self._close_result = result
        self.threadpool.stop()
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None

    def _on_shutdown(self) -> Deferred:
        self._shutdown_trigger = None  # the reactor is running it; removing it now would fail
        return self.close()


def _fire(target: Deferred, result) -> None:
    if isinstance(result, Failure):
        target.errback(result)
    else:
        target.callback(result)

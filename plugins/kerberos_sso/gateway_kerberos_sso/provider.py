"""The ``kerberos`` SSO provider: ``Authorization: Negotiate`` for signed-in users, by KCD.

For a request to an app with ``options.sso = "kerberos"`` the provider names the user's
principal (settings.AppSettings.principal), gets the user's delegated credentials for the
app's SPN from the cache (a KDC exchange in the thread pool on a miss) and makes a new
security context from them, also in the pool: every GSSAPI call that may touch the KDC or the
keytab runs there, never on the reactor thread. Checking the back end's mutual-auth reply
(``on_response``) only decrypts the reply with the context's session key, so it runs inline.

Preemptive (the default) sends the token with the request. Otherwise a request without a body
goes without one, and the back end's ``401 WWW-Authenticate: Negotiate`` is answered by sending
it again with the token (a request with a body is always preemptive: it cannot be sent twice).
A 401 to a token drops the cached credentials and tries once with fresh ones.

Each failure raises SSOFailed (the http plugin answers 502 with the correlation id and nothing
of Kerberos) after an admin-log event naming the cause and the fix.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.errors import GatewayError

from . import settings as config

log = Logger(namespace="gateway_kerberos_sso")

REQUEST_ID_HEADER = b"x-gateway-request-id"


class SSOFailed(GatewayError):
    """Single sign-on failed for one request; the admin log already says why and what to do."""


class Negotiate(list):
    """The header pairs sent with one request, and what ``on_response`` needs to judge the answer."""

    def __init__(self, pairs: list, user: str, spn: str, negotiation: Any = None, attempt: int = 0) -> None:
        super().__init__(pairs)
        self.user = user
        self.spn = spn
        self.negotiation = negotiation   # None: sent without a token (challenge mode)
        self.attempt = attempt


class KerberosSSO:
    """The provider (see the module docstring); ``start`` configures it from the connector's config."""

    # The user's own credentials for the back end are never forwarded to a Kerberos app.
    strip_headers = (b"authorization",)

    def __init__(self) -> None:
        self.settings: config.Settings | None = None
        self.problem = "this connector has no [kerberos] table (the delegating account's keytab and principal)"
        self.reactor: Any = None
        self.pool: ThreadPool | None = None
        self.cache: Any = None
        self.account: Any = None
        self.failures: collections.Counter = collections.Counter()
        self.check_result: str | None = None
        self._delegation: Any = None

    # -- start ---------------------------------------------------------------------------

    def start(self, config_: Any, reactor: Any) -> None:
        """Read ``[kerberos]``, make the thread pool and the cache, and run the start-up check once
        the reactor runs. Without the table (or python-gssapi) the provider only explains itself."""
        self.reactor = reactor
        self.settings = (getattr(config_, "sections", None) or {}).get(config.SECTION)
        if self.settings is None:
            return
        try:
            from . import delegation
        except ImportError as e:
            self.problem = (f"python-gssapi is not installed on this connector ({e}): install the plugin's "
                            f"kerberos extra (pip install 'gateway[kerberos]'; it builds against libkrb5-dev)")
            log.error("kerberos: {problem}; apps with sso = \"kerberos\" answer 502", problem=self.problem)
            return
        from .cache import CredentialCache, in_thread_pool

        if self.settings.krb5_conf:
            # MIT krb5 reads KRB5_CONFIG for each new context: this process's contexts use this file.
            os.environ["KRB5_CONFIG"] = self.settings.krb5_conf
        self._delegation = delegation
        self.problem = ""
        self.account = delegation.Account(self.settings.principal, self.settings.keytab)
        self.pool = ThreadPool(minthreads=0, maxthreads=self.settings.threads, name="kerberos-sso")
        self.cache = CredentialCache(reactor, in_thread_pool(reactor, self.pool, self._delegate),
                                     max_entries=self.settings.max_entries)
        reactor.callWhenRunning(self.pool.start)
        reactor.addSystemEventTrigger("during", "shutdown", self.pool.stop)
        reactor.callWhenRunning(self.check)

    def check(self) -> Deferred:
        """The start-up check: a TGT from the keytab, and protocol transition for check_user when set."""
        settings = self.settings
        d = deferToThreadPool(self.reactor, self.pool, self._delegation.check_account, self.account,
                              settings.check_user) if settings.check_user else \
            deferToThreadPool(self.reactor, self.pool, self._delegation.account_credentials, self.account)
        return d.addCallbacks(self._checked, self._check_failed)

    def _checked(self, _: Any) -> None:
        settings = self.settings
        transition = (f"and protocol transition for {settings.check_user} works" if settings.check_user else
                      "(protocol transition is checked with the first request; set [kerberos] check_user to check "
                      "it at start)")
        self.check_result = "ok"
        log.info("kerberos: account {account} got a TGT from {keytab} {transition}; single sign-on is ready",
                 account=settings.principal, keytab=settings.keytab, transition=transition)

    def _check_failed(self, failure: Failure) -> None:
        error = failure.value
        cause = getattr(getattr(error, "cause", None), "name", "OTHER")
        self.check_result = cause
        log.error("kerberos: start-up check of {account} failed: {cause}: {summary}. Fix: {fix} ({detail}). Apps "
                  "with sso = \"kerberos\" fail with 502 until this is fixed; other apps are served",
                  account=self.settings.principal, cause=cause, summary=getattr(error, "summary", str(error)),
                  fix=getattr(error, "fix", "see the detail"), detail=getattr(error, "detail", repr(error)))

    # -- the ISSOProvider ----------------------------------------------------------------

    def check_app(self, app: Any) -> str | None:
        """Why ``app``'s Kerberos options cannot work on this connector, or None."""
        try:
            config.app_settings(app)
        except config.AppError as e:
            return str(e)
        if self.problem:
            return f"app {app.name}: options.sso = \"kerberos\": {self.problem}; its requests will fail with 502"
        return None

    def credentials(self, app: Any, identity: dict, request: Any) -> Any:
        """The Negotiate header for ``identity``'s request (a Deferred), or no header in challenge mode."""
        rid = request_id(request)
        if self.problem:
            raise self._failed(rid, app, "?", "?", "NOT_CONFIGURED", self.problem,
                               "add a [kerberos] table with keytab and principal to this connector's config")
        try:
            options = config.app_settings(app)
            user = options.principal(identity, self.settings.realm)
        except config.AppError as e:
            raise self._failed(rid, app, "?", "?", "APP_CONFIG", str(e), "correct the app's options") from e
        except config.IdentityError as e:
            raise self._failed(rid, app, str(identity.get("sub")), options.spn, "IDENTITY_UNMAPPED", str(e),
                               "check the app's options.kerberos_identity (and kerberos_map) for this user") from e
        preemptive = self.settings.preemptive if options.preemptive is None else options.preemptive
        if not preemptive and not has_body(request):
            return Negotiate([], user, options.spn)
        return self._negotiate(rid, app, user, options.spn, 0)

    def on_response(self, app: Any, identity: dict, request: Any, sent: Any, response: Any) -> Any:
        """Judge the back end's final answer to a request sent with ``sent``: None to relay it, new
        headers (a Deferred) to send the request again, SSOFailed to answer 502."""
        if not isinstance(sent, Negotiate):
            return None
        rid = request_id(request)
        reply = negotiate_value(response.headers)
        if response.status == 401 and reply is not None:
            if sent.negotiation is None:
                return self._negotiate(rid, app, sent.user, sent.spn, 1)   # the challenge: answer it
            self.cache.discard(sent.user, sent.spn)
            if sent.attempt == 0 and not has_body(request):
                return self._negotiate(rid, app, sent.user, sent.spn, 1)   # stale credentials? once more
            raise self._known(rid, app, sent.user, sent.spn, self._delegation.DelegationError(
                self._delegation.Cause.BACKEND_REFUSED, f"401 to the token of attempt {sent.attempt + 1}",
                **self._names(sent.user, sent.spn)))
        if sent.negotiation is None:
            return None   # challenge mode and no challenge: the back end did not ask
        if reply or 200 <= response.status < 300:
            try:
                self._delegation.verify_reply(sent.negotiation, b"Negotiate " + (reply or b""))
            except self._delegation.DelegationError as e:
                raise self._known(rid, app, sent.user, sent.spn, e) from e
        return None

    @property
    def counters(self) -> dict[str, Any]:
        """KDC round trips, cache hits, waits on an exchange in flight, failures by cause (for metrics)."""
        cache = self.cache
        return {"kdc_exchanges": cache.exchanges if cache else 0, "cache_hits": cache.hits if cache else 0,
                "shared_exchanges": cache.joined if cache else 0, "cached_entries": len(cache) if cache else 0,
                "failures": dict(self.failures)}

    # -- delegating ----------------------------------------------------------------------

    def _delegate(self, user: str, spn: str) -> Any:
        """The blocking KDC exchange (in the pool); the delegation's first context is used once."""
        delegation = self._delegation.delegate(self.account, user, spn)
        return _Fresh(delegation)

    def _negotiate(self, rid: str, app: Any, user: str, spn: str, attempt: int) -> Deferred:
        d = self.cache.get(user, spn)
        d.addCallback(self._context)
        d.addCallback(lambda negotiation: Negotiate([(b"Authorization", negotiation.header)], user, spn,
                                                    negotiation, attempt))
        d.addErrback(self._exchange_failed, rid, app, user, spn)
        return d

    def _context(self, fresh: _Fresh) -> Any:
        first = fresh.take_first()
        if first is not None:
            return first
        return deferToThreadPool(self.reactor, self.pool, fresh.delegation.negotiate)

    def _exchange_failed(self, failure: Failure, rid: str, app: Any, user: str, spn: str) -> None:
        if failure.check(self._delegation.DelegationError):
            raise self._known(rid, app, user, spn, failure.value)
        raise self._failed(rid, app, user, spn, "OTHER", failure.getErrorMessage(),
                           "see the connector's log and the KDC's log")

    def _known(self, rid: str, app: Any, user: str, spn: str, error: Any) -> SSOFailed:
        return self._failed(rid, app, user, spn, error.cause.name, f"{error.summary} ({error.detail})", error.fix)

    def _failed(self, rid: str, app: Any, user: str, spn: str, cause: str, why: str, fix: str) -> SSOFailed:
        self.failures[cause] += 1
        log.error("request {request_id} for app {app}: Kerberos single sign-on for {user} to {spn} failed: "
                  "{cause}: {why}. Fix: {fix}", request_id=rid, app=app.name, user=user, spn=spn, cause=cause,
                  why=why, fix=fix)
        return SSOFailed(f"Kerberos single sign-on failed ({cause}; request {rid})")

    def _names(self, user: str, spn: str) -> dict[str, str]:
        return {"account": self.account.principal, "keytab": self.account.keytab, "realm": self.account.realm,
                "user": user, "spn": spn}


class _Fresh:
    """A cached delegation and whether its first context (made during the exchange) was used yet:
    a context's token is good for one request only."""

    def __init__(self, delegation: Any) -> None:
        self.delegation = delegation
        self.expires_at = delegation.expires_at
        self._first = delegation.first

    def take_first(self) -> Any:
        first, self._first = self._first, None
        return first


def request_id(request: Any) -> str:
    for name, value in getattr(request, "headers", ()):
        if name.lower() == REQUEST_ID_HEADER:
            return value.decode("latin-1")
    return "-"


def has_body(request: Any) -> bool:
    for name, value in getattr(request, "headers", ()):
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def negotiate_value(headers: Any) -> bytes | None:
    """The token of the response's ``WWW-Authenticate: Negotiate [token]`` (b"" for a bare challenge), or None."""
    for name, value in headers:
        if name.lower() == b"www-authenticate":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"negotiate":
                return token.strip()
    return None

"""The admin listener's one resource: a route table of API calls, status page and documents.

Every path the listener answers is a row of ROUTES (method, path template, handler, who may
call it), and gateway/admin/openapi.py documents each row; tests/unit/test_admin_routes.py fails
when a row is not documented. Anything else is a 404 in JSON.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gateway.admin import auth
from gateway.admin.page import SignInPage, StatusPage, render_html
from gateway.admin.operations import OPERATIONS
from gateway.admin.summary import jsonable, summarise
from gateway.errors import AdminTokenError, GatewayError, StoreClosed, StoreUnavailable, UnknownName
from gateway.pki import keys
from gateway.store.sqlite import SQLiteStore

# Request bodies of the API are small JSON documents; anything larger is refused, not buffered.
MAX_BODY = 64 * 1024
JSON = b"application/json"
EVENTS_LIMIT = 100


@frozen
class Route:
    """One thing the listener serves: `access` is "token" (API), "page" (status page) or "public"."""

    method: str
    template: str
    handler: str
    access: str
    operation: str = ""   # a command's operation (gateway/admin/operations.py) the handler runs

    def match(self, method: str, segments: list[str]) -> dict[str, str] | None:
        """The path parameters when `method` and the path `segments` are this route's, else None."""
        mine = self.template.strip("/").split("/") if self.template != "/" else [""]
        if method != self.method or len(mine) != len(segments):
            return None
        params = {}
        for pattern, value in zip(mine, segments):
            if pattern.startswith("{"):
                if not value:
                    return None
                params[pattern.strip("{}")] = value
            elif pattern != value:
                return None
        return params


ROUTES = (
    Route("GET", "/api/v1/status", "api_status", "token"),
    Route("GET", "/api/v1/connectors", "api_connectors", "token"),
    Route("DELETE", "/api/v1/connectors/{connector_id}", "api_delete_connector", "token"),
    Route("POST", "/api/v1/connectors/{connector_id}/move", "api_move_connector", "token"),
    Route("GET", "/api/v1/groups", "api_groups", "token"),
    Route("POST", "/api/v1/groups", "api_create_group", "token"),
    Route("GET", "/api/v1/events", "api_events", "token"),
    *(Route(o.method, o.template, "api_operation", "token", o.command) for o in OPERATIONS.values()),
    Route("GET", "/api/openapi.json", "openapi", "public"),
    Route("GET", "/ca.pem", "ca_pem", "public"),
    Route("GET", "/", "status_page", "page"),
    Route("GET", "/signin", "signin_form", "public"),
    Route("POST", "/signin", "signin", "public"),
    Route("POST", "/signout", "signout", "page"),
)


class ApiError(GatewayError):
    """A request the API refuses, with its status and stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


class AdminRequest(Request):
    """A Request that keeps at most MAX_BODY bytes of body: past it, the rest is discarded and
    the request answered 413 (twisted.web would otherwise spool any size to a temporary file)."""

    too_large = False
    _received = 0
    admin_token = None  # the AdminTokenRecord of an API call, once checked

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


class AdminResource(Resource):
    """The root of the admin listener; `node` is the ServiceNode (store, apps, CA, admin events)."""

    isLeaf = True
    log = Logger()

    def __init__(self, node: Any, sessions: auth.Sessions, tls: bool, refresh: int) -> None:
        super().__init__()
        self.node, self.sessions, self.tls, self.refresh = node, sessions, tls, refresh

    # -- dispatch ----------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        Deferred.fromCoroutine(self._serve(request)).addErrback(self._crashed, request)
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        if getattr(request, "too_large", False):
            return self._json(request, 413, {"error": "body_too_large",
                                             "message": f"request bodies are limited to {MAX_BODY} bytes"})
        method = request.method.decode("ascii", "replace")
        segments = [unquote(s) for s in request.path.decode("latin-1").strip("/").split("/")]
        for route in ROUTES:
            params = route.match(method, segments)
            if params is not None:
                break
        else:
            allowed = sorted({r.method for r in ROUTES if r.match(r.method, segments) is not None})
            if allowed:
                request.setHeader(b"Allow", ", ".join(allowed).encode())
                return self._json(request, 405, {"error": "method_not_allowed",
                                                 "message": f"use {' or '.join(allowed)} on this path"})
            return self._json(request, 404, {"error": "not_found",
                                             "message": "no such admin route; see /api/openapi.json"})
        try:
            return await self._route(request, route, params)
        except (StoreUnavailable, StoreClosed) as e:
            return await self._store_down(request, route, e)

    async def _route(self, request: Request, route: Route, params: dict[str, str]) -> None:
        handler = getattr(self, route.handler)
        if route.operation:
            params = {"operation": OPERATIONS[route.operation], "params": params}
        if route.access == "token":
            try:
                request.admin_token = await self._token_of(request)
                if request.admin_token.role == "read" and route.method != "GET":
                    self.log.info("admin API: {method} {path} by read-only admin token {token_id} ({by}) refused",
                                  event="refused", method=route.method, path=request.path.decode("latin-1"),
                                  **_who(request))
                    raise ApiError(403, "read_only", f"admin token {request.admin_token.token_id}"
                                   f" ({request.admin_token.name}) may only read: {route.method} {route.template}"
                                   " changes the service; use an admin token made with --role admin (the default)")
                return self._json(request, 200, await handler(request, **params))
            except AdminTokenError as e:
                return self._refuse(request, auth.token_refusal(e))
            except ApiError as e:
                if e.status == 401:
                    return self._refuse(request, auth.Refusal(e.status, e.code, str(e)))
                return self._json(request, e.status, {"error": e.code, "message": str(e)})
        if route.access == "page":
            session = await self._page_session(request)
            if session is None:
                return self._redirect(request, b"/signin")
            return await handler(request, session, **params)
        return await handler(request, **params)

    async def _store_down(self, request: Request, route: Route, error: GatewayError) -> None:
        """The store cannot be reached (or the node is stopping): 503 saying so (JSON for the API,
        a page for the browser), not the 500 of a crash; tunnels and traffic carry on meanwhile."""
        message = str(error) if isinstance(error, StoreClosed) else (
            f"{error} The tunnels and the traffic carry on (from the last good config, for "
            f"[service] store_outage_grace); the admin API and the status page need the store: "
            f"try again once it is back.")
        if request.finished or request.startedWriting:
            return None
        if route.access == "token":
            return self._json(request, 503, {"error": "store_unavailable", "message": message})
        csrf = secrets.token_urlsafe(32)
        self._cookie(request, auth.SIGNIN_CSRF_COOKIE, csrf, max_age=3600)
        return await self._html(request, 503, SignInPage(csrf, message))

    def _crashed(self, failure: Any, request: Request) -> None:
        self.log.failure("admin request {method} {path} failed", failure,
                         method=request.method.decode("ascii", "replace"), path=request.path.decode("latin-1"))
        if not request.finished and not request.startedWriting:
            self._json(request, 500, {"error": "internal", "message": "internal error on the service; see its log"})

    # -- who is asking -----------------------------------------------------------------------

    async def _token_of(self, request: Request) -> Any:
        """The admin token record of an API call; raises ApiError (401) or AdminTokenError."""
        text = auth.bearer_token(request.getHeader(b"authorization"))
        if isinstance(text, auth.Refusal):
            raise ApiError(text.status, text.code, text.message)
        return await self._check_token(text)

    async def _check_token(self, text: str) -> Any:
        token = auth.parse_admin_token(text, self.node.ca.fingerprint)
        return await self.node.store.check_admin_token(token.token_id, token.secret, datetime.now(UTC))

    async def _page_session(self, request: Request) -> auth.Session | None:
        """The live sign-in of a status page request, its token still good; None otherwise."""
        session = await self.sessions.get(_cookie(request, auth.SESSION_COOKIE))
        if session is None:
            return None
        record = await self.node.store.get_admin_token(session.token_id)
        try:
            if record is None:
                raise AdminTokenError("unknown", "the admin token was removed")
            SQLiteStore.usable_admin_token(record, datetime.now(UTC))
        except AdminTokenError as e:
            await self.sessions.end_token(session.token_id)
            self.log.info("status page session of admin token {token_id} ended: {reason}",
                          token_id=session.token_id, reason=str(e))
            return None
        return session

    # -- the API ---------------------------------------------------------------------------

    async def api_status(self, request: Request) -> dict[str, Any]:
        connectors = await self.node.store.list_connectors()
        groups = await self.node.store.list_groups()
        summaries = summarise([g.name for g in groups], self.node.apps.values(), connectors)
        return {"node_id": self.node.config.service.node_id, "groups": [
            {"name": s.name, "health": s.health, "apps": list(s.apps), "open_streams": s.open_streams,
             "active": len(s.active), "connectors": [
                 {**jsonable(c), "share": s.share(c)} for c in s.connectors]}
            for s in summaries]}

    async def api_connectors(self, request: Request) -> dict[str, Any]:
        everything = _query(request, "all") in ("true", "1")
        connectors = await self.node.store.list_connectors(include_deleted=everything)
        return {"connectors": [jsonable(c) for c in connectors]}

    async def api_delete_connector(self, request: Request, connector_id: str) -> dict[str, Any]:
        await self._live_connector(connector_id)
        deleted = await self.node.store.delete_connector(connector_id, datetime.now(UTC))
        self.log.info("admin API: connector {connector_id} deleted by admin token {token_id} ({by})",
                      connector_id=connector_id, **_who(request))
        self.node.changed_here()
        return {"connector_id": connector_id, "deleted": bool(deleted)}

    async def api_move_connector(self, request: Request, connector_id: str) -> dict[str, Any]:
        group = _body(request).get("group")
        if not isinstance(group, str) or not group:
            raise ApiError(400, "bad_request", 'expected a JSON body {"group": "NAME"}')
        await self._live_connector(connector_id)
        if any(a.group == group for a in self.node.apps.values()):
            await self.node.store.ensure_group(group, datetime.now(UTC))
        try:
            record = await self.node.store.move_connector(connector_id, group)
        except (StoreUnavailable, StoreClosed):
            raise
        except GatewayError as e:
            raise ApiError(409, "conflict", str(e)) from None
        self.log.info("admin API: connector {connector_id} moved to group {group} by admin token {token_id} ({by})",
                      connector_id=connector_id, group=group, **_who(request))
        self.node.changed_here()
        return {"connector": jsonable(record)}

    async def api_groups(self, request: Request) -> dict[str, Any]:
        return {"groups": [jsonable(g) for g in await self.node.store.list_groups()]}

    async def api_create_group(self, request: Request) -> dict[str, Any]:
        from gateway.config import _NAME_RE

        name = _body(request).get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ApiError(400, "bad_request", 'expected a JSON body {"name": "NAME"} with a name matching'
                                               " [a-z0-9][a-z0-9._-]{0,62}")
        try:
            record = await self.node.store.create_group(name, datetime.now(UTC))
        except (StoreUnavailable, StoreClosed):
            raise
        except GatewayError as e:
            raise ApiError(409, "conflict", str(e)) from None
        self.log.info("admin API: group {group} created by admin token {token_id} ({by})", group=name,
                      **_who(request))
        return {"group": jsonable(record)}

    async def api_operation(self, request: Request, operation: Any, params: dict[str, str]) -> dict[str, Any]:
        """A `gateway` command's operation, run on this node's store with its config file: the
        same checks, the same refusals and the same result as the command run on this machine."""
        from_query = operation.method in ("GET", "DELETE")
        values = {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                  for k, vs in request.args.items()} if from_query else _body(request)
        try:
            args = operation.arguments(params, values, from_query)
        except GatewayError as e:
            raise ApiError(400, "bad_request", f"{e}; see /api/openapi.json") from None
        try:
            done = await self.node.store.run(operation.run(), args, self.node.file_config)
        except UnknownName as e:
            raise ApiError(404, "not_found", str(e)) from None
        except (StoreUnavailable, StoreClosed):
            raise   # _serve answers 503 naming the store
        except GatewayError as e:
            raise ApiError(400, "refused", str(e)) from None
        if operation.changes:
            self.log.info("admin API: gateway {command} ({what}) by admin token {token_id} ({by})",
                          command=operation.command, what=operation.described(args), **_who(request))
            self.node.changed_here()
        return done

    async def api_events(self, request: Request) -> dict[str, Any]:
        try:
            limit = int(_query(request, "limit") or EVENTS_LIMIT)
        except ValueError:
            raise ApiError(400, "bad_request", "limit: expected a whole number 1..1000") from None
        if not 1 <= limit <= 1000:
            raise ApiError(400, "bad_request", "limit: expected a whole number 1..1000")
        return {"events": [jsonable(e) for e in self._events(limit, _query(request, "source"))]}

    def _events(self, limit: int, source: str | None = None) -> list[Any]:
        return self.node.admin_events.recent(limit, source)

    async def _live_connector(self, connector_id: str) -> None:
        record = await self.node.store.get_connector(connector_id)
        if record is None or record.deleted_at is not None:
            raise ApiError(404, "not_found", f"no connector {connector_id!r}: give the whole id"
                                             " (GET /api/v1/connectors lists them)")

    # -- public documents ------------------------------------------------------------------

    async def openapi(self, request: Request) -> None:
        from gateway.admin.openapi import document

        self._json(request, 200, document())

    async def ca_pem(self, request: Request) -> None:
        # Public: a client pins it by the fingerprint its admin token carries before trusting it.
        request.setHeader(b"Content-Type", b"application/x-pem-file")
        request.write(keys.cert_pem(self.node.ca.cert))
        request.finish()

    # -- the status page -------------------------------------------------------------------

    async def status_page(self, request: Request, session: auth.Session) -> None:
        connectors = await self.node.store.list_connectors()
        groups = await self.node.store.list_groups()
        page = StatusPage(self.node.config.service.node_id,
                          summarise([g.name for g in groups], self.node.apps.values(), connectors),
                          self._events(EVENTS_LIMIT), session.csrf, self.refresh, datetime.now(UTC))
        await self._html(request, 200, page)

    async def signin_form(self, request: Request, problem: str = "", status: int = 200) -> None:
        csrf = secrets.token_urlsafe(32)
        self._cookie(request, auth.SIGNIN_CSRF_COOKIE, csrf, max_age=3600)
        await self._html(request, status, SignInPage(csrf, problem))

    async def signin(self, request: Request) -> None:
        refusal = self._csrf_refusal(request, _cookie(request, auth.SIGNIN_CSRF_COOKIE))
        if refusal:
            return self._forbidden(request, refusal)
        try:
            record = await self._check_token(_form(request, "token"))
        except AdminTokenError as e:
            self.log.info("status page sign-in from {address} refused: {reason}", event="refused", reason=str(e),
                          address=_address(request))
            return await self.signin_form(request, str(e), 401)
        session = await self.sessions.create(record.token_id)
        self.log.info("status page: admin token {token_id} ({name}) signed in", token_id=record.token_id,
                      name=record.name)
        self._cookie(request, auth.SESSION_COOKIE, session.session_id, max_age=int(self.sessions.lifetime))
        self._cookie(request, auth.SIGNIN_CSRF_COOKIE, "", max_age=0)
        return self._redirect(request, b"/")

    async def signout(self, request: Request, session: auth.Session) -> None:
        refusal = self._csrf_refusal(request, session.csrf)
        if refusal:
            return self._forbidden(request, refusal)
        await self.sessions.end(session.session_id)
        self._cookie(request, auth.SESSION_COOKIE, "", max_age=0)
        return self._redirect(request, b"/signin")

    def _csrf_refusal(self, request: Request, expected: str | None) -> str:
        """Why a state-changing form is refused ("" when it is not)."""
        if auth.foreign_origin(request.getHeader(b"origin"), self._origin(request)):
            return "this form was sent from another site (its Origin is not this page's)"
        if not auth.same_secret(_form(request, "csrf"), expected):
            return "this form's CSRF token is missing or wrong: open the page again and send the form from it"
        return ""

    def _origin(self, request: Request) -> str:
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip()
        return f"{'https' if self.tls else 'http'}://{host}"

    # -- responses -------------------------------------------------------------------------

    def _json(self, request: Request, status: int, body: dict[str, Any]) -> None:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.write(json.dumps(body, indent=1).encode() + b"\n")
        request.finish()

    def _refuse(self, request: Request, refusal: auth.Refusal) -> None:
        self.log.info("admin API {method} {path} from {address} refused: {code}", event="refused",
                      method=request.method.decode("ascii", "replace"), path=request.path.decode("latin-1"),
                      code=refusal.code, address=_address(request))
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="gateway admin"')
        self._json(request, refusal.status, refusal.body())

    def _forbidden(self, request: Request, why: str) -> None:
        self.log.info("status page {path} from {address} refused: {reason}", event="refused",
                      path=request.path.decode("latin-1"), reason=why, address=_address(request))
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.write(f"refused: {why}\n".encode())
        request.finish()

    async def _html(self, request: Request, status: int, element: Any) -> None:
        body = await render_html(element)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        # No script, no framing by others: the page needs neither.
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline';"
                                                      b" form-action 'self'; frame-ancestors 'none'")
        request.setHeader(b"X-Frame-Options", b"DENY")
        # same-origin, not no-referrer: under no-referrer Chromium sends the sign-in form with
        # "Origin: null", which the CSRF defence must refuse.
        request.setHeader(b"Referrer-Policy", b"same-origin")
        request.write(body)
        request.finish()

    def _redirect(self, request: Request, location: bytes) -> None:
        request.setResponseCode(303)
        request.setHeader(b"Location", location)
        request.finish()

    def _cookie(self, request: Request, name: bytes, value: str, max_age: int) -> None:
        request.addCookie(name, value.encode(), path=b"/", max_age=str(max_age).encode(), httpOnly=True,
                          secure=self.tls, sameSite=b"strict")


def _who(request: Request) -> dict[str, str]:
    """The admin token behind an API call, for the log: its id and name (never its secret)."""
    record = request.admin_token
    return {"token_id": record.token_id, "by": record.name}


def _address(request: Request) -> str:
    peer = request.getClientAddress()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


def _cookie(request: Request, name: bytes) -> str | None:
    value = request.getCookie(name)
    return value.decode("latin-1") if value else None


def _query(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _form(request: Request, name: str) -> str | None:
    """A field of a urlencoded form body (the page's forms); None when absent."""
    body = b""
    if request.content is not None:
        body = request.content.read()
        request.content.seek(0)   # the next field's lookup reads it again
    values = parse_qs(body.decode("utf-8", "replace")).get(name)
    return values[0] if values else None


def _body(request: Request) -> dict[str, Any]:
    """The JSON object of an API call's body; ApiError 400 otherwise."""
    raw = request.content.read() if request.content is not None else b""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as e:
        raise ApiError(400, "bad_request", f"expected a JSON object as the body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "expected a JSON object as the body")
    return data

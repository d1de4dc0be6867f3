"""The OpenAPI 3 document of the admin listener, served at /api/openapi.json.

Written by hand next to the route table (gateway/admin/routes.py ROUTES): the unit test
test_every_route_is_documented fails when a route is added without its entry here.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.admin.operations import OPERATIONS, Operation

_ERROR = {"$ref": "#/components/schemas/Error"}
_UNAUTHORIZED = {"description": "missing, unknown, revoked or expired admin token",
                 "content": {"application/json": {"schema": _ERROR}}}
_NOT_FOUND = {"description": "no such connector", "content": {"application/json": {"schema": _ERROR}}}
_BAD = {"description": "malformed request body or query", "content": {"application/json": {"schema": _ERROR}}}
_TOKEN = [{"adminToken": []}]
_CONNECTOR_ID = {"name": "connector_id", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "the connector's whole id"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _api(summary: str, ok: dict[str, Any], *, body: dict[str, Any] | None = None,
         parameters: list[dict[str, Any]] | None = None, not_found: bool = False) -> dict[str, Any]:
    """An admin API operation: token-protected, JSON in and out; 503 while the store is down."""
    operation: dict[str, Any] = {"summary": summary, "security": _TOKEN,
                                 "responses": {"200": ok, "401": _UNAUTHORIZED, "503": _STORE_DOWN}}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        operation["responses"]["400"] = _BAD
    if not_found:
        operation["responses"]["404"] = _NOT_FOUND
    return operation


def _page(summary: str, responses: dict[str, Any], form: dict[str, Any] | None = None) -> dict[str, Any]:
    """A status page operation: HTML for browsers, signed in with the session cookie."""
    operation: dict[str, Any] = {"summary": summary, "tags": ["status page"], "responses": responses}
    if form is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/x-www-form-urlencoded": {"schema": form}}}
    return operation


_HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}
_TO_SIGNIN = {"description": "not signed in (no, unknown or expired session cookie, or its token revoked):"
                             " to /signin"}
_CSRF = {"description": "CSRF token missing or wrong, or the form came from another site"}


def _operation(operation: Operation) -> dict[str, Any]:
    """A `gateway` command run on the service: its flags as path, query or body fields."""
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in operation.path_names]
    body = None
    if operation.method in ("GET", "DELETE"):
        parameters += [{"name": f.name, "in": "query", "required": f.required, "schema": f.schema()}
                       for f in operation.fields]
    else:
        body = {"type": "object", "additionalProperties": False,
                "properties": {f.name: f.schema() for f in operation.fields}}
        required = [f.name for f in operation.fields if f.required]
        if required:
            body["required"] = required
    documented = _api(operation.summary, _json(f"what `gateway {operation.command}` shows, as JSON",
                                               {"type": "object"}), body=body, parameters=parameters)
    documented["tags"] = ["commands"]
    documented["responses"]["400"] = _REFUSED
    documented["responses"]["404"] = _UNKNOWN
    documented["responses"]["503"] = _STORE_DOWN
    return documented


_REFUSED = {"description": "a field unknown, missing or of the wrong kind, or the command refused it (the message"
                          " says why and what to do, as the command does)",
            "content": {"application/json": {"schema": _ERROR}}}
_UNKNOWN = {"description": "no such group, app, connector or credential", "content": {"application/json": {
    "schema": _ERROR}}}
_STORE_DOWN = {"description": "the service's store cannot be reached", "content": {"application/json": {
    "schema": _ERROR}}}


def _paths(fixed: dict[str, Any]) -> dict[str, Any]:
    """`fixed` with an operation for each command of OPERATIONS."""
    paths = {path: dict(operations) for path, operations in fixed.items()}
    for operation in OPERATIONS.values():
        paths.setdefault(operation.template, {})[operation.method.lower()] = _operation(operation)
    for operations in paths.values():
        for method, operation in operations.items():
            if method != "get" and "security" in operation:
                operation["responses"]["403"] = _READ_ONLY
    return paths


_READ_ONLY = {"description": "the admin token is read-only (`gateway admin token create --role read`): it may"
                             " only GET", "content": {"application/json": {"schema": _ERROR}}}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.0 document."""
    connector = {"$ref": "#/components/schemas/Connector"}
    group = {"$ref": "#/components/schemas/Group"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "gateway admin API", "version": __version__,
                 "description": "The admin API and status page of a gateway service node ([admin] in the"
                                " config). API calls take an admin token (`gateway admin token create`) as"
                                " `Authorization: Bearer TOKEN`; cookies never authenticate them."},
        "paths": _paths({
            "/api/v1/status": {"get": _api(
                "Groups with their apps, connectors and the spread of open streams (what `gateway status` shows)",
                _json("groups", {"type": "object", "properties": {
                    "node_id": {"type": "string"}, "groups": {"type": "array", "items": {"type": "object"}}}}))},
            "/api/v1/connectors": {"get": _api(
                "Connectors known to the service, with their status",
                _json("connectors", {"type": "object", "properties": {
                    "connectors": {"type": "array", "items": connector}}}),
                parameters=[{"name": "all", "in": "query", "schema": {"type": "boolean"},
                             "description": "include deleted connectors"}])},
            "/api/v1/connectors/{connector_id}": {"delete": _api(
                "Delete a connector and revoke its certificates",
                _json("deleted", {"type": "object", "properties": {"connector_id": {"type": "string"},
                                                                   "deleted": {"type": "boolean"}}}),
                parameters=[_CONNECTOR_ID], not_found=True)},
            "/api/v1/connectors/{connector_id}/move": {"post": _api(
                "Move a connector to another group",
                _json("the connector, moved", {"type": "object", "properties": {"connector": connector}}),
                body={"type": "object", "required": ["group"], "properties": {"group": {"type": "string"}}},
                parameters=[_CONNECTOR_ID], not_found=True)},
            "/api/v1/groups": {
                "get": _api("Connector groups", _json("groups", {"type": "object", "properties": {
                    "groups": {"type": "array", "items": group}}})),
                "post": _api("Create an empty group", _json("the new group", {"type": "object", "properties": {
                    "group": group}}), body={"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}}}),
            },
            "/api/v1/events": {"get": _api(
                "Recent admin events of the node and its connectors, newest first",
                _json("events", {"type": "object", "properties": {"events": {"type": "array", "items": {
                    "$ref": "#/components/schemas/AdminEvent"}}}}),
                parameters=[{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 1000, "default": 100}},
                            {"name": "source", "in": "query", "schema": {"type": "string"},
                             "description": "\"node\" or a connector id"}])},
            "/api/openapi.json": {"get": {"summary": "This document", "security": [],
                                          "responses": {"200": _json("OpenAPI 3 document", {"type": "object"})}}},
            "/ca.pem": {"get": {"summary": "The gateway's CA certificate (check its sha256 against the"
                                           " fingerprint your admin token carries before trusting it)",
                                "security": [], "responses": {"200": {"description": "PEM", "content": {
                                    "application/x-pem-file": {"schema": {"type": "string"}}}}}}},
            "/": {"get": _page("The status page", {"200": {"description": "the page", **_HTML}, "303": _TO_SIGNIN})},
            "/signin": {
                "get": _page("The sign-in form (sets the sign-in CSRF cookie)",
                             {"200": {"description": "the form", **_HTML}}),
                "post": _page("Sign in with an admin token: sets the session cookie",
                              {"303": {"description": "signed in: to /"}, "401": {
                                  "description": "unknown, revoked or expired token: the form again", **_HTML},
                               "403": _CSRF},
                              form={"type": "object", "required": ["token", "csrf"], "properties": {
                                  "token": {"type": "string"}, "csrf": {"type": "string"}}}),
            },
            "/signout": {"post": _page("Sign out", {"303": {"description": "signed out: to /signin"},
                                                    "403": _CSRF},
                                       form={"type": "object", "required": ["csrf"],
                                             "properties": {"csrf": {"type": "string"}}})},
        }),
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                               "description": "gwa1.<id>.<secret>.<CA fingerprint>"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string", "description": "a stable code, e.g. missing_token, revoked_token"},
                    "message": {"type": "string", "description": "what was wrong and what to do"}}},
                "Connector": {"type": "object", "properties": {
                    name: {"type": kind, "nullable": True} for name, kind in (
                        ("connector_id", "string"), ("name", "string"), ("group", "string"),
                        ("created_at", "string"), ("last_seen", "string"), ("deleted_at", "string"),
                        ("state", "string"), ("state_since", "string"), ("software_version", "string"),
                        ("address", "string"), ("tunnels", "integer"), ("open_streams", "integer"),
                        ("node_id", "string"), ("cert_serial", "string"), ("cert_not_after", "string"))}},
                "Group": {"type": "object", "properties": {"name": {"type": "string"},
                                                           "created_at": {"type": "string"}}},
                "AdminEvent": {"type": "object", "properties": {
                    "time": {"type": "number"}, "source": {"type": "string"},
                    "level": {"type": "string"}, "text": {"type": "string"}}},
            },
        },
    }

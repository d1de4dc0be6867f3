"""The commands `gateway --service URL` runs on the service through the admin API, one table.

Each Operation names a command's flags and the API call that carries them. The client
(gateway/cli.py) turns the parsed flags into that call; the service (gateway/admin/routes.py)
turns the call back into the same flags and runs the command's own operation function, the
one the local command runs on its store, so both refuse the same input with the same message.
gateway/admin/openapi.py documents each row.
"""

from __future__ import annotations

import argparse
import importlib
import re
from typing import Any, Callable
from urllib.parse import quote, urlencode

from attrs import frozen

from gateway.errors import GatewayError

# What a field holds: "text", "texts" (a list of text), "number", "whole", or choices "a|b|c".
_SCHEMAS = {"text": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}},
            "number": {"type": "number"}, "whole": {"type": "integer"}}
_QUERY_METHODS = ("GET", "DELETE")


@frozen
class Field:
    """One flag of a command as a field of its API call; `required` when there is no default."""

    name: str
    kind: str = "text"
    default: Any = None
    required: bool = False

    def read(self, value: Any, from_query: bool) -> Any:
        """The flag's value from the call; GatewayError saying what was expected otherwise."""
        if value is None or (from_query and value == []):
            if self.required:
                raise GatewayError(f"missing field {self.name!r}: expected {self.expected()}")
            return list(self.default or []) if self.kind == "texts" else self.default
        if from_query and self.kind != "texts":
            value = value[-1]
            if self.kind in ("number", "whole"):
                value = _number(value, self.kind == "whole")
        if self.kind == "texts":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif self.kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind == "whole":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str) and ("|" not in self.kind or value in self.kind.split("|"))
        if not ok:
            raise GatewayError(f"field {self.name!r}: expected {self.expected()}, got {value!r}")
        return value

    def expected(self) -> str:
        if "|" in self.kind:
            return "one of " + ", ".join(self.kind.split("|"))
        return {"texts": "a list of text", "number": "a number", "whole": "a whole number"}.get(self.kind, "text")

    def schema(self) -> dict[str, Any]:
        if "|" in self.kind:
            return {"type": "string", "enum": self.kind.split("|")}
        return dict(_SCHEMAS[self.kind])


def _number(text: str, whole: bool) -> Any:
    try:
        return int(text) if whole else float(text)
    except ValueError:
        return text  # read() refuses it, naming the field


@frozen
class Operation:
    """A command (`gateway GROUP ACTION`) as one admin API call.

    `template` holds the flags that name what the command acts on ({name}); `fields` the other
    flags, in the query of a GET or DELETE and in the JSON body otherwise; `fixed` flags the
    call implies. `function` ("module:name") is the command's operation, run as
    function(args, config, store) with the service's config file and its store.
    """

    command: str
    method: str
    template: str
    function: str
    summary: str
    fields: tuple[Field, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()
    # The flags the service's log names when the call changes something (never a secret).
    logged: tuple[str, ...] = ()

    @property
    def path_names(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.template)

    @property
    def changes(self) -> bool:
        return self.method != "GET"

    def request(self, args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
        """(method, path, body) of the call that carries the parsed flags `args`."""
        path = self.template.format(**{n: quote(str(getattr(args, n)), safe="") for n in self.path_names})
        values = {f.name: getattr(args, f.name) for f in self.fields}
        if self.method not in _QUERY_METHODS:
            return self.method, path, values
        query = urlencode({k: v for k, v in values.items() if v not in (None, [], "")}, doseq=True)
        return self.method, path + ("?" + query if query else ""), None

    def arguments(self, params: dict[str, str], values: dict[str, Any], from_query: bool) -> argparse.Namespace:
        """The flags a call carries (path `params`, body or query `values`); GatewayError naming a
        field that is unknown, missing or of the wrong kind."""
        unknown = sorted(set(values) - {f.name for f in self.fields})
        if unknown:
            raise GatewayError(f"unknown field {', '.join(map(repr, unknown))}: expected only"
                               f" {', '.join(f.name for f in self.fields) or 'no fields'}")
        flags: dict[str, Any] = {**dict(self.fixed), **params}
        for f in self.fields:
            flags[f.name] = f.read(values.get(f.name), from_query)
        return argparse.Namespace(**flags)

    def run(self) -> Callable[[argparse.Namespace, Any, Any], dict[str, Any]]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)

    def described(self, args: argparse.Namespace) -> str:
        """What the call acted on, for the log."""
        return ", ".join(f"{n}={getattr(args, n)!r}" for n in self.logged if getattr(args, n, None)) or "-"


_APP_FIELDS = (
    Field("group"), Field("external_url"), Field("internal_url"), Field("option", "texts"), Field("affinity"),
    Field("connect_timeout", "number"), Field("segment", "texts"), Field("allow_user", "texts"),
    Field("allow_group", "texts"))

OPERATIONS = {op.command: op for op in (
    Operation("groups rename", "POST", "/api/v1/groups/{old}/rename", "gateway.cli:groups_rename_operation",
              "Rename a group no app of the config file names (`gateway groups rename`)",
              (Field("new", required=True),), logged=("old", "new")),
    Operation("groups delete", "DELETE", "/api/v1/groups/{name}", "gateway.cli:groups_delete_operation",
              "Delete a group no app names (`gateway groups delete`)",
              (Field("move_connectors_to"),), logged=("name", "move_connectors_to")),
    Operation("apps list", "GET", "/api/v1/apps", "gateway.cli:apps_list_operation",
              "The apps of the config file and of the store, with why a stored one is not served"
              " (`gateway apps list`)"),
    Operation("apps add", "POST", "/api/v1/apps", "gateway.cli:apps_add_operation",
              "Publish a web app or a private app, kept in the store (`gateway apps add`)",
              (Field("name", required=True), *_APP_FIELDS), logged=("name", "group")),
    Operation("apps set", "PATCH", "/api/v1/apps/{name}", "gateway.cli:apps_set_operation",
              "Change an app kept in the store (`gateway apps set`); a list given replaces the app's",
              (*_APP_FIELDS, Field("unset_option", "texts")), logged=("name", "group")),
    Operation("apps remove", "DELETE", "/api/v1/apps/{name}", "gateway.cli:apps_remove_operation",
              "Stop publishing an app kept in the store (`gateway apps remove`)", logged=("name",)),
    Operation("token create", "POST", "/api/v1/tokens", "gateway.cli:token_create_operation",
              "A one-time enrolment token for a connector group (`gateway token create`); the answer holds"
              " the token, shown this once", (Field("group", default="default"), Field("lifetime", "whole")),
              logged=("group",)),
    Operation("token list", "GET", "/api/v1/tokens", "gateway.cli:token_list_operation",
              "Enrolment tokens, never their secrets (`gateway token list`)"),
    Operation("users token create", "POST", "/api/v1/users/tokens", "gateway.cli:users_token_create_operation",
              "A personal token of a Private Access user (`gateway users token create`); the answer holds the"
              " token, shown this once",
              (Field("user", required=True), Field("name", default=""), Field("email", default=""),
               Field("groups", "texts"), Field("expires", required=True)), logged=("user",)),
    Operation("users token list", "GET", "/api/v1/users/credentials", "gateway.cli:users_token_list_operation",
              "Users' personal tokens and sign-ins, never their secrets (`gateway users token list`)",
              (Field("user"),)),
    Operation("users token revoke", "POST", "/api/v1/users/credentials/{credential_id}/revoke",
              "gateway.cli:users_token_revoke_operation",
              "Revoke one personal token or sign-in (`gateway users token revoke`)", logged=("credential_id",)),
    Operation("users revoke", "POST", "/api/v1/users/revoke", "gateway.cli:users_revoke_operation",
              "Revoke every credential of a user (`gateway users revoke`)",
              (Field("user", required=True),), logged=("user",)),
    Operation("logs session list", "GET", "/api/v1/session-log", "gateway.logs_cli:session_switch_operation",
              "The session log switches of groups and connectors (`gateway logs session list`)",
              fixed=(("state", "list"), ("group", None), ("connector", None))),
    Operation("logs session", "PUT", "/api/v1/session-log", "gateway.logs_cli:session_switch_operation",
              "Switch the session log of a group or a connector (`gateway logs session on|off|inherit`)",
              (Field("state", "on|off|inherit", required=True), Field("group"), Field("connector")),
              logged=("state", "group", "connector")),
)}


def operation_of(args: argparse.Namespace) -> Operation | None:
    """The Operation of the command `args` were parsed for, if `--service` can run it."""
    words = [args.command, getattr(args, "action", None), getattr(args, "token_action", None)]
    if args.command == "logs" and getattr(args, "state", None) == "list":
        words.append("list")
    return OPERATIONS.get(" ".join(w for w in words if w))

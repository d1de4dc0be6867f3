"""The `gateway` command: tokens, registration, connectors, groups, apps, plugins, config checks."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import json
import os
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import attrs
from twisted.python.failure import Failure

from gateway import __version__, plugins
from gateway import logs_cli
from gateway import diagnose_cli
from gateway.access import cli as access_cli
from gateway.store import cli as store_cli
from gateway.updater import cli as updater_cli
from gateway.admin.client import TOKEN_ENV as ADMIN_TOKEN_ENV
from gateway.admin.summary import jsonable, when as _when
from gateway.config import DEFAULT_CONFIG_PATH, load_config
from gateway.errors import GatewayError, UnknownName

TOKEN_ENV = "GATEWAY_ENROL_TOKEN"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Manage a gateway service and its connectors.")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    p.add_argument("--service", dest="remote", metavar="URL",
                   help="use the admin API at URL (https://HOST:PORT/, [admin] listen) instead of the local store;"
                        f" for: {_remote_commands()}")
    p.add_argument("--admin-token-file", metavar="FILE",
                   help=f"with --service: the file holding the admin token, or - for standard input"
                        f" (or set {ADMIN_TOKEN_ENV})")
    sub = p.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="enrolment tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="make a one-time enrolment token for a connector group")
    create.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")
    create.add_argument("--group", default="default", help="the connector group the new connector joins")
    create.add_argument("--lifetime", type=int, help="seconds the token stays valid (default: service.token_lifetime)")
    create.add_argument("--output", help="write the token to this file (mode 0600) instead of standard output")
    token.add_parser("list", help="list tokens (never their secrets)").add_argument(
        "--config", default=str(DEFAULT_CONFIG_PATH))

    conn = sub.add_parser("connector", help="this machine's connector").add_subparsers(dest="action", required=True)
    reg = conn.add_parser("register", help="enrol this connector with a service using a token")
    reg.add_argument("--service", required=True, help="the service's tunnel address, HOST:PORT")
    reg.add_argument("--token-file", help=f"file holding the token, or - for standard input (or set {TOKEN_ENV})")
    reg.add_argument("--state-dir", required=True, help="where the connector keeps its key and certificates")
    reg.add_argument("--server-name", help="name to check in the service's certificate (default: the HOST)")
    reg.add_argument("--name", help="a name for this connector (default: the host name)")
    reg.add_argument("--proxy", metavar="URL", help="enrol through this HTTP CONNECT proxy, http://[USER@]HOST:PORT"
                     " (default: HTTPS_PROXY unless NO_PROXY names the service; \"\" for none)")
    reg.add_argument("--proxy-password-file", metavar="FILE", help="file holding the proxy user's password")
    updater_cli.add_connector_parser(conn)

    conns = sub.add_parser("connectors", help="connectors known to the service").add_subparsers(
        dest="action", required=True)
    lst = conns.add_parser("list", help="list connectors with their status")
    lst.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    lst.add_argument("--all", action="store_true", help="include deleted connectors")
    lst.add_argument("--wide", action="store_true", help="show full connector ids")
    lst.add_argument("--json", action="store_true", help="print the full records as JSON")
    delete = conns.add_parser("delete", help="delete a connector and revoke its certificate")
    delete.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    delete.add_argument("connector_id", help="the id, or a unique prefix of it")
    move = conns.add_parser("move", help="move a connector to another group")
    move.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    move.add_argument("connector_id", help="the id, or a unique prefix of it")
    move.add_argument("--group", required=True, help="the group it joins")

    groups = sub.add_parser("groups", help="connector groups").add_subparsers(dest="action", required=True)
    groups.add_parser("list", help="list groups").add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    gcreate = groups.add_parser("create", help="create an empty group")
    gcreate.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    gcreate.add_argument("name")
    grename = groups.add_parser("rename", help="rename a group no app names")
    grename.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    grename.add_argument("old")
    grename.add_argument("new")
    gdelete = groups.add_parser("delete", help="delete a group no app names")
    gdelete.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    gdelete.add_argument("name")
    gdelete.add_argument("--move-connectors-to", metavar="GROUP", help="the group its connectors join")

    apps = sub.add_parser("apps", help="published apps: the config file's and those kept in the store").add_subparsers(
        dest="action", required=True)
    alist = apps.add_parser("list", help="list apps from the config file and from the store")
    alist.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    alist.add_argument("--json", action="store_true", help="print the apps as JSON")
    aadd = apps.add_parser("add", help="publish a web app (--external-url and --internal-url) or a private app"
                                       " (--segment); kept in the store, the running service picks it up")
    aadd.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    aadd.add_argument("name", help="the app's name, [a-z0-9][a-z0-9._-]{0,62}")
    aadd.add_argument("--external-url", help="a web app: where users reach it, e.g. https://wiki.apps.example.test/")
    aadd.add_argument("--internal-url", help="a web app: where the connector finds it, e.g. http://wiki.corp:8080/")
    _app_flags(aadd)
    aset = apps.add_parser("set", help="change an app kept in the store")
    aset.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    aset.add_argument("name")
    aset.add_argument("--external-url")
    aset.add_argument("--internal-url")
    _app_flags(aset)
    aset.add_argument("--unset-option", action="append", default=[], metavar="KEY", help="drop an option (repeatable)")
    aremove = apps.add_parser("remove", help="stop publishing an app kept in the store")
    aremove.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    aremove.add_argument("name")

    _users_parsers(sub)
    _admin_parsers(sub)

    status = sub.add_parser("status", help="per connector group: its apps, connectors and how streams are spread")
    status.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")
    sub.add_parser("plugins", help="list loaded plugins, their versions and hooks")
    check = sub.add_parser("check-config", help="validate a TOML file and exit")
    check.add_argument("config")
    access_cli.add_parsers(sub)
    diagnose_cli.add_parsers(sub)
    logs_cli.add_parsers(sub)
    store_cli.add_parsers(sub)
    updater_cli.add_parsers(sub)
    return p


def _users_parsers(sub: Any) -> None:
    users = sub.add_parser("users", help="Private Access users' credentials: personal tokens and sign-ins"
                           ).add_subparsers(dest="action", required=True)
    tokens = users.add_parser("token", help="personal tokens for headless machines").add_subparsers(
        dest="token_action", required=True)
    create = tokens.add_parser("create", help="issue a personal token (printed once; only its hash is kept)")
    create.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")
    create.add_argument("--user", required=True, help="the user's subject, as assignments name it")
    create.add_argument("--name", default="", help="the user's display name")
    create.add_argument("--email", default="", help="the user's email address (assignments may name it)")
    create.add_argument("--group", action="append", default=[], dest="groups", metavar="GROUP",
                        help="a group the user is in, for options.allowed_groups (repeatable)")
    create.add_argument("--expires", required=True, metavar="DURATION", help="how long it is valid: 30d, 12h or 90m")
    create.add_argument("--output", help="write the token to this file (mode 0600) instead of standard output")
    tlist = tokens.add_parser("list", help="list users' credentials (never their secrets)")
    tlist.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    tlist.add_argument("--user", help="only this user's")
    trevoke = tokens.add_parser("revoke", help="revoke one credential (a personal token or a sign-in)")
    trevoke.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    trevoke.add_argument("credential_id", metavar="ID")
    revoke = users.add_parser("revoke", help="revoke every credential of a user (tokens and sign-ins)")
    revoke.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    revoke.add_argument("--user", required=True, help="the user's subject")


def _admin_parsers(sub: Any) -> None:
    admin = sub.add_parser("admin", help="the admin API and status page ([admin])").add_subparsers(
        dest="action", required=True)
    tokens = admin.add_parser("token", help="admin tokens (only their hashes are kept)").add_subparsers(
        dest="token_action", required=True)
    create = tokens.add_parser("create", help="issue an admin token (printed once)")
    create.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="the service's TOML file")
    create.add_argument("--name", required=True, help="who or what holds it, e.g. alice or monitoring")
    create.add_argument("--expires", default="90d", metavar="DURATION", help="how long it is valid: 30d, 12h or 90m"
                                                                           " (default 90d)")
    create.add_argument("--output", help="write the token to this file (mode 0600) instead of standard output")
    create.add_argument("--role", choices=("admin", "read"), default="admin",
                        help="admin (default): everything; read: the API's GET routes and the status page only"
                             " (monitoring, a status screen), every change refused")
    tlist = tokens.add_parser("list", help="list admin tokens (never their secrets)")
    tlist.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    trevoke = tokens.add_parser("revoke", help="revoke an admin token: API calls and status page sessions with it"
                                               " are refused at once")
    trevoke.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    trevoke.add_argument("token_id", metavar="ID")


def _app_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", help="the connector group that reaches it (default: default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an app option as in [[apps]] options; VALUE is read as TOML (true, 30, \"text\")"
                        " or else taken as text (repeatable)")
    p.add_argument("--affinity", help="none, client or user")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="how long the connector tries the back end")
    again = " (repeatable; on set, the flags given replace the whole list)"
    p.add_argument("--segment", action="append", default=[], metavar='"[tcp|udp] DESTINATION:PORTS"',
                   help="a private app: what its users reach, e.g. \"tcp 10.0.0.0/8:22,80\", \"udp dns.corp:53\" or"
                        " \"tcp *.corp.example:8000-8100\"" + again)
    p.add_argument("--allow-user", action="append", default=[], metavar="USER",
                   help="a private app: a user assigned to it (subject or verified email)" + again)
    p.add_argument("--allow-group", action="append", default=[], metavar="GROUP",
                   help="a private app: a group whose users are assigned to it" + again)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    action = getattr(args, "action", None)
    if args.command in ("users", "admin") and action == "token":
        action = f"token {args.token_action}"
    try:
        return COMMANDS[(args.command, action)](args)
    except GatewayError as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 1


# The commands that work against a remote service's admin API (`gateway --service URL ...`).
REMOTE_COMMANDS = {("connectors", "list"), ("connectors", "delete"), ("connectors", "move"), ("groups", "list"),
                   ("groups", "create"), ("status", None)}


def _remote_commands() -> str:
    from gateway.admin.operations import OPERATIONS

    names = {" ".join(filter(None, c)) for c in REMOTE_COMMANDS} | {o.removesuffix(" list") if o.startswith("logs")
                                                                   else o for o in OPERATIONS}
    return ", ".join(sorted(names))


def _perform(args: argparse.Namespace, operation: Any) -> dict[str, Any]:
    """What `operation(args, config, store)` answers: run here on the store of --config, or with
    --service URL run by the service on its store (the admin API calls the same function)."""
    if getattr(args, "remote", None):
        from gateway.admin.client import AdminClient, read_admin_token
        from gateway.admin.operations import operation_of

        remote = operation_of(args)
        if remote is None:
            raise GatewayError(f"`gateway {args.command} {args.action}` works on the service machine only"
                               f" (with --config); with --service: {_remote_commands()}")
        return AdminClient(args.remote, read_admin_token(args.admin_token_file)).call(*remote.request(args))
    with _service_store(args) as (config, store):
        return operation(args, config, store)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)


@contextmanager
def _service_store(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """The service's config and its store, closed when the command is done with it: the local
    store of --config, or with --service URL the admin API standing in for both."""
    from gateway.service.node import open_store

    if getattr(args, "remote", None):
        yield _remote_store(args)
        return
    config_path = args.config
    config = load_config(config_path, plugins.config_sections(plugins.make_plugin_manager()))
    if config.service is None:
        raise GatewayError(f"{config_path} has no [service] table; give the service's config file")
    store = open_store(config.service)
    try:
        yield config, store
    finally:
        store.close()


def _remote_store(args: argparse.Namespace) -> tuple[Any, Any]:
    from gateway.admin.client import AdminClient, RemoteStore, read_admin_token

    command = (args.command, getattr(args, "action", None))
    if command not in REMOTE_COMMANDS:
        raise GatewayError(f"`gateway {' '.join(filter(None, command))}` works on the service machine only (with"
                           f" --config); with --service: {_remote_commands()}")
    store = RemoteStore(AdminClient(args.remote, read_admin_token(args.admin_token_file)))
    return store.config(), store


def token_create_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """A new enrolment token of group --group: the token itself (its only copy) and when it expires."""
    from gateway.pki.ca import CertificateAuthority
    from gateway.pki.tokens import EnrolmentToken, hash_secret
    from gateway.store.records import TokenRecord

    known = {g.name for g in store.list_groups()} | {a.group for a in config.apps} | {"default"}
    if args.group not in known:
        raise UnknownName(
            f"no connector group {args.group!r}; known groups: {', '.join(sorted(known))}"
            " (a group exists once an app in the config names it or `gateway groups create` made it)"
        )
    lifetime = args.lifetime or config.service.token_lifetime
    if lifetime <= 0:
        raise GatewayError(f"--lifetime must be a positive number of seconds, got {lifetime}")
    now = datetime.now(UTC)
    store.ensure_group(args.group, now)
    ca = CertificateAuthority.load_or_create(config.service.state_dir)
    token = EnrolmentToken.generate(ca.fingerprint)
    store.create_token(TokenRecord(
        token_id=token.token_id, secret_hash=hash_secret(token.secret), group=args.group,
        created_at=now, expires_at=now + timedelta(seconds=lifetime),
    ))
    return {"token": token.encode(), "token_id": token.token_id, "group": args.group,
            "expires": (now + timedelta(seconds=lifetime)).strftime("%Y-%m-%d %H:%M:%S UTC")}


def token_create(args: argparse.Namespace) -> int:
    made = _perform(args, token_create_operation)
    token_id, group, expires = made["token_id"], made["group"], made["expires"]
    if args.output:
        from gateway.pki.keys import write_private

        write_private(Path(args.output), (made["token"] + "\n").encode())
        print(f"token {token_id} for group {group!r} written to {args.output}; one use, expires {expires}",
              file=sys.stderr)
    else:
        print(made["token"])
        print(f"token {token_id} for group {group!r}: one use, expires {expires}", file=sys.stderr)
    return 0


def token_list_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """The enrolment tokens (never their secrets' hashes)."""
    return {"tokens": [{"token_id": t.token_id, "group": t.group, "created_at": t.created_at.isoformat(),
                        "expires_at": t.expires_at.isoformat(), "used_at": t.used_at and t.used_at.isoformat(),
                        "used_by": t.used_by} for t in store.list_tokens()]}


def token_list(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    rows = [("TOKEN", "GROUP", "EXPIRES", "STATE")]
    for t in _perform(args, token_list_operation)["tokens"]:
        expires_at = datetime.fromisoformat(t["expires_at"])
        state = f"used by {t['used_by'][:12]}" if t["used_at"] else ("expired" if expires_at <= now else "unused")
        rows.append((t["token_id"], t["group"], f"{expires_at:%Y-%m-%d %H:%M}", state))
    _table(rows)
    return 0


def run_on_reactor(work: Any, what: str) -> Any:
    """Run the coroutine ``work(reactor)`` on the global reactor and return its result; its
    GatewayError is raised as is, anything else as "``what`` failed: ..."."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            outcome["error"] = result.value
        else:
            outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(work(reactor)).addBoth(done))
    reactor.run()
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, GatewayError):
            raise error
        raise GatewayError(f"{what} failed: {error!r}")
    return outcome.get("result")


def connector_register(args: argparse.Namespace) -> int:
    from gateway.connector.proxy import choose_proxy
    from gateway.connector.register import parse_service, register

    text = _read_token(args.token_file)
    host, port = parse_service(args.service)
    password_file = Path(args.proxy_password_file) if args.proxy_password_file else None
    proxy = choose_proxy(args.proxy, password_file, host, port, source="--proxy")

    async def run(reactor: Any) -> Any:
        return await register(reactor, args.service, text, Path(args.state_dir).absolute(), args.server_name,
                              args.name, proxy=proxy)

    result = run_on_reactor(run, "registration")
    print(f"registered connector {result['connector_id']} ({result.get('name')}) in group {result['group']!r};"
          f" state in {Path(args.state_dir).absolute()}")
    print(f"start it with: twistd -n gateway --config FILE.toml  ([connector] state_dir = \"{args.state_dir}\")")
    return 0


def _read_token(path: str | None) -> str:
    if path is None:
        text = os.environ.get(TOKEN_ENV)
        if not text:
            raise GatewayError(f"give the token with --token-file FILE (or - for standard input) or {TOKEN_ENV}")
        return text
    if path == "-":
        return sys.stdin.readline()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise GatewayError(f"cannot read the token file {path}: {e.strerror}") from None


ID_WIDTH = 12


def connectors_list(args: argparse.Namespace) -> int:
    with _service_store(args) as (_, store):
        connectors = store.list_connectors(include_deleted=args.all)
    if args.json:
        print(json.dumps([jsonable(c) for c in connectors], indent=2))
        return 0
    rows = [("ID", "NAME", "GROUP", "STATE", "VERSION", "ADDRESS", "TUNNELS", "STREAMS", "LAST HEARTBEAT",
             "CERT EXPIRES")]
    for c in connectors:
        rows.append((
            c.connector_id if args.wide else c.connector_id[:ID_WIDTH], c.name, c.group,
            "deleted" if c.deleted_at else c.state, c.software_version or "-", c.address or "-",
            str(c.tunnels), str(c.open_streams), _when(c.last_seen, "never"), _when(c.cert_not_after, "-"),
        ))
    _table(rows)
    return 0


def status(args: argparse.Namespace) -> int:
    """Groups with their apps and connectors, and each connector's share of the open streams."""
    from gateway.admin.summary import summarise

    with _service_store(args) as (config, store):
        connectors = store.list_connectors()
        groups = [g.name for g in store.list_groups()]
        config = _with_store_apps(config, store)
    for group in summarise(groups, config.apps, connectors):
        print(f"group {group.name}: {len(group.active)}/{len(group.connectors)} connectors active,"
              f" {group.open_streams} open streams, {group.health}")
        print(f"  apps: {', '.join(group.apps) or '-'}")
        rows = [("  CONNECTOR", "NAME", "STATE", "TUNNELS", "STREAMS", "SHARE", "LAST HEARTBEAT")]
        for c in group.connectors:
            rows.append((f"  {c.connector_id[:ID_WIDTH]}", c.name, c.state, str(c.tunnels), str(c.open_streams),
                         group.share(c), _when(c.last_seen, "never")))
        if group.connectors:
            _table(rows)
        print()
    return 0


def _find_connector(store: Any, text: str) -> Any:
    """The live connector whose id is `text` or starts with it (unique)."""
    matches = [c for c in store.list_connectors() if c.connector_id.startswith(text)] if text else []
    exact = [c for c in matches if c.connector_id == text]
    if exact:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UnknownName(f"no active connector {text!r}; see `gateway connectors list`")
    raise GatewayError(f"{text!r} matches {len(matches)} connectors; give more of the id (`--wide` shows it all)")


def connectors_delete(args: argparse.Namespace) -> int:
    with _service_store(args) as (_, store):
        connector = _find_connector(store, args.connector_id)
        store.delete_connector(connector.connector_id, datetime.now(UTC))
    print(f"connector {connector.connector_id} deleted; its certificate is revoked")
    return 0


def connectors_move(args: argparse.Namespace) -> int:
    with _service_store(args) as (config, store):
        connector = _find_connector(store, args.connector_id)
        if args.group in _app_groups(config):
            store.ensure_group(args.group, datetime.now(UTC))
        if connector.group == args.group:
            print(f"connector {connector.connector_id} is in group {args.group!r} already")
            return 0
        store.move_connector(connector.connector_id, args.group)
    print(f"connector {connector.connector_id} ({connector.name}) moved from group {connector.group!r} to"
          f" {args.group!r}; the running service routes {args.group!r}'s apps to it and sends it their config"
          " at its next heartbeat; open streams carry on")
    return 0


def _app_groups(config: Any) -> dict[str, list[str]]:
    """Group name -> the apps of the config that name it."""
    groups: dict[str, list[str]] = {}
    for app in config.apps:
        groups.setdefault(app.group, []).append(app.name)
    return groups


def _refuse_if_apps_use(config: Any, group: str, what: str) -> None:
    apps = _app_groups(config).get(group)
    if apps:
        raise GatewayError(
            f"cannot {what} group {group!r}: apps {', '.join(sorted(apps))} in {config.path} name it;"
            " edit the config first (and reload the service)"
        )


def _check_group_name(name: str) -> None:
    from gateway.config import _NAME_RE

    if not _NAME_RE.match(name):
        raise GatewayError(f"a group name must match [a-z0-9][a-z0-9._-]{{0,62}}, got {name!r}")


def groups_list(args: argparse.Namespace) -> int:
    with _service_store(args) as (config, store):
        stored = {g.name: g for g in store.list_groups()}
        counts: dict[str, int] = {}
        for c in store.list_connectors():
            counts[c.group] = counts.get(c.group, 0) + 1
        apps = _app_groups(_with_store_apps(config, store))
    rows = [("GROUP", "CONNECTORS", "APPS", "CREATED")]
    for name in sorted(set(stored) | set(apps) | {"default"}):
        created = _when(stored[name].created_at, "-") if name in stored else "at the next service start"
        rows.append((name, str(counts.get(name, 0)), ", ".join(sorted(apps.get(name, []))) or "-", created))
    _table(rows)
    return 0


def groups_create(args: argparse.Namespace) -> int:
    _check_group_name(args.name)
    with _service_store(args) as (_, store):
        store.create_group(args.name, datetime.now(UTC))
    print(f"group {args.name!r} created")
    return 0


def _stored_group(store: Any, name: str) -> None:
    if name != "default" and name not in {g.name for g in store.list_groups()}:
        raise UnknownName(f"no group named {name!r}; see `gateway groups list`")


def groups_rename_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Group --old renamed --new with its connectors; how many connectors it had."""
    _check_group_name(args.new)
    _refuse_if_apps_use(config, args.old, "rename")
    _stored_group(store, args.old)
    return {"old": args.old, "new": args.new, "moved": store.rename_group(args.old, args.new)}


def groups_rename(args: argparse.Namespace) -> int:
    done = _perform(args, groups_rename_operation)
    print(f"group {done['old']!r} renamed to {done['new']!r} ({done['moved']} connectors)")
    return 0


def groups_delete_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Group NAME deleted, its connectors moved to --move-connectors-to; how many moved."""
    _refuse_if_apps_use(config, args.name, "delete")
    _stored_group(store, args.name)
    target = args.move_connectors_to
    if target is not None and target in _app_groups(config):
        store.ensure_group(target, datetime.now(UTC))
    return {"name": args.name, "target": target, "moved": store.delete_group(args.name, target)}


def groups_delete(args: argparse.Namespace) -> int:
    done = _perform(args, groups_delete_operation)
    note = f"; {done['moved']} connectors moved to {done['target']!r}" if done["moved"] else ""
    print(f"group {done['name']!r} deleted{note}")
    return 0


# -- apps -------------------------------------------------------------------------------------

# The [[apps]] key each flag sets, so an error about a key names the flag to fix.
APP_FLAGS = {
    "name": "NAME", "external_url": "--external-url", "internal_url": "--internal-url", "group": "--group",
    "options": "--option", "affinity": "--affinity", "connect_timeout": "--connect-timeout",
    "options.allowed_users": "--allow-user", "options.allowed_groups": "--allow-group",
}


def _served_protocols() -> set[str]:
    """The protocols the loaded plugins serve, as the service would see them."""
    return set(plugins.protocol_handlers(plugins.make_plugin_manager()))


def _with_store_apps(config: Any, store: Any) -> Any:
    """`config` with the stored apps the service would serve after its own."""
    from gateway.service import store_apps

    apps, _ = store_apps.parse_records(store.list_apps())
    return store_apps.merge(config, apps, _served_protocols())[0]


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise GatewayError(f"--option: expected KEY=VALUE, such as translate_host=false, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
        json.dumps(parsed)  # TOML dates and times do not go into the store: keep those as text
    except (tomllib.TOMLDecodeError, TypeError):
        parsed = value
    return key, parsed


def _definition(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stored [[apps]] keys (but name and group): `base` with what the flags set."""
    definition = dict(base or {})
    for key, value in (("external_url", args.external_url), ("internal_url", args.internal_url),
                       ("affinity", args.affinity), ("connect_timeout", args.connect_timeout)):
        if value is not None:
            definition[key] = value
    options = dict(definition.get("options") or {})
    for key in getattr(args, "unset_option", []):
        if key not in options:
            raise GatewayError(f"--unset-option: the app has no option {key!r}; it has: {', '.join(options) or 'none'}")
        del options[key]
    options.update(_option(text) for text in args.option)
    for key, given in (("allowed_users", args.allow_user), ("allowed_groups", args.allow_group)):
        if given:
            options[key] = list(given)
    if args.segment:
        definition["segments"] = [_segment_flag(i, text) for i, text in enumerate(args.segment)]
    definition.pop("options", None)
    if options:
        definition["options"] = options
    return definition


def _segment_flag(index: int, text: str) -> dict[str, str]:
    """``--segment "tcp 10.0.0.0/8:22,80"`` as the segment table ``[[apps.segments]]`` holds (checked later)."""
    words = text.split()
    protocol, target = (words if len(words) == 2 else ("tcp", words[0]) if len(words) == 1 else ("", ""))
    destination, sep, ports = target.rpartition(":")
    if not sep or not destination or not ports or destination.startswith("[") != destination.endswith("]"):
        raise GatewayError(f"--segment (#{index + 1}): expected \"[tcp|udp] DESTINATION:PORTS\" such as"
                           f" \"tcp 10.0.0.0/8:22,80\" or \"udp [fd00::/64]:53\", got {text!r}")
    return {"destination": destination.removeprefix("[").removesuffix("]"), "ports": ports, "protocol": protocol}


def _flag_for(key: str) -> str:
    """The `gateway apps` flag that set the [[apps]] key ``key``."""
    if key.startswith("segments"):
        index = key.removeprefix("segments[").partition("]")[0]
        return f"--segment (#{int(index) + 1})" if index.isdigit() else "--segment"
    return APP_FLAGS.get(key, key)


def _parse_cli_app(name: str, group: str, definition: dict[str, Any]) -> Any:
    """The app as the service will parse it; an error names the flag and what was expected."""
    from gateway.config import WEB_PROTOCOL, parse_app
    from gateway.errors import ConfigError

    if not definition.get("segments") and not ("external_url" in definition or "internal_url" in definition):
        raise GatewayError("expected --external-url and --internal-url (a web app) or --segment (a private app),"
                           " got neither")
    try:
        app = parse_app({**definition, "name": name, "group": group}, source="gateway apps")
    except ConfigError as e:
        raise GatewayError(f"{_flag_for(e.key)}: {e.expected}") from None
    if app.protocol != WEB_PROTOCOL and not app.is_private:  # the store takes web apps and private apps only
        raise GatewayError("only web apps and private apps can be published with `gateway apps`; put other apps"
                           " in the config file")
    return app


def _require_group(config: Any, store: Any, group: str) -> None:
    """The group must exist in the store (`gateway groups create`), or be one the config file names."""
    stored = {g.name for g in store.list_groups()}
    named = set(_app_groups(config)) | {"default"}
    if group in stored:
        return
    if group in named:
        store.ensure_group(group, datetime.now(UTC))  # the service makes these at start; do it now
        return
    raise UnknownName(
        f"--group: no connector group {group!r}; known groups: {', '.join(sorted(stored | named))};"
        f" create it first with `gateway groups create {group}`"
    )


def _unique_external_url(config: Any, app: Any, records: list[Any]) -> None:
    """Refuse an external URL (scheme, host, port and path) that another app already has, or
    segments that overlap an app's of another connector group."""
    from gateway.config import web_origin
    from gateway.service import store_apps

    others, _ = store_apps.parse_records(r for r in records if r.name != app.name)
    if app.is_private:
        why = store_apps.overlap(app, [*config.apps, *others], {a.name for a in config.apps})
        if why is not None:
            raise GatewayError(f"--segment: {why}; narrow one of them, or use the same --group")
        return
    other = store_apps.clash(app, [*config.apps, *others])
    if other is None:
        return
    if any(other is a for a in config.apps):
        where, what = f"in {config.path}", "change that app in the file"
    else:
        where, what = "in the store", f"change or remove that app with `gateway apps set|remove {other.name}`"
    raise GatewayError(
        f"--external-url: expected an external URL unique among apps, got {app.external_url!r}"
        f" (app {other.name!r} {where} has the same scheme, host, port and path: {web_origin(app.external_url)});"
        f" choose another URL or {what}"
    )


def _check_with_plugins(config: Any, store: Any, app: Any) -> list[str]:
    """Refuse an app the plugin serving it would refuse (e.g. the http plugin's options); the
    warnings this app brings (e.g. no certificate for its host)."""
    from gateway.service import store_apps

    pm = plugins.make_plugin_manager()
    handlers = plugins.protocol_handlers(pm)
    if app.protocol not in handlers:
        blocked = os.environ.get(plugins.DISABLE_ENV)
        hint = f" ({plugins.DISABLE_ENV}={blocked})" if blocked else ""
        raise GatewayError(f"no loaded plugin serves protocol {app.protocol!r}{hint}; see `gateway plugins`")
    apps, _ = store_apps.parse_records(r for r in store.list_apps() if r.name != app.name)
    before, _ = store_apps.merge(config, apps, handlers)
    try:
        known = plugins.check_service_listeners(pm, before)
    except Exception:
        return []  # the apps there already are refused: not this app's doing, so no verdict on it
    after, _ = store_apps.merge(config, [*apps, app], handlers)
    try:
        warnings = plugins.check_service_listeners(pm, after)
    except Exception as e:
        raise GatewayError(f"the {app.protocol} plugin refuses app {app.name!r}: {e}") from None
    return [w for w in warnings if w not in known]


def _applied_note(config: Any) -> str:
    interval = config.service.config_interval
    return (f"the running service applies it within config_interval ({interval:g} s), or at once on SIGHUP;"
            " connectors of the group get it with their config")


def apps_list_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """The config file's apps and the store's, each saying whether it is served and if not why."""
    from gateway.service import store_apps

    records = store.list_apps()
    parsed, problems = store_apps.parse_records(records)
    _, left_out = store_apps.merge(config, parsed, _served_protocols())
    by_name = {a.name: a for a in parsed}
    entries = []
    for app in config.apps:
        entries.append({"name": app.name, "source": "config", "group": app.group, "protocol": app.protocol,
                        "external_url": app.external_url, "internal_url": app.internal_url,
                        "listen": app.listen, "destination": app.destination, "options": app.options,
                        "segments": [str(s) for s in app.segments],
                        "affinity": app.affinity, "connect_timeout": app.connect_timeout, "served": True,
                        "note": ""})
    for record in records:
        app = by_name.get(record.name)
        note = problems.get(record.name) or left_out.get(record.name) or ""
        definition = record.definition
        entries.append({
            "name": record.name, "source": "store", "group": record.group,
            "protocol": app.protocol if app else definition.get("protocol", ""),
            "external_url": definition.get("external_url", ""), "internal_url": definition.get("internal_url", ""),
            "listen": "", "destination": app.destination if app else "",
            "segments": [str(s) for s in app.segments] if app else [],
            "options": definition.get("options", {}), "affinity": app.affinity if app else definition.get("affinity"),
            "connect_timeout": app.connect_timeout if app else definition.get("connect_timeout"),
            "served": not note, "note": note,
            "created_at": record.created_at.isoformat(), "updated_at": record.updated_at.isoformat(),
        })
    entries.sort(key=lambda e: (e["name"], e["source"]))
    return {"apps": entries}


def apps_list(args: argparse.Namespace) -> int:
    entries = _perform(args, apps_list_operation)["apps"]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("NAME", "SOURCE", "GROUP", "EXTERNAL", "INTERNAL", "NOTE")]
    for e in entries:
        rows.append((e["name"], e["source"], e["group"], e["external_url"] or e["listen"] or "(private)",
                     e["internal_url"] or e["destination"] or ", ".join(e["segments"]), f"not served: {e['note']}" if e["note"] else "-"))
    _table(rows)
    return 0


def apps_add_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """App NAME as the flags describe it, checked as the service will and kept in the store."""
    from gateway.store.records import AppRecord

    group = args.group or "default"
    definition = _definition(args)
    app = _parse_cli_app(args.name, group, definition)
    if any(a.name == app.name for a in config.apps):
        raise GatewayError(
            f"NAME: app {app.name!r} is in {config.path}, and the config file's apps win over the store's;"
            " choose another name (or change the app in the file)"
        )
    _require_group(config, store, group)
    warnings = _check_with_plugins(config, store, app)
    now = datetime.now(UTC)
    store.add_app(AppRecord(app.name, group, definition, now, now),
                  check=lambda records: _unique_external_url(config, app, records))
    return {"name": app.name, "group": group, "summary": _app_summary(app), "note": _applied_note(config),
            "warnings": warnings}


def apps_add(args: argparse.Namespace) -> int:
    done = _perform(args, apps_add_operation)
    _warn(done["warnings"])
    print(f"app {done['name']!r} added: {done['summary']} via group {done['group']!r}; {done['note']}")
    return 0


def _app_summary(app: Any) -> str:
    if app.is_private:
        return f"private app, segments {', '.join(str(s) for s in app.segments)},"
    return f"{app.external_url} -> {app.internal_url}"


def _stored_app(config: Any, store: Any, name: str, what: str) -> Any:
    record = store.get_app(name)
    if record is not None:
        return record
    if any(a.name == name for a in config.apps):
        raise GatewayError(f"app {name!r} is in {config.path}, not in the store: {what} it in the file and reload"
                           " the service (SIGHUP)")
    raise UnknownName(f"no app {name!r} in the store; see `gateway apps list`")


def _refuse_kind_change(args: argparse.Namespace, record: Any) -> None:
    """`set` changes an app, not its kind: a web app's URLs and a private app's segments do not mix."""
    private = "segments" in record.definition
    flag = "--segment" if args.segment and not private else (
        "--external-url" if args.external_url and private else "--internal-url" if args.internal_url and private
        else None)
    if flag is not None:
        raise GatewayError(f"{flag}: app {args.name!r} is a {'private' if private else 'web'} app; to make it the"
                           f" other kind, remove it (`gateway apps remove {args.name}`) and add it again")


def apps_set_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Stored app NAME changed as the flags say, checked as the service will."""
    record = _stored_app(config, store, args.name, "change")
    group = args.group or record.group
    _refuse_kind_change(args, record)
    definition = _definition(args, record.definition)
    app = _parse_cli_app(args.name, group, definition)
    if group != record.group:
        _require_group(config, store, group)
    warnings = _check_with_plugins(config, store, app)
    done = {"name": app.name, "group": group, "summary": _app_summary(app), "note": _applied_note(config),
            "warnings": warnings, "changed": group != record.group or definition != record.definition}
    if done["changed"]:
        store.update_app(app.name, group, definition, datetime.now(UTC),
                         check=lambda records: _unique_external_url(config, app, records))
    return done


def apps_set(args: argparse.Namespace) -> int:
    done = _perform(args, apps_set_operation)
    _warn(done["warnings"])
    if not done["changed"]:
        print(f"app {done['name']!r} is so already")
        return 0
    print(f"app {done['name']!r} changed: {done['summary']} via group {done['group']!r}; {done['note']}")
    return 0


def apps_remove_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Stored app NAME removed."""
    _stored_app(config, store, args.name, "remove")
    store.remove_app(args.name)
    return {"name": args.name, "config_interval": config.service.config_interval}


def apps_remove(args: argparse.Namespace) -> int:
    done = _perform(args, apps_remove_operation)
    print(f"app {done['name']!r} removed from the store; the running service stops serving it within"
          f" config_interval ({done['config_interval']:g} s), or at once on SIGHUP")
    return 0


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60}
# A personal token is a long-lived secret on a machine: a year at most, then a new one.
MAX_TOKEN_LIFETIME = timedelta(days=366)


def parse_duration(text: str, flag: str = "--expires") -> timedelta:
    """"30d", "12h" or "90m" as a timedelta; GatewayError naming ``flag`` otherwise."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _DURATION_UNITS or not number.isascii() or not number.isdigit() or int(number) == 0:
        raise GatewayError(f"{flag}: expected a duration such as 30d, 12h or 90m (a whole number > 0 and d, h or m),"
                           f" got {text!r}")
    duration = timedelta(seconds=int(number) * _DURATION_UNITS[unit])
    if duration > MAX_TOKEN_LIFETIME:
        raise GatewayError(f"{flag}: expected at most {MAX_TOKEN_LIFETIME.days}d, got {text!r}:"
                           " issue a new token when this one expires")
    return duration


def _user_text(flag: str, value: str, required: bool = True) -> str:
    """A subject, name, email or group as given: printable, not only spaces."""
    text = value.strip()
    if (required and not text) or any(not c.isprintable() for c in value):
        raise GatewayError(f"{flag}: expected {'a non-empty' if required else 'a'} printable text, got {value!r}")
    return text


def _token_identity(args: argparse.Namespace) -> dict[str, Any]:
    """The user a personal token stands for, as a sign-in would give it."""
    email = _user_text("--email", args.email, required=False)
    if email and ("@" not in email or any(c.isspace() for c in email)):
        raise GatewayError(f"--email: expected an email address such as alice@example.test, got {args.email!r}")
    return {"sub": _user_text("--user", args.user), "name": _user_text("--name", args.name, required=False),
            # The admin vouches for the address, as a provider does when it says "verified".
            "email": email, "email_verified": bool(email),
            "groups": [_user_text("--group", g) for g in args.groups]}


def _new_token(config: Any, token_class: Any, table: str, needs: str) -> tuple[Any, list[str]]:
    """A new token of `token_class` naming this service's CA, and a warning when the config
    lacks the [table] that makes the token useful."""
    from gateway.pki.ca import CertificateAuthority

    warnings = [f"{config.path} has no [{table}] table: {needs}"] if getattr(config, table) is None else []
    return token_class.generate(CertificateAuthority.load_or_create(config.service.state_dir).fingerprint), warnings


def users_token_create_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """A new personal token of user --user: the token itself (its only copy) and what it is."""
    from gateway.pki.tokens import UserToken, hash_secret
    from gateway.store.records import UserCredentialRecord

    identity = _token_identity(args)
    lifetime = parse_duration(args.expires)
    token, warnings = _new_token(config, UserToken, "access",
                                 "the service accepts the token only once it has one (see docs/configuration.md)")
    now = datetime.now(UTC)
    record = UserCredentialRecord(
        credential_id=token.token_id, user=identity["sub"], kind="token", identity=identity,
        secret_hash=hash_secret(token.secret), created_at=now, expires_at=now + lifetime,
        name=identity["name"] or "personal token")
    store.create_user_credential(record)
    about = (f"personal token {record.credential_id} for user {record.user!r}, expires"
             f" {record.expires_at:%Y-%m-%d %H:%M:%S UTC}; give it to gateway login --token-file"
             f" (revoke it with `gateway users token revoke {record.credential_id}`)")
    return {"token": token.encode(), "credential_id": record.credential_id, "about": about, "warnings": warnings}


def users_token_create(args: argparse.Namespace) -> int:
    made = _perform(args, users_token_create_operation)
    _warn(made["warnings"])
    _hand_over(made["token"], made["about"], args.output)
    return 0


def _hand_over(text: str, about: str, output: str | None) -> None:
    """Show a new token once: on standard output, or into `output` (mode 0600); what it is on stderr."""
    if output:
        from gateway.pki.keys import write_private

        write_private(Path(output), (text + "\n").encode())
        print(f"{about}; written to {output}", file=sys.stderr)
    else:
        print(text)
        print(about, file=sys.stderr)


def users_token_list_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Users' credentials (of --user only, if given), never their secrets' hashes."""
    return {"credentials": [
        {"credential_id": c.credential_id, "user": c.user, "kind": c.kind, "name": c.name,
         "created_at": c.created_at.isoformat(), "expires_at": c.expires_at.isoformat(),
         "revoked_at": c.revoked_at and c.revoked_at.isoformat()}
        for c in store.list_user_credentials(args.user)]}


def users_token_list(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    rows = [("ID", "USER", "KIND", "NAME", "CREATED", "EXPIRES", "REVOKED")]
    for c in _perform(args, users_token_list_operation)["credentials"]:
        created, expires_at = datetime.fromisoformat(c["created_at"]), datetime.fromisoformat(c["expires_at"])
        expires = f"{expires_at:%Y-%m-%d %H:%M}" + (" (expired)" if expires_at <= now else "")
        revoked = datetime.fromisoformat(c["revoked_at"]) if c["revoked_at"] else None
        rows.append((c["credential_id"], c["user"], c["kind"], c["name"] or "-", f"{created:%Y-%m-%d %H:%M}",
                     expires, _when(revoked, "-")))
    _table(rows)
    return 0


def _revocation_note(config: Any) -> str:
    return (f"the running service closes the tunnels and streams it allowed within config_interval"
            f" ({config.service.config_interval:g} s)")


def users_token_revoke_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Credential ID revoked, unless it was already (then `already` says when)."""
    found = store.get_user_credential(args.credential_id)
    if found is None:
        raise UnknownName(f"no user credential {args.credential_id!r}; see `gateway users token list`")
    done = {"credential_id": found.credential_id, "user": found.user, "kind": found.kind,
            "already": _when(found.revoked_at, "-") if found.revoked_at else None, "note": _revocation_note(config)}
    if found.revoked_at is None:
        store.revoke_user_credential(found.credential_id, datetime.now(UTC))
    return done


def users_token_revoke(args: argparse.Namespace) -> int:
    done = _perform(args, users_token_revoke_operation)
    if done["already"]:
        print(f"credential {done['credential_id']} of user {done['user']!r} was revoked already ({done['already']})")
        return 0
    print(f"credential {done['credential_id']} ({done['kind']}) of user {done['user']!r} revoked; {done['note']}")
    return 0


def users_revoke_operation(args: argparse.Namespace, config: Any, store: Any) -> dict[str, Any]:
    """Every credential of user --user revoked; how many were still good."""
    user = _user_text("--user", args.user)
    if not store.list_user_credentials(user):
        raise UnknownName(f"--user: no credentials of user {user!r}; see `gateway users token list`"
                          " (users are named by their subject)")
    return {"user": user, "count": store.revoke_user(user, datetime.now(UTC)), "note": _revocation_note(config)}


def users_revoke(args: argparse.Namespace) -> int:
    done = _perform(args, users_revoke_operation)
    user, count = done["user"], done["count"]
    if count == 0:
        print(f"user {user!r} had no credential left to revoke")
        return 0
    print(f"{count} credential{'' if count == 1 else 's'} of user {user!r} revoked (personal tokens and sign-ins);"
          f" {done['note']}")
    return 0


def admin_token_create(args: argparse.Namespace) -> int:
    from gateway.pki.tokens import AdminToken, hash_secret
    from gateway.store.records import AdminTokenRecord

    name = _user_text("--name", args.name)
    lifetime = parse_duration(args.expires)
    with _service_store(args) as (config, store):
        token, warnings = _new_token(config, AdminToken, "admin",
                                     "the service serves no admin API until it has one (see docs/operations.md)")
        _warn(warnings)
        now = datetime.now(UTC)
        record = store.create_admin_token(AdminTokenRecord(token.token_id, name, hash_secret(token.secret), now,
                                                           now + lifetime, role=args.role))
    kind = "read-only admin token" if record.role == "read" else "admin token"
    about = (f"{kind} {record.token_id} ({name}), expires {record.expires_at:%Y-%m-%d %H:%M:%S UTC}; give it to"
             f" `gateway --service URL --admin-token-file FILE` or the status page's sign-in (revoke it with"
             f" `gateway admin token revoke {record.token_id}`)")
    _hand_over(token.encode(), about, args.output)
    return 0


def admin_token_list(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    rows = [("ID", "NAME", "ROLE", "CREATED", "EXPIRES", "REVOKED")]
    with _service_store(args) as (_, store):
        for t in store.list_admin_tokens():
            expires = f"{t.expires_at:%Y-%m-%d %H:%M}" + (" (expired)" if t.expires_at <= now else "")
            rows.append((t.token_id, t.name, t.role, f"{t.created_at:%Y-%m-%d %H:%M}", expires,
                         _when(t.revoked_at, "-")))
    _table(rows)
    return 0


def admin_token_revoke(args: argparse.Namespace) -> int:
    with _service_store(args) as (_, store):
        found = store.get_admin_token(args.token_id)
        if found is None:
            raise GatewayError(f"no admin token {args.token_id!r}; see `gateway admin token list`")
        if not store.revoke_admin_token(found.token_id, datetime.now(UTC)):
            print(f"admin token {found.token_id} ({found.name}) was revoked already ({_when(found.revoked_at, '-')})")
            return 0
    print(f"admin token {found.token_id} ({found.name}) revoked; the admin API refuses it and its status page"
          " sessions end at their next request")
    return 0


def list_plugins(args: argparse.Namespace) -> int:
    pm = plugins.make_plugin_manager()
    rows = [("PLUGIN", "VERSION", "HOOKS")]
    for info in plugins.list_plugins(pm):
        rows.append((info.name, info.version, ", ".join(info.hooks) or "-"))
    _table(rows)
    handlers = plugins.protocol_handlers(pm)
    print(f"\nprotocols: {', '.join(sorted(handlers)) or 'none'}")
    blocked = os.environ.get(plugins.DISABLE_ENV)
    if blocked:
        print(f"blocked by {plugins.DISABLE_ENV}: {blocked}")
    return 0


def open_listen_warning(app: Any) -> str:
    """What check-config says of an app with a listen of its own: nobody signs in there."""
    return (f"app {app.name}: anyone who can reach {app.listen} may connect (options.preauth = \"none\");"
            " publish it as a private app with segments so users sign in")


def check_config(args: argparse.Namespace) -> int:
    from gateway.tap import check_protocols

    pm = plugins.make_plugin_manager()
    config = load_config(args.config, plugins.config_sections(pm))
    check_protocols(config, plugins.protocol_handlers(pm))
    warnings: list[str] = []
    if config.service is not None:
        # what `twistd gateway` would refuse at start: per-app options, certificates
        warnings = plugins.check_service_listeners(pm, config)
    warnings += [open_listen_warning(app) for app in config.apps if app.listen]
    for warning in warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    roles = [r for r in ("service", "connector") if getattr(config, r) is not None]
    count = len(config.apps)
    print(f"{args.config}: OK ({' and '.join(roles)}, {count} app{'' if count == 1 else 's'})")
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


COMMANDS = {
    ("token", "create"): token_create,
    ("token", "list"): token_list,
    ("connector", "register"): connector_register,
    ("connectors", "list"): connectors_list,
    ("connectors", "delete"): connectors_delete,
    ("connectors", "move"): connectors_move,
    ("groups", "list"): groups_list,
    ("groups", "create"): groups_create,
    ("groups", "rename"): groups_rename,
    ("groups", "delete"): groups_delete,
    ("apps", "list"): apps_list,
    ("apps", "add"): apps_add,
    ("apps", "set"): apps_set,
    ("apps", "remove"): apps_remove,
    ("users", "token create"): users_token_create,
    ("users", "token list"): users_token_list,
    ("users", "token revoke"): users_token_revoke,
    ("users", "revoke"): users_revoke,
    ("admin", "token create"): admin_token_create,
    ("admin", "token list"): admin_token_list,
    ("admin", "token revoke"): admin_token_revoke,
    ("status", None): status,
    ("plugins", None): list_plugins,
    ("check-config", None): check_config,
    **access_cli.COMMANDS,
    **diagnose_cli.COMMANDS,
    **logs_cli.COMMANDS,
    **store_cli.COMMANDS,
    **updater_cli.COMMANDS,
}

if __name__ == "__main__":
    sys.exit(main())

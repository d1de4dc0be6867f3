"""The user's commands of `gateway`: login, logout, access tcp and access socks.

gateway/cli.py adds these with :func:`add_parsers` and dispatches through :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from gateway.errors import GatewayError
from gateway.segments import host_port

DEFAULT_SOCKS_LISTEN = "127.0.0.1:1080"


def add_parsers(sub: Any) -> None:
    login = sub.add_parser("login", help="sign in to a service for Private Access (gateway access)")
    login.add_argument("--service", required=True, metavar="URL|HOST:PORT",
                       help="the service's sign-in URL (browser sign-in), or with --token-file its tunnel address")
    login.add_argument("--token-file", metavar="FILE",
                       help="sign in with a personal token read from FILE (- for standard input), not a browser")
    login.add_argument("--server-name", help="with --token-file: the name the service's certificate must carry"
                                             " (default: the host of --service)")
    login.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for the browser sign-in (default 300)")
    login.add_argument("--no-browser", action="store_true",
                       help="only print the sign-in URL (open it in a browser on this machine yourself)")

    logout = sub.add_parser("logout", help="forget this machine's Private Access credentials for a service")
    logout.add_argument("--service", help="the service signed in to (default: the only one)")

    access = sub.add_parser("access", help="reach private apps through the service").add_subparsers(
        dest="action", required=True)
    tcp = access.add_parser("tcp", help="forward a local TCP port to a private app")
    tcp.add_argument("--app", required=True, help="the private app's name")
    tcp.add_argument("--listen", required=True, metavar="127.0.0.1:PORT", help="the loopback address to listen on")
    tcp.add_argument("--to", metavar="HOST:PORT",
                     help="the destination (a name is resolved on the connector); default: the app's only one")
    tcp.add_argument("--service", help="the service signed in to (default: the only one)")
    socks = access.add_parser("socks", help="a SOCKS5 proxy (CONNECT and UDP ASSOCIATE) to private apps")
    socks.add_argument("--listen", default=DEFAULT_SOCKS_LISTEN, metavar="127.0.0.1:PORT",
                       help=f"the loopback address to listen on (default {DEFAULT_SOCKS_LISTEN})")
    socks.add_argument("--service", help="the service signed in to (default: the only one)")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def login(args: argparse.Namespace) -> int:
    from gateway.access import credentials, login as signin
    from gateway.cli import _read_token, run_on_reactor

    token = _read_token(args.token_file) if args.token_file else None
    if token is None:
        signin.check_service_url(args.service)
    if args.timeout <= 0:
        raise GatewayError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")

    async def work(reactor: Any) -> Any:
        if token is not None:
            return await signin.login_with_token(reactor, args.service, token, args.server_name)
        return await signin.login_in_browser(reactor, args.service, timeout=args.timeout,
                                             open_browser=(lambda url: None) if args.no_browser else None)

    creds = run_on_reactor(work, "gateway login")
    path = credentials.save(creds)
    _say(f"signed in: {creds.describe()}")
    _say(f"credentials in {path}; reach apps with gateway access tcp|socks, forget them with gateway logout")
    return 0


def logout(args: argparse.Namespace) -> int:
    from gateway.access import credentials

    forgotten = credentials.delete(args.service)
    if forgotten is None:
        _say(f"not signed in{' to ' + args.service if args.service else ''}: nothing to forget")
        return 0
    _say(f"signed out: forgot the credentials of {forgotten.describe()}")
    return 0


def access_tcp(args: argparse.Namespace) -> int:
    from gateway.access.client import TcpForward, parse_listen, parse_target

    host, port = parse_listen(args.listen)
    target_host, target_port = parse_target(args.to) if args.to else (None, None)
    where = f"app {args.app}" + (f" ({args.to})" if args.to else "")
    return _serve(args.service, host, port, lambda tunnel: TcpForward(tunnel, args.app, target_host, target_port),
                  f"forwarding {{listen}} to {where}")


def access_socks(args: argparse.Namespace) -> int:
    from gateway.access.client import SocksFactory, parse_listen

    host, port = parse_listen(args.listen)
    return _serve(args.service, host, port, SocksFactory, "SOCKS5 proxy on {listen} (CONNECT and UDP ASSOCIATE)")


def _serve(service: str | None, host: str, port: int, factory: Callable[[Any], Any], what: str) -> int:
    """Listen with ``factory(tunnel)`` and keep the tunnel until interrupted."""
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    from gateway.access import credentials, login as signin
    from gateway.access.client import AccessTunnel, Reporter

    creds = credentials.find(service)
    tunnel = AccessTunnel(reactor, creds, renew=signin.renew, save=credentials.save, reporter=Reporter(_say))
    try:
        listening = reactor.listenTCP(port, factory(tunnel), interface=host)
    except CannotListenError as e:
        raise GatewayError(f"cannot listen on {host}:{port}: {e.socketError}; choose another --listen port") from None
    bound = listening.getHost()
    listen = host_port(bound.host, bound.port)
    _say(f"gateway access: {what.format(listen=listen)} through {creds.tunnel} as {creds.describe()}; "
         "Ctrl-C to stop")
    tunnel.start()
    reactor.addSystemEventTrigger("before", "shutdown", tunnel.stop)
    reactor.run()
    return 0


COMMANDS = {
    ("login", None): login,
    ("logout", None): logout,
    ("access", "tcp"): access_tcp,
    ("access", "socks"): access_socks,
}

"""Load and validate the gateway's TOML configuration file.

One file configures a service node (``[service]`` plus ``[[apps]]``), a connector
(``[connector]``), or both, with optional ``[tunnel]`` tuning and ``[logging]``.
Everything is checked before anything is bound or started: every problem raises
:class:`gateway.errors.ConfigError` naming the file, the dotted key (``apps[2].destination``)
and what was expected versus what was found. docs/configuration.md is the reference.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import attrs
from attrs import field, frozen

from gateway.errors import ConfigError
from gateway.segments import host_port

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AccessConfig",
    "AppConfig",
    "ConnectorConfig",
    "GatewayConfig",
    "LoggingConfig",
    "ServiceConfig",
    "TunnelConfig",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/gateway/gateway.toml")

KIB = 1024
MIB = 1024 * 1024

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
DEFAULT_JOURNALD_SOCKET = "/run/systemd/journal/socket"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_PROTOCOL_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
# Shortest certificate_lifetime_seconds: renewal needs time for a round trip and retries.
MIN_CERTIFICATE_LIFETIME = 60
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}\Z")


# ---------------------------------------------------------------------------
# Models


@frozen
class ServiceConfig:
    """The ``[service]`` table: a service node accepting connector tunnels."""

    state_dir: Path
    listen: str = "tcp:8443"
    names: tuple[str, ...] = ("localhost", "127.0.0.1")
    node_id: str = field(factory=socket.gethostname)
    config_interval: float = 300.0
    heartbeat_interval: float = 15.0
    certificate_lifetime_days: int = 90
    token_lifetime: int = 3600
    max_handshakes: int = 64
    # Unauthenticated peers (no TLS yet, or TLS without hello): how long and how many.
    handshake_timeout: float = 5.0
    max_unauthenticated_per_address: int = 8
    enrolments_per_minute: int = 10
    # A connector renews at most once per this many seconds unless its certificate is due.
    renewal_min_interval: float = 3600.0
    certificate_lifetime_seconds: int | None = None
    inactive_after: float = 600.0
    remove_inactive_after: float = 864000.0
    sweep_interval: float = 60.0
    # Where the state lives: "" is the embedded SQLite file in state_dir; a postgresql:// URL
    # (no password in it) a PostgreSQL database that several nodes can share.
    store: str = ""
    store_password_file: Path | None = None
    # "host:port" connectors dial to reach this node's tunnel port (several nodes: each its
    # own); "" derives it from listen and names (tunnel_address).
    advertise: str = ""
    # With the store unreachable, new streams to known apps are routed from the last config
    # read for this long; then refused, since the node can no longer see revocations.
    store_outage_grace: float = 900.0

    def tunnel_address(self, bound_port: int | None = None) -> str:
        """Where connectors reach this node's tunnel port: advertise, else derived from listen
        (with `bound_port`, the port a "tcp:0" listen got); "" if there is nothing to derive from."""
        return self.advertise or default_advertise(self.listen, self.names, bound_port) or ""

    @property
    def certificate_lifetime(self) -> timedelta:
        """How long new client certificates are valid: the seconds if set, else the days."""
        if self.certificate_lifetime_seconds is not None:
            return timedelta(seconds=self.certificate_lifetime_seconds)
        return timedelta(days=self.certificate_lifetime_days)


@frozen
class AppConfig:
    """One ``[[apps]]`` entry: a listener on the service spliced to ``host:port`` behind a connector."""

    name: str
    listen: str
    destination: str
    host: str
    port: int
    group: str = "default"
    protocol: str = "tcp"
    connect_timeout: float = 10.0
    options: dict[str, Any] = field(factory=dict, hash=False)
    # Web apps (protocol "http") have no listen of their own: they are served by the http
    # plugin's shared front door, routed by the host of external_url; destination, host and
    # port come from internal_url.
    external_url: str = ""
    internal_url: str = ""
    # "client" or "user": the same client address (or signed-in user) keeps the same healthy
    # connector; "none" spreads every stream by load.
    affinity: str = "none"
    # A Private Access app (issue 10): what its assigned users may reach through the group's
    # connectors (gateway.segments). Such an app has no listen, destination, host or port.
    segments: tuple[Any, ...] = field(default=(), hash=False)

    @property
    def is_private(self) -> bool:
        return bool(self.segments)


@frozen
class AccessConfig:
    """The ``[access]`` table: Private Access users on this service (docs/configuration.md)."""

    # Where users run `gateway login --service URL` (the http front door serves the sign-in
    # page there); "" when absent: personal tokens only.
    url: str = ""
    # "host:port" users' clients dial for their tunnel (the service's tunnel port).
    tunnel: str = "127.0.0.1:8443"
    certificate_lifetime: int = 3600
    login_lifetime: int = 43200
    udp_idle_timeout: float = 60.0
    max_tunnels_per_user: int = 16


DEFAULT_ADMIN_LISTEN = "tcp:8444:interface=127.0.0.1"


@frozen
class AdminConfig:
    """The ``[admin]`` table: the admin API and status page of a service node (docs/operations.md)."""

    listen: str = DEFAULT_ADMIN_LISTEN
    # HTTPS with a certificate from the gateway's CA (names = service.names), as the tunnel port.
    tls: bool = True
    # How long a status page sign-in lasts (the admin token is re-checked on every request).
    session_lifetime: int = 28800
    # Seconds between the status page's reloads (a <meta refresh>; no JavaScript).
    page_refresh: int = 10


@frozen
class ConnectorConfig:
    """The ``[connector]`` table: a connector keeping tunnels open to the service."""

    state_dir: Path
    tunnels: int = 2
    # Nodes of a several-node service this connector keeps a tunnel to (the config's node list).
    max_nodes: int = 8
    drain_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # An HTTP CONNECT forward proxy to the service: None follows HTTPS_PROXY/NO_PROXY, "" is none.
    proxy: str | None = None
    proxy_password_file: Path | None = None


@frozen
class TunnelConfig:
    """The ``[tunnel]`` table: tuning shared by both roles."""

    ping_interval: float = 10.0
    initial_window: int = 256 * KIB
    max_window: int = 16 * MIB
    max_frame: int = 64 * KIB
    max_streams: int = 20000


@frozen
class LoggingConfig:
    """The ``[logging]`` table."""

    format: str = "text"
    level: str = "info"
    # The admin log (JSON lines); None when the admin turned it off (admin_log = "").
    admin_log: Path | None = None
    # The service node's own session log (a connector's is switched by its service).
    session_log: bool = False
    session_log_file: Path | None = None
    # Each log rotates at max_bytes and keeps max_files files: the bound on disk per log.
    max_bytes: int = 10 * 1024 * 1024
    max_files: int = 5
    journald: bool = False
    journald_socket: str = DEFAULT_JOURNALD_SOCKET


DEFAULT_METRICS_LISTEN = "tcp:9464:interface=127.0.0.1"


@frozen
class MetricsConfig:
    """The ``[metrics]`` table: the Prometheus endpoint of a node or connector (docs/operations.md)."""

    enabled: bool = False
    listen: str = DEFAULT_METRICS_LISTEN


@frozen
class GatewayConfig:
    """A whole validated configuration file."""

    path: Path
    service: ServiceConfig | None
    connector: ConnectorConfig | None
    apps: tuple[AppConfig, ...] = ()
    tunnel: TunnelConfig = field(factory=TunnelConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)
    # Private Access users ([access]); None when the service has no such table.
    access: AccessConfig | None = None
    # The admin API and status page ([admin]); None when the service has no such table.
    admin: AdminConfig | None = None
    metrics: MetricsConfig = field(factory=MetricsConfig)
    # Tables that plugins added through the gateway_config_sections hook, parsed by them.
    sections: dict[str, Any] = field(factory=dict, hash=False)


# ---------------------------------------------------------------------------
# Public API


def load_config(path: str | os.PathLike[str], sections: Mapping[str, Callable] | None = None) -> GatewayConfig:
    """Read, parse and validate the TOML file at ``path``; raise ConfigError on any problem."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(shown, "(file)", "expected an existing configuration file, got no such file") from None
    except IsADirectoryError:
        raise ConfigError(shown, "(file)", "expected a configuration file, got a directory") from None
    except OSError as e:
        raise ConfigError(shown, "(file)", f"expected a readable configuration file, got: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(shown, "(syntax)", f"expected UTF-8 text, got an invalid byte at offset {e.start}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(shown, "(syntax)", f"expected valid TOML: {e}") from None
    return parse_config(data, path, sections)


def parse_config(
    data: Mapping[str, Any], path: str | os.PathLike[str], sections: Mapping[str, Callable] | None = None
) -> GatewayConfig:
    """Validate an already-parsed TOML document; ``path`` names the file in errors and anchors relative paths.

    ``sections`` maps extra top-level table names (from plugins) to ``parse(table, error)``.
    """
    return _Parser(os.fspath(path), sections or {}).parse(data)


# ---------------------------------------------------------------------------
# Helpers


def _describe(value: Any) -> str:
    """Show a TOML value the way the user wrote it, for "got ..." in messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, str):
        return f"{json.dumps(value, ensure_ascii=False)} (a string)" if _looks_numeric(value) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a float)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"{text} (an array)"
    return f"{value} (a {type(value).__name__})"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in ("true", "false")
    return True


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    message = f"unknown key {json.dumps(key)}"
    if close:
        return f"{message}; did you mean {json.dumps(close[0])}?"
    return f"{message}; expected one of {', '.join(known)}"


def _build_endpoint(description: str) -> Any:
    """Create (never listen on) the server endpoint for ``description``; raises what Twisted raises."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    return serverFromString(MemoryReactor(), description)


def _endpoint_identity(description: str) -> tuple | None:
    """A normalised identity for conflict checks, or None when it never collides (TCP port 0)."""
    from twisted.internet.endpoints import UNIXServerEndpoint, _TCPServerEndpoint

    try:
        endpoint = _build_endpoint(description)
    except Exception:
        return ("raw", description)
    if isinstance(endpoint, _TCPServerEndpoint):
        if endpoint._port == 0:
            return None  # ephemeral: never collides
        return ("tcp", endpoint._port, endpoint._interface or "")
    if isinstance(endpoint, UNIXServerEndpoint):
        return ("unix", os.path.abspath(endpoint._address))
    return ("raw", description)


def _loopback_endpoint(description: str) -> bool:
    """Whether a server endpoint string listens on a loopback address only (a UNIX socket counts)."""
    from twisted.internet.endpoints import UNIXServerEndpoint, _TCPServerEndpoint

    endpoint = _build_endpoint(description)
    if isinstance(endpoint, UNIXServerEndpoint):
        return True
    if not isinstance(endpoint, _TCPServerEndpoint):
        return False
    try:
        return ipaddress.ip_address(endpoint._interface).is_loopback
    except ValueError:
        return False


def _endpoints_conflict(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return False
    if a[0] == "tcp" and b[0] == "tcp":
        if a[1] != b[1]:
            return False
        wildcard = ("", "0.0.0.0", "::")
        return a[2] == b[2] or a[2] in wildcard or b[2] in wildcard
    return a == b


class _Table:
    """One TOML table being read: checks unknown keys and typed values, with dotted keys in errors."""

    def __init__(self, parser: _Parser, prefix: str, data: Mapping[str, Any], known: list[str]) -> None:
        self.parser = parser
        self.prefix = prefix
        self.data = data
        for key in data:
            if key not in known:
                raise parser.error(self.key(key), _unknown_key_message(key, known))

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, expected: str, value: Any) -> ConfigError:
        return self.parser.error(self.key(name), f"expected {expected}, got {_describe(value)}")

    def get(self, name: str, default: Any, required: bool, what: str = "a value") -> Any:
        if name not in self.data:
            if required:
                raise self.parser.error(self.key(name), f"expected {what}, got nothing (this key is required)")
            return default
        return self.data[name]

    def integer(self, name: str, default: int, low: int | None = None, high: int | None = None) -> int:
        value = self.get(name, default, False)
        expected = "an integer" + _range_text(low, high)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, expected, value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(name, expected, value)
        return value

    def number(self, name: str, default: float, low: float | None = None, high: float | None = None,
               positive: bool = False) -> float:
        value = self.get(name, default, False)
        if positive:
            expected = "a number of seconds > 0"
        else:
            expected = "a number of seconds" + _range_text(low, high)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, expected, value)
        if (positive and value <= 0) or (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(name, expected, value)
        return float(value)

    def string(self, name: str, default: str | None, required: bool = False,
               what: str = "a non-empty string") -> str:
        value = self.get(name, default, required, what)
        if not isinstance(value, str) or not value:
            raise self.fail(name, what, value)
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, default, False)
        if value not in choices or not isinstance(value, str):
            raise self.fail(name, "one of " + ", ".join(json.dumps(c) for c in choices), value)
        return value

    def path(self, name: str) -> Path:
        value = self.string(name, None, required=True, what="a directory path (a non-empty string)")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.parser.base_dir / p
        return Path(os.path.normpath(p))

    def endpoint(self, name: str, default: str, required: bool = False) -> str:
        value = self.string(name, default, required, what="a Twisted server endpoint string")
        problem = _check_endpoint(value)
        if problem:
            expected, detail = problem
            message = f"expected {expected}, got {_describe(value)}"
            if detail:
                message += f" ({detail})"
            raise self.parser.error(self.key(name), message)
        return value


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" {low}..{high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def _check_endpoint(description: str) -> tuple[str, str] | None:
    """Return (expected, detail) when ``description`` is not a usable server endpoint string. Never binds."""
    from twisted.internet.endpoints import _TCPServerEndpoint

    kind = description.split(":", 1)[0].strip().lower()
    if kind == "ssl":
        return ('a plain server endpoint such as "tcp:8443:interface=127.0.0.1", not "ssl:"',
                "gateway adds TLS itself")
    try:
        endpoint = _build_endpoint(description)
    except Exception as e:
        detail = str(e) or type(e).__name__
        if isinstance(e, TypeError):
            detail += '; colons inside a value must be escaped, e.g. "tcp:8443:interface=\\:\\:1"'
        return 'a Twisted server endpoint string such as "tcp:8443:interface=127.0.0.1"', detail
    if isinstance(endpoint, _TCPServerEndpoint) and not 0 <= endpoint._port <= 65535:
        return "a server endpoint string with a TCP port 0..65535", ""
    return None


def _check_name_for_certificate(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    return bool(labels) and len(name) <= 253 and all(_DNS_LABEL_RE.match(label) for label in labels)


def _parse_destination(text: str) -> tuple[str, int] | None:
    """Split "host:port" or "[v6]:port"; None when malformed."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            return None
        host, port_text = text[1:end], text[end + 2:]
        try:
            if ipaddress.ip_address(host).version != 6:
                return None
        except ValueError:
            return None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host or not _HOST_RE.match(host):
            return None
    if not port_text.isdigit() or not port_text.isascii():
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    return host, port


# Apps with external_url and internal_url are web apps: served on a shared front door (the
# http plugin's), routed by external host; their protocol defaults to this.
WEB_PROTOCOL = "http"
EXTERNAL_SCHEMES = ("https", "http")
INTERNAL_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_origin(url: str) -> tuple[str, str, int]:
    """(scheme, lower-case host without brackets, port with the scheme's default) of a checked URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS[scheme]


def web_origin(url: str) -> str:
    """"scheme://host:port/path" of a checked URL, the default port made explicit: what routing compares."""
    from urllib.parse import urlsplit

    scheme, host, port = _split_origin(url)
    path = urlsplit(url).path or "/"
    return f"{scheme}://[{host}]:{port}{path}" if ":" in host else f"{scheme}://{host}:{port}{path}"


def _check_web_url(url: str, schemes: tuple[str, ...], wildcard: bool = False) -> str | None:
    """What is wrong with an external or internal URL, as an "expected ..." text; None when fine."""
    from urllib.parse import urlsplit

    allowed = " or ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"a URL with a valid host and port ({e})"
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        known = scheme in _DEFAULT_PORTS
        why = "not supported yet" if known else "unknown scheme"
        return f"a URL starting with {allowed} ({why}: {scheme or 'none'}:)"
    host = parts.hostname or ""
    if not host:
        return f"a URL with a host, such as {schemes[0]}://wiki.example.test/"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "a URL with a valid host"
    elif wildcard and host.startswith("*."):
        if not _check_name_for_certificate(host[2:]) or "*" in host[2:] or "." not in host[2:]:
            return "a URL whose wildcard host is *. and a DNS name of two labels or more, such as *.apps.example.test"
    elif not _check_name_for_certificate(host) or "*" in host:
        return "a URL with a valid DNS name or IP address as host"
    if port == 0:
        return "a URL with a port 1..65535"
    if parts.username is not None or parts.password is not None:
        return "a URL without user name or password"
    if parts.query or parts.fragment:
        return "a URL without query or fragment"
    if parts.path and not parts.path.endswith("/"):
        return 'a URL whose path ends with "/" (the path is a prefix: "/" or such as "/wiki/")'
    if parts.path and ("//" in parts.path or "/../" in parts.path or "/./" in parts.path or "%" in parts.path):
        return 'a URL with a plain path prefix (no "//", "." or ".." segments and no %-escapes)'
    return None


# ---------------------------------------------------------------------------
# The parser


AFFINITIES = ("none", "client", "user")
# What a listen app must say in options.preauth: nobody signs in, anyone who reaches it connects.
NO_PREAUTH = "none"
# The options that assign a private app (or an http app that signs users in) to users.
ASSIGNMENT_KEYS = ("allowed_users", "allowed_groups")


SMB_PROTOCOL = "smb"
SMB_PORT = 445


def smb_only(segments: Any) -> bool:
    """Whether every TCP segment allows port 445 alone (and there is one): a private app of file
    shares, which gets ``protocol = "smb"`` unless it names a protocol."""
    tcp = [s for s in segments if s.protocol == "tcp"]
    return bool(tcp) and all(len(s.ports) == 1 and s.ports[0].first == s.ports[0].last == SMB_PORT for s in tcp)


def overlapping_app(app: AppConfig, others: list[AppConfig]) -> tuple[AppConfig, int, int] | None:
    """The first of ``others`` in another connector group with a segment overlapping one of
    ``app``'s: (that app, index in app.segments, index in its segments); else None. Apps of one
    group may overlap: the same connectors serve both."""
    from gateway.segments import overlapping_pair

    for other in others:
        if other.name == app.name or other.group == app.group or not other.segments:
            continue
        pair = overlapping_pair(app.segments, other.segments)
        if pair is not None:
            return other, app.segments.index(pair[0]), other.segments.index(pair[1])
    return None


def overlap_message(app: AppConfig, mine: int, other: AppConfig, theirs: int, other_key: str) -> str:
    """Why app's segment ``mine`` is refused: it overlaps ``other_key``.segments[theirs]."""
    return (f"expected segments no app of another connector group overlaps, got {json.dumps(str(app.segments[mine]))}"
            f", which overlaps {other_key}.segments[{theirs}] {json.dumps(str(other.segments[theirs]))} "
            f"(app {json.dumps(other.name)}, group {json.dumps(other.group)}); a destination is served by one "
            f"group's connectors: narrow one of the segments or put both apps in one group")


def _loopback_only_http(url: str) -> str | None:
    """Plain http sends sign-in codes in clear: only to this machine (tests, demos)."""
    scheme, host, _ = _split_origin(url)
    if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        return "an https:// URL (plain http only for 127.0.0.1, localhost or ::1)"
    return None


def _names_cover(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for ``names`` (with "*." wildcards) is valid for ``host``."""
    host = host.lower().rstrip(".")
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and host.endswith(name[1:]) and "." not in host[:-len(name) + 1]:
            return True
    return False


STORE_URL_SCHEMES = ("postgresql", "postgres")


def store_url_problem(url: str) -> str | None:
    """Why `url` is not a usable [service] store (not PostgreSQL, a password in it, no
    database), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return f"a postgresql://user@host:port/database URL ({e})"
    if parts.scheme not in STORE_URL_SCHEMES:
        return ("a postgresql://user@host:port/database URL (leave store out for the embedded SQLite"
                " store in state_dir)")
    if parts.password is not None or "password=" in parts.query:
        return ("a URL without a password, which would sit in the config file: put the password in"
                " the file store_password_file names, or in PGPASSWORD or ~/.pgpass")
    if not parts.path.strip("/"):
        return "a URL that names the database: postgresql://user@host:port/DATABASE"
    return None


def _redacted_url(url: str) -> str:
    # An error message must not repeat a password someone put in the URL.
    try:
        parts = urlsplit(url)
        if parts.password is None and "password=" not in parts.query:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}", query="..."))
    except ValueError:
        return "(a malformed URL)"


MAX_STORE_OUTAGE_GRACE = 86400.0  # a day: a node cut off from the store longer must stop routing


def default_advertise(listen: str, names: tuple[str, ...], bound_port: int | None = None) -> str | None:
    """[service] advertise when not set: the tunnel listen's interface if it is one address the
    certificate names, else names[0], with the listen's port (or `bound_port`, the one a "tcp:0"
    listen got); None if listen is not TCP or its port is not known yet."""
    from twisted.internet.endpoints import _TCPServerEndpoint

    try:
        endpoint = _build_endpoint(listen)
    except Exception:
        return None
    if not isinstance(endpoint, _TCPServerEndpoint):
        return None
    port = bound_port or endpoint._port
    if not port:
        return None
    interface = endpoint._interface or ""
    host = interface if interface not in ("", "0.0.0.0", "::") and _names_cover(names, interface) else names[0]
    return host_port(host, port)


class _Parser:
    TOP = ["service", "connector", "apps", "access", "admin", "tunnel", "logging", "metrics"]
    SERVICE = ["state_dir", "listen", "names", "node_id", "config_interval", "heartbeat_interval",
               "certificate_lifetime_days", "token_lifetime", "max_handshakes", "certificate_lifetime_seconds",
               "inactive_after", "remove_inactive_after", "sweep_interval", "handshake_timeout",
               "max_unauthenticated_per_address", "enrolments_per_minute", "renewal_min_interval",
               "store", "store_password_file", "advertise", "store_outage_grace"]
    APP = ["name", "group", "protocol", "listen", "destination", "connect_timeout", "options",
           "external_url", "internal_url", "affinity", "segments"]
    ACCESS = ["url", "tunnel", "certificate_lifetime", "login_lifetime", "udp_idle_timeout",
              "max_tunnels_per_user"]
    ADMIN = ["listen", "tls", "session_lifetime", "page_refresh"]
    METRICS = ["enabled", "listen"]
    CONNECTOR = ["state_dir", "tunnels", "max_nodes", "drain_timeout", "backoff_initial", "backoff_max", "proxy",
                 "proxy_password_file"]
    TUNNEL = ["ping_interval", "initial_window", "max_window", "max_frame", "max_streams"]
    LOGGING = ["format", "level", "admin_log", "session_log", "session_log_file", "max_bytes", "max_files",
               "journald", "journald_socket"]

    def __init__(self, file: str, sections: Mapping[str, Callable] | None = None) -> None:
        self.file = file
        self.sections = dict(sections or {})
        self.abs_path = Path(os.path.abspath(file))
        self.base_dir = self.abs_path.parent

    def error(self, key: str, expected: str) -> ConfigError:
        return ConfigError(self.file, key, expected)

    def table(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
        if name not in data:
            return None
        value = data[name]
        if not isinstance(value, Mapping):
            raise self.error(name, f"expected a table [{name}], got {_describe(value)}")
        return value

    def parse(self, data: Mapping[str, Any]) -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise self.error("(file)", f"expected a TOML document (a table), got {_describe(data)}")
        _Table(self, "", data, self.TOP + sorted(self.sections))
        service_data = self.table(data, "service")
        connector_data = self.table(data, "connector")
        if service_data is None and connector_data is None:
            raise self.error("service", "expected a [service] table, a [connector] table or both, got neither")
        service = self.service(service_data) if service_data is not None else None
        connector = self.connector(connector_data) if connector_data is not None else None
        apps = self.apps(data, service)
        access_data = self.table(data, "access")
        access = self.access(access_data, service) if access_data is not None else None
        admin_data = self.table(data, "admin")
        admin = self.admin(admin_data, service) if admin_data is not None else None
        tunnel_data = self.table(data, "tunnel")
        tunnel = self.tunnel(tunnel_data if tunnel_data is not None else {})
        logging_data = self.table(data, "logging")
        logging = self.logging(logging_data if logging_data is not None else {},
                               service.state_dir if service is not None else connector.state_dir)
        extra = {}
        for name, parse in self.sections.items():
            table = self.table(data, name)
            extra[name] = parse(table if table is not None else {},
                                lambda key, expected, _n=name: self.error(f"{_n}.{key}", expected))
        metrics_data = self.table(data, "metrics")
        metrics = self.metrics(metrics_data if metrics_data is not None else {}, service, admin)
        return GatewayConfig(path=self.abs_path, service=service, connector=connector, apps=apps,
                             tunnel=tunnel, logging=logging, access=access, admin=admin,
                             metrics=metrics, sections=extra)

    def service(self, data: Mapping[str, Any]) -> ServiceConfig:
        t = _Table(self, "service", data, self.SERVICE)
        state_dir = t.path("state_dir")
        listen = t.endpoint("listen", "tcp:8443")
        names_value = t.get("names", ["localhost", "127.0.0.1"], False)
        if not isinstance(names_value, list) or not names_value:
            raise t.fail("names", "a non-empty array of DNS names or IP addresses", names_value)
        for i, name in enumerate(names_value):
            if not isinstance(name, str) or not _check_name_for_certificate(name):
                raise self.error(f"service.names[{i}]",
                                 f"expected a DNS name or an IP address, got {_describe(name)}")
        node_id = t.get("node_id", None, False)
        if node_id is None:
            node_id = socket.gethostname()
        elif not isinstance(node_id, str) or not node_id or any(c.isspace() or not c.isprintable() for c in node_id):
            raise t.fail("node_id", "a non-empty string without spaces", node_id)
        store = self.store(t, data)
        return ServiceConfig(
            state_dir=state_dir,
            listen=listen,
            names=tuple(names_value),
            node_id=node_id,
            config_interval=t.number("config_interval", 300, positive=True),
            heartbeat_interval=t.number("heartbeat_interval", 15, positive=True),
            certificate_lifetime_days=t.integer("certificate_lifetime_days", 90, 1, 3650),
            token_lifetime=t.integer("token_lifetime", 3600, 1),
            max_handshakes=t.integer("max_handshakes", 64, 1),
            handshake_timeout=t.number("handshake_timeout", 5, positive=True),
            max_unauthenticated_per_address=t.integer("max_unauthenticated_per_address", 8, 1),
            enrolments_per_minute=t.integer("enrolments_per_minute", 10, 1),
            renewal_min_interval=t.number("renewal_min_interval", 3600, low=0),
            certificate_lifetime_seconds=(t.integer("certificate_lifetime_seconds", 0, MIN_CERTIFICATE_LIFETIME)
                                          if "certificate_lifetime_seconds" in data else None),
            inactive_after=t.number("inactive_after", 600, positive=True),
            remove_inactive_after=t.number("remove_inactive_after", 864000, positive=True),
            sweep_interval=t.number("sweep_interval", 60, positive=True),
            store_outage_grace=t.number("store_outage_grace", 900, low=1, high=MAX_STORE_OUTAGE_GRACE),
            **store,
            advertise=self.advertise(t, listen, tuple(names_value), store.get("store", "")),
        )

    def advertise(self, t: "_Table", listen: str, names: tuple[str, ...], store: str) -> str:
        """``service.advertise``: where connectors dial this node, a host the certificate names;
        "" to derive it from listen (ServiceConfig.tunnel_address)."""
        expected = ('"host:port" (or "[v6]:port") connectors can dial for this node\'s tunnel port, with a host'
                    ' of service.names, such as "gw1.example.test:8443"')
        if "advertise" not in t.data:
            # A shared store means other nodes: connectors must be told how to reach this one.
            if store and default_advertise(listen, names, bound_port=1) is None:
                raise self.error(t.key("advertise"), f"expected {expected} with a PostgreSQL store (several"
                                                     f" nodes), got nothing (service.listen {json.dumps(listen)}"
                                                     f" has no TCP port to default to)")
            return ""
        value = t.string("advertise", None, what=expected)
        parsed = _parse_destination(value)
        if parsed is None or parsed[1] == 0:
            raise t.fail("advertise", expected, value)
        if not _names_cover(names, parsed[0]):
            raise self.error(t.key("advertise"), f"expected {expected} (the node's certificate names only those,"
                                                 f" so connectors would refuse it), got {_describe(value)}; add"
                                                 f" the host to service.names")
        return value

    def store(self, t: "_Table", data: Mapping[str, Any]) -> dict[str, Any]:
        """[service] store and store_password_file: the SQLite default, or a PostgreSQL URL
        that holds no password (the file, PGPASSWORD or ~/.pgpass does)."""
        if "store" not in data:
            if "store_password_file" in data:
                raise t.fail("store_password_file", "no store_password_file without a postgresql:// store"
                             " (the embedded SQLite store has no password)", data["store_password_file"])
            return {}
        url = t.string("store", None, what="a postgresql://user@host:port/database URL")
        problem = store_url_problem(url)
        if problem:
            raise t.fail("store", problem, _redacted_url(url))
        password_file = None
        if "store_password_file" in data:
            value = t.string("store_password_file", None, what="a file path (a non-empty string)")
            p = Path(value).expanduser()
            password_file = Path(os.path.normpath(p if p.is_absolute() else self.base_dir / p))
        return {"store": url, "store_password_file": password_file}

    def connector(self, data: Mapping[str, Any]) -> ConnectorConfig:
        t = _Table(self, "connector", data, self.CONNECTOR)
        state_dir = t.path("state_dir")
        tunnels = t.integer("tunnels", 2, 1, 16)
        max_nodes = t.integer("max_nodes", 8, 1, 64)
        drain_timeout = t.number("drain_timeout", 30, low=0)
        backoff_initial = t.number("backoff_initial", 1.0, positive=True)
        backoff_max = t.number("backoff_max", 60.0, positive=True)
        if backoff_max < backoff_initial:
            raise t.fail("backoff_max", f"a number of seconds >= backoff_initial ({backoff_initial:g})",
                         data.get("backoff_max", 60.0))
        proxy, password_file = self.connector_proxy(t, data)
        return ConnectorConfig(state_dir=state_dir, tunnels=tunnels, max_nodes=max_nodes, drain_timeout=drain_timeout,
                               backoff_initial=backoff_initial, backoff_max=backoff_max, proxy=proxy,
                               proxy_password_file=password_file)

    def connector_proxy(self, t: _Table, data: Mapping[str, Any]) -> tuple[str | None, Path | None]:
        """``proxy`` (None: from the environment; "": none) and ``proxy_password_file``."""
        from gateway.connector.proxy import parse_proxy_url

        proxy = data.get("proxy")
        if proxy is not None:
            if not isinstance(proxy, str):
                raise t.fail("proxy", 'an http://[USER@]HOST:PORT proxy URL, or "" for none', proxy)
            if proxy:
                try:
                    parse_proxy_url(proxy)
                except ValueError as e:
                    # never the value itself: it may hold a password
                    raise self.error(t.key("proxy"), f"expected {e}") from None
        password_file = None
        if "proxy_password_file" in data:
            value = t.string("proxy_password_file", None, what="a file path (a non-empty string)")
            password_file = Path(os.path.normpath(self.base_dir / Path(value).expanduser()))
            if proxy is not None and (not proxy or not parse_proxy_url(proxy).username):
                raise self.error(t.key("proxy_password_file"),
                                 "expected only with a user in proxy (http://USER@HOST:PORT), whose password the"
                                 f" file holds; got proxy = {json.dumps(proxy)}")
        return proxy, password_file

    def apps(self, data: Mapping[str, Any], service: ServiceConfig | None) -> tuple[AppConfig, ...]:
        if "apps" not in data:
            return ()
        value = data["apps"]
        if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
            raise self.error("apps", f"expected an array of tables [[apps]], got {_describe(value)}")
        if value and service is None:
            raise self.error("apps", f"expected [[apps]] only together with a [service] table, "
                                     f"got {len(value)} app(s) and no [service]")
        apps: list[AppConfig] = []
        names: dict[str, int] = {}
        listens: list[tuple[int, tuple | None, str]] = []
        service_listen = _endpoint_identity(service.listen) if service is not None else None
        external: dict[str, int] = {}
        for i, item in enumerate(value):
            app = self.app(i, item)
            if app.name in names:
                raise self.error(f"apps[{i}].name", f"expected a unique app name, got {json.dumps(app.name)} "
                                                    f"(also used by apps[{names[app.name]}])")
            names[app.name] = i
            if app.is_private:
                self.check_overlap(i, app, apps)
                apps.append(app)
                continue
            if app.external_url:
                origin = web_origin(app.external_url)
                if origin in external:
                    raise self.error(f"apps[{i}].external_url",
                                     f"expected an external URL unique among apps, got {json.dumps(app.external_url)} "
                                     f"(apps[{external[origin]}] has the same scheme, host, port and path)")
                external[origin] = i
                apps.append(app)
                continue
            identity = _endpoint_identity(app.listen)
            if service is not None and _endpoints_conflict(identity, service_listen):
                raise self.error(f"apps[{i}].listen",
                                 f"expected an endpoint different from service.listen "
                                 f"({json.dumps(service.listen)}), got {json.dumps(app.listen)}")
            for j, other_identity, other_listen in listens:
                if _endpoints_conflict(identity, other_identity):
                    raise self.error(f"apps[{i}].listen",
                                     f"expected a listen endpoint unique among apps, got {json.dumps(app.listen)} "
                                     f"(conflicts with apps[{j}].listen {json.dumps(other_listen)})")
            listens.append((i, identity, app.listen))
            apps.append(app)
        return tuple(apps)

    def app(self, i: int, data: Mapping[str, Any]) -> AppConfig:
        t = _Table(self, f"apps[{i}]", data, self.APP)
        name = t.get("name", None, True, "an app name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise t.fail("name", "a name matching [a-z0-9][a-z0-9._-]{0,62}", name)
        group = t.get("group", "default", False)
        if not isinstance(group, str) or not _NAME_RE.match(group):
            raise t.fail("group", "a group name matching [a-z0-9][a-z0-9._-]{0,62}", group)
        private = "segments" in data
        web = not private and ("external_url" in data or "internal_url" in data)
        protocol = t.get("protocol", WEB_PROTOCOL if web else "tcp", False)
        if not isinstance(protocol, str) or not _PROTOCOL_RE.match(protocol):
            raise t.fail("protocol", 'a protocol handler name such as "tcp"', protocol)
        connect_timeout = t.number("connect_timeout", 10, positive=True)
        affinity = t.choice("affinity", "none", AFFINITIES)
        options = t.get("options", {}, False)
        if not isinstance(options, Mapping):
            raise t.fail("options", "a table", options)
        if private:
            return attrs.evolve(self.private_app(t, name, group, protocol, connect_timeout, dict(options)),
                                affinity=affinity)
        if web:
            if protocol != WEB_PROTOCOL:
                raise t.fail("protocol", f'"{WEB_PROTOCOL}" in an app with external_url or internal_url', protocol)
            return attrs.evolve(self.web_app(t, name, group, protocol, connect_timeout, dict(options)),
                                affinity=affinity)
        listen = t.endpoint("listen", None, required=True)
        destination = t.get("destination", None, True, '"host:port"')
        parsed = _parse_destination(destination) if isinstance(destination, str) else None
        if parsed is None:
            raise t.fail("destination", '"host:port" (or "[v6]:port") with a port 1..65535', destination)
        host, port = parsed
        self.check_listen_preauth(t, name, protocol, options)
        return AppConfig(name=name, listen=listen, destination=destination, host=host, port=port,
                         group=group, protocol=protocol, connect_timeout=connect_timeout,
                         options=dict(options), affinity=affinity)

    def check_listen_preauth(self, t: _Table, name: str, protocol: str, options: Mapping[str, Any]) -> None:
        """A listen app lets in anyone who reaches its port: the config must say so."""
        if options.get("preauth") == NO_PREAUTH:
            return
        web = " (or, for a web app, with external_url and internal_url behind the [http] front door)" \
            if protocol == WEB_PROTOCOL else ""
        got = _describe(options["preauth"]) if "preauth" in options else "nothing"
        raise self.error(t.key("options.preauth"),
                         f'expected "none" on app {name}, which has a listen: anyone who can reach it may connect, '
                         f'nobody signs in; add options.preauth = "none" to say so, or publish the app with '
                         f"segments{web} so users sign in; got {got}")

    def private_app(self, t: _Table, name: str, group: str, protocol: str, connect_timeout: float,
                    options: dict) -> AppConfig:
        """A Private Access app: segments its assigned users reach through the group's connectors."""
        from gateway.segments import Where, parse_segments

        for key in ("listen", "destination", "external_url", "internal_url"):
            if key in t.data:
                raise self.error(t.key(key), f"expected no {key} in a private app (one with segments: its users "
                                             f"reach the segments with gateway access), got {_describe(t.data[key])}; "
                                             f"remove {key}, or publish the app without segments")
        if protocol == WEB_PROTOCOL:
            raise t.fail("protocol", 'a handler for the segments\' TCP connections such as "tcp" in a private '
                                     "app (web apps are published with external_url and internal_url)", protocol)
        if "preauth" in options:
            raise self.error(t.key("options.preauth"),
                             f"expected no options.preauth in a private app (its users always sign in with "
                             f"gateway login), got {_describe(options['preauth'])}")
        assigned = False
        for key in ASSIGNMENT_KEYS:
            if key not in options:
                continue
            value = options[key]
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise self.error(t.key(f"options.{key}"), f"expected a list of non-empty strings, got {_describe(value)}")
            assigned = assigned or bool(value)
        if not assigned:
            raise self.error(t.key("options.allowed_users"),
                             "expected options.allowed_users or options.allowed_groups with at least one entry: "
                             "a private app is reachable only by the users assigned to it")
        segments = parse_segments(t.data["segments"], Where(self.file, t.key("segments")))
        if "protocol" not in t.data and smb_only(segments):
            protocol = SMB_PROTOCOL   # file shares: the smb plugin checks the handshake (SMB1 refused...)
        return AppConfig(name=name, listen="", destination="", host="", port=0, group=group, protocol=protocol,
                         connect_timeout=connect_timeout, options=options, segments=segments)

    def check_overlap(self, i: int, app: AppConfig, earlier: list[AppConfig]) -> None:
        """Refuse segments of ``app`` that overlap those of an earlier app in another connector group."""
        found = overlapping_app(app, earlier)
        if found is not None:
            other, mine, theirs = found
            raise self.error(f"apps[{i}].segments[{mine}]",
                             overlap_message(app, mine, other, theirs, f"apps[{earlier.index(other)}]"))

    def access(self, data: Mapping[str, Any], service: ServiceConfig | None) -> AccessConfig:
        t = _Table(self, "access", data, self.ACCESS)
        if service is None:
            raise self.error("access", "expected [access] only together with a [service] table (Private Access "
                                       "users sign in to a service), got no [service]")
        url = ""
        if "url" in data:
            url = t.string("url", None, what='an absolute URL such as "https://access.example.test/"')
            problem = _check_web_url(url, EXTERNAL_SCHEMES) or _loopback_only_http(url)
            if problem:
                raise self.error(t.key("url"), f"expected {problem}, got {_describe(url)}")
        return AccessConfig(
            url=url,
            tunnel=self.access_tunnel(t, service),
            certificate_lifetime=t.integer("certificate_lifetime", 3600, MIN_CERTIFICATE_LIFETIME, 7 * 86400),
            login_lifetime=t.integer("login_lifetime", 43200, MIN_CERTIFICATE_LIFETIME, 366 * 86400),
            udp_idle_timeout=t.number("udp_idle_timeout", 60, positive=True),
            max_tunnels_per_user=t.integer("max_tunnels_per_user", 16, 1, 1024),
        )

    def admin(self, data: Mapping[str, Any], service: ServiceConfig | None) -> AdminConfig:
        t = _Table(self, "admin", data, self.ADMIN)
        if service is None:
            raise self.error("admin", "expected [admin] only together with a [service] table (the admin API is"
                                      " served by a service node), got no [service]")
        listen = t.endpoint("listen", DEFAULT_ADMIN_LISTEN)
        if _endpoints_conflict(_endpoint_identity(listen), _endpoint_identity(service.listen)):
            raise t.fail("listen", f"an endpoint other than service.listen ({service.listen})", listen)
        tls = t.get("tls", True, False)
        if not isinstance(tls, bool):
            raise t.fail("tls", "true or false", tls)
        if not tls and not _loopback_endpoint(listen):
            # Tokens and session cookies would cross the network in the clear.
            raise t.fail("tls", 'true when admin.listen is not on loopback (add interface=127.0.0.1 to listen,'
                                ' or keep tls = true)', tls)
        return AdminConfig(
            listen=listen, tls=tls,
            session_lifetime=t.integer("session_lifetime", 28800, 60, 7 * 86400),
            page_refresh=t.integer("page_refresh", 10, 1, 3600),
        )

    def metrics(self, data: Mapping[str, Any], service: ServiceConfig | None,
                admin: AdminConfig | None) -> MetricsConfig:
        t = _Table(self, "metrics", data, self.METRICS)
        enabled = t.get("enabled", False, False)
        if not isinstance(enabled, bool):
            raise t.fail("enabled", "true or false", enabled)
        listen = t.endpoint("listen", DEFAULT_METRICS_LISTEN)
        taken = [("service.listen", service.listen if service else None),
                 ("admin.listen", admin.listen if admin else None)]
        for key, other in taken:
            if other and _endpoints_conflict(_endpoint_identity(listen), _endpoint_identity(other)):
                raise t.fail("listen", f"an endpoint other than {key} ({other})", listen)
        return MetricsConfig(enabled=enabled, listen=listen)

    def access_tunnel(self, t: _Table, service: ServiceConfig) -> str:
        """``access.tunnel``, or service.names[0] with service.listen's port."""
        expected = '"host:port" (or "[v6]:port") with a host of service.names, such as "gateway.example.test:8443"'
        if "tunnel" not in t.data:
            identity = _endpoint_identity(service.listen)
            if identity is None or identity[0] != "tcp":
                raise self.error(t.key("tunnel"), f"expected {expected}, got nothing (service.listen "
                                                  f"{json.dumps(service.listen)} has no TCP port to default to)")
            host = service.names[0]
            return host_port(host, identity[1])
        value = t.string("tunnel", None, what=expected)
        parsed = _parse_destination(value)
        if parsed is None:
            raise t.fail("tunnel", expected, value)
        if not _names_cover(service.names, parsed[0]):
            raise self.error(t.key("tunnel"), f"expected {expected} (the service certificate names only those, "
                                              f"so clients would refuse it), got {_describe(value)}; add the host "
                                              f"to service.names")
        return value

    def web_app(self, t: _Table, name: str, group: str, protocol: str, connect_timeout: float,
                options: dict) -> AppConfig:
        """An app the http plugin serves on its shared front door: external_url -> internal_url."""
        for key in ("listen", "destination"):
            if key in t.data:
                derived = "the front door's [http] listen" if key == "listen" else "internal_url"
                raise self.error(t.key(key), f"expected no {key} in a web app (one with external_url and "
                                             f"internal_url; it comes from {derived}), got {_describe(t.data[key])}")
        urls = {}
        for key, schemes in (("external_url", EXTERNAL_SCHEMES), ("internal_url", INTERNAL_SCHEMES)):
            value = t.string(key, None, required=True, what='an absolute URL such as "http://wiki.example.test/"')
            problem = _check_web_url(value, schemes, wildcard=key == "external_url")
            if problem:
                raise self.error(t.key(key), f"expected {problem}, got {_describe(value)}")
            urls[key] = value
        scheme, host, port = _split_origin(urls["internal_url"])
        destination = host_port(host, port)
        return AppConfig(name=name, listen="", destination=destination, host=host, port=port, group=group,
                         protocol=protocol, connect_timeout=connect_timeout, options=options,
                         external_url=urls["external_url"], internal_url=urls["internal_url"])

    def tunnel(self, data: Mapping[str, Any]) -> TunnelConfig:
        t = _Table(self, "tunnel", data, self.TUNNEL)
        ping_interval = t.number("ping_interval", 10, positive=True)
        initial_window = t.integer("initial_window", 256 * KIB, 64 * KIB, 16 * MIB)
        max_window = t.integer("max_window", 16 * MIB, None, 256 * MIB)
        if max_window < initial_window:
            raise t.fail("max_window", f"an integer >= initial_window ({initial_window}) and <= {256 * MIB}",
                         max_window)
        return TunnelConfig(
            ping_interval=ping_interval,
            initial_window=initial_window,
            max_window=max_window,
            max_frame=t.integer("max_frame", 64 * KIB, KIB, MIB),
            max_streams=t.integer("max_streams", 20000, 1, 2**31 - 1),
        )

    def logging(self, data: Mapping[str, Any], state_dir: Path) -> LoggingConfig:
        t = _Table(self, "logging", data, self.LOGGING)
        flags = {}
        for key in ("session_log", "journald"):
            flags[key] = t.get(key, False, False)
            if not isinstance(flags[key], bool):
                raise t.fail(key, "true or false", flags[key])
        admin_log = t.get("admin_log", None, False)
        if admin_log is not None and not isinstance(admin_log, str):
            raise t.fail("admin_log", 'a file path, or "" to turn the admin log off', admin_log)
        journald_socket = t.string("journald_socket", DEFAULT_JOURNALD_SOCKET, what="a UNIX socket path")
        if not journald_socket.startswith("/"):
            raise t.fail("journald_socket", "an absolute UNIX socket path", journald_socket)
        return LoggingConfig(
            format=t.choice("format", "text", LOG_FORMATS), level=t.choice("level", "info", LOG_LEVELS),
            admin_log=(None if admin_log == "" else
                       t.path("admin_log") if admin_log is not None else state_dir / "admin.log"),
            session_log=flags["session_log"],
            session_log_file=t.path("session_log_file") if "session_log_file" in data else state_dir / "session.log",
            max_bytes=t.integer("max_bytes", 10 * MIB, 16 * KIB, 1024 * MIB),
            max_files=t.integer("max_files", 5, 1, 100),
            journald=flags["journald"], journald_socket=journald_socket,
        )


# ---------------------------------------------------------------------------
# One app on its own (the `gateway apps` command and the apps the service reads from its store)


def parse_app(data: Mapping[str, Any], source: str = "(app)") -> AppConfig:
    """Validate one ``[[apps]]`` table by itself, with exactly the checks a file's app gets.

    A ConfigError names ``source`` and the bare key (``external_url``, not ``apps[0].external_url``),
    so a command can point at its own flag. Checks across apps (unique names and external URLs,
    see web_origin; listen conflicts) are the caller's.
    """
    try:
        return _Parser(source).app(0, data)
    except ConfigError as e:
        key = e.key.removeprefix("apps[0]").removeprefix(".")
        raise ConfigError(source, key or "(app)", e.expected) from None

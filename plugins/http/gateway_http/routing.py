"""Which web app a request is for: by listener scheme, Host and the longest path prefix.

Pure functions over a table built once from the apps (``routing_table``), tested on their own
(tests/unit/test_http_routing.py). ``route`` is the front door's router: it returns the app, an
``auth.Respond`` the front door sends itself (a redirect), or None (404).

The rules, and the peers they follow:

- **Scheme**: the https listener serves apps whose external_url is https, the plain listener
  those that are http. A plain request for an https app is redirected (``redirect_to_https``,
  308, keeping method and body, as Caddy does) to the same host, path and query over https.
- **Host**: case-insensitive, a trailing dot ignored, the scheme's default port made explicit.
  An exact host beats a wildcard. ``*.apps.example.test`` matches any name under it, one
  label deep or more (``a.apps.example.test``, ``a.b.apps.example.test``), as nginx server
  names and Entra wildcard apps do, but not ``apps.example.test`` itself; of several wildcards
  the longest suffix wins. (A certificate's wildcard covers one label only: names deeper than
  that need a certificate of their own.)
- **Path**: the longest external_url path prefix that the request path starts with; paths are
  compared case-sensitively, as nginx and Envoy do. A path equal to a prefix without its
  trailing slash (``/wiki`` for ``/wiki/``) is redirected to the prefix (308; nginx answers 301
  the same way). The host is chosen first, then the path among that host's apps (as nginx
  server blocks and Envoy virtual hosts do): an exact host with no matching prefix is a 404
  even if a wildcard has one. A target with ``.``/``..`` segments (plain or %-escaped) or a
  backslash is refused with 400 rather than routed: the back end would resolve it under another
  prefix than the one we routed (and pre-authenticated) by. Browsers never send such paths.
- **Absolute-form** targets (``GET http://host/path``) route by their own host and path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from .auth import Respond

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT = 308

HostKey = tuple[str, int]


@frozen
class Entry:
    prefix: str      # "/" or "/wiki/"
    app: Any


@frozen
class Table:
    """Routing table of one set of apps; look-ups are ``route(table, scheme, host, target)``."""

    # (scheme, host, port) -> entries, longest prefix first
    exact: dict[tuple[str, str, int], tuple[Entry, ...]]
    # (scheme, ".suffix", port) -> entries, longest prefix first; suffix keeps its leading dot
    wildcard: dict[tuple[str, str, int], tuple[Entry, ...]]
    # longest wildcard suffix first, for "longest suffix wins"
    suffixes: tuple[str, ...]


def route_key(host: str, scheme: str) -> HostKey | None:
    """(host, port) of a Host header value, the scheme's default port made explicit; None if malformed."""
    if not host:
        return None
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        name, _, port_text = host.partition(":")
        name = name.rstrip(".")
    if not name:
        return None
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    else:
        port = DEFAULT_PORTS[scheme]
    return name, port


def app_origin(app: Any) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an app's external_url; host may start with "*."."""
    parts = urlsplit(app.external_url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower().rstrip("."), parts.port or DEFAULT_PORTS[scheme], parts.path or "/"


def routing_table(apps: list) -> Table:
    """The table of the apps with an external_url (config has made each scheme+host+port+path unique)."""
    exact: dict[tuple[str, str, int], list[Entry]] = {}
    wildcard: dict[tuple[str, str, int], list[Entry]] = {}
    for app in apps:
        if not getattr(app, "external_url", ""):
            continue
        scheme, host, port, prefix = app_origin(app)
        if host.startswith("*."):
            wildcard.setdefault((scheme, host[1:], port), []).append(Entry(prefix, app))
        else:
            exact.setdefault((scheme, host, port), []).append(Entry(prefix, app))

    def ordered(d: dict) -> dict:
        return {k: tuple(sorted(v, key=lambda e: -len(e.prefix))) for k, v in d.items()}

    suffixes = tuple(sorted({k[1] for k in wildcard}, key=len, reverse=True))
    return Table(ordered(exact), ordered(wildcard), suffixes)


def request_path(target: bytes) -> tuple[str, str] | None:
    """(path, "?query" or "") of a request target; None for a target that names no path ("*")."""
    text = target.decode("latin-1")
    if text.lower().startswith(("http://", "https://")):
        parts = urlsplit(text)
        return parts.path or "/", f"?{parts.query}" if parts.query else ""
    if not text.startswith("/"):
        return None
    path, sep, query = text.partition("?")
    return path, sep + query


def _unsafe(path: str) -> bool:
    """Dot segments (plain or %-escaped) or a backslash: resolved differently behind us.

    An escaped slash (%2F) is let through: apps such as GitLab's API rely on it staying escaped."""
    lowered = path.lower()
    if "%5c" in lowered or "\\" in path:
        return True  # IIS and others take a backslash for a slash
    segments = lowered.replace("%2e", ".").split("/")
    return any(s in (".", "..") for s in segments)


def _entries(table: Table, scheme: str, name: str, port: int) -> tuple[Entry, ...]:
    found = table.exact.get((scheme, name, port))
    if found:
        return found
    for suffix in table.suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            found = table.wildcard.get((scheme, suffix, port))
            if found:
                return found
    return ()


def _match(entries: tuple[Entry, ...], path: str, query: str) -> Any:
    for entry in entries:  # longest prefix first; "/wiki" is nearer to "/wiki/" than to "/"
        if path + "/" == entry.prefix:
            return redirect(entry.prefix + query)
        if path.startswith(entry.prefix):
            return entry.app
    return None


def route(table: Table, host: str, target: bytes = b"/", scheme: str = "http",
          redirect_to_https: bool = False) -> Any:
    """The app a request on a ``scheme`` listener is for, a Respond (redirect, 400), or None."""
    key = route_key(host, scheme)
    where = request_path(target)
    if key is None:
        return None
    path, query = where if where is not None else ("/", "")
    if where is not None and _unsafe(path):
        return Respond(400, [(b"Content-Type", b"text/plain; charset=utf-8")],
                       b"The request path has dot segments or escaped slashes.\n")
    name, port = key
    found = _match(_entries(table, scheme, name, port), path, query)
    if found is not None or not redirect_to_https or scheme != "http":
        return found
    https_port = _https_port(table, name, path)
    if https_port is None:
        return None
    authority = f"[{name}]" if ":" in name else name
    if https_port != DEFAULT_PORTS["https"]:
        authority += f":{https_port}"
    return redirect(f"https://{authority}{path}{query}")


def _https_port(table: Table, name: str, path: str) -> int | None:
    """The port of an https app at host ``name`` (any port: the plain request names the plain one)."""
    ports = sorted({k[2] for k in table.exact if k[0] == "https" and k[1] == name}
                   | {k[2] for k in table.wildcard if k[0] == "https" and name.endswith(k[1]) and len(name) > len(k[1])},
                   key=lambda p: (p != DEFAULT_PORTS["https"], p))
    for port in ports:
        if _match(_entries(table, "https", name, port), path, "") is not None:
            return port
    return None


def redirect(location: str) -> Respond:
    return Respond(REDIRECT, [(b"Location", location.encode("latin-1")),
                              (b"Content-Type", b"text/plain; charset=utf-8")],
                   f"Moved to {location}\n".encode("latin-1"))


def request_origin(app: Any, host: str, scheme: str) -> tuple[str, str, int]:
    """(scheme, host, port) the client reached ``app`` at: the external_url's, but for a wildcard
    app the host the client asked for (what Location and cookie rewriting should use)."""
    app_scheme, app_host, port, _ = app_origin(app)
    if app_host.startswith("*."):
        key = route_key(host, scheme)
        if key is not None:
            return app_scheme, key[0], port
    return app_scheme, app_host, port

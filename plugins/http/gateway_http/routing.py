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
- **Path**: the longest external_url path prefix that the request path starts with. A path
  equal to a prefix without its trailing slash (``/wiki`` for ``/wiki/``) is redirected to the
  prefix (308; nginx answers 301 the same way). The host is chosen first, then the path among
  that host's apps (as nginx server blocks and Envoy virtual hosts do): an exact host with no
  matching prefix is a 404 even if a wildcard has one.
- **The path is normalised before it is matched, and the normalised path is what the back end
  gets** (``request_target``), so no spelling of a path reaches an app other than the one a
  back end would serve it as: %-escapes of unreserved characters are decoded (``%61`` is
  ``a``), other escapes get upper-case hex, ``//`` runs are merged (nginx's merge_slashes).
  Refused with 400, as no browser sends them: escaped ``/``, ``\\`` or control characters, a
  bad escape, a backslash, ``.``/``..`` segments (plain, %-escaped, or as ``..;x``: resolved
  behind us they would land under another prefix than the one we routed and pre-authenticated
  by), and targets that are not a path (origin-form), an http(s) URL (absolute-form), ``*``
  (OPTIONS only) or an authority (CONNECT only).
- **Prefixes match case-insensitively, and a segment's ``;params`` do not count**: a back end
  may ignore case (IIS) or path parameters (Tomcat, Jetty), so ``/ADMIN/x`` and ``/admin;x/x``
  are for the app at ``/admin/`` as such a back end would see them. The first is forwarded as
  sent; the second is refused (400): a ``;`` inside the segments of an app's prefix has no
  use but to hide the prefix. ``;`` after the prefix (``/app/x;jsessionid=1``) is forwarded.
- **Absolute-form** targets (``GET http://host/path``) route by their own host and path (RFC
  9112 3.2.2: the target's authority wins over Host); the back end gets the origin-form path.
- **Host** values (the header, or the authority of an absolute-form target) must be a host
  name (letters, digits, ``-``, ``_``, ``.``), an IPv4 address or a bracketed IPv6 address,
  with an optional port 1-65535 (``host_key``); anything else is a 400, since the host becomes
  the external origin of wildcard apps and apps with a listener of their own (Forwarded,
  X-Forwarded-Host, rewritten Location, the JWT assertion's audience).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from .auth import Respond
from .rules import HTTPError

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT = 308

HostKey = tuple[str, int]


@frozen
class Entry:
    prefix: str      # "/" or "/wiki/"
    app: Any
    key: str = field(init=False)   # the prefix as paths are matched against it: lower case

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", self.prefix.lower())


@frozen
class Table:
    """Routing table of one set of apps; look-ups are ``route(table, scheme, host, target)``."""

    # (scheme, host, port) -> entries, longest prefix first
    exact: dict[tuple[str, str, int], tuple[Entry, ...]]
    # (scheme, ".suffix", port) -> entries, longest prefix first; suffix keeps its leading dot
    wildcard: dict[tuple[str, str, int], tuple[Entry, ...]]
    # longest wildcard suffix first, for "longest suffix wins"
    suffixes: tuple[str, ...]


# a host name (DNS labels, "_" as some internal names have, an optional trailing dot), or an
# IPv4 address (which has the same shape), or a bracketed IPv6 address; an optional port
_HOST = re.compile(r"(?:([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)\.?|\[([0-9a-f:.]+)\])(?::([0-9]{1,5}))?")


@functools.lru_cache(maxsize=4096)   # asked twice per request, mostly for the same few hosts
def route_key(host: str, scheme: str) -> HostKey | None:
    """(host, port) of a Host header value, lower case, the scheme's default port made explicit;
    None unless it is a host name, IPv4 address or bracketed IPv6 address with an optional port
    1-65535 (RFC 3986 3.2.2, stricter: no %-escapes or sub-delims, which no DNS name has)."""
    found = _HOST.fullmatch(host.lower()) if host and len(host) <= 261 else None
    if found is None:
        return None
    name, v6, port_text = found.groups()
    if v6 is not None:
        try:
            name = str(ipaddress.IPv6Address(v6))
        except ValueError:
            return None
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        return None
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


def bad_target(why: str) -> HTTPError:
    return HTTPError(400, f"The request target {why}.")


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# what a path needs normalising for; most paths have none of it and are used as they are
_UNUSUAL = re.compile(rb"[%\\]|//|/\.")


def normalise_path(path: bytes) -> bytes:
    """An origin-form path (starting with "/") as routing and the back end are to see it; raises
    HTTPError(400) for what no back end may see differently from us (module docstring)."""
    if _UNUSUAL.search(path) is None:
        return path
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"\\" in path:
        raise bad_target("has a backslash, which some servers take for a slash")
    segments = path.split(b"/")
    if any(s.split(b";", 1)[0] in (b".", b"..") for s in segments):
        raise bad_target("has . or .. segments")
    if b"//" in path:   # merged, as nginx's merge_slashes does: "//admin/x" is "/admin/x"
        path = b"/".join([b"", *(s for s in segments[1:-1] if s), segments[-1]])
    return path


def _decode_unreserved(path: bytes) -> bytes:
    """RFC 3986 6.2.2: %-escapes of unreserved characters decoded, the others in upper case."""
    pieces = path.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        digits = piece[:2]
        if len(digits) < 2 or not set(digits) <= _HEX:
            raise bad_target("has a malformed %-escape")
        byte = int(digits, 16)
        if byte in (0x2F, 0x5C):
            raise bad_target("has an escaped slash or backslash (%2F, %5C)")
        if byte < 0x20 or byte == 0x7F:
            raise bad_target("has an escaped control character")
        out.append(bytes((byte,)) if byte in _UNRESERVED else b"%" + digits.upper())
        out.append(piece[2:])
    return b"".join(out)


def request_target(method: bytes, target: bytes) -> tuple[str | None, bytes]:
    """(the authority of an absolute-form target or None, the target to route and forward:
    origin-form with a normalised path, ``*``, or a CONNECT's authority); raises HTTPError(400)
    for any other form."""
    if target[:1] == b"/" and method != b"CONNECT":
        path, sep, query = target.partition(b"?")
        normal = normalise_path(path)
        return None, target if normal is path else normal + sep + query
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")) and method != b"CONNECT":
        return _absolute_form(target[target.index(b"//") + 2:])
    if target == b"*" and method == b"OPTIONS":
        return None, target
    if method == b"CONNECT":
        if route_key(target.decode("latin-1"), "http") is None or b":" not in target.rpartition(b"]")[2]:
            raise bad_target("of a CONNECT request must be a host and port")
        return None, target
    raise bad_target("must be a path starting with / (or an http URL)")


def _absolute_form(rest: bytes) -> tuple[str, bytes]:
    """(authority, origin-form target) of the part of an absolute-form target after "scheme://"."""
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if 0 <= found < end:
            end = found
    authority, rest = rest[:end].decode("latin-1"), rest[end:]
    if "@" in authority:
        raise bad_target("has user information, which HTTP does not allow (RFC 9110 4.2.4)")
    if not authority:
        raise bad_target("has no host")
    rest = rest.partition(b"#")[0]
    path, sep, query = rest.partition(b"?")
    return authority, normalise_path(path or b"/") + sep + query


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


def match_key(path: str) -> str:
    """A path as it is matched against prefixes: lower case, each segment's ``;params`` dropped."""
    key = path.lower()
    if ";" in key:   # "/;/admin/" is "//admin/" to Tomcat, then "/admin/": merged as normalise_path does
        key = "/".join(s.partition(";")[0] for s in key.split("/"))
        while "//" in key:
            key = key.replace("//", "/")
    return key


def _match(entries: tuple[Entry, ...], path: str, query: str) -> Any:
    key = match_key(path)
    for entry in entries:  # longest prefix first; "/wiki" is nearer to "/wiki/" than to "/"
        if key + "/" == entry.key:
            return redirect(entry.prefix + query)
        if key.startswith(entry.key):
            if len(entry.key) > 1 and not path[:len(entry.key)].lower() == entry.key:
                raise bad_target("has ;parameters inside the path of an application")
            return entry.app
    return None


def route(table: Table, host: str, target: bytes = b"/", scheme: str = "http",
          redirect_to_https: bool = False) -> Any:
    """The app a request on a ``scheme`` listener is for, a Respond (redirect), or None.

    ``target`` is one ``request_target`` returned: normalised already; a Host that is not one
    (``route_key``) is for no app."""
    key = route_key(host, scheme)
    where = request_path(target)
    if key is None:
        return None
    path, query = where if where is not None else ("/", "")
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

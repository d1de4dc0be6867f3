"""Pure HTTP rules of the front door: parsing heads, translating headers (routing: routing.py).

Nothing here does I/O, so every rule is tested on its own (tests/unit/test_http_rules.py).
Headers are lists of ``(name, value)`` byte pairs in arrival order; names keep their case.
"""

from __future__ import annotations

import functools
import html
import re
from urllib.parse import urlsplit

from attrs import field, frozen

from .sessions import strip_our_cookies


MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100

DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 9110 7.6.1 plus the old ones proxies still meet; Transfer-Encoding and Content-Length are
# framing, which the front door sets itself on each side.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# The front door's correlation id for each request, sent to the connector (which logs it) and
# on to the back end; a client's header of that name is dropped.
REQUEST_ID_HEADER = b"x-gateway-request-id"
# Every X-Gateway-* header is the gateway's to set (the request id, the signed assertion, and
# whatever it adds later): a client's header of such a name is dropped, never passed on as if
# the gateway had said it. So are the gateway's own cookies (sessions.strip_our_cookies).
GATEWAY_HEADER_PREFIX = b"x-gateway-"
FORWARDING = frozenset({b"x-forwarded-proto", b"x-forwarded-host", REQUEST_ID_HEADER})

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

Headers = list[tuple[bytes, bytes]]


class HTTPError(Exception):
    """A request the front door answers itself with ``status`` (400, 404, 414, 431, 501, ...)."""

    def __init__(self, status: int, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers   # more fields for the error page (Allow, for a 405)


@frozen
class Origin:
    """scheme, lower-case host (no brackets), port (the scheme's default made explicit) and the
    app's path prefix ("/" or such as "/wiki/")."""

    scheme: str
    host: str
    port: int
    path: str = "/"

    @classmethod
    def from_url(cls, url: str) -> Origin:
        return _origin_of(url)

    @property
    def authority(self) -> str:
        """host[:port] as a Host header says it: the default port left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS.get(self.scheme) else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"


@functools.lru_cache(maxsize=4096)
def _origin_of(url: str) -> Origin:
    # an app's two URLs, asked for on every request: parse each once
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return Origin(scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS[scheme], parts.path or "/")


def _index(headers: Headers) -> tuple[dict[bytes, list[bytes]], list[bytes]]:
    """{lower-case name: values} and the lower-case names in order, in one pass."""
    index: dict[bytes, list[bytes]] = {}
    names = [k.lower() for k, _ in headers]
    for name, (_, v) in zip(names, headers):
        found = index.get(name)
        if found is None:
            index[name] = [v]
        else:
            found.append(v)
    return index, names


@frozen
class _ParsedHead:
    """What a parsed request or response keeps beside its fields, made once when parsed:
    {lower-case name: values}, which the rules ask several times per message, and the
    lower-case names in the order of ``headers``, for the passes that rebuild a head."""

    index: dict[bytes, list[bytes]] = field(init=False, eq=False, repr=False)
    names: list[bytes] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        index, names = _index(self.headers)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "names", names)


@frozen
class Request(_ParsedHead):
    method: bytes
    target: bytes
    version: bytes          # b"HTTP/1.1" or b"HTTP/1.0"
    headers: Headers


@frozen
class Response(_ParsedHead):
    version: bytes
    status: int
    reason: bytes
    headers: Headers


def values(message: Request | Response, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case) of a parsed message, in order."""
    return message.index.get(name, [])


def _message_tokens(message: Request | Response, name: bytes) -> list[bytes]:
    return [t.strip().lower() for v in message.index.get(name, ()) for t in v.split(b",") if t.strip()]


def get(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case), in order."""
    return [v for k, v in headers if k.lower() == name]


def is_token(name: str) -> bool:
    """A valid header field name."""
    return bool(name) and set(name.encode("latin-1", "replace")) <= _TOKEN


def is_field_value(value: str) -> bool:
    """A header value we are willing to send: printable ASCII and tabs/spaces, no line breaks."""
    return all(c == "\t" or " " <= c <= "~" for c in value)


# name ":" OWS value OWS CRLF, anchored at a line start, the value without CR, LF or NUL; a line
# starting with white space (obsolete line folding) has no name and does not match. The value
# is matched greedily up to its last character that is not white space: a lazy value (``*?``)
# would try the rest of the pattern after every byte, 2.6 x slower on a typical head.
_FIELD_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\r\n\0]*[^\r\n\0 \t])?)[ \t]*\r\n",
                         re.MULTILINE)


def _parse_fields(block: bytes) -> Headers:
    """The header fields of a head's ``block`` (the lines after the first, CRLF-separated)."""
    if not block:
        return []
    block += b"\r\n"
    fields = _FIELD_LINE.findall(block)   # one C-level pass; every line must be one match
    if len(fields) == block.count(b"\n"):
        if len(fields) > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
        return fields
    lines = block[:-2].split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
    for line in lines:
        if _FIELD_LINE.match(line + b"\r\n") is None:
            name, colon, _ = line.partition(b":")
            if colon and name and set(name) <= _TOKEN:
                raise HTTPError(400, "malformed header value")
            raise HTTPError(400, "malformed header field")
    raise HTTPError(400, "malformed header field")


def bare_lf(head: bytes) -> bool:
    """Whether an unfinished head has a line ending in LF alone. RFC 9112 2.2 lets a recipient
    take LF for CRLF, but the front door and the connector find a head's end by CRLF CRLF only:
    such a head is refused at once (400 from a client, 502 from a back end) rather than waited
    on until a timeout, and a head two parsers could split differently is never passed on."""
    return b"\n" in head and head.count(b"\n") != head.count(b"\r\n")


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (everything before the blank line, CRLF line ends)."""
    line, _, rest = head.partition(b"\r\n")
    if len(line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPError(505 if version.startswith(b"HTTP/") else 400, "only HTTP/1.0 and HTTP/1.1")
    if not target or any(c <= 0x20 or c == 0x7F for c in target):
        raise HTTPError(400, "malformed request target")
    headers = _parse_fields(rest)
    return Request(method, target, version, headers)


def parse_response_head(head: bytes) -> Response:
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise HTTPError(502, "the back end sent a malformed status line")
    try:
        headers = _parse_fields(rest)
    except HTTPError as e:
        raise HTTPError(502, f"the back end sent a {e.message}") from None
    return Response(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else b"", headers)


def request_body_length(request: Request) -> int | None:
    """Bytes of body that follow, or None for chunked; refuses ambiguous framing (smuggling)."""
    codings = _message_tokens(request, b"transfer-encoding")
    lengths = values(request, b"content-length")
    if codings:
        if lengths:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if codings != [b"chunked"]:
            raise HTTPError(501, "only the chunked transfer coding is supported")
        return None
    return _content_length(lengths, 400)


def _content_length(values: list[bytes], status: int) -> int:
    if not values:
        return 0 if status == 400 else -1
    found = {v.strip() for v in b",".join(values).split(b",")}
    if len(found) != 1:
        raise HTTPError(status, "conflicting Content-Length values")
    value = found.pop()
    if not value.isdigit() or len(value) > 18:
        raise HTTPError(status, "malformed Content-Length")
    return int(value)


def response_body_length(response: Response, method: bytes) -> int | None:
    """Bytes of body that follow: n, 0, None for chunked, or -1 for "until the back end closes"."""
    if method == b"HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
        return 0
    codings = _message_tokens(response, b"transfer-encoding")
    if codings:
        return None if codings[-1] == b"chunked" else -1
    return _content_length(values(response, b"content-length"), 502)


def wants_keep_alive(request: Request) -> bool:
    connection = _message_tokens(request, b"connection")
    if request.version == b"HTTP/1.1":
        return b"close" not in connection
    return False  # HTTP/1.0 clients get one response per connection


def request_host(request: Request) -> str:
    """The host:port the client asked for (Host header; absolute-form target wins), lower case."""
    if request.target.lower().startswith((b"http://", b"https://")):
        return urlsplit(request.target.decode("latin-1")).netloc.rpartition("@")[2].lower()
    hosts = values(request, b"host")
    if len(hosts) != 1 and request.version == b"HTTP/1.1":
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    return hosts[0].decode("latin-1").strip().lower() if hosts else ""


def hop_by_hop(message: Request | Response) -> frozenset[bytes] | set[bytes]:
    """The (lower-case) names not to pass on: hop-by-hop and framing headers and the ones the
    message's Connection header lists."""
    if b"connection" not in message.index:
        return HOP_BY_HOP | FRAMING
    return HOP_BY_HOP | FRAMING | set(_message_tokens(message, b"connection"))


def strip_hop_by_hop(message: Request | Response) -> Headers:
    """The message's fields without its hop-by-hop ones (see hop_by_hop)."""
    drop = hop_by_hop(message)
    return [field for name, field in zip(message.names, message.headers) if name not in drop]


def _forwarded_for(client_host: str) -> str:
    return f'"[{client_host}]"' if ":" in client_host else client_host


WEBSOCKET_ONLY = frozenset({b"websocket"})


def upgrade_protocols(request: Request, allowed: frozenset[bytes] = WEBSOCKET_ONLY) -> bytes | None:
    """The Upgrade protocols of a request that asks to switch (WebSocket...) that are in
    ``allowed`` (lower-case names, versions ignored), else None: a request asking only for
    others (h2c, say) goes on as a plain request, as nginx does when Upgrade is not configured."""
    upgrade = values(request, b"upgrade")
    if not (upgrade and request.version == b"HTTP/1.1" and b"upgrade" in _message_tokens(request, b"connection")):
        return None
    offered = [p.strip() for v in upgrade for p in v.split(b",") if p.strip()]
    kept = [p for p in offered if p.partition(b"/")[0].lower() in allowed]
    return b", ".join(kept) if kept else None


def origin_form(target: bytes) -> bytes:
    """path?query of a request target; an absolute-form target loses its scheme and authority."""
    if target.lower().startswith((b"http://", b"https://")):
        parts = urlsplit(target.decode("latin-1"))
        return (parts.path or "/").encode("latin-1") + (b"?" + parts.query.encode("latin-1") if parts.query else b"")
    return target


def translate_target(target: bytes, external: Origin, internal: Origin) -> bytes:
    """The external path prefix of an origin-form target becomes the internal one."""
    ext, inner = external.path.encode("latin-1"), internal.path.encode("latin-1")
    if ext == inner:
        return target
    if target[:len(ext)].lower() == ext.lower():   # routing matched it case-insensitively (routing.py)
        return inner + target[len(ext):]
    if target == ext[:-1] or target.startswith(ext[:-1] + b"?"):   # "/wiki" for the app at "/wiki/"
        return inner + target[len(ext) - 1:]
    return target


def backend_request_head(request: Request, body_length: int | None, external: Origin, internal: Origin,
                         client_host: str, translate_host: bool = True, extra_headers: Headers = (),
                         upgrades: frozenset[bytes] = WEBSOCKET_ONLY) -> bytes:
    """The head sent on the stream to the connector: origin-form target with the internal path
    prefix, translated Host, forwarding headers, the app's custom headers, hop-by-hop headers
    stripped (but for an upgrade request's ``Connection: Upgrade``), and our framing. A client's
    X-Gateway-* headers and the gateway's cookies are stripped too, whatever the app. The
    connector keeps its own back-end connections alive, so no Connection header is sent.
    Host: with ``translate_host`` off, the external host routing used (an absolute-form
    target's, not a second one in the Host header); an upgrade only to one of ``upgrades``.

    One pass over the client's headers: this runs for every request."""
    target = translate_target(origin_form(request.target), external, internal)
    drop = hop_by_hop(request) | FORWARDING
    upgrade = upgrade_protocols(request, upgrades) if b"upgrade" in request.index else None
    if extra_headers:
        drop = drop | {k.lower() for k, _ in extra_headers}
    headers: Headers = []
    append = headers.append
    xff: list[bytes] = []
    forwarded: list[bytes] = []
    host_seen = False
    host = (internal if translate_host else external).authority.encode("latin-1")
    for name, (k, v) in zip(request.names, request.headers):
        if name in drop or name.startswith(GATEWAY_HEADER_PREFIX):
            continue
        if name == b"cookie":
            v = strip_our_cookies(v)
            if v:
                append((k, v))
        elif name == b"host":
            host_seen = True
            append((b"Host", host))
        elif name == b"x-forwarded-for":
            xff.append(v)
        elif name == b"forwarded":
            forwarded.append(v)
        else:
            append((k, v))
    if not host_seen and host:
        headers.insert(0, (b"Host", host))
    xff.append(client_host.encode("latin-1"))
    forwarded.append(f'for={_forwarded_for(client_host)};host="{external.authority}";proto={external.scheme}'
                     .encode("latin-1"))
    headers += [
        (b"X-Forwarded-For", b", ".join(xff)),
        (b"X-Forwarded-Proto", external.scheme.encode()),
        (b"X-Forwarded-Host", external.authority.encode("latin-1")),
        (b"Forwarded", b", ".join(forwarded)),
    ]
    headers += extra_headers
    if body_length is None:
        append((b"Transfer-Encoding", b"chunked"))
    elif body_length or request.method in (b"POST", b"PUT", b"PATCH"):
        append((b"Content-Length", str(body_length).encode()))
    if upgrade is not None:
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
    return head_bytes(b" ".join((request.method, target, b"HTTP/1.1")), headers)


def rewrite_location(value: bytes, external: Origin, internal: Origin) -> bytes:
    """An absolute Location pointing at the internal origin now points at the external one."""
    text = value.decode("latin-1").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return value
    scheme = parts.scheme.lower()
    if not parts.netloc and text.startswith("/") and not text.startswith("//"):
        # absolute path: only the path prefix may differ
        return translate_path(text, internal, external).encode("latin-1")
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        return value  # relative: already relative to the external URL
    if (scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS[scheme]) != (
            internal.scheme, internal.host, internal.port):
        return value
    rest = text[len(parts.scheme) + 3 + len(parts.netloc):]
    if rest and rest[0] not in "?#":
        rest = translate_path(rest, internal, external)
    return (external.url + rest).encode("latin-1")


def translate_path(path: str, source: Origin, target: Origin) -> str:
    """A path under ``source``'s prefix moved under ``target``'s prefix; other paths unchanged."""
    if source.path != target.path and path.startswith(source.path):
        return target.path + path[len(source.path):]
    return path


def rewrite_refresh(value: bytes, external: Origin, internal: Origin) -> bytes:
    """``Refresh: 5; url=http://internal/x`` points at the external origin instead."""
    delay, sep, rest = value.partition(b";")
    key, eq, url = rest.strip().partition(b"=")
    if not sep or not eq or key.strip().lower() != b"url":
        return value
    quote = url[:1] if url[:1] in (b"'", b'"') else b""
    inner = url[1:-1] if quote and url.endswith(quote) and len(url) > 1 else url
    return delay + b"; " + key.strip() + b"=" + quote + rewrite_location(inner, external, internal) + quote


def rewrite_cookie_domain(value: bytes, external: Origin, internal: Origin) -> bytes:
    """A cookie for the internal host's domain (``Domain=wiki.corp``) is set for the external host."""
    parts = value.split(b";")
    for i, attribute in enumerate(parts[1:], 1):
        key, eq, found = attribute.strip().partition(b"=")
        if eq and key.lower() == b"domain" and found.strip().lstrip(b".").lower() == internal.host.encode("latin-1"):
            parts[i] = b" Domain=" + external.host.encode("latin-1")
        elif eq and key.lower() == b"path":
            path = found.strip().decode("latin-1")
            if path.startswith(internal.path) or path + "/" == internal.path:
                parts[i] = b" Path=" + translate_path(path if path.endswith("/") or path != internal.path[:-1]
                                                      else internal.path, internal, external).encode("latin-1")
    return b";".join(parts)


def client_response_head(response: Response, body_length: int | None, chunked_to_client: bool,
                         keep_alive: bool, external: Origin, internal: Origin) -> bytes:
    """The head sent to the client: hop-by-hop stripped, URLs and cookie domains translated, our framing.

    A 101 keeps its ``Connection: Upgrade`` and ``Upgrade``.
    """
    if response.status == 101:
        headers = strip_hop_by_hop(response)
        headers += [(b"Connection", b"Upgrade")] + [(b"Upgrade", v) for v in get(response.headers, b"upgrade")]
        return head_bytes(b"HTTP/1.1 101 %s" % (response.reason or b"Switching Protocols"), headers)
    headers = []
    drop = hop_by_hop(response)
    for name, (k, v) in zip(response.names, response.headers):
        if name in drop:
            continue
        if name in (b"location", b"content-location"):
            v = rewrite_location(v, external, internal)
        elif name == b"refresh":
            v = rewrite_refresh(v, external, internal)
        elif name == b"set-cookie":
            v = rewrite_cookie_domain(v, external, internal)
        headers.append((k, v))
    if chunked_to_client:
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif body_length is not None and body_length >= 0:
        # HEAD, 204 and 304 keep the back end's Content-Length (it describes the would-be body)
        lengths = values(response, b"content-length")
        if lengths and body_length == 0:
            headers.append((b"Content-Length", lengths[0].split(b",")[0].strip()))
        elif response.status not in (204, 304) and not 100 <= response.status < 200:
            headers.append((b"Content-Length", str(body_length).encode()))
    if not 100 <= response.status < 200:
        headers.append((b"Connection", b"keep-alive" if keep_alive else b"close"))
    reason = response.reason or b"-"
    return head_bytes(b"HTTP/1.1 %d %s" % (response.status, reason), headers)


_FIELD = b": ".join   # (name, value) -> name: value, mapped over a head's fields in C


def head_bytes(first_line: bytes, headers: Headers) -> bytes:
    """A head on the wire: the first line, ``name: value`` fields, CRLF line ends, the blank line."""
    if not headers:
        return first_line + b"\r\n\r\n"
    return first_line + b"\r\n" + b"\r\n".join(map(_FIELD, headers)) + b"\r\n\r\n"


REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other", 307: "Temporary Redirect",
           308: "Permanent Redirect", 401: "Unauthorized", 403: "Forbidden", 405: "Method Not Allowed",
           413: "Content Too Large",
           504: "Gateway Timeout", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def own_response(status: int, headers: Headers, body: bytes, keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete response the front door makes itself (redirects, sign-in pages, JWKS)."""
    reason = REASONS.get(status, "OK" if status < 300 else "Error")
    headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"connection",
                                                                b"transfer-encoding")]
    headers += [(b"Content-Length", str(len(body)).encode()),
                (b"Connection", b"keep-alive" if keep_alive else b"close")]
    return head_bytes(b"HTTP/1.1 %d %s" % (status, reason.encode()), headers) + (b"" if head_only else body)


def error_page(status: int, message: str, request_id: str, extra_headers: Headers = ()) -> bytes:
    """A complete response (head and HTML body) the front door sends itself; closes the connection.

    ``message`` must name nothing internal: no app, group, connector or back-end address.
    """
    reason = REASONS.get(status, "Error")
    body = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{s} {r}</title></head>\n"
        "<body><h1>{s} {r}</h1>\n<p>{m}</p>\n<p>Correlation id: <code>{rid}</code></p></body></html>\n"
    ).format(s=status, r=reason, m=html.escape(message), rid=html.escape(request_id)).encode()
    headers = [
        (b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"), (b"X-Request-Id", request_id.encode()), *extra_headers,
        (b"Connection", b"close"),
    ]
    return head_bytes(b"HTTP/1.1 %d %s" % (status, reason.encode()), headers) + body


class ChunkDecoder:
    """Incremental chunked-body decoder: ``feed(data)`` returns (pieces of body, bytes after the end).

    ``done`` is True once the last chunk and the trailer section were read; trailers are dropped.
    Raises HTTPError(400) on malformed framing.
    """

    MAX_LINE = 4096

    def __init__(self, status: int = 400) -> None:
        self.status = status
        self.buf = b""
        self.left = 0          # bytes of chunk data still to come
        self.state = "size"    # size, data, data_crlf, trailer
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        out: list[bytes] = []
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        while pos < len(buf) and not self.done:
            if self.state == "data":
                n = min(self.left, len(buf) - pos)
                out.append(buf[pos:pos + n])
                pos += n
                self.left -= n
                if self.left == 0:
                    self.state = "data_crlf"
                continue
            if self.state == "data_crlf" and len(buf) - pos >= 2 and buf[pos:pos + 2] != b"\r\n":
                raise HTTPError(self.status, "malformed chunk: no CRLF after the data")
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > self.MAX_LINE:
                    raise HTTPError(self.status, "chunk framing line too long")
                break
            line = buf[pos:end]
            pos = end + 2
            if self.state == "data_crlf":
                if line:
                    raise HTTPError(self.status, "malformed chunk: no CRLF after the data")
                self.state = "size"
            elif self.state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise HTTPError(self.status, "malformed chunk size")
                self.left = int(size, 16)
                self.state = "data" if self.left else "trailer"
            else:  # trailer section: lines until an empty one
                if not line:
                    self.done = True
        rest = buf[pos:]
        if not self.done:
            self.buf = rest
            rest = b""
        return [p for p in out if p], rest


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"

"""Link translation in response bodies: internal URLs become external URLs, streaming.

What Microsoft Entra application proxy calls "translate URLs in application body": an HTML
page, a script or a style sheet that names ``http://wiki.corp:8080/...`` reaches the browser
naming ``https://wiki.apps.example.test/...`` instead. Pure code, no I/O, bounded memory:

- ``LinkMap.from_apps(apps)`` compiles every published web app's internal URL into one
  regular expression (a body may link to any published app, not only the one serving it).
- ``should_translate(content_type, content_encoding)`` says whether a response body is one we
  translate; ``accept_encoding_for_translation(value)`` is the Accept-Encoding to send to the
  back end so the body comes back in a coding we can undo (gzip, deflate or none).
- ``translator_for_response(link_map, method, status, headers)`` is the one call the front door
  makes per response: a translator (or None) and the headers to send instead.
- ``LinkTranslator(link_map, content_encoding)`` is fed the body piece by piece
  (``feed(data) -> bytes``, then ``finish() -> bytes``). It holds back at most
  ``link_map.carry_limit`` bytes (a link may straddle two pieces), so the output is the same
  however the body is split. A gzip or deflate body is inflated, translated and deflated again
  in bounded pieces, with a guard against decompression bombs.

Forms translated, for ``internal_url = "http://wiki.corp:8080/"``::

    http://wiki.corp:8080/x            plain (scheme and host in any case)
    //wiki.corp:8080/x                 scheme-relative (not when preceded by ":", i.e. another scheme)
    http:\\/\\/wiki.corp:8080\\/x         JavaScript / JSON string escapes, and \\/\\/wiki.corp:8080\\/x
    http%3A%2F%2Fwiki.corp%3A8080%2Fx  percent-encoded (?returnUrl=...), and %2F%2Fwiki.corp...

and for an internal URL on its scheme's default port (``http://corp/``) both ``http://corp/x``
and ``http://corp:80/x``.

The internal path prefix maps to the external one (``http://corp/wiki/x`` ->
``https://wiki.example.test/x`` for an app published from ``/wiki/``); ``http://corp/wiki``
without the slash counts too when the URL ends there. The most specific prefix wins. Not
translated: a longer host that merely starts with the internal one (``wiki.corp.evil``,
``wiki.corpx``), another port or scheme, user info (``http://wiki.corp@evil/``), bare host
names without a scheme or ``//``, relative links (they already resolve against the external
URL; Entra does not translate them either), HTML entities (``&#x2F;``), ``\\u002F`` escapes,
double %-encoding, and the internal URL's origin under another scheme (``https://wiki.corp:8080``
is another site than ``http://wiki.corp:8080``).

Body length changes, so a translated response must not carry the back end's Content-Length
(nor Content-MD5/Digest, and a strong ETag no longer describes the bytes): send it chunked to an
HTTP/1.1 client, close-delimited to an HTTP/1.0 one.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Iterable, Iterator
from urllib.parse import quote, urlsplit

from attrs import field, frozen

from gateway.errors import GatewayError

DEFAULT_PORTS = {"http": 80, "https": 443}

TRANSLATED_TYPES = frozenset({
    b"text/html", b"application/xhtml+xml", b"text/css",
    b"application/javascript", b"text/javascript", b"application/x-javascript",
    b"application/ecmascript", b"text/ecmascript",
})
JSON_TYPES = frozenset({b"application/json"})
GZIP_CODINGS = frozenset({b"gzip", b"x-gzip"})
DECODABLE = GZIP_CODINGS | {b"deflate"}

# Decompression bomb guard: a body may inflate to BOMB_ALLOWANCE bytes freely, beyond that to at
# most MAX_RATIO times the compressed bytes read so far. Text compresses 3-20x; zlib's ceiling is
# about 1032x, so 200x only ever trips on data made to expand.
MAX_RATIO = 200
BOMB_ALLOWANCE = 1024 * 1024
# Inflated bytes handled at a time: what bounds memory, whatever the ratio.
PIECE = 64 * 1024
# Re-compression level: on text, zlib's default (6) runs about 3x slower than 4 for output 2% smaller
# (nginx's gzip_comp_level defaults to 1).
COMPRESS_LEVEL = 4

# Bytes of look-behind a match may need before its start (the "%3A" before a scheme-relative
# "%2F%2F"); look-ahead is counted per alternative (_Form.ahead).
BEHIND = 3

# Characters that would continue a host, port, user info or path segment: a URL that goes on
# with one of these is not the internal URL (wiki.corpx, wiki.corp.evil, wiki.corp:9999,
# wiki.corp@evil, /wikipedia for the prefix /wiki/).
_END = rb"(?=[^A-Za-z0-9._~:@%\-]|\Z)"
_END_PERCENT = rb"(?=%(?:2[fF]|3[fF]|23|26)|[^A-Za-z0-9._~:@%\-]|\Z)"


class TranslationError(GatewayError):
    """A response body could not be translated (a corrupt or truncated compressed body).

    Raised by ``LinkTranslator.feed``/``finish``. Before the response head went out, answer
    502; after, abort the client connection (no last chunk) so the client sees a truncated
    response, not a complete wrong one.
    """


class DecompressionBomb(TranslationError):
    """A compressed body inflated beyond ``MAX_RATIO`` times its size (after ``BOMB_ALLOWANCE``)."""


# -- patterns ----------------------------------------------------------------------------------


@frozen
class _Form:
    """How a URL is spelled in one encoding: its separators, and how to match its text."""

    colon_slashes: str       # "://"
    slash: str               # "/"
    colon: str               # ":" between host and port
    behind: bytes            # what must not precede a scheme-relative "//"
    end: bytes               # look-ahead after a URL that stops at the authority or prefix
    ahead: int               # bytes ``end`` may read
    percent: bool = False

    def text(self, s: str) -> str:
        """``s`` (host, path segment) as this form writes it."""
        return quote(s, safe="") if self.percent else s


_PLAIN = _Form("://", "/", ":", rb"(?<!:)", _END, 1)
_JS = _Form(r":\/\/", r"\/", ":", rb"(?<!:)", _END, 1)
_PERCENT = _Form("%3A%2F%2F", "%2F", "%3A", rb"(?<!%3[aA])", _END_PERCENT, 3, percent=True)
_FORMS = (_PLAIN, _JS, _PERCENT)


def _literal(s: str) -> bytes:
    """A regex matching ``s`` exactly, but for the hex digits of %-escapes in either case."""
    out = []
    for part in re.split(r"(%[0-9A-Fa-f]{2})", s):
        if part.startswith("%") and len(part) == 3:
            out.append("%" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in part[1:]))
        elif part:
            out.append(re.escape(part))
    return "".join(out).encode("utf-8")


def _authority_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@frozen
class _Url:
    scheme: str
    host: str       # lower case, no brackets
    port: int
    path: str       # prefix, ends with "/"

    @classmethod
    def parse(cls, url: str) -> _Url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        path = parts.path or "/"
        if not path.endswith("/"):
            path += "/"
        return cls(scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS[scheme], path)

    @property
    def default_port(self) -> bool:
        return self.port == DEFAULT_PORTS[self.scheme]

    def authority(self, form: _Form) -> str:
        host = form.text(_authority_host(self.host))
        return host if self.default_port else f"{host}{form.colon}{self.port}"

    def path_in(self, form: _Form, path: str) -> str:
        return form.slash.join(form.text(segment) for segment in path.split("/"))


@frozen
class _Alternative:
    regex: bytes
    replacement: bytes
    reach: int            # bytes from its start this alternative may read: its longest text and look-ahead
    specificity: int      # length of the internal path prefix: longer prefixes are tried first
    lead: bytes           # what every match starts with, lower case: "http://", "//", "http%3a%2f%2f"...
    anchor: bytes         # the host as this alternative spells it, lower case: every match holds it


def _alternatives(internal: _Url, external: _Url) -> Iterator[_Alternative]:
    """The ways a body may name ``internal``, each with what replaces it."""
    # "http://corp/wiki" (no slash, the URL ends there) maps to the external prefix without its
    # slash; the bare origin "http://corp" keeps its shape unless the external prefix is deeper.
    short_external = external.path if internal.path == "/" and external.path != "/" else external.path[:-1]
    for form in _FORMS:
        host = form.text(_authority_host(internal.host))
        port = f"{form.colon}{internal.port}"
        host_port = _literal(host) + (b"(?:" + _literal(port) + b")?" if internal.default_port else _literal(port))
        longest_authority = len(host) + len(port)
        for absolute in (True, False):
            if absolute:
                lead = internal.scheme + form.colon_slashes
                start = b"(?i:" + _literal(lead) + host_port + b")"
                origin = external.scheme + form.colon_slashes + external.authority(form)
            else:
                lead = form.slash * 2
                start = form.behind + b"(?i:" + _literal(lead) + host_port + b")"
                origin = lead + external.authority(form)
            anchor = host.lower().encode("utf-8")
            longest = len(lead) + longest_authority
            lead_bytes = lead.lower().encode("utf-8")
            prefix = internal.path_in(form, internal.path)
            yield _Alternative(start + _literal(prefix),
                               (origin + external.path_in(form, external.path)).encode("utf-8"),
                               longest + len(prefix), len(internal.path), lead_bytes, anchor)
            short = internal.path_in(form, internal.path[:-1])
            yield _Alternative(start + _literal(short) + form.end,
                               (origin + external.path_in(form, short_external)).encode("utf-8"),
                               longest + len(short) + form.ahead, len(internal.path), lead_bytes, anchor)


@frozen
class _Lead:
    """The alternatives that start with one lead (``text``), in the map's order."""

    text: bytes
    pattern: re.Pattern[bytes]
    replacements: tuple[bytes, ...]


def _join(alternatives: list[_Alternative]) -> re.Pattern[bytes]:
    return re.compile(b"|".join(b"(" + a.regex + b")" for a in alternatives))


@frozen
class LinkMap:
    """Every internal URL a body may name, and what replaces each.

    ``pattern`` is all of them in one regex, the most specific first; ``translate`` and
    ``LinkTranslator`` replace exactly what ``pattern.finditer`` finds, but faster: Python's re
    has no multi-string search, and trying a big alternation at every byte runs at about 1 MB/s.
    So we find the hosts (``anchors``: bytes.find on the lower-cased text), look for a lead
    ("http://", "//", ...) where each occurrence says a match would start, and only there try
    the smaller pattern of the alternatives with that lead. No lead is a prefix of another, so at
    most one fits a position.

    ``carry_limit`` is the most bytes a ``LinkTranslator`` on this map holds back between
    pieces: the most bytes a match may read from its start (its text and look-ahead), less one.
    """

    pattern: re.Pattern[bytes] | None
    replacements: tuple[bytes, ...]
    reach: int
    anchors: tuple[tuple[bytes, tuple[int, ...]], ...]            # (host, lead lengths before it)
    leads: dict[int, tuple[_Lead, ...]] = field(eq=False)        # by length

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> LinkMap:
        """From ``(internal_url, external_url)`` pairs; for one internal URL the first pair wins."""
        alternatives: list[_Alternative] = []
        seen: set[_Url] = set()
        for internal_url, external_url in pairs:
            internal, external = _Url.parse(internal_url), _Url.parse(external_url)
            if internal in seen or external.host.startswith("*."):
                continue   # a wildcard app has no one external host to link to
            seen.add(internal)
            alternatives.extend(_alternatives(internal, external))
        if not alternatives:
            return cls(None, (), 0, (), {})
        # Stable sort: the longest internal prefix first, so http://corp/wiki/x goes to the app
        # at /wiki/ rather than the one at /; at one prefix, "with slash" before "URL ends here".
        alternatives.sort(key=lambda a: -a.specificity)
        anchors: dict[bytes, set[int]] = {}
        by_lead: dict[bytes, list[_Alternative]] = {}
        for a in alternatives:
            anchors.setdefault(a.anchor, set()).add(len(a.lead))
            by_lead.setdefault(a.lead, []).append(a)
        leads: dict[int, list[_Lead]] = {}
        for text, group in by_lead.items():
            assert not any(other != text and other.startswith(text) for other in by_lead), text
            leads.setdefault(len(text), []).append(_Lead(text, _join(group), tuple(a.replacement for a in group)))
        return cls(_join(alternatives), tuple(a.replacement for a in alternatives),
                   max(a.reach for a in alternatives),
                   tuple((host, tuple(sorted(offsets))) for host, offsets in anchors.items()),
                   {n: tuple(group) for n, group in leads.items()})

    @classmethod
    def from_apps(cls, apps: Iterable[Any]) -> LinkMap:
        """From web apps (``gateway.config.AppConfig`` with ``external_url`` and ``internal_url``);
        apps without both, and wildcard external hosts, are left out."""
        return cls.from_pairs((app.internal_url, app.external_url) for app in apps
                              if getattr(app, "internal_url", "") and getattr(app, "external_url", ""))

    @property
    def empty(self) -> bool:
        return self.pattern is None

    @property
    def carry_limit(self) -> int:
        return self.reach - 1 if self.pattern is not None else 0

    def translate(self, text: bytes) -> bytes:
        """A whole uncompressed text translated at once (what a LinkTranslator's pieces add up to)."""
        translator = _Text(self)
        return translator.feed(text, final=True)

    def scan(self, buf: bytes, begin: int, limit: int) -> tuple[list[bytes], int]:
        """Translate the matches in ``buf`` that start in [begin, limit), as ``pattern.finditer``
        would find them from ``begin``: (pieces of output for buf[begin:end], end). ``end`` is
        ``begin`` or the end of the last match; bytes before ``begin`` are look-behind only."""
        if self.pattern is None or limit <= begin:
            return [], begin
        lower = buf.lower()   # ASCII only: same length, same offsets
        candidates: dict[int, _Lead] = {}
        for host, offsets in self.anchors:
            at = lower.find(host, begin)
            while at >= 0 and at - offsets[-1] < limit:   # the earliest start it implies
                for offset in offsets:
                    start = at - offset
                    if begin <= start < limit and start not in candidates:
                        for lead in self.leads[offset]:
                            if lower.startswith(lead.text, start):
                                candidates[start] = lead
                                break
                at = lower.find(host, at + 1)
        out: list[bytes] = []
        pos = begin
        # every match starts at one of these, so the first that matches is the leftmost match
        for start in sorted(candidates):
            if start < pos:
                continue   # inside the match just replaced
            lead = candidates[start]
            match = lead.pattern.match(buf, start)
            if match is not None:
                out.append(buf[pos:start])
                out.append(lead.replacements[match.lastindex - 1])  # type: ignore[operator]
                pos = match.end()
        return out, pos


# -- header helpers ----------------------------------------------------------------------------


def _codings(content_encoding: bytes | None) -> list[bytes]:
    """The content codings applied, identity left out, in order; lower case."""
    if not content_encoding:
        return []
    codings = [c.strip().lower() for c in content_encoding.split(b",")]
    return [c for c in codings if c and c != b"identity"]


def should_translate(content_type: bytes | None, content_encoding: bytes | None, *, json: bool = False) -> bool:
    """True for an HTML, CSS or JavaScript body (JSON too with ``json=True``) that is
    uncompressed, gzip or deflate. The front door should also leave alone responses without a
    body (HEAD, 1xx, 204, 304) and partial ones (206, or any with Content-Range)."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    if media not in TRANSLATED_TYPES and not (json and (media in JSON_TYPES or media.endswith(b"+json"))):
        return False
    codings = _codings(content_encoding)
    return len(codings) <= 1 and all(c in DECODABLE for c in codings)


# Response headers that describe the back end's exact bytes, which translation changes.
_LENGTH_BOUND = frozenset({b"content-length", b"content-md5", b"digest", b"repr-digest", b"content-digest",
                           b"accept-ranges"})


def translator_for_response(link_map: LinkMap, method: bytes, status: int,
                            headers: list[tuple[bytes, bytes]], *, json: bool = False,
                            ) -> tuple[LinkTranslator | None, list[tuple[bytes, bytes]]]:
    """For one back-end response: ``(translator, headers to send)``, or ``(None, headers)``
    unchanged when its body is left alone (no web apps, HEAD, 1xx/204/304, a partial 206 or
    Content-Range, a type or coding ``should_translate`` refuses).

    With a translator, the headers lose Content-Length, Accept-Ranges and digests of the old
    bytes, and a strong ETag becomes weak (the body is equivalent, not byte-identical); the
    caller frames the body itself (chunked, or close-delimited for HTTP/1.0).
    """
    def one(name: bytes) -> bytes | None:
        values = [v for k, v in headers if k.lower() == name]
        return b", ".join(values) if values else None

    if (link_map.empty or method == b"HEAD" or status < 200 or status in (204, 206, 304)
            or one(b"content-range") is not None
            or not should_translate(one(b"content-type"), one(b"content-encoding"), json=json)):
        return None, headers
    kept = []
    for k, v in headers:
        name = k.lower()
        if name in _LENGTH_BOUND:
            continue
        if name == b"etag" and not v.lstrip().startswith(b"W/"):
            v = b"W/" + v.lstrip()
        kept.append((k, v))
    return LinkTranslator(link_map, one(b"content-encoding")), kept


def accept_encoding_for_translation(value: bytes | None) -> bytes:
    """The Accept-Encoding to send the back end for an app whose bodies are translated: the
    client's gzip/deflate/identity entries (br, zstd, compress and * dropped, as we cannot undo
    them), and ``identity`` when nothing acceptable is left. The back end then answers in a
    coding the client also accepts, so what we re-compress needs no renegotiation."""
    kept: list[bytes] = []
    acceptable = False
    for item in (value or b"").split(b","):
        item = item.strip()
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        if coding not in DECODABLE and coding != b"identity":
            continue
        q = _quality(params)
        if coding == b"identity" and q == 0:
            continue   # identity is our fallback: never let the back end refuse it
        kept.append(item)
        acceptable = acceptable or q > 0
    if not acceptable:
        kept.append(b"identity")
    return b", ".join(kept)


def _quality(params: bytes) -> float:
    for param in params.split(b";"):
        key, _, q = param.partition(b"=")
        if key.strip().lower() == b"q":
            try:
                return float(q.strip())
            except ValueError:
                return 1.0
    return 1.0


# -- the streaming translator ------------------------------------------------------------------


class _Text:
    """Translates uncompressed text piece by piece, holding back what a link may still need."""

    def __init__(self, link_map: LinkMap) -> None:
        self.map = link_map
        self.behind = b""   # the last original bytes before ``carry``: look-behind context only
        self.carry = b""    # original bytes not yet translated: at most link_map.carry_limit

    def feed(self, data: bytes, final: bool = False) -> bytes:
        pattern = self.map.pattern
        if pattern is None:
            return data
        buf = self.behind + self.carry + data if self.behind or self.carry else data
        begin = len(self.behind)
        # A match starting before ``limit`` has all its bytes and look-ahead in ``buf``, so it is
        # the match the whole body would give; later ones may still grow or fail.
        limit = len(buf) if final else len(buf) - self.map.carry_limit
        out, pos = self.map.scan(buf, begin, limit)
        cut = max(pos, limit)
        out.append(buf[pos:cut])
        self.carry = buf[cut:]
        self.behind = buf[max(0, cut - BEHIND):cut]
        return b"".join(out)


class LinkTranslator:
    """One response body: ``feed(data)`` for each piece, then ``finish()`` once; each returns
    the bytes to send on (possibly empty). The output is in ``content_encoding`` as the input
    was, except that deflate always comes out zlib-wrapped (RFC 9110's "deflate").

    A compressed body is flushed (Z_SYNC_FLUSH) at the end of every ``feed`` that produced
    text, so a streamed page keeps streaming; an uncompressed one holds back at most
    ``link_map.carry_limit`` bytes. Raises ``TranslationError`` (``DecompressionBomb``) on a
    body it cannot inflate; ``ValueError`` for a coding ``should_translate`` refuses.
    """

    def __init__(self, link_map: LinkMap, content_encoding: bytes | None = None, *,
                 max_ratio: int = MAX_RATIO, bomb_allowance: int = BOMB_ALLOWANCE) -> None:
        codings = _codings(content_encoding)
        if len(codings) > 1 or not all(c in DECODABLE for c in codings):
            raise ValueError(f"cannot translate a body with Content-Encoding {content_encoding!r}; "
                             "check should_translate() first")
        self.coding = codings[0] if codings else None
        self._text = _Text(link_map)
        self._max_ratio = max_ratio
        self._bomb_allowance = bomb_allowance
        self._finished = False
        self._read = 0          # compressed bytes fed
        self._inflated = 0      # bytes they inflated to
        self._head = b""        # the first bytes of a deflate body, until we know its wrapper
        self._inflater: Any = None
        self._deflater: Any = None
        self._pending = False   # text handed to the deflater since its last flush
        if self.coding in GZIP_CODINGS:
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._deflater = zlib.compressobj(COMPRESS_LEVEL, wbits=16 + zlib.MAX_WBITS)
        elif self.coding == b"deflate":
            self._deflater = zlib.compressobj(COMPRESS_LEVEL, wbits=zlib.MAX_WBITS)

    @property
    def carry(self) -> int:
        """Bytes of (uncompressed) text held back now; never more than ``link_map.carry_limit``."""
        return len(self._text.carry)

    def feed(self, data: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("LinkTranslator.feed after finish")
        if self._deflater is None:
            return self._text.feed(data)
        self._read += len(data)
        out = [self._deflate(self._text.feed(piece)) for piece in self._inflate(data)]
        if self._pending:
            out.append(self._deflater.flush(zlib.Z_SYNC_FLUSH))
            self._pending = False
        return b"".join(out)

    def finish(self) -> bytes:
        if self._finished:
            raise RuntimeError("LinkTranslator.finish called twice")
        self._finished = True
        if self._deflater is None:
            return self._text.feed(b"", final=True)
        if self._read == 0:
            return b""   # an empty body stays empty
        out = [self._deflate(self._text.feed(piece)) for piece in self._inflate(b"", final=True)]
        out.append(self._deflate(self._text.feed(b"", final=True)))
        out.append(self._deflater.flush(zlib.Z_FINISH))
        return b"".join(out)

    def _deflate(self, text: bytes) -> bytes:
        if not text:
            return b""
        self._pending = True
        return self._deflater.compress(text)

    def _inflate(self, data: bytes, final: bool = False) -> Iterator[bytes]:
        """Inflated text in pieces of at most PIECE bytes, the bomb guard checked on each."""
        if self._inflater is None:
            # deflate: zlib-wrapped as RFC 9110 says, or raw as some servers send it; the first
            # two bytes tell (a zlib header is CM=8 and a multiple of 31).
            self._head += data
            if len(self._head) < 2 and not final:
                return
            head = self._head
            zlib_header = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
            data, self._head = head, b""
        try:
            while True:
                if self._inflater.eof:
                    rest = self._inflater.unused_data + data
                    if not rest:
                        break
                    if self.coding not in GZIP_CODINGS:
                        raise TranslationError("the back end sent data after the end of its deflate body")
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)   # the next gzip member
                    data = rest
                piece = self._inflater.decompress(data, PIECE)
                data = self._inflater.unconsumed_tail
                if piece:
                    self._inflated += len(piece)
                    if self._inflated > max(self._bomb_allowance, self._max_ratio * self._read):
                        raise DecompressionBomb(
                            f"the back end's {self.coding.decode()} body inflates to more than "
                            f"{self._max_ratio} times its size ({self._inflated} bytes from {self._read}); "
                            "refusing to translate it (turn link translation off for this app if that is expected)")
                    yield piece
                if not data and len(piece) < PIECE and not self._inflater.eof:
                    break   # all input used and no more output pending
            if final and not self._inflater.eof:
                raise TranslationError(f"the back end's {self.coding.decode()} body ended before its "
                                       "compressed data did (truncated or corrupt)")
        except zlib.error as e:
            raise TranslationError(f"the back end's {self.coding.decode()} body is corrupt: {e}") from None

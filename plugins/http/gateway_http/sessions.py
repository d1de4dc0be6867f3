"""Sealed cookies of pre-authentication: the session and the pending sign-in, and their keys.

A cookie value is ``v1.`` + base64url(nonce || AES-256-GCM(zlib(JSON))). The associated data
names the cookie's purpose and the app, so a value made for one app (or for a pending sign-in)
never opens as another app's session. Nothing here does network I/O; the key is a file in the
service state dir made once with mode 0600, so sessions survive a restart (several nodes behind
one name share sessions by sharing this file).

Tampered, truncated, expired or foreign values all decode to None: the caller starts a fresh
sign-in, the user never sees an error for a bad cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = b"v1."
SESSION_COOKIE = "gateway_session"
SIGNIN_COOKIE = "gateway_signin"
# Browsers keep cookies of up to 4096 bytes (name, value and attributes); stay well below.
MAX_COOKIE_VALUE = 3600
KEY_FILE = "http-session.key"

Headers = list[tuple[bytes, bytes]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def read_or_make_secret(path: Path, make: Any) -> bytes:
    """The bytes in ``path``; made once by ``make()`` and written with mode 0600 if absent.

    O_EXCL makes the first writer win when two processes start at once; the loser reads.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process got there first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


class Sealer:
    """Seal and open small JSON documents with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the session key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> Sealer:
        return cls(read_or_make_secret(Path(state_dir) / KEY_FILE, lambda: os.urandom(32)))

    def seal(self, purpose: str, document: dict[str, Any]) -> str:
        plain = zlib.compress(json.dumps(document, separators=(",", ":")).encode("utf-8"))
        nonce = os.urandom(12)
        return PREFIX.decode() + b64url(nonce + self._aead.encrypt(nonce, plain, purpose.encode("utf-8")))

    def open(self, purpose: str, value: str, now: float) -> dict[str, Any] | None:
        """The document, or None if the value is not ours, was altered, or its ``exp`` passed."""
        raw = value.encode("ascii", "replace")
        if not raw.startswith(PREFIX) or len(raw) > 8192:
            return None
        try:
            blob = unb64url(raw[len(PREFIX):])
            if len(blob) < 12 + 16:
                return None
            plain = self._aead.decrypt(blob[:12], blob[12:], purpose.encode("utf-8"))
            document = json.loads(zlib.decompress(plain, bufsize=4096))
        except (InvalidTag, ValueError, binascii.Error, zlib.error, UnicodeDecodeError):
            return None
        if not isinstance(document, dict):
            return None
        exp = document.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= now:
            return None
        return document


# -- cookie names and headers -------------------------------------------------------------------


def app_tag(app_name: str) -> str:
    """A short, cookie-name-safe tag per app: apps on one host keep separate sessions."""
    return hashlib.sha256(app_name.encode("utf-8")).hexdigest()[:8]


def session_cookie_name(app_name: str) -> str:
    return f"{SESSION_COOKIE}_{app_tag(app_name)}"


def signin_cookie_name(state: str) -> str:
    """One pending sign-in cookie per state, so sign-ins in several tabs do not undo each other."""
    return f"{SIGNIN_COOKIE}_{hashlib.sha256(state.encode('ascii', 'replace')).hexdigest()[:12]}"


def parse_cookies(headers: Headers) -> list[tuple[str, str]]:
    """Every ``name=value`` pair of the request's Cookie headers, in order (values unquoted)."""
    pairs = []
    for name, value in headers:
        if name.lower() != b"cookie":
            continue
        for piece in value.decode("latin-1").split(";"):
            k, eq, v = piece.strip().partition("=")
            if eq and k:
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    v = v[1:-1]
                pairs.append((k.strip(), v))
    return pairs


def is_ours(cookie_name: str) -> bool:
    """A session or sign-in cookie of the gateway, in any letter case (a back end may not care)."""
    return cookie_name.strip().lower().startswith((SESSION_COOKIE + "_", SIGNIN_COOKIE + "_"))


def strip_our_cookies(value: bytes) -> bytes:
    """A Cookie header value without the gateway's cookies (b"" if nothing else is left); the
    client's other cookies keep their bytes and their order.

    Every request to a back end goes through this, so a value naming none of ours is returned
    as it is."""
    if b"gateway_" not in value.lower():
        return value
    kept = [p for p in value.split(b";") if p.strip() and not is_ours(p.partition(b"=")[0].decode("latin-1"))]
    return b";".join(kept).lstrip(b" \t")


def set_cookie(name: str, value: str, path: str, secure: bool, max_age: int | None) -> bytes:
    """A Set-Cookie value: host-only (no Domain), HttpOnly, SameSite=Lax (the provider's redirect
    back to the callback is a cross-site top-level GET, which Lax lets through)."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode("latin-1")


def clear_cookie(name: str, path: str, secure: bool) -> bytes:
    return set_cookie(name, "", path, secure, 0)

"""Signed update manifests: what a release is (version, wheel, sha256, mode) and who vouches for it.

The admin signs with an ed25519 key that never leaves their machine (`gateway update sign`); the
service only stores and serves the signed document (`gateway update publish`); each updater pins
the public keys it trusts and checks the signature before it looks at anything else. Codec and
checks only: no I/O.

A signed manifest is a JSON object::

    {"format": 1, "manifest": {"version": "...", "wheel": "...whl", "sha256": "...", "size": N,
     "mode": "auto"}, "key_id": "16 hex", "signature": "base64 of 64 bytes"}

The signature covers the canonical JSON of ``manifest`` (sorted keys, no spaces, UTF-8), so the
bytes checked are re-made from the parsed object: no whitespace or key order can smuggle a
second meaning past it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from attrs import asdict, frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import GatewayError

FORMAT = 1
MODES = ("auto", "manual")
PUBLIC_KEY_PREFIX = "ed25519:"
# A wheel file name (PEP 427) with nothing that could name another directory.
WHEEL_RE = re.compile(r"[A-Za-z0-9_]+-[A-Za-z0-9_.!+]+(-[0-9][A-Za-z0-9_]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl\Z")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
# A signed manifest is a few hundred bytes; anything much larger is not one.
MAX_DOCUMENT = 16 * 1024


class ManifestRefused(GatewayError):
    """A manifest that is malformed or not signed by a pinned key."""


@frozen
class Manifest:
    """One release: the wheel's file name, its sha256 and size, and whether updaters apply it alone."""

    version: str
    wheel: str
    sha256: str
    size: int
    mode: str = "auto"

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")


def wheel_version(name: str) -> str:
    """The version field of a wheel file name (``gateway-0.2.0-py3-none-any.whl`` -> ``0.2.0``)."""
    if not WHEEL_RE.match(name):
        raise ManifestRefused(f"{name!r} is not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl)")
    return name.split("-")[1]


def parse_manifest(value: Any) -> Manifest:
    """A Manifest from its JSON object, every field checked; ManifestRefused names the bad one."""
    if not isinstance(value, dict):
        raise ManifestRefused("the manifest is not a JSON object")
    version, wheel, sha256, size, mode = (value.get(k) for k in ("version", "wheel", "sha256", "size", "mode"))
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ManifestRefused(f"manifest version must be a version string, got {version!r}")
    if not isinstance(wheel, str) or wheel_version_or_none(wheel) != version:
        raise ManifestRefused(f"manifest wheel must be a wheel file name of version {version}, got {wheel!r}")
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise ManifestRefused(f"manifest sha256 must be 64 lower-case hex digits, got {sha256!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ManifestRefused(f"manifest size must be a positive number of bytes, got {size!r}")
    if mode not in MODES:
        raise ManifestRefused(f"manifest mode must be one of {', '.join(MODES)}, got {mode!r}")
    extra = sorted(set(value) - {"version", "wheel", "sha256", "size", "mode"})
    if extra:
        raise ManifestRefused(f"manifest has fields this updater does not know: {', '.join(extra)}")
    return Manifest(version=version, wheel=wheel, sha256=sha256, size=size, mode=mode)


def wheel_version_or_none(name: str) -> str | None:
    try:
        return wheel_version(name)
    except ManifestRefused:
        return None


# -- keys ----------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(data: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ManifestRefused(f"{source} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestRefused(f"{source} is not an ed25519 key (make one with `gateway update keygen`)")
    return key


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:`` and the base64 of the 32 raw bytes: what `[updater] public_keys` lists."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: Any) -> Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise ManifestRefused(f"a public key must read {PUBLIC_KEY_PREFIX}BASE64 (from `gateway update keygen`),"
                              f" got {text!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ManifestRefused(f"{text!r} is not the base64 of a 32-byte ed25519 public key") from None


def key_id(key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key: names a key in messages."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signing and checking ------------------------------------------------------------------------


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed document for `manifest` (a JSON-ready dict)."""
    return {
        "format": FORMAT,
        "manifest": asdict(manifest),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest.canonical())).decode("ascii"),
    }


def encode_document(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def decode_document(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT:
        raise ManifestRefused(f"a signed manifest is at most {MAX_DOCUMENT} bytes, got {len(data)}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestRefused(f"the signed manifest is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ManifestRefused("the signed manifest is not a JSON object")
    return value


def verify(document: Any, keys: list[Ed25519PublicKey]) -> Manifest:
    """The manifest of a signed document if one of `keys` signed it; ManifestRefused otherwise.

    The signature is checked before any field of the manifest is trusted, over the canonical
    bytes of the manifest object as received.
    """
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ManifestRefused(f"not a signed update manifest of format {FORMAT}"
                              f" (format {document.get('format') if isinstance(document, dict) else None!r})")
    body, signature = document.get("manifest"), document.get("signature")
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise ManifestRefused("the signed manifest lacks its manifest object or its signature")
    try:
        signature_bytes = base64.b64decode(signature, validate=True)
    except binascii.Error:
        raise ManifestRefused("the manifest's signature is not base64") from None
    signed = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    for key in keys:
        try:
            key.verify(signature_bytes, signed)
        except InvalidSignature:
            continue
        return parse_manifest(body)
    pinned = ", ".join(key_id(k) for k in keys) or "none"
    raise ManifestRefused(
        f"the manifest's signature does not verify with any pinned key (signed by key"
        f" {document.get('key_id')!r}; pinned: {pinned}); it was not signed by your update key or was altered"
    )


def file_digest(path: Any) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size

"""Enrolment tokens (`gw1.<token_id>.<secret>.<CA fingerprint hex>`) and Private Access
personal tokens (`gwu1.<credential id>.<secret>.<CA fingerprint hex>`)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import ClassVar, Self

import attrs
from attrs import frozen

from gateway.errors import AdminTokenError, EnrolmentError, UserCredentialError
from gateway.pki.keys import FINGERPRINT_PREFIX

TOKEN_PREFIX = "gw1"
_ID_BYTES = 8
_SECRET_BYTES = 32
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
# token_urlsafe(32) is 43 characters of base64url; it never contains the "." separator.
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_FINGERPRINT_HEX = re.compile(r"[0-9a-f]{64}")
_ADVICE = "copy the whole token again, or create a new one on the service"


USER_TOKEN_PREFIX = "gwu1"
ADMIN_TOKEN_PREFIX = "gwa1"
_USER_ADVICE = "copy the whole token again, or ask your administrator for a new one (gateway users token create)"
# What a token of the other kind is, when one is given for the other.
_KINDS = {TOKEN_PREFIX: "that is a connector enrolment token",
          USER_TOKEN_PREFIX: "that is a Private Access personal token, for gateway login",
          ADMIN_TOKEN_PREFIX: "that is an admin API token, for the admin API and the status page"}


@frozen
class _Token:
    """`<PREFIX>.<id>.<secret>.<CA fingerprint hex>`: which record, its secret, and which CA to trust."""

    PREFIX: ClassVar[str]

    token_id: str
    secret: str = attrs.field(repr=False)
    ca_fingerprint: str  # "sha256:<64 hex>", as keys.fingerprint returns

    @classmethod
    def generate(cls, ca_fingerprint: str) -> Self:
        """A fresh token with a random id and secret for the CA with this fingerprint."""
        return cls(
            token_id=secrets.token_hex(_ID_BYTES),
            secret=secrets.token_urlsafe(_SECRET_BYTES),
            ca_fingerprint=FINGERPRINT_PREFIX + _fingerprint_hex(ca_fingerprint),
        )

    def encode(self) -> str:
        """The single-line text an admin hands over."""
        return ".".join((self.PREFIX, self.token_id, self.secret, _fingerprint_hex(self.ca_fingerprint)))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse `encode()`'s output; the error names the bad part but never shows the secret."""
        parts = text.strip().split(".")
        if len(parts) != 4:
            raise cls._malformed(f"expected 4 parts separated by '.' ({cls.PREFIX}.<id>.<secret>.<fingerprint>),"
                                 f" found {len(parts)}")
        prefix, token_id, secret, fp_hex = parts
        if prefix != cls.PREFIX:
            raise cls._malformed(f"it does not start with '{cls.PREFIX}.' ({_KINDS.get(prefix, 'an unknown token format')})")
        if not _TOKEN_ID.fullmatch(token_id):
            raise cls._malformed("the id (second part) is not 16 hex digits")
        if not _SECRET.fullmatch(secret):
            raise cls._malformed("the secret (third part) is not 43 base64url characters")
        fp_hex = fp_hex.lower()
        if not _FINGERPRINT_HEX.fullmatch(fp_hex):
            raise cls._malformed("the CA fingerprint (fourth part) is not 64 hex digits")
        return cls(token_id, secret, FINGERPRINT_PREFIX + fp_hex)

    @classmethod
    def _malformed(cls, what: str) -> Exception:
        """The error for a malformed token of this kind (each kind's own, with its advice)."""
        raise NotImplementedError


@frozen
class EnrolmentToken(_Token):
    """What a connector needs to enrol: which token, its secret, and which CA to trust."""

    PREFIX: ClassVar[str] = TOKEN_PREFIX

    @classmethod
    def _malformed(cls, what: str) -> EnrolmentError:
        return EnrolmentError(f"malformed enrolment token: {what}: {_ADVICE}")


@frozen
class UserToken(_Token):
    """A personal token an admin issued a Private Access user (`gateway users token create`):
    which user credential (``token_id``), its secret, and which CA the user's client must trust.
    Malformed ones are UserCredentialError with code "unknown"."""

    PREFIX: ClassVar[str] = USER_TOKEN_PREFIX

    @classmethod
    def _malformed(cls, what: str) -> UserCredentialError:
        return UserCredentialError("unknown", f"malformed personal token: {what}: {_USER_ADVICE}")


@frozen
class AdminToken(_Token):
    """A token for the admin API and the status page (`gateway admin token create`): which admin
    token record, its secret, and which CA signs the admin listener's certificate."""

    PREFIX: ClassVar[str] = ADMIN_TOKEN_PREFIX

    @classmethod
    def _malformed(cls, what: str) -> AdminTokenError:
        return AdminTokenError("unknown", f"malformed admin token: {what}: copy the whole token again, or create"
                                          " one on the service with `gateway admin token create`")


def hash_secret(secret: str) -> str:
    """sha256 hex of the secret: the store keeps only this, so a leaked database enrols nobody."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, hashed: str) -> bool:
    """Whether `secret` hashes to `hashed`, in constant time so timing reveals nothing."""
    return hmac.compare_digest(hash_secret(secret).encode("ascii"), hashed.encode("ascii", "replace"))


def _fingerprint_hex(fingerprint: str) -> str:
    hex_part = fingerprint.lower().removeprefix(FINGERPRINT_PREFIX)
    if not _FINGERPRINT_HEX.fullmatch(hex_part):
        raise ValueError(f"not a sha256 fingerprint: {fingerprint!r}")
    return hex_part


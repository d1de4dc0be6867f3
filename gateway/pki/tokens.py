"""Enrolment tokens (`gw1.<token_id>.<secret>.<CA fingerprint hex>`) and Private Access
personal tokens (`gwu1.<credential id>.<secret>.<CA fingerprint hex>`)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import attrs
from attrs import frozen

from gateway.errors import EnrolmentError, UserCredentialError
from gateway.pki.keys import FINGERPRINT_PREFIX

TOKEN_PREFIX = "gw1"
_ID_BYTES = 8
_SECRET_BYTES = 32
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
# token_urlsafe(32) is 43 characters of base64url; it never contains the "." separator.
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_FINGERPRINT_HEX = re.compile(r"[0-9a-f]{64}")
_FORMAT = f"{TOKEN_PREFIX}.<id>.<secret>.<fingerprint>"
_ADVICE = "copy the whole token again, or create a new one on the service"


@frozen
class EnrolmentToken:
    """What a connector needs to enrol: which token, its secret, and which CA to trust."""

    token_id: str
    secret: str
    ca_fingerprint: str  # "sha256:<64 hex>", as keys.fingerprint returns

    @classmethod
    def generate(cls, ca_fingerprint: str) -> EnrolmentToken:
        """A fresh token with a random id and secret for the CA with this fingerprint."""
        return cls(
            token_id=secrets.token_hex(_ID_BYTES),
            secret=secrets.token_urlsafe(_SECRET_BYTES),
            ca_fingerprint=FINGERPRINT_PREFIX + _fingerprint_hex(ca_fingerprint),
        )

    def encode(self) -> str:
        """The single-line text an admin copies to the connector."""
        return ".".join((TOKEN_PREFIX, self.token_id, self.secret, _fingerprint_hex(self.ca_fingerprint)))

    @classmethod
    def parse(cls, text: str) -> EnrolmentToken:
        """Parse `encode()`'s output; EnrolmentError names the bad part but never shows the secret."""
        parts = text.strip().split(".")
        if len(parts) != 4:
            raise _malformed(f"expected 4 parts separated by '.' ({_FORMAT}), found {len(parts)}")
        prefix, token_id, secret, fp_hex = parts
        if prefix != TOKEN_PREFIX:
            raise _malformed(f"it does not start with '{TOKEN_PREFIX}.' (an unknown token format)")
        if not _TOKEN_ID.fullmatch(token_id):
            raise _malformed("the id (second part) is not 16 hex digits")
        if not _SECRET.fullmatch(secret):
            raise _malformed("the secret (third part) is not 43 base64url characters")
        fp_hex = fp_hex.lower()
        if not _FINGERPRINT_HEX.fullmatch(fp_hex):
            raise _malformed("the CA fingerprint (fourth part) is not 64 hex digits")
        return cls(token_id, secret, FINGERPRINT_PREFIX + fp_hex)


USER_TOKEN_PREFIX = "gwu1"
_USER_FORMAT = f"{USER_TOKEN_PREFIX}.<id>.<secret>.<fingerprint>"
_USER_ADVICE = "copy the whole token again, or ask your administrator for a new one (gateway users token create)"


@frozen
class UserToken:
    """A personal token an admin issued a Private Access user (`gateway users token create`):
    which credential, its secret, and which CA the user's client must trust."""

    token_id: str  # the user credential's id
    secret: str = attrs.field(repr=False)
    ca_fingerprint: str  # "sha256:<64 hex>"

    @classmethod
    def generate(cls, ca_fingerprint: str) -> UserToken:
        """A fresh token with a random id and secret for the CA with this fingerprint."""
        return cls(secrets.token_hex(_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES),
                   FINGERPRINT_PREFIX + _fingerprint_hex(ca_fingerprint))

    def encode(self) -> str:
        """The single-line text the user gives `gateway login --token-file`."""
        return ".".join((USER_TOKEN_PREFIX, self.token_id, self.secret, _fingerprint_hex(self.ca_fingerprint)))

    @classmethod
    def parse(cls, text: str) -> UserToken:
        """Parse `encode()`'s output; UserCredentialError ("unknown") names the bad part, never the secret."""
        parts = text.strip().split(".")
        if len(parts) != 4:
            raise _bad_user_token(f"expected 4 parts separated by '.' ({_USER_FORMAT}), found {len(parts)}")
        prefix, token_id, secret, fp_hex = parts
        if prefix != USER_TOKEN_PREFIX:
            hint = " (that is a connector enrolment token)" if prefix == TOKEN_PREFIX else ""
            raise _bad_user_token(f"it does not start with '{USER_TOKEN_PREFIX}.'{hint}")
        if not _TOKEN_ID.fullmatch(token_id):
            raise _bad_user_token("the id (second part) is not 16 hex digits")
        if not _SECRET.fullmatch(secret):
            raise _bad_user_token("the secret (third part) is not 43 base64url characters")
        fp_hex = fp_hex.lower()
        if not _FINGERPRINT_HEX.fullmatch(fp_hex):
            raise _bad_user_token("the CA fingerprint (fourth part) is not 64 hex digits")
        return cls(token_id, secret, FINGERPRINT_PREFIX + fp_hex)


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


def _malformed(what: str) -> EnrolmentError:
    return EnrolmentError(f"malformed enrolment token: {what}: {_ADVICE}")


def _bad_user_token(what: str) -> UserCredentialError:
    return UserCredentialError("unknown", f"malformed personal token: {what}: {_USER_ADVICE}")

"""PKCE (RFC 7636): a code verifier and its S256 challenge. Pure functions.

One copy for the core's ``gateway login`` client and the http plugin's OIDC sign-in.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = ["pkce_pair", "s256"]


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge): RFC 7636 4.1 and 4.2."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of the unreserved set
    return verifier, s256(verifier)


def s256(verifier: str) -> str:
    """The S256 challenge of ``verifier``: base64url of its sha256, without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")

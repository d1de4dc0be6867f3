"""The signed identity a back end may receive: ``X-Gateway-Jwt-Assertion`` (ES256 JWT) and its JWKS.

Like Cloudflare Access's ``Cf-Access-Jwt-Assertion`` and Pomerium's ``X-Pomerium-Jwt-Assertion``:
a back end that wants to be sure a request came through the gateway verifies the header against
the key set served at ``/.gateway/jwks.json`` on any web-app host; ``iss`` is that host's origin, ``aud`` the app's external URL. The P-256 key is made once
in the service state dir (mode 0600); its ``kid`` is the RFC 7638 thumbprint, so a back end that
caches keys by kid notices a new key.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from .sessions import b64url, read_or_make_secret

HEADER = b"X-Gateway-Jwt-Assertion"
KEY_FILE = "http-assertion-key.pem"
ALGORITHM = "ES256"
LIFETIME = 300  # seconds: one request's worth, with room for clock skew between us and the back end
JWKS_PATH = ".gateway/jwks.json"


def _make_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members in lexical order, no white space."""
    members = {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


class Signer:
    """Mints assertions with the service's key and publishes its public half."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.key = private_key
        public = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.kid = thumbprint(public)
        self.public_jwk = {**public, "kid": self.kid, "use": "sig", "alg": ALGORITHM}

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> Signer:
        pem = read_or_make_secret(Path(state_dir) / KEY_FILE, _make_key)
        return cls(serialization.load_pem_private_key(pem, password=None))

    def jwks(self) -> bytes:
        return json.dumps({"keys": [self.public_jwk]}, separators=(",", ":")).encode()

    def mint(self, identity: Any, issuer: str, audience: str, now: float) -> str:
        """``issuer``: the external origin the request came to (its JWKS is at issuer + /.gateway/jwks.json);
        ``audience``: the app's external URL."""
        claims = {
            "iss": issuer, "aud": audience, "sub": identity.subject,
            "iat": int(now), "nbf": int(now) - 5, "exp": int(now) + LIFETIME, "jti": uuid.uuid4().hex,
            "name": identity.name, "email": identity.email, "email_verified": identity.email_verified,
            "groups": list(identity.groups),
        }
        return jwt.encode(claims, self.key, algorithm=ALGORITHM, headers={"kid": self.kid})

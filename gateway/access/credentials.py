"""The user's credential cache: one file per service, 0600 in a 0700 directory, written atomically.

``gateway login`` writes it, ``gateway access`` reads it (and refreshes the certificate in it),
``gateway logout`` deletes it. A file holds the service's address and pinned CA, the private
key and the short-lived user certificate, who the user is, and what buys the next certificate:
the refresh credential a browser sign-in left, or the personal token (docs/operations.md,
*Private Access for users*). Nothing here prints a secret: ``describe`` and ``repr`` leave them out.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from attrs import define, field

from gateway.errors import GatewayError
from gateway.pki import keys

__all__ = ["CacheError", "Credentials", "cache_key", "credentials_dir", "delete", "find", "load", "path_for", "save"]

FORMAT = 1
# Refresh once less than this share of the certificate's life is left.
REFRESH_SHARE = 1 / 3


class CacheError(GatewayError):
    """The cache file is missing, unreadable or not ours; the message says what to run."""


@define
class Credentials:
    """What one ``gateway login`` left for ``gateway access``."""

    service: str          # what the user gave --service (URL or HOST:PORT): the cache key
    tunnel: str           # HOST:PORT the client dials
    server_name: str      # the name the node certificate must carry
    ca_pem: str
    key_pem: str = field(repr=False)
    certificate_pem: str = field(repr=False)
    user: dict[str, Any] = field(factory=dict)
    refresh: dict[str, Any] | None = field(default=None, repr=False)   # {"id", "secret", "expires_at"}
    token: str | None = field(default=None, repr=False)                # personal token text

    @property
    def certificate(self) -> Any:
        return keys.load_cert(self.certificate_pem.encode())

    @property
    def ca(self) -> Any:
        return keys.load_cert(self.ca_pem.encode())

    @property
    def key(self) -> Any:
        return keys.load_key(self.key_pem.encode())

    @property
    def ca_fingerprint(self) -> str:
        return keys.fingerprint(self.ca)

    @property
    def expires_at(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def needs_refresh(self, now: datetime) -> bool:
        """Whether less than a third of the certificate's life is left (or none)."""
        cert = self.certificate
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        return cert.not_valid_after_utc - now < life * REFRESH_SHARE

    def renewal(self) -> dict[str, Any] | None:
        """The credential of a user_certificate_request that buys the next certificate, if any."""
        if self.token:
            return {"kind": "token", "token": self.token}
        if self.refresh:
            return {"kind": "refresh", "id": self.refresh["id"], "secret": self.refresh["secret"]}
        return None

    def renewable_until(self) -> datetime | None:
        """When the refresh credential expires (None: a token, whose expiry only the service knows)."""
        if self.refresh and self.refresh.get("expires_at"):
            return datetime.fromisoformat(self.refresh["expires_at"])
        return None

    def describe(self) -> str:
        """Who is signed in where, for people: never a secret."""
        who = self.user.get("email") or self.user.get("name") or self.user.get("sub") or "unknown user"
        how = "personal token" if self.token else "browser sign-in"
        return f"{who} at {self.service} ({how}; certificate valid until {self.expires_at:%Y-%m-%d %H:%M:%S} UTC)"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "service": self.service, "tunnel": self.tunnel, "server_name": self.server_name,
            "ca": self.ca_pem, "key": self.key_pem, "certificate": self.certificate_pem,
            "certificate_expires_at": self.expires_at.isoformat(), "user": self.user,
            "refresh": self.refresh, "token": self.token,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Credentials:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        creds = cls(
            service=str(data["service"]), tunnel=str(data["tunnel"]), server_name=str(data["server_name"]),
            ca_pem=str(data["ca"]), key_pem=str(data["key"]), certificate_pem=str(data["certificate"]),
            user=dict(data.get("user") or {}), refresh=data.get("refresh"), token=data.get("token"),
        )
        creds.certificate, creds.ca, creds.key  # noqa: B018 - parse now: a broken file fails on load
        return creds


def normalise_service(service: str) -> str:
    """The form of --service that names a cache file: no spaces, no trailing slash."""
    return service.strip().rstrip("/")


def cache_key(service: str) -> str:
    return hashlib.sha256(normalise_service(service).encode("utf-8")).hexdigest()[:16]


def credentials_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_CONFIG_HOME/gateway/credentials, ~/.config when XDG_CONFIG_HOME is unset or relative."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path(environ.get("HOME") or Path.home()) / ".config"
    return root / "gateway" / "credentials"


def path_for(service: str, environ: Mapping[str, str] | None = None) -> Path:
    return credentials_dir(environ) / f"{cache_key(service)}.json"


def save(creds: Credentials, environ: Mapping[str, str] | None = None) -> Path:
    """Write the cache file atomically, 0600, its directory 0700 (made or tightened)."""
    path = path_for(creds.service, environ)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    keys.write_private(path, (json.dumps(creds.to_json(), indent=1) + "\n").encode())
    return path


def load(service: str, environ: Mapping[str, str] | None = None) -> Credentials:
    path = path_for(service, environ)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"not signed in to {normalise_service(service)}: run gateway login --service "
                         f"{normalise_service(service)}") from None
    except OSError as e:
        raise CacheError(f"cannot read the credentials in {path}: {e.strerror}") from None
    return _parse(path, raw)


def find(service: str | None, environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials for --service, or the only ones cached when --service was not given."""
    if service:
        return load(service, environ)
    directory = credentials_dir(environ)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise CacheError("not signed in: run gateway login --service URL")
    if len(files) > 1:
        found = []
        for path in files:
            try:
                found.append(_parse(path, path.read_bytes()).service)
            except (CacheError, OSError):
                continue
        raise CacheError(f"signed in to several services ({', '.join(found)}): say which with --service")
    return _parse(files[0], files[0].read_bytes())


def delete(service: str | None, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Forget the credentials (--service, or the only ones); returns what was forgotten, or None
    when there was nothing. Without --service and several services cached, CacheError says to choose."""
    if service is None:
        directory = credentials_dir(environ)
        if not directory.is_dir() or not any(directory.glob("*.json")):
            return None
        service = find(None, environ).service
    path = path_for(service, environ)
    if not path.exists():
        return None
    try:
        creds: Credentials | None = _parse(path, path.read_bytes())
    except CacheError:
        creds = None   # a damaged file is forgotten too
    path.unlink(missing_ok=True)
    return creds


def _parse(path: Path, raw: bytes) -> Credentials:
    try:
        return Credentials.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"the credentials in {path} are damaged ({type(e).__name__}): run gateway logout and "
                         "gateway login again") from None

"""``gateway --service URL``: the admin API as a store-like object, so the commands that run
on the local store run the same against a remote service.

The admin token comes from a file (``--admin-token-file``) or the GATEWAY_ADMIN_TOKEN
environment variable, never the command line. Over HTTPS the service's CA is pinned by the
fingerprint the token carries (as connectors pin it by their enrolment token): the CA is
fetched from /ca.pem, checked against the fingerprint, and only then is a verified connection
opened that carries the token.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import define, field, frozen
from cryptography import x509

from gateway.admin.summary import connector_from_json, group_from_json
from gateway.errors import AdminTokenError, GatewayError
from gateway.pki import keys
from gateway.pki.tokens import AdminToken
from gateway.store.records import ConnectorRecord, GroupRecord

TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
TIMEOUT = 30.0
# An API answer is a few records per connector; far more than that is not the admin API.
MAX_ANSWER = 16 * 1024 * 1024


def read_admin_token(path: str | None) -> AdminToken:
    """The admin token from the file `path` (or - for standard input), else from GATEWAY_ADMIN_TOKEN."""
    if path is None:
        text = os.environ.get(TOKEN_ENV)
        if not text:
            raise GatewayError(f"--service needs an admin token: give --admin-token-file FILE or set {TOKEN_ENV}"
                               " (create one on the service with `gateway admin token create`)")
    elif path == "-":
        text = sys.stdin.readline()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise GatewayError(f"cannot read the admin token file {path}: {e.strerror}") from None
    try:
        return AdminToken.parse(text)
    except AdminTokenError as e:
        raise GatewayError(str(e)) from None


@frozen
class RemoteApp:
    """An app the remote service serves, as far as the commands need it."""

    name: str
    group: str


@frozen
class RemoteConfig:
    """What the commands read of the service's config, from the API: its URL and served apps."""

    path: str
    apps: tuple[RemoteApp, ...] = ()


@define
class AdminClient:
    """Calls to one service's admin API with one admin token."""

    url: str
    token: AdminToken = field(repr=False)
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False)  # pinned, once made

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise GatewayError(f"--service: expected the admin API's URL, such as https://127.0.0.1:8444/,"
                               f" got {self.url!r}")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer of one API call; GatewayError with the service's message otherwise."""
        headers = {"Authorization": f"Bearer {self.token.encode()}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        status, data = self._request(method, path, payload, headers, self._pinned_context())
        try:
            answer = json.loads(data)
        except ValueError:
            raise GatewayError(f"{self.url}{path}: expected a JSON answer from the admin API, got HTTP {status}"
                               f" {data[:200]!r}: is --service the admin listener ([admin] listen)?") from None
        if status != 200:
            raise GatewayError(f"the service refused {method} {path} (HTTP {status}, {answer.get('error')}):"
                               f" {answer.get('message')}")
        return answer

    def _pinned_context(self) -> ssl.SSLContext | None:
        if urlsplit(self.url).scheme != "https":
            return None
        if self._context is None:
            # Only the public CA certificate travels over this unverified connection; it is
            # trusted only if it is the CA the token names.
            unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            status, pem = self._request("GET", "/ca.pem", None, {}, unverified)
            try:
                ca = x509.load_pem_x509_certificate(pem)
            except ValueError:
                raise GatewayError(f"{self.url}/ca.pem: expected the gateway's CA certificate, got HTTP {status}:"
                                   " is --service the admin listener ([admin] listen)?") from None
            if keys.fingerprint(ca) != self.token.ca_fingerprint:
                raise GatewayError(f"{self.url} does not hold the CA your admin token names"
                                   f" ({self.token.ca_fingerprint}): check the URL, or get a token of this service")
            self._context = ssl.create_default_context(cadata=pem.decode("ascii"))
        return self._context

    def _request(self, method: str, path: str, payload: bytes | None, headers: dict[str, str],
                 context: ssl.SSLContext | None) -> tuple[int, bytes]:
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port or 443, timeout=TIMEOUT, context=context)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT)
        try:
            conn.request(method, parts.path.rstrip("/") + path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_ANSWER + 1)
            if len(data) > MAX_ANSWER:
                raise GatewayError(f"{self.url}{path}: the answer is larger than {MAX_ANSWER} bytes")
            return response.status, data
        except ssl.SSLCertVerificationError as e:
            raise GatewayError(f"{self.url}: its certificate is not valid for this name ({e.verify_message}):"
                               " use a name of the service's [service] names in the URL") from None
        except (OSError, http.client.HTTPException) as e:
            raise GatewayError(f"cannot reach the admin API at {self.url}: {e}") from None
        finally:
            conn.close()


@frozen
class RemoteStore:
    """The store methods the remote-capable commands call, answered by the admin API."""

    client: AdminClient

    def list_connectors(self, include_deleted: bool = False) -> list[ConnectorRecord]:
        answer = self.client.call("GET", "/api/v1/connectors" + ("?all=true" if include_deleted else ""))
        return [connector_from_json(c) for c in answer["connectors"]]

    def list_groups(self) -> list[GroupRecord]:
        return [group_from_json(g) for g in self.client.call("GET", "/api/v1/groups")["groups"]]

    def list_apps(self) -> list[Any]:
        return []  # the service's served apps (file and store) come with RemoteConfig

    def delete_connector(self, connector_id: str, now: datetime) -> bool:
        return self.client.call("DELETE", f"/api/v1/connectors/{quote(connector_id, safe='')}")["deleted"]

    def move_connector(self, connector_id: str, group: str) -> ConnectorRecord:
        answer = self.client.call("POST", f"/api/v1/connectors/{quote(connector_id, safe='')}/move",
                                  {"group": group})
        return connector_from_json(answer["connector"])

    def create_group(self, name: str, now: datetime) -> GroupRecord:
        return group_from_json(self.client.call("POST", "/api/v1/groups", {"name": name})["group"])

    def ensure_group(self, name: str, now: datetime) -> None:
        """Nothing to do: the service creates the groups its apps name when a connector moves there."""

    def config(self) -> RemoteConfig:
        apps = self.client.call("GET", "/api/v1/apps")["apps"]
        return RemoteConfig(self.client.url, tuple(RemoteApp(a["name"], a["group"]) for a in apps if a["served"]))

    def close(self) -> None:
        """Nothing held open: each call is its own connection."""

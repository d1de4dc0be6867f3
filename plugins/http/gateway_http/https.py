"""The HTTPS front door: TLS with a certificate per domain, picked by SNI.

``[http] tls_listen`` is a plain server endpoint string; the front door wraps it in TLS
(``TLSMemoryBIOFactory``) with ``SNIServerOptions``. Certificates come from PEM files
(``[[http.certificates]]`` with ``cert`` and ``key``); the names each one serves are the DNS
names of its subjectAltName, wildcards included.

- SNI picks the certificate: an exact name beats a wildcard (``*.apps.example.test`` covers one
  label, as RFC 6125 and browsers say); when two certificates cover the same name, the one that
  is valid now and expires last wins, so a renewed certificate can sit beside the old one. No
  SNI, or a name none covers: the default certificate (``default_certificate``, naming the
  ``cert`` file of an entry; else the first entry).
- TLS 1.2 minimum, ECDHE with AES-GCM or ChaCha20 (TLS 1.3 suites are all AEAD), ALPN
  ``http/1.1`` (the front door speaks HTTP/1.1 only; an h2-only client gets no ALPN answer).
- The files are read when the config is parsed: at start, and on SIGHUP, where a broken file
  makes the reload refused and the running certificates stay (tap.install_reload). Errors name
  the file and what to do. An expired (or not yet valid) certificate is a warning, not an
  error: refusing to start would take every other app down with it, and nginx and Caddy serve
  it too. Key material is never logged, and never in a repr.
- ``redirect_to_https`` (default true when ``tls_listen`` is set): the plain listener answers
  requests for https apps with a 308 to the https URL (routing.py).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any, Callable

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from gateway.errors import GatewayError

log = Logger(namespace="gateway_http")

SECTION_KEYS: tuple[str, ...] = ("tls_listen", "redirect_to_https", "certificates", "default_certificate")
CERTIFICATE_KEYS = ("cert", "key")

# The tunnel's list (gateway/pki/tls.py): AES-GCM first, ChaCha20 for machines without AES-NI.
CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
           b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
ALPN = b"http/1.1"


class CertificateFileError(GatewayError):
    """A certificate or key file that cannot be served; the message names the file and the fix."""


def normalise_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


@frozen
class ServedCertificate:
    """One ``[[http.certificates]]`` entry, loaded and checked."""

    cert_path: str
    key_path: str
    leaf: x509.Certificate = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    key: Any = field(repr=False)      # never logged, never in a repr
    names: tuple[str, ...]            # SAN DNS names, lower case, "*.x" for wildcards

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now <= self.not_after


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateFileError(f"{what} file {path} does not exist") from None
    except PermissionError:
        raise CertificateFileError(f"{what} file {path} is not readable by this user "
                                   f"(uid {os.getuid()}): give the service read access") from None
    except OSError as e:
        raise CertificateFileError(f"{what} file {path} cannot be read: {e.strerror}") from None


def load_certificate(cert_path: str, key_path: str) -> ServedCertificate:
    """Read and check one certificate (PEM, leaf first, then its chain) and its private key (PEM)."""
    try:
        certs = x509.load_pem_x509_certificates(_read(cert_path, "certificate"))
    except ValueError:
        raise CertificateFileError(f"certificate file {cert_path} holds no PEM certificate "
                                   "(expected -----BEGIN CERTIFICATE-----, the server's first, then its chain)") from None
    key_data = _read(key_path, "key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertificateFileError(f"key file {key_path} is encrypted: the service needs it unencrypted "
                                   "(openssl pkey -in KEY -out KEY.plain), readable only by the service") from None
    except Exception:
        # the parser's message is not repeated: nothing of a key file goes to a log
        raise CertificateFileError(f"key file {key_path} holds no PEM private key "
                                   "(expected -----BEGIN PRIVATE KEY----- or a BEGIN RSA/EC PRIVATE KEY)") from None
    leaf = certs[0]
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise CertificateFileError(f"key file {key_path} does not belong to the certificate in {cert_path} "
                                   "(its public key differs): pair each cert with its own key")
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = tuple(dict.fromkeys(normalise_name(n) for n in san.get_values_for_type(x509.DNSName)))
    except x509.ExtensionNotFound:
        names = ()
    if not names:
        raise CertificateFileError(f"certificate file {cert_path} names no DNS name in its subjectAltName "
                                   "(browsers ignore the common name): use a certificate with DNS names")
    return ServedCertificate(cert_path, key_path, leaf, tuple(certs[1:]), key, names)


class CertificateStore:
    """The served certificates by name; ``choose(server_name)`` is what SNI gets."""

    def __init__(self, entries: list[ServedCertificate], default: ServedCertificate,
                 now: datetime | None = None) -> None:
        self.entries = tuple(entries)
        self.default = default
        now = now or datetime.now(UTC)
        self.exact: dict[str, ServedCertificate] = {}
        self.wildcard: dict[str, ServedCertificate] = {}   # ".apps.example.test" -> entry
        # valid now first, then the one expiring last: it wins a name several certificates cover
        for entry in sorted(self.entries, key=lambda e: (e.valid_at(now), e.not_after), reverse=True):
            for name in entry.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[1:], entry)
                elif "*" not in name:
                    self.exact.setdefault(name, entry)

    def __repr__(self) -> str:
        return f"CertificateStore({', '.join(e.cert_path for e in self.entries)}; default {self.default.cert_path})"

    def lookup(self, name: str) -> ServedCertificate | None:
        """The certificate for ``name``: exact first, then a wildcard one label up; None if none."""
        name = normalise_name(name)
        if name.startswith("*."):
            return self.wildcard.get(name[1:])
        found = self.exact.get(name)
        if found is None and "." in name:
            label, _, parent = name.partition(".")
            found = self.wildcard.get("." + parent) if label else None
        return found

    def choose(self, server_name: bytes | None) -> ServedCertificate:
        if server_name:
            found = self.lookup(server_name.decode("ascii", "replace"))
            if found is not None:
                return found
        return self.default


def parse_section(table: dict, error: Any) -> dict:
    """``tls_listen``, ``redirect_to_https`` and the certificates (read and checked here)."""
    tls_listen = table.get("tls_listen")
    if tls_listen is not None:
        if not isinstance(tls_listen, str) or not tls_listen:
            raise error("tls_listen", 'expected a Twisted server endpoint string for plain TCP such as '
                                      f'"tcp:443" (the front door adds TLS), got {tls_listen!r}')
        if tls_listen.startswith("ssl:"):
            raise error("tls_listen", f'expected a plain endpoint such as "tcp:443" (the front door adds TLS '
                                      f"with the [[http.certificates]]), got {tls_listen!r}")
        try:
            from twisted.internet.endpoints import serverFromString
            from twisted.internet.testing import MemoryReactor

            serverFromString(MemoryReactor(), tls_listen)
        except Exception as e:
            raise error("tls_listen", f'expected a Twisted server endpoint string such as "tcp:443", '
                                      f"got {tls_listen!r} ({e})")
    redirect = table.get("redirect_to_https", tls_listen is not None)
    if not isinstance(redirect, bool):
        raise error("redirect_to_https", f"expected true or false, got {redirect!r}")
    if redirect and tls_listen is None:
        raise error("redirect_to_https", "expected tls_listen to be set too (there is no https listener "
                                         "to redirect to)")
    raw = table.get("certificates", [])
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise error("certificates", 'expected an array of tables [[http.certificates]] with cert = "/path/cert.pem" '
                                    'and key = "/path/key.pem"')
    if raw and tls_listen is None:
        raise error("certificates", "expected tls_listen to be set too (certificates are served on it)")
    if tls_listen is not None and not raw:
        raise error("certificates", 'expected at least one [[http.certificates]] (cert = "/path/cert.pem", '
                                    'key = "/path/key.pem") to serve on tls_listen')
    entries = []
    for i, item in enumerate(raw):
        where = f"certificates[{i}]"
        unknown = sorted(set(item) - set(CERTIFICATE_KEYS))
        if unknown:
            raise error(f"{where}.{unknown[0]}", "unknown key; expected cert and key")
        for key in CERTIFICATE_KEYS:
            value = item.get(key)
            if not isinstance(value, str) or not os.path.isabs(value):
                raise error(f"{where}.{key}", f"expected the absolute path of a PEM file, got {value!r}")
        try:
            entries.append(load_certificate(item["cert"], item["key"]))
        except CertificateFileError as e:
            raise error(where, f"expected a readable certificate and matching key: {e}") from None
    default_path = table.get("default_certificate")
    default = entries[0] if entries else None
    if default_path is not None:
        found = [e for e in entries if e.cert_path == default_path]
        if not isinstance(default_path, str) or not found:
            raise error("default_certificate", "expected the cert path of one [[http.certificates]] entry "
                                               f"({', '.join(e.cert_path for e in entries) or 'none'}), "
                                               f"got {default_path!r}")
        default = found[0]
    store = CertificateStore(entries, default) if entries else None
    return {"tls_listen": tls_listen, "redirect_to_https": redirect, "certificates": store}


def _alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerOptions:
    """One OpenSSL context per certificate; a handshake starts on the default's and SNI switches it."""

    def __init__(self, store: CertificateStore) -> None:
        self.store = store
        self.contexts = {id(e): self._context(e) for e in store.entries}

    def _context(self, entry: ServedCertificate) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.set_cipher_list(CIPHERS)
        ctx.use_certificate(crypto.X509.from_cryptography(entry.leaf))
        for cert in entry.chain:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(entry.key))
        ctx.check_privatekey()
        ctx.set_session_id(b"gateway-https")
        ctx.set_alpn_select_callback(_alpn)
        ctx.set_tlsext_servername_callback(self._servername)
        return ctx

    def _servername(self, connection: SSL.Connection) -> None:
        try:
            entry = self.store.choose(connection.get_servername())
            connection.set_context(self.contexts[id(entry)])
        except Exception:
            # an exception here would fail the handshake with no word why: log, keep the default
            log.failure("https: choosing a certificate by SNI failed")

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.contexts[id(self.store.default)], None)


def https_apps(apps: list[Any]) -> list[Any]:
    return [a for a in apps if a.external_url.lower().startswith("https://")]


def check_coverage(store: CertificateStore, apps: list[Any], now: datetime | None = None) -> list[str]:
    """Warnings: certificates out of their validity, https app hosts no certificate covers."""
    from .routing import app_origin

    now = now or datetime.now(UTC)
    warnings = []
    for entry in store.entries:
        if now > entry.not_after:
            warnings.append(f"certificate {entry.cert_path} ({', '.join(entry.names)}) expired on "
                            f"{entry.not_after:%Y-%m-%d %H:%M} UTC: clients will refuse it; renew it and send SIGHUP")
        elif now < entry.not_before:
            warnings.append(f"certificate {entry.cert_path} ({', '.join(entry.names)}) is not valid before "
                            f"{entry.not_before:%Y-%m-%d %H:%M} UTC: clients will refuse it until then")
    for app in https_apps(apps):
        host = app_origin(app)[1]
        if store.lookup(host) is None:
            warnings.append(f"app {app.name}: no certificate covers its host {host} "
                            f"(external_url {app.external_url}); clients get the default certificate "
                            f"{store.default.cert_path} and a name mismatch: add a [[http.certificates]] for it")
    return warnings


def register_listeners(register: Callable[[str, str, Any], None], section: dict,
                       front_door_factory: Callable[[str], Any], reactor: Any, apps: list[Any] = ()) -> None:
    """Register the HTTPS listener described by ``section``, if any (the plain listener's
    redirect to it is routing's job)."""
    tls_listen = section.get("tls_listen")
    secure = https_apps(list(apps))
    if not tls_listen:
        if secure:
            app = secure[0]
            raise GatewayError(f"app {app.name} has an https external_url ({app.external_url}) but [http] "
                               'tls_listen is not set: set tls_listen (such as "tcp:443") and add '
                               "[[http.certificates]] for its host")
        return
    store: CertificateStore = section["certificates"]
    for warning in check_coverage(store, list(apps)):
        log.warn("https front door: {warning}", warning=warning)
    factory = TLSMemoryBIOFactory(SNIServerOptions(store), False, front_door_factory("https"))
    factory.noisy = False
    register("https", tls_listen, factory)
    log.info("https front door on {listen}: certificates {certificates}; default {default}",
             listen=tls_listen, default=store.default.cert_path,
             certificates="; ".join(f"{e.cert_path} ({', '.join(e.names)})" for e in store.entries))

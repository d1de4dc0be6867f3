"""The errors gateway raises on purpose. Each message says what was wrong and what to do."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error gateway raises on purpose."""


class UnknownName(GatewayError):
    """A command or API call names a group, app, connector or credential that does not exist
    (the admin API answers it 404)."""


class ConfigError(GatewayError):
    """A configuration file is wrong: names the file, the key and what was expected."""

    def __init__(self, file: str, key: str, expected: str) -> None:
        self.file = str(file)
        self.key = key
        self.expected = expected
        super().__init__(f"{self.file}: {key}: {expected}")


class EnrolmentError(GatewayError):
    """An enrolment was refused; the message is meant for the admin."""


class UserCredentialError(GatewayError):
    """A Private Access credential (personal token or sign-in refresh secret) cannot be used;
    ``code`` says why: "unknown", "revoked" or "expired" (the user_login error codes)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class AdminTokenError(GatewayError):
    """An admin API token cannot be used; ``code`` says why: "unknown", "revoked" or "expired"."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class StoreUnavailable(GatewayError):
    """The store (PostgreSQL) cannot be reached or refused the connection; says where and why."""


class StoreClosed(GatewayError):
    """The store was closed: the process is shutting down."""


class ProtocolError(GatewayError):
    """The peer broke the tunnel protocol; `code` is a GO_AWAY / RST code (docs/protocol.md)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{message} (code {code})")


def describe_failure(failure) -> str:
    """One readable sentence for a Failure, for logs and for the peer."""
    if failure is None:
        return "closed"
    value = failure.value
    if isinstance(value, GatewayError):
        return str(value)
    args = getattr(value, "args", ())
    # pyOpenSSL raises Error([(library, function, reason), ...]); the reasons are the readable part.
    if args and isinstance(args[0], list) and all(isinstance(a, tuple) and len(a) == 3 for a in args[0]):
        reasons = "; ".join(str(a[2]) for a in args[0] if a[2])
        if reasons:
            return f"TLS error: {reasons}"
    text = failure.getErrorMessage()
    return text or type(value).__name__

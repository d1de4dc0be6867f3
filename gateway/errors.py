"""The errors gateway raises on purpose. Each message says what was wrong and what to do."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration file is wrong: names the file, the key and what was expected."""

    def __init__(self, file: str, key: str, expected: str) -> None:
        self.file = str(file)
        self.key = key
        self.expected = expected
        super().__init__(f"{self.file}: {key}: {expected}")


class EnrolmentError(GatewayError):
    """An enrolment was refused; the message is meant for the admin."""


class ProtocolError(GatewayError):
    """The peer broke the tunnel protocol; `code` is a GO_AWAY / RST code (docs/protocol.md)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{message} (code {code})")

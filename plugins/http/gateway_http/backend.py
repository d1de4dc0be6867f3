"""The connector's half of a web app (stub: splices bytes until the back-end pool lands)."""

from __future__ import annotations

from typing import Any

from gateway.tunnel.splice import dial_and_splice


def serve_stream(stream: Any, app: Any, reactor: Any) -> None:
    dial_and_splice(stream, app, reactor)

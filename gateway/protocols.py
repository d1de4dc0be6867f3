"""Interfaces plugins implement, and the values hooks receive."""

from __future__ import annotations

from typing import Any

from attrs import frozen
from zope.interface import Attribute, Interface


class IProtocolHandler(Interface):
    """Carries one kind of app traffic between a service listener and a connector stream."""

    name = Attribute("The name apps use in their `protocol` key, e.g. 'tcp'.")

    def service_factory(app, open_stream, reactor):
        """Return an IProtocolFactory for the app's listen endpoint on the service.

        ``open_stream(extra_metadata: dict) -> Deferred[Stream]`` opens a stream to a
        connector of the app's group with the app's metadata plus ``extra_metadata`` (for
        example the user identity); it fails with a GatewayError saying why (no connector
        connected, destination refused, ...).
        """

    def connector_stream(stream, app, reactor):
        """Handle a new stream on the connector for ``app`` (an AppConfig).

        Dial ``app.host``/``app.port`` (only that: the core already checked it is the app's
        destination), then ``stream.accept()`` and splice, or ``stream.reset(code, reason)``.
        """


class ISSOProvider(Interface):
    """Obtains back-end credentials for a pre-authenticated user."""

    name = Attribute("The name apps use to select this provider.")

    def credentials(identity, app):
        """Return a Deferred firing with a dict of credentials for the back end."""


@frozen
class StreamInfo:
    """What lifecycle hooks learn about a stream."""

    stream_id: int
    tunnel_id: str
    connector_id: str
    app: str
    protocol: str
    request_id: str
    user: Any = None

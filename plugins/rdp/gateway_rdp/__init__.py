"""The RDP protocol plugin: apps with ``protocol = "rdp"``.

On the service an RDP app is served like a tcp app (the tcp plugin's listener, idle_timeout
included). On the connector, which dials the RDP server, sees both directions and enforces the
app's policy, :mod:`gateway_rdp.codec` reads the client's X.224 Connection Request (the
``Cookie: mstshash=`` user or routing token, the requested security protocols) and the server's
Connection Confirm (the selected protocol) without altering a byte. With ``options.require_nla``
(the default) a client that offers no CredSSP gets an RDP Negotiation Failure
(HYBRID_REQUIRED_BY_SERVER) and a clean close, and so does a server that selects anything but
CredSSP. Then the connection is spliced untouched (gateway.tunnel.inspect). Loaded through the
``gateway`` entry point like a third party's plugin.
"""

from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl
from gateway.tunnel.inspect import InspectingHandler, flag_option
from gateway_tcp import TCPHandler, idle_timeout

from gateway_rdp.codec import FAILURE_CODES, RdpInspector, protocol_names


def session_facts(inspector: RdpInspector) -> dict[str, Any]:
    """What the negotiation showed, for stream.session_facts and the connector's session_facts log."""
    record = inspector.record
    failure = record.failure_code
    return {
        "cookie_user": record.cookie_user,
        "routing_token": record.routing_token,
        "requested_protocols": None if record.requested_protocols is None
        else "/".join(protocol_names(record.requested_protocols)),
        "selected_protocol": None if record.selected_protocol is None
        else "/".join(protocol_names(record.selected_protocol)),
        "server_failure": None if failure is None else FAILURE_CODES.get(failure, f"0x{failure:x}"),
    }


class RDPHandler(InspectingHandler, TCPHandler):
    """The service side is the tcp plugin's; the connector side inspects, then splices."""

    name = "rdp"

    def inspector(self, app: Any) -> RdpInspector:
        return RdpInspector(require_nla=flag_option(app, "require_nla", True))

    facts = staticmethod(session_facts)


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(RDPHandler())


@hookimpl
def gateway_service_listeners(register: Any, config: Any, open_stream: Any, reactor: Any) -> None:
    """Registers no listener: checks the rdp apps' options."""
    RDPHandler().check_apps(config.apps, idle_timeout)

"""The SMB protocol plugin: apps with ``protocol = "smb"``.

On the service an SMB app is served like a tcp app (the tcp plugin's listener, idle_timeout
included). On the connector, which dials the file server, sees both directions and enforces the
app's policy, the start of each connection is read by :mod:`gateway_smb.codec` without altering
a byte (signing and encryption keep working): dialect, signing, encryption, the NTLM user and
domain, the share. SMB1 is refused unless ``options.allow_smb1``; ``options.require_signing`` and
``options.require_encryption`` refuse sessions whose negotiated flags fall short
(:mod:`gateway_smb.policy`). Once the handshake is seen the connection is spliced at full speed
(gateway.tunnel.inspect). Loaded through the ``gateway`` entry point like a third party's plugin.
"""

from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl
from gateway.tunnel.inspect import InspectingHandler, flag_option
from gateway_tcp import TCPHandler, idle_timeout

from gateway_smb.codec import SmbInspector
from gateway_smb.policy import SmbPolicy, session_facts


class SMBHandler(InspectingHandler, TCPHandler):
    """The service side is the tcp plugin's; the connector side inspects, then splices."""

    name = "smb"

    def inspector(self, app: Any) -> SmbPolicy:
        return SmbPolicy(SmbInspector(allow_smb1=flag_option(app, "allow_smb1", False)),
                         require_signing=flag_option(app, "require_signing", False),
                         require_encryption=flag_option(app, "require_encryption", False))

    facts = staticmethod(session_facts)


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(SMBHandler())


@hookimpl
def gateway_service_listeners(register: Any, config: Any, open_stream: Any, reactor: Any) -> None:
    """Registers no listener: checks the smb apps' options."""
    SMBHandler().check_apps(config.apps, idle_timeout)

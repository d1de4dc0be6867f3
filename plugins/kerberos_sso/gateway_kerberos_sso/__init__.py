"""Single sign-on to integrated-Windows-auth back ends by Kerberos constrained delegation (issue 12).

A connector with a keytab for its delegating account gets, for a user the service already
signed in, a service ticket to the back end's SPN without the user's password (S4U2Self, then
S4U2Proxy) and sends it as ``Authorization: Negotiate``. Loaded through the ``gateway``
entry point like any plugin; apps select it with ``options.sso = "kerberos"``.

- ``settings``: the connector's ``[kerberos]`` table and the apps' ``kerberos_*`` options;
- ``provider``: the ISSOProvider (tokens, 401 challenges, the mutual-auth reply, failures that
  name cause and fix, counters);
- ``delegation``: the KDC exchanges with python-gssapi (the ``kerberos`` extra), and
  ``delegate_cifs``, the building block for SMB;
- ``cache``: delegated credentials per user and SPN, shared while in flight, until shortly
  before the ticket ends.

Importing this package does not import gssapi: the service, or a connector without the extra,
loads the plugin and only an app that asks for it fails, saying what is missing.
"""

from __future__ import annotations

from typing import Any

from gateway import hookimpl

from .provider import KerberosSSO
from .settings import SECTION, parse_section

PROVIDER_NAME = "kerberos"


@hookimpl
def gateway_config_sections(register: Any) -> None:
    register(SECTION, parse_section)


@hookimpl
def gateway_register_sso_providers(register: Any) -> None:
    register(PROVIDER_NAME, KerberosSSO())

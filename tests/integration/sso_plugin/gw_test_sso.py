"""A test SSO provider, loaded through the ``gateway`` entry point group.

Only processes started with tests/integration/sso_plugin on PYTHONPATH find it (the
connectors of test_http_sso.py), exactly as a third-party plugin installed on the connector
host would be found. ``GW_TEST_SSO_LABEL`` names the process, so a back end can tell which
connector signed a request.
"""

from __future__ import annotations

import os

from twisted.internet.defer import succeed
from twisted.logger import Logger

from gateway import hookimpl

log = Logger(namespace="gw_test_sso")


class TestSSO:
    """Credentials derived from the identity the connector got in the stream metadata."""

    def __init__(self, label: str) -> None:
        self.label = label

    def credentials(self, app, identity, request):
        log.info("test-sso on {label}: credentials for user {user} to app {app}",
                 label=self.label, user=identity["sub"], app=app.name)
        # A Deferred, as a provider that asks a KDC or a token service would return.
        return succeed([
            (b"Authorization", b"Bearer test-sso." + identity["sub"].encode()),
            (b"X-Test-Groups", ",".join(identity["groups"]).encode()),
            (b"X-Test-Connector", self.label.encode()),
        ])


@hookimpl
def gateway_register_sso_providers(register):
    register("test-sso", TestSSO(os.environ.get("GW_TEST_SSO_LABEL", "unlabelled")))

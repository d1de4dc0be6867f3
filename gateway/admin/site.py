"""The admin listener of a service node: the route table's resource on ``[admin] listen``,
behind TLS with the node's certificate (from the gateway's CA) unless ``tls = false``."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from gateway.admin.auth import Sessions
from gateway.admin.routes import AdminRequest, AdminResource
from gateway.pki.tls import https_server_options

# An idle admin connection is closed after this long (seconds): a browser keeps one alive.
IDLE_TIMEOUT = 60


def admin_site(node: Any, sessions: Sessions) -> Site:
    admin = node.config.admin
    site = Site(AdminResource(node, sessions, admin.tls, admin.page_refresh), timeout=IDLE_TIMEOUT)
    site.requestFactory = AdminRequest
    site.displayTracebacks = False
    site.noisy = False
    return site


def admin_listener(node: Any, endpoint: Any, node_cert: Any, node_key: Any) -> StreamServerEndpointService:
    """The admin listener service; HTTPS with `node_cert` (and the CA in the chain, so a client
    can pin the CA by fingerprint) unless [admin] tls = false."""
    admin = node.config.admin
    sessions = Sessions(node, admin.session_lifetime)
    factory: Any = admin_site(node, sessions)
    if admin.tls:
        factory = TLSMemoryBIOFactory(https_server_options(node.ca.cert, node_cert, node_key), False, factory)
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    service.setName("admin-listener")
    return service

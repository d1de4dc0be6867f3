"""The admin API and status page of a service node (``[admin]``, docs/operations.md).

- :mod:`gateway.admin.routes`: the one route table (API, status page, public documents) and the
  resource that serves it; :mod:`gateway.admin.openapi` documents every route of it.
- :mod:`gateway.admin.auth`: bearer admin tokens, the status page's sign-in sessions and CSRF.
- :mod:`gateway.admin.summary`: what the service knows (connectors, groups, apps, events) as
  plain values, shared by the API, the page and ``gateway status``.
- :mod:`gateway.admin.page`: the status page (twisted.web.template, no JavaScript).
- :mod:`gateway.admin.client`: the ``gateway --service URL`` side: a store-like API client.
- :mod:`gateway.admin.operations`: the commands ``--service`` runs on the service, each as one
  API call whose handler runs the command's own operation on the service's store.
"""

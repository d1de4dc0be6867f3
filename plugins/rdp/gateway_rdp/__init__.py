"""The RDP protocol plugin (issue 11), not wired yet.

What it will be: a protocol handler for apps with ``protocol = "rdp"`` that reads the client's
X.224 Connection Request (the ``Cookie: mstshash=`` user or routing token and the requested
security protocols), answers a client offering no CredSSP with an RDP Negotiation Failure
(``HYBRID_REQUIRED_BY_SERVER``) when the app's ``require_nla`` is on (the default), records the
cookie user and the protocol the server selected in its Connection Confirm, and then splices the
connection untouched.

What exists so far is only the codec, :mod:`gateway_rdp.codec`, without I/O. This package has
no hook implementation and no entry point: ``gateway plugins`` does not load it.
"""

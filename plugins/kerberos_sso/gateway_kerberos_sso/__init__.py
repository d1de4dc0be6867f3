"""Single sign-on to integrated-Windows-auth back ends by Kerberos constrained delegation (issue 12).

A connector with a keytab for its delegating account gets, for a user the service already
signed in, a service ticket to the back end's SPN without the user's password (S4U2Self, then
S4U2Proxy) and sends it as ``Authorization: Negotiate``. This package holds the building
blocks so far, not the plugin: ``delegation`` (the KDC exchanges with python-gssapi, and the
causes of their failures with the admin's fix) and ``cache`` (delegated credentials per user
and SPN, shared while in flight, until shortly before the ticket ends). It registers no hook
and has no entry point yet; docs/ARCHITECTURE.md, "Not yet", says what is missing.
"""

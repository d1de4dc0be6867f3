"""The `gateway access` client (issue 10, Private Access): for now only its pure building blocks.

``socks5`` is the SOCKS5 server state machine (no I/O); nothing listens or connects yet.
"""

"""The `gateway login` / `gateway access` client of Private Access (issue 10).

``credentials`` (the cache), ``login`` (certificates for a sign-in or a token), ``client`` (the
user tunnel and the local listeners), ``cli`` (the subcommands), ``socks5`` (the SOCKS5 state
machine, no I/O).
"""

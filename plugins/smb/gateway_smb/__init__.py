"""The SMB protocol plugin (issue 11), not wired yet.

What it will be: a protocol handler for apps with ``protocol = "smb"`` (port 445 segments by
default) that watches the start of an SMB2/3 connection without altering a byte (signing and
encryption keep working): the dialect, signing and encryption from NEGOTIATE and SESSION_SETUP,
the user and domain from an NTLM AUTHENTICATE (a Kerberos AP-REQ does not show the client's
name), and the share of the first TREE_CONNECT when it is not encrypted. It refuses SMB1 and the
SMB1-style multi-protocol NEGOTIATE unless the app sets ``allow_smb1``, can enforce
``require_signing``/``require_encryption`` from the negotiated flags, and once the handshake is
seen splices the rest at full speed.

What exists so far is only the codec, :mod:`gateway_smb.codec`, without I/O. This package has
no hook implementation and no entry point: ``gateway plugins`` does not load it.
"""

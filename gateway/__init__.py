"""gateway: a self-hostable private network connector on Twisted."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

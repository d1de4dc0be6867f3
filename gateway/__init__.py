"""gateway: a self-hostable private network connector on Twisted."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1


from gateway.hookspecs import hookimpl  # noqa: E402  (what plugin authors import)

__all__ = ["__version__", "PROTOCOL_VERSION", "hookimpl"]

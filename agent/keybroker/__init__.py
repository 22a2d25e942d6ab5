"""keybroker's agent side, Django-free: the ``keybroker`` CLI and what it shares with the server."""

__version__ = "0.1.0"

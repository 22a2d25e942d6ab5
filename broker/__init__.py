"""keybroker's server: project wiring, the domain (backends, agents, tokens), API and admin."""

from keybroker import __version__

__all__ = ["__version__"]

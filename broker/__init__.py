"""keybroker: the Django project package and the core domain (backends, agents, tokens)."""

__version__ = "0.1.0"

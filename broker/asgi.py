"""The name operators run: ``uvicorn broker.asgi:application`` (DESIGN.md's production line).

The application itself is assembled in ``broker.project.asgi``, with the rest of the wiring.
"""

from broker.project.asgi import application

__all__ = ["application"]

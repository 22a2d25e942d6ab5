"""Reads: what the API, the admin and the proxy ask of the domain without changing it.

Writes live beside them in ``broker.services``; a selector never changes state.
"""

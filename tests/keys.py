"""Realistic-looking upstream secrets for tests (never real keys)."""

from __future__ import annotations

import secrets


def api_key(tail: str = "Xy9Q") -> str:
    return f"sk-ant-api03-{secrets.token_urlsafe(70)}{tail}"


def oauth_token(tail: str = "Oa7T") -> str:
    return f"sk-ant-oat01-{secrets.token_urlsafe(70)}{tail}"

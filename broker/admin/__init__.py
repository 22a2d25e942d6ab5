"""The Django admin, one module per model family; importing them registers their pages.

Every page changes state through ``broker.services`` only (issue 12): forms validate, and
actions and views call the service that owns the rule.
"""

from broker.admin import admin_tokens as admin_tokens
from broker.admin import agents, backends, oidc, site, tokens

__all__ = ["agents", "backends", "oidc", "site", "tokens"]

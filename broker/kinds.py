"""Upstream providers: what a backend's kind means (base URL, secret formats, auth headers).

A new kind registers a Provider here; the Backend model, its services and the proxy only
ever talk to this interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANTHROPIC_VERSION = "2023-06-01"
OAUTH_BETA = "oauth-2025-04-20"


class ProviderError(ValueError):
    pass


@dataclass(frozen=True)
class AuthScheme:
    """How a secret travels upstream: in ``x-api-key``, or as ``Authorization: Bearer``."""

    name: str
    bearer: bool = False
    beta_flag: str | None = None

    def headers(self, secret: str, *, anthropic_beta: str | None = None) -> dict[str, str]:
        headers = {"authorization": f"Bearer {secret}"} if self.bearer else {"x-api-key": secret}
        if self.beta_flag:
            flags = [f.strip() for f in (anthropic_beta or "").split(",") if f.strip()]
            if self.beta_flag not in flags:
                flags.append(self.beta_flag)
            headers["anthropic-beta"] = ",".join(flags)
        return headers


API_KEY = AuthScheme("x-api-key")
OAUTH_BEARER = AuthScheme("bearer", bearer=True, beta_flag=OAUTH_BETA)
# An API key sent as ``Authorization: Bearer``, with no flag: OpenAI's way.
BEARER_KEY = AuthScheme("bearer-key", bearer=True)
SCHEMES = {scheme.name: scheme for scheme in (API_KEY, OAUTH_BEARER, BEARER_KEY)}


@dataclass(frozen=True)
class Provider:
    kind: str
    label: str
    default_base_url: str
    models_path: str
    # A federated kind stores no secret: its calls carry an access token that keybroker
    # gets by exchanging its own signed JWT (workload identity federation).
    federated: bool = False
    default_audience: str = ""

    # The proxy's wire format for this kind: how its errors look, where usage is read
    # (a Wire in proxy/providers/). Anthropic's unless a kind says otherwise.
    dialect: str = "anthropic"
    # What the provider's SDKs add after the host in their base URL (OpenAI's: /v1).
    sdk_path: str = ""

    def auth_scheme(self, secret: str) -> AuthScheme:
        raise NotImplementedError

    def fingerprint(self, secret: str) -> str:
        raise NotImplementedError

    def validation_headers(self, secret: str) -> dict[str, str]:
        raise NotImplementedError


_ANTHROPIC_SECRET = re.compile(r"^(sk-ant-(api|oat)\d*-)[A-Za-z0-9_-]{8,}$")


@dataclass(frozen=True)
class AnthropicProvider(Provider):
    def _match(self, secret: str) -> re.Match[str]:
        match = _ANTHROPIC_SECRET.match(secret)
        if match is None:
            raise ProviderError(
                "an Anthropic secret is an API key (sk-ant-api…) or an OAuth token (sk-ant-oat…)"
            )
        return match

    def auth_scheme(self, secret: str) -> AuthScheme:
        return API_KEY if self._match(secret)[2] == "api" else OAUTH_BEARER

    def fingerprint(self, secret: str) -> str:
        return f"{self._match(secret)[1]}…{secret[-4:]}"

    def validation_headers(self, secret: str) -> dict[str, str]:
        return {
            "anthropic-version": ANTHROPIC_VERSION,
            **self.auth_scheme(secret).headers(secret),
        }


@dataclass(frozen=True)
class AnthropicWifProvider(Provider):
    """Anthropic through workload identity federation: no key, an exchanged access token.

    The access token (``sk-ant-oat01-…``) is a short-lived OAuth token, so it travels as
    ``Authorization: Bearer`` with the OAuth beta flag, like a stored OAuth token does.
    """

    def auth_scheme(self, secret: str) -> AuthScheme:
        return OAUTH_BEARER

    def fingerprint(self, secret: str) -> str:
        raise ProviderError("an anthropic-wif backend stores no secret")

    def validation_headers(self, secret: str) -> dict[str, str]:
        return {"anthropic-version": ANTHROPIC_VERSION, **OAUTH_BEARER.headers(secret)}


# sk-… (older user keys), sk-proj-… (project keys), sk-svcacct-… (service accounts); never
# an Anthropic key, which also starts with sk-.
_OPENAI_SECRET = re.compile(r"^(sk-(?!ant-)(?:proj-|svcacct-|admin-)?)[A-Za-z0-9_-]{20,}$")


@dataclass(frozen=True)
class OpenAIProvider(Provider):
    def _match(self, secret: str) -> re.Match[str]:
        match = _OPENAI_SECRET.match(secret)
        if match is None:
            raise ProviderError("an OpenAI secret is an API key (sk-… or sk-proj-…)")
        return match

    def auth_scheme(self, secret: str) -> AuthScheme:
        if secret:
            self._match(secret)
        return BEARER_KEY

    def fingerprint(self, secret: str) -> str:
        return f"{self._match(secret)[1]}…{secret[-4:]}"

    def validation_headers(self, secret: str) -> dict[str, str]:
        return BEARER_KEY.headers(secret)


# What a backend is when nobody says: the model, the admin form, the API and the CLI agree.
DEFAULT_KIND = "anthropic"

PROVIDERS: dict[str, Provider] = {
    "anthropic": AnthropicProvider(
        kind="anthropic",
        label="Anthropic",
        default_base_url="https://api.anthropic.com",
        models_path="/v1/models",
    ),
    "anthropic-wif": AnthropicWifProvider(
        kind="anthropic-wif",
        label="Anthropic (workload identity, no stored key)",
        default_base_url="https://api.anthropic.com",
        models_path="/v1/models",
        federated=True,
        default_audience="https://api.anthropic.com",
    ),
    "openai": OpenAIProvider(
        kind="openai",
        label="OpenAI",
        default_base_url="https://api.openai.com",
        models_path="/v1/models",
        dialect="openai",
        sdk_path="/v1",
    ),
}


def provider_for(kind: str) -> Provider:
    try:
        return PROVIDERS[kind]
    except KeyError:
        raise ProviderError(
            f"unknown kind {kind!r}; known kinds: {', '.join(sorted(PROVIDERS))}"
        ) from None

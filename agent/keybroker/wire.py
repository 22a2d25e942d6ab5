"""What the agent side and the server agree on, with no Django: where the proxy lives, what
a credential looks like, how a duration is written.

The server imports this module (broker's services, logging and ASGI routing), and so does
the agent CLI: neither keeps a copy of its own.
"""

from __future__ import annotations

import ipaddress
import re

# --- the proxy's URLs ------------------------------------------------------------------------
PROXY_PREFIX = "/v1/proxy/"


def proxy_base_url(public_url: str, backend: str) -> str:
    """What an SDK's ``base_url`` must be to reach ``backend`` through the proxy."""
    return f"{public_url.rstrip('/')}{PROXY_PREFIX}{backend}"


def is_proxy_path(path: str) -> bool:
    return path.startswith(PROXY_PREFIX)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine: plain http is allowed there and nowhere else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- credentials -----------------------------------------------------------------------------
# keybroker's own secrets (crd_, ckr_, cks_, cka_, and ckw_ the alert webhooks' signing
# secrets), Anthropic keys and OAuth tokens, JWTs (keybroker's identity tokens and
# federation assertions are bearer credentials too), and Slack incoming-webhook URLs.
SECRET_PATTERN = re.compile(
    r"\b(?:crd|ckr|cks|cka|ckw)_[A-Za-z0-9_-]{8,}|sk-ant-[A-Za-z0-9_-]{8,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r"|hooks\.slack\.com/services/[A-Za-z0-9/_-]+"
)


def redact(text: str, *, keep_kind: bool = False) -> str:
    """``text`` with every credential cut out; ``keep_kind`` leaves its kind (``crd_…``)."""
    if not keep_kind:
        return SECRET_PATTERN.sub("[redacted]", text)
    return SECRET_PATTERN.sub(lambda match: _kind(match[0]) + "…", text)


def _kind(secret: str) -> str:
    if secret.startswith("sk-ant-"):
        return "sk-ant-"
    if secret.startswith("hooks."):
        return "hooks.slack.com/services/"
    return "eyJ" if secret.startswith("eyJ") else secret[:4]


# --- durations -------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d{1,9})(?:\.(\d{1,6}))?([smhd]?)")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration_parse(
    text: str, *, units: str = "smh", whole: bool = True, unit_required: bool = False
) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h`` (and ``7d`` where ``units`` has d).

    ``whole`` refuses fractions (``1.5``); ``unit_required`` refuses a bare number. Raises
    ValueError with a message that says what is accepted.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    unit = match[3] if match else ""
    if (
        match is None
        or (unit and unit not in units)
        or (unit_required and not unit)
        or (whole and match[2] is not None)
    ):
        examples = ", ".join(
            f"{n}{u}" for n, u in zip((90, 30, 2, 7), "smhd", strict=True) if u in units
        )
        bare = "" if unit_required else "seconds or "
        raise ValueError(f"{text.strip()[:20]!r} is not a duration; use {bare}{examples}")
    seconds = float(f"{match[1]}.{match[2] or 0}") * UNIT_SECONDS[unit or "s"]
    return int(seconds) if whole else seconds


def duration_format(seconds: float) -> str:
    """The shortest way to write it: ``1h``, ``10m``, ``90s``, ``1.5s``."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    for unit, size in (("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"

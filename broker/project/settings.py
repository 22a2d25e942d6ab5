"""keybroker settings: one module, every value from the environment (see README)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from broker import __version__
from broker.project.env import env_bool, env_int, env_secret, env_str, generated_secret

# Lets admin and form classes be subscripted for the type checker (ModelAdmin[Backend]).
django_stubs_ext.monkeypatch()

# The checkout: broker/project/settings.py is two packages below it.
BASE_DIR = Path(__file__).resolve().parents[2]
VERSION = __version__

DATA_DIR = Path(env_str("KEYBROKER_DATA_DIR") or BASE_DIR / "var").resolve()
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)

DEBUG = env_bool("KEYBROKER_DEBUG", default=False)
SECRET_KEY = env_secret("KEYBROKER_SECRET_KEY") or generated_secret(DATA_DIR / "secret_key")

# Stored upstream secrets are encrypted with this key (django-cryptography-5 reads
# CRYPTOGRAPHY_KEY). It is deliberately not SECRET_KEY: rotating the session key must not
# make every stored credential unreadable.
# None when the key comes from the environment; then the operator owns its rotation.
ENCRYPTION_KEY_PATH = (
    None if env_secret("KEYBROKER_ENCRYPTION_KEY") else DATA_DIR / "encryption_key"
)
ENCRYPTION_KEY = env_secret("KEYBROKER_ENCRYPTION_KEY") or generated_secret(
    DATA_DIR / "encryption_key"
)
CRYPTOGRAPHY_KEY = ENCRYPTION_KEY

HOST = env_str("KEYBROKER_HOST", "127.0.0.1")
PORT = env_int("KEYBROKER_PORT", default=8400, minimum=1, maximum=65535)
# Celery worker processes `serve` starts beside uvicorn.
WORKER_CONCURRENCY = env_int("KEYBROKER_WORKER_CONCURRENCY", default=2, minimum=1)
# The CPU priority `serve` gives them, as `nice` counts (0 to 19; higher yields more): the
# proxy's calls come first on a machine they share.
WORKER_NICENESS = env_int("KEYBROKER_WORKER_NICE", default=10, minimum=0, maximum=19)
# uvicorn worker processes `serve` starts: one per core, since one Python process can use
# only one. Revocation, rates and budgets are shared through Redis whatever the count.
WEB_WORKERS = env_int("KEYBROKER_WEB_WORKERS", default=os.cpu_count() or 1, minimum=1)


def _public_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ImproperlyConfigured(
            "KEYBROKER_PUBLIC_URL must be an http(s) URL such as https://keys.example.com, "
            f"not {raw!r}"
        )
    return raw.rstrip("/")


_display_host = "127.0.0.1" if HOST in {"0.0.0.0", "::"} else HOST  # noqa: S104
PUBLIC_URL = _public_url(env_str("KEYBROKER_PUBLIC_URL") or f"http://{_display_host}:{PORT}")
_public_host = urlsplit(PUBLIC_URL).hostname or ""

ALLOWED_HOSTS = sorted(
    {_public_host, HOST, "127.0.0.1", "localhost", "[::1]"}
    | {h.strip() for h in env_str("KEYBROKER_ALLOWED_HOSTS").split(",") if h.strip()}
)
CSRF_TRUSTED_ORIGINS = [f"{urlsplit(PUBLIC_URL).scheme}://{urlsplit(PUBLIC_URL).netloc}"]


def _networks(raw: str, *, variable: str) -> list[str]:
    """A comma list of IP addresses or networks (CIDRs), as ``variable`` gave it."""
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"{variable} lists IP addresses or networks such as "
                f"10.0.0.5,10.1.0.0/16, not {entry!r}"
            ) from None
    return entries


def _trusted_proxies(raw: str) -> list[str]:
    """KEYBROKER_TRUSTED_PROXIES: the addresses (IPs or CIDRs) whose X-Forwarded-For and
    X-Forwarded-Proto `serve` lets uvicorn believe; empty means nobody's (issue 19, item 10)."""
    return _networks(raw, variable="KEYBROKER_TRUSTED_PROXIES")


TRUSTED_PROXIES = _trusted_proxies(env_str("KEYBROKER_TRUSTED_PROXIES"))
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = PUBLIC_URL.startswith("https://")
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"


# --- Database -------------------------------------------------------------------------
# The web server and the Celery worker write from separate processes: WAL lets readers go
# on during a write, IMMEDIATE avoids lock-upgrade deadlocks ("database is locked" at once,
# whatever the timeout), for a sqlite:// DATABASE_URL as for the default file.
SQLITE_OPTIONS = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}


def _database(url: str) -> dict[str, object]:
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(DATA_DIR / "keybroker.sqlite3"),
            "OPTIONS": dict(SQLITE_OPTIONS),
        }
    # Never echo the URL itself: it usually carries a password.
    malformed = ImproperlyConfigured("DATABASE_URL is malformed (check host, port and name)")
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise malformed from None
    if scheme not in {"postgres", "postgresql", "pgsql", "sqlite"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must start with postgres:// or sqlite://, not {scheme or 'nothing'}://"
        )
    try:
        config = dj_database_url.parse(url, conn_health_checks=True)
    except Exception:  # dj-database-url raises several types for malformed URLs
        raise malformed from None
    if not config.get("NAME"):
        raise ImproperlyConfigured("DATABASE_URL names no database")
    if scheme == "sqlite":
        config["OPTIONS"] = {**SQLITE_OPTIONS, **config.get("OPTIONS", {})}
    return dict(config)


DATABASES = {"default": _database(env_str("DATABASE_URL"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# --- Redis: cache, channel layer, Celery broker ----------------------------------------
REDIS_EMBEDDED = not env_str("REDIS_URL")
REDIS_SOCKET = DATA_DIR / "redis.sock"
REDIS_URL = env_str("REDIS_URL") or f"unix://{REDIS_SOCKET}"
if urlsplit(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
    raise ImproperlyConfigured("REDIS_URL must start with redis://, rediss:// or unix://")
REDIS_KEY_PREFIX = env_str("KEYBROKER_REDIS_PREFIX", "keybroker")


def _celery_broker_url(url: str) -> str:
    # kombu spells a unix-socket Redis as redis+socket://
    return "redis+socket://" + url.removeprefix("unix://") if url.startswith("unix://") else url


CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": REDIS_KEY_PREFIX,
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL}], "prefix": f"{REDIS_KEY_PREFIX}:channels"},
    }
}

CELERY_BROKER_URL = _celery_broker_url(REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{REDIS_KEY_PREFIX}:celery:"}
CELERY_TASK_DEFAULT_QUEUE = "keybroker"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SOFT_TIME_LIMIT = 60
CELERY_TASK_TIME_LIMIT = 90
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
HEARTBEAT_INTERVAL_SECONDS = 10
# /ready calls the worker down when its last heartbeat is older than this.
HEARTBEAT_MAX_AGE_SECONDS = env_int("KEYBROKER_HEARTBEAT_MAX_AGE", default=45, minimum=15)
BACKEND_VALIDATE_TIMEOUT_SECONDS = env_int("KEYBROKER_VALIDATE_TIMEOUT", default=10, minimum=1)
BACKEND_VALIDATE_INTERVAL_SECONDS = env_int("KEYBROKER_VALIDATE_INTERVAL", default=3600, minimum=60)


def _upstream_hosts(raw: str) -> list[str]:
    hosts = [entry.strip().lower() for entry in raw.split(",") if entry.strip()]
    for host in hosts:
        try:
            parts = urlsplit(f"//{host}")
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            parts = None
        if parts is None or not parts.hostname or parts.netloc != host:
            raise ImproperlyConfigured(
                f"KEYBROKER_ALLOWED_UPSTREAM_HOSTS: {host!r} is not a host or host:port "
                "(such as api.anthropic.com or gateway.example.com:8443)"
            )
    return hosts


# Hosts a backend may be moved to without its key entered with the change (issue 19): a
# host alone means its scheme's default port. The provider's own host is always allowed.
ALLOWED_UPSTREAM_HOSTS = _upstream_hosts(
    env_str("KEYBROKER_ALLOWED_UPSTREAM_HOSTS", "api.anthropic.com")
)
TOKEN_SWEEP_INTERVAL_SECONDS = 60
# Expired and revoked token rows are kept this long (their audit events stay regardless).
TOKEN_RETENTION_SECONDS = env_int("KEYBROKER_TOKEN_RETENTION", default=7 * 86400, minimum=0)
CELERY_BEAT_SCHEDULE = {
    "heartbeat": {
        "task": "broker.tasks.heartbeat",
        "schedule": HEARTBEAT_INTERVAL_SECONDS,
        "options": {"expires": HEARTBEAT_INTERVAL_SECONDS - 1},
    },
    "backends-validate": {
        "task": "broker.tasks.backends_validate_all",
        "schedule": BACKEND_VALIDATE_INTERVAL_SECONDS,
        "options": {"expires": BACKEND_VALIDATE_INTERVAL_SECONDS - 30},
    },
    "tokens-sweep": {
        "task": "broker.tasks.tokens_sweep_task",
        "schedule": TOKEN_SWEEP_INTERVAL_SECONDS,
        "options": {"expires": TOKEN_SWEEP_INTERVAL_SECONDS - 5},
    },
}


# --- Agents ------------------------------------------------------------------------------
# Enrollment is open to anyone who can reach the server, so it is rate limited per address.
ENROLL_RATE = env_str("KEYBROKER_ENROLL_RATE", "20/10m")
try:
    from broker.infra.ratelimit import Rate

    Rate.parse(ENROLL_RATE)
except ValueError as exc:
    raise ImproperlyConfigured(f"KEYBROKER_ENROLL_RATE: {exc}") from None
# Failed authentication (bad client secrets, vend tokens, JWTs): per address, per client id
# from an address, and how many auth.failed audit rows one address may write per window.
AUTH_FAILURE_RATE = env_str("KEYBROKER_AUTH_FAILURE_RATE", "20/5m")
AUTH_CLIENT_FAILURE_RATE = env_str("KEYBROKER_AUTH_CLIENT_FAILURE_RATE", "5/5m")
AUTH_FAILURE_AUDIT_RATE = env_str("KEYBROKER_AUTH_FAILURE_AUDIT_RATE", "10/10m")
for _name, _rate in (
    ("KEYBROKER_AUTH_FAILURE_RATE", AUTH_FAILURE_RATE),
    ("KEYBROKER_AUTH_CLIENT_FAILURE_RATE", AUTH_CLIENT_FAILURE_RATE),
    ("KEYBROKER_AUTH_FAILURE_AUDIT_RATE", AUTH_FAILURE_AUDIT_RATE),
):
    try:
        Rate.parse(_rate)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{_name}: {exc}") from None
# The JWT signing algorithm for new keys (existing keys keep theirs until `oidc rotate-key`).
OIDC_SIGNING_ALGORITHM = env_str("KEYBROKER_OIDC_ALGORITHM", "RS256").upper()
if OIDC_SIGNING_ALGORITHM not in {"RS256", "ES256"}:
    raise ImproperlyConfigured(
        f"KEYBROKER_OIDC_ALGORITHM must be RS256 or ES256, not {OIDC_SIGNING_ALGORITHM!r}"
    )
OIDC_TOKEN_LIFETIME_SECONDS = env_int(
    "KEYBROKER_OIDC_TOKEN_LIFETIME", default=3600, minimum=60, maximum=3600
)


# --- Django ----------------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "broker",
    "proxy",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "broker.project.urls"
ASGI_APPLICATION = "broker.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
# Short ISO-like dates in the admin (broker/project/formats/en/formats.py).
FORMAT_MODULE_PATH = ["broker.project.formats"]
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "broker.api.auth.AdminTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "EXCEPTION_HANDLER": "broker.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "keybroker",
    "DESCRIPTION": (
        "Credential broker for AI agents: agents enroll, an admin approves them, and they "
        "mint short-lived crd_ tokens to call upstream APIs through the proxy."
    ),
    "VERSION": VERSION,
    "SERVE_INCLUDE_SCHEMA": False,
    # Separate request and response components, so write-only fields (secrets) show as such.
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI from the installed sidecar package: the docs work without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        # Each operation's refusals, which the exception handler answers in one shape.
        "broker.api.schema.document_refusals",
        # Tags by audience (agent, admin, OIDC, health) and the proxy, which is not DRF's.
        "broker.api.schema.tag_by_audience",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact_secrets": {"()": "broker.project.logging.RedactSecretsFilter"},
        "quiet_readiness": {"()": "broker.project.logging.QuietReadinessFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": env_str("KEYBROKER_LOG_LEVEL", "INFO").upper()},
    "loggers": {
        "django.request": {"level": "ERROR", "filters": ["quiet_readiness"]},
        "httpx": {"level": "WARNING"},
    },
}


# --- Prices ------------------------------------------------------------------------------
# The operator's price table (TOML, as broker/prices/*.toml): its entries win over the
# shipped ones (README, "Cost").
PRICES_FILE = env_str("KEYBROKER_PRICES_FILE")


# --- Proxy -------------------------------------------------------------------------------
# Anthropic accepts request bodies up to 32 MB; bigger ones get 413 before going upstream.
PROXY_MAX_BODY_BYTES = env_int("KEYBROKER_PROXY_MAX_BODY", default=32 * 1024 * 1024, minimum=1024)
# The longest silence allowed while waiting for the upstream (between stream chunks, or for
# a non-streamed answer); there is no limit on a stream's total length.
PROXY_IDLE_TIMEOUT_SECONDS = env_int("KEYBROKER_PROXY_IDLE_TIMEOUT", default=600, minimum=1)
PROXY_CONNECT_TIMEOUT_SECONDS = env_int("KEYBROKER_PROXY_CONNECT_TIMEOUT", default=10, minimum=1)
# Slow clients (broker/runtime/http_timeouts.py): request headers must be complete this many seconds
# after a connection opens or a request begins; a request body may pause this long between
# chunks (408 after).
HEADER_TIMEOUT_SECONDS = env_int("KEYBROKER_HEADER_TIMEOUT", default=10, minimum=1)
BODY_READ_TIMEOUT_SECONDS = env_int("KEYBROKER_BODY_READ_TIMEOUT", default=30, minimum=1)
# How long an idle client connection is kept open. Longer than any client's own idle expiry
# (the Anthropic SDK's httpx 5 s, aiohttp 15 s, Go 90 s is the outlier), as nginx's 75 s is:
# a server that closes first races the client's next request on that connection, and the
# call fails before keybroker reads it (docs/decisions.md, "Idle connections").
KEEP_ALIVE_SECONDS = env_int("KEYBROKER_KEEP_ALIVE", default=75, minimum=1)
# Each open stream holds one upstream connection; beyond this many, new calls queue.
PROXY_MAX_CONNECTIONS = env_int("KEYBROKER_PROXY_MAX_CONNECTIONS", default=10_000, minimum=1)
# Proxied calls are in the audit trail; uvicorn's access log line for each is opt-in.
PROXY_ACCESS_LOG = env_bool("KEYBROKER_PROXY_ACCESS_LOG", default=False)
# A backstop: cached token state is re-read at least this often even without a change signal.
PROXY_CACHE_SECONDS = env_int("KEYBROKER_PROXY_CACHE_SECONDS", default=30, minimum=0)
# Redis connections per web process for the proxy's access and policy checks, shared by all
# agents. A call finds one free within microseconds; when all are busy it waits up to
# PROXY_REDIS_WAIT_SECONDS (then 503), never failing open and never failing other agents.
# Counting usage after a call has a small pool of its own (broker/infra/redis.py).
PROXY_REDIS_CONNECTIONS = env_int("KEYBROKER_PROXY_REDIS_CONNECTIONS", default=64, minimum=1)
PROXY_REDIS_WAIT_SECONDS = 2
# Request bodies held in memory at once by one web process (all calls together): a call
# that would go over waits for none, it gets 503 with retry-after.
PROXY_BUFFERED_BODY_BYTES = env_int(
    "KEYBROKER_PROXY_BUFFERED_BODY", default=256 * 1024 * 1024, minimum=1024 * 1024
)


# --- Audit -------------------------------------------------------------------------------
# Audit events older than this are deleted by the retention task; nothing else deletes one.
AUDIT_RETENTION_DAYS = env_int("KEYBROKER_AUDIT_RETENTION_DAYS", default=90, minimum=1)
AUDIT_RETENTION_INTERVAL_SECONDS = 3600
# A copy of every event, as it is written, for a SIEM: udp://HOST:PORT or tcp://HOST:PORT
# (RFC 5424 syslog; audit/sink.py). Off when empty.
AUDIT_SYSLOG = env_str("KEYBROKER_AUDIT_SYSLOG")
if AUDIT_SYSLOG:
    _syslog = urlsplit(AUDIT_SYSLOG)
    try:
        _syslog_port = _syslog.port
    except ValueError:
        _syslog_port = None
    if _syslog.scheme not in ("udp", "tcp") or not _syslog.hostname or _syslog_port is None:
        raise ImproperlyConfigured(
            "KEYBROKER_AUDIT_SYSLOG must be udp://HOST:PORT or tcp://HOST:PORT, "
            f"not {AUDIT_SYSLOG!r}"
        )
CELERY_BEAT_SCHEDULE["audit-retention"] = {
    "task": "audit.tasks.audit_prune_task",
    "schedule": AUDIT_RETENTION_INTERVAL_SECONDS,
    "options": {"expires": AUDIT_RETENTION_INTERVAL_SECONDS - 60},
}
# The usage rollups take in new proxied calls this often: the usage API is this far behind.
USAGE_ROLLUP_INTERVAL_SECONDS = 30
CELERY_BEAT_SCHEDULE["usage-rollup"] = {
    "task": "audit.tasks.usage_rollup_task",
    "schedule": USAGE_ROLLUP_INTERVAL_SECONDS,
    "options": {"expires": USAGE_ROLLUP_INTERVAL_SECONDS - 5},
}


# --- Policy ------------------------------------------------------------------------------
# With Redis unreachable, rates and budgets cannot be checked: refuse such calls (503) by
# default; when set, let them through uncounted (availability over limits).
POLICY_FAIL_OPEN = env_bool("KEYBROKER_POLICY_FAIL_OPEN", default=False)
# The length of the rpm and tpm windows. Not an environment setting: the limits are per
# minute by name; tests shorten it to see a window pass.
POLICY_WINDOW_SECONDS = 60


# --- Metrics -----------------------------------------------------------------------------
# GET /metrics answers an admin token (or a staff session) with view_auditevent, or any client
# from these addresses; empty: tokens only, since behind a proxy on the same machine every
# client would come from loopback (docs/decisions.md, "Metrics").
METRICS_ALLOW = _networks(env_str("KEYBROKER_METRICS_ALLOW"), variable="KEYBROKER_METRICS_ALLOW")
# Agent names as a label of the per-call metrics: one series per agent, so opt-in.
METRICS_AGENT_LABEL = env_bool("KEYBROKER_METRICS_AGENT_LABEL", default=False)

# --- Alerts (issue 17): channels, deliveries, the spike rule, email --------------------------
# A delivery is tried at most this many times, waiting base * 2^(n-1) seconds (capped)
# between tries.
ALERT_MAX_ATTEMPTS = env_int("KEYBROKER_ALERT_MAX_ATTEMPTS", default=8, minimum=1, maximum=50)
ALERT_RETRY_BASE_SECONDS = env_int("KEYBROKER_ALERT_RETRY_BASE", default=10, minimum=1)
ALERT_RETRY_MAX_SECONDS = env_int("KEYBROKER_ALERT_RETRY_MAX", default=3600, minimum=1)
# The spike rule (docs/alerts.md): an agent's last hour against the mean hour of the 24
# before it; at most one spike alert per agent and rule in this many seconds.
ALERT_SPIKE_FACTOR = env_int("KEYBROKER_ALERT_SPIKE_FACTOR", default=3, minimum=2)
ALERT_SPIKE_MIN_USD = env_str("KEYBROKER_ALERT_SPIKE_MIN_USD", "1.00")
ALERT_SPIKE_MIN_ERRORS = env_int("KEYBROKER_ALERT_SPIKE_MIN_ERRORS", default=20, minimum=1)
ALERT_SPIKE_INTERVAL_SECONDS = 600
ALERT_SPIKE_QUIET_SECONDS = 6 * 3600
try:
    from decimal import Decimal, InvalidOperation

    if not Decimal(ALERT_SPIKE_MIN_USD) >= 0:
        raise InvalidOperation
except InvalidOperation:
    raise ImproperlyConfigured(
        f"KEYBROKER_ALERT_SPIKE_MIN_USD must be an amount of dollars such as 1.00, "
        f"not {ALERT_SPIKE_MIN_USD!r}"
    ) from None
ALERT_REQUEUE_INTERVAL_SECONDS = 300
CELERY_BEAT_SCHEDULE["alerts-requeue"] = {
    "task": "audit.tasks.notification_requeue_task",
    "schedule": ALERT_REQUEUE_INTERVAL_SECONDS,
    "options": {"expires": ALERT_REQUEUE_INTERVAL_SECONDS - 30},
}
CELERY_BEAT_SCHEDULE["alerts-spike"] = {
    "task": "audit.tasks.alerts_spike_task",
    "schedule": ALERT_SPIKE_INTERVAL_SECONDS,
    "options": {"expires": ALERT_SPIKE_INTERVAL_SECONDS - 30},
}
# Email channels send through Django's SMTP backend with these.
EMAIL_HOST = env_str("KEYBROKER_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("KEYBROKER_EMAIL_PORT", default=25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("KEYBROKER_EMAIL_USER")
EMAIL_HOST_PASSWORD = env_secret("KEYBROKER_EMAIL_PASSWORD") or ""
EMAIL_USE_TLS = env_bool("KEYBROKER_EMAIL_STARTTLS", default=False)
EMAIL_USE_SSL = env_bool("KEYBROKER_EMAIL_SSL", default=False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env_str("KEYBROKER_EMAIL_FROM", f"keybroker@{_public_host or 'localhost'}")
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("set KEYBROKER_EMAIL_STARTTLS or KEYBROKER_EMAIL_SSL, not both")

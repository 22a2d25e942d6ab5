"""Minimal Django settings for the candidate proxies (not the project's settings).

``BENCH_DJANGO_MIDDLEWARE=project`` adds keybroker's own middleware list, to see what it
costs on a proxied request; the default has none, which is Django's floor.
"""

from __future__ import annotations

import os
import secrets

SECRET_KEY = secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bench.candidates.urls"
USE_TZ = True
USE_I18N = False
DATABASES: dict[str, dict[str, str]] = {}
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []

if os.environ.get("BENCH_DJANGO_MIDDLEWARE") == "project":
    INSTALLED_APPS = [
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
    ]
    # Copied from broker/project/settings.py (not imported: the candidates stand alone).
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ]

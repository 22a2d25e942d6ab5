from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def run() -> str:
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    return out.getvalue()


def test_it_creates_the_first_admin_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_ADMIN_USER", "alice")
    monkeypatch.setenv("KEYBROKER_ADMIN_PASSWORD", "correct-horse-battery")
    output = run()
    assert "correct-horse-battery" not in output
    alice = get_user_model().objects.get(username="alice")
    assert alice.is_superuser
    assert alice.is_staff
    assert alice.check_password("correct-horse-battery")


def test_it_generates_and_prints_a_password_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYBROKER_ADMIN_USER", raising=False)
    monkeypatch.delenv("KEYBROKER_ADMIN_PASSWORD", raising=False)
    first = run()
    admin = get_user_model().objects.get(username="admin")
    printed = first.split("user admin, password ")[1].split()[0]
    assert admin.check_password(printed)
    # Framed, so it stands out of a log, and saying where to change it.
    lines = first.splitlines()
    assert lines[0] == lines[-1] == "+" + "-" * (len(lines[1]) - 2) + "+"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[1:-1])
    assert "shown only this once" in first
    assert "/admin/ and change it there (Change password," in first
    assert "manage.py changepassword admin" in first
    second = run()
    assert printed not in second
    assert "exists" in second
    assert get_user_model().objects.count() == 1

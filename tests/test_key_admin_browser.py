"""Rotating one key of a pool as a person does it (issue 15): a real Chromium on the
backend's admin page, against the live server."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEvent
from broker.selectors.backend_keys import keys_of
from broker.services.backend_keys import key_add
from broker.services.backends import backend_add
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_alice_picks_a_key_of_the_pool_and_pastes_its_new_secret(
    page: Any, live_url: str, fake_anthropic: FakeAnthropic
) -> None:
    first, second, new = api_key(tail="Brw1"), api_key(tail="Brw2"), api_key(tail="Brw9")
    fake_anthropic.valid_keys.add(new)  # the admin checks it against the upstream first
    backend = backend_add(name="anthropic", secret=first, base_url=fake_anthropic.url)
    key_add(backend=backend, secret=second, weight=2)
    log_in(page, live_url, next_path=f"/admin/broker/backend/{backend.pk}/change/")
    page.wait_for_selector(".kb-keys")
    assert page.get_attribute("#id_new_secret", "type") == "password"
    page.fill("#id_new_secret", new)
    page.select_option("#id_rotate_fingerprint", "sk-ant-api03-…Brw2")
    page.click("input[name=_continue]")
    page.wait_for_selector(".messagelist .success")
    pool = page.inner_text(".kb-keys")
    assert "sk-ant-api03-…Brw9" in pool
    assert "sk-ant-api03-…Brw2" not in pool
    assert page.input_value("#id_new_secret") == ""  # never pre-filled
    for secret in (first, second, new):
        assert secret not in page.content()
    page.screenshot(path=str(ARTIFACTS / "admin-key-rotated.png"), full_page=True)
    assert [(k.fingerprint, k.weight) for k in keys_of(backend)] == [
        ("sk-ant-api03-…Brw1", 1),
        ("sk-ant-api03-…Brw9", 2),  # its place and weight stay
    ]
    assert AuditEvent.objects.get(action="backend.rotated").actor == "alice"


def test_alice_is_told_to_pick_the_key_when_the_pool_has_several(page: Any, live_url: str) -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Brw1"))
    key_add(backend=backend, secret=api_key(tail="Brw2"))
    log_in(page, live_url, next_path=f"/admin/broker/backend/{backend.pk}/change/")
    page.wait_for_selector(".kb-keys")
    page.fill("#id_new_secret", api_key(tail="Brw9"))
    page.click("input[name=_continue]")
    page.wait_for_selector(".errorlist")
    assert "name the one to replace" in page.inner_text(".field-rotate_fingerprint")
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…Brw1", "sk-ant-api03-…Brw2"]

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from broker.management.commands._output import first_admin_box
from broker.project.env import env_secret, env_str
from broker.services.admins import admin_ensure_first


class Command(BaseCommand):
    help = (
        "Create the first admin from KEYBROKER_ADMIN_USER / KEYBROKER_ADMIN_PASSWORD unless "
        "an admin exists; without a password one is generated and printed once."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        result = admin_ensure_first(
            username=env_str("KEYBROKER_ADMIN_USER", "admin"),
            password=env_secret("KEYBROKER_ADMIN_PASSWORD"),
        )
        name = result.user.get_username()
        if not result.created:
            self.stdout.write(f"admin user {name!r} exists; leaving it as it is")
        elif result.generated_password:
            self.stdout.write(
                first_admin_box(
                    name=name, password=result.generated_password, url=settings.PUBLIC_URL
                )
            )
        else:
            self.stdout.write(f"created admin user {name!r} with the password from the environment")

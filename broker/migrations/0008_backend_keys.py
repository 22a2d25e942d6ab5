"""A backend holds a pool of keys (issue 15): each backend's one stored secret becomes the
only key of its pool, then the backend's own column goes. A client-key or workload identity
backend stores no secret and gets no key.

The ciphertext is copied as stored: both columns are sealed by the same box
(broker.infra.fields), so nothing is decrypted here, and a key never passes through Python.
"""

from typing import Any

import django.db.models.deletion
import django_cryptography.fields
from django.db import migrations, models


def _pool_of_one(apps: Any, schema_editor: Any) -> None:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            'INSERT INTO broker_backendkey (backend_id, "position", secret, fingerprint, auth_scheme, '
            "weight, enabled, validation_state, validation_checked_at, validation_message, "
            "created_at) "
            "SELECT id, 0, secret, secret_fingerprint, auth_scheme, 1, %s, validation_state, "
            "validation_checked_at, validation_message, COALESCE(rotated_at, created_at) "
            "FROM broker_backend WHERE client_key = %s AND federation_rule_id = '' "
            "AND secret_fingerprint != ''",
            [True, False],
        )


class Migration(migrations.Migration):
    dependencies = [
        ("broker", "0007_segment_path_globs"),
    ]

    operations = [
        migrations.CreateModel(
            name="BackendKey",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("position", models.PositiveIntegerField(default=0)),
                ("secret", django_cryptography.fields.encrypt(models.TextField(editable=False))),
                ("fingerprint", models.CharField(max_length=64)),
                ("auth_scheme", models.CharField(max_length=16)),
                ("weight", models.PositiveIntegerField(default=1)),
                ("enabled", models.BooleanField(default=True)),
                (
                    "validation_state",
                    models.CharField(
                        choices=[
                            ("unknown", "Unknown"),
                            ("valid", "Valid"),
                            ("invalid", "Invalid"),
                            ("unreachable", "Unreachable"),
                        ],
                        default="unknown",
                        max_length=16,
                    ),
                ),
                ("validation_checked_at", models.DateTimeField(blank=True, null=True)),
                ("validation_message", models.CharField(blank=True, max_length=500)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "backend",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="keys",
                        to="broker.backend",
                    ),
                ),
            ],
            options={
                "ordering": ["position", "pk"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("backend", "fingerprint"), name="backend_key_fingerprint_unique"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("weight__gte", 1)), name="backend_key_weight"
                    ),
                ],
            },
        ),
        migrations.RunPython(_pool_of_one, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name="backend",
            name="secret",
        ),
    ]

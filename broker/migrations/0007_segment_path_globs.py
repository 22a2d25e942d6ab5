"""Path globs became segment-aware (issue 19): ``*`` no longer crosses ``/``.

Patterns saved before meant what fnmatch made of them, so every run of ``*`` becomes
``**`` and each grant and backend default keeps exactly what it allowed (``?`` stays:
it could match ``/`` before, which no one writes on purpose). Admins tighten them from
there: ``/v1/messages**`` shows what ``/v1/messages*`` quietly allowed.
"""

from __future__ import annotations

import re
from typing import Any

from django.db import migrations


def _rewrite(apps: Any, star: str, column_of: dict[str, str]) -> None:
    for model_name, column in column_of.items():
        model = apps.get_model("broker", model_name)
        for row in model.objects.exclude(**{f"{column}__isnull": True}).only("pk", column):
            patterns = getattr(row, column)
            if not isinstance(patterns, list):
                continue
            rewritten = [re.sub(r"\*+", star, p) if isinstance(p, str) else p for p in patterns]
            if rewritten != patterns:
                model.objects.filter(pk=row.pk).update(**{column: rewritten})


COLUMNS = {"Grant": "allowed_paths", "Backend": "default_paths"}


def forwards(apps: Any, schema_editor: Any) -> None:
    _rewrite(apps, "**", COLUMNS)


def backwards(apps: Any, schema_editor: Any) -> None:
    _rewrite(apps, "*", COLUMNS)


class Migration(migrations.Migration):
    dependencies = [("broker", "0006_max_concurrent")]

    operations = [migrations.RunPython(forwards, backwards)]

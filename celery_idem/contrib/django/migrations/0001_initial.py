"""The step table of ``self.idempotency.transaction``."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Step",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("record_key", models.TextField()),
                ("name", models.TextField()),
                ("fence", models.BigIntegerField()),
                ("digest", models.TextField()),
                ("ctype", models.TextField()),
                ("cenc", models.TextField()),
                ("value", models.BinaryField()),
                ("expires_at", models.BigIntegerField(db_index=True)),
            ],
            options={"db_table": "celery_idem_steps"},
        ),
        migrations.AddConstraint(
            model_name="step",
            constraint=models.UniqueConstraint(
                fields=("record_key", "name"), name="celery_idem_steps_key_name"
            ),
        ),
    ]

"""The step table of ``self.idempotency.transaction``, as a Django model (for the migration)."""

from __future__ import annotations

from django.db import models


class Step(models.Model):  # type: ignore[misc]
    """One stored step: (record key, name) → the fence that wrote it and fn's value.

    celery_idem reads and writes it with SQL of its own (the same on every adapter);
    the model exists so the table is created and changed by migrations.
    """

    id = models.BigAutoField(primary_key=True)
    record_key = models.TextField()
    name = models.TextField()
    fence = models.BigIntegerField()
    digest = models.TextField()
    ctype = models.TextField()
    cenc = models.TextField()
    value = models.BinaryField()
    expires_at = models.BigIntegerField(db_index=True)

    class Meta:
        db_table = "celery_idem_steps"
        constraints = [
            models.UniqueConstraint(fields=["record_key", "name"], name="celery_idem_steps_key_name")
        ]

    def __str__(self) -> str:
        return f"{self.record_key} {self.name} (fence {self.fence})"

"""The ledger: no unique constraint, so an effect made twice shows as two rows."""

from __future__ import annotations

from django.db import models


class Ledger(models.Model):
    order_id = models.TextField()
    cents = models.IntegerField()

    def __str__(self) -> str:
        return f"{self.order_id}: {self.cents}"

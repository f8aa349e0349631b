"""``manage.py celery_idem_purge_steps``: delete the step rows whose time has passed."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):  # type: ignore[misc]
    """Delete expired rows of celery_idem's step table (workers also do it every ten minutes)."""

    help = "Delete expired rows of celery_idem's step table."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default", help="the database alias (default: default)")

    def handle(self, *args: Any, **options: Any) -> None:
        from celery_idem.contrib.django import DjangoDatabase
        from celery_idem.effects import purge_steps

        deleted = purge_steps(DjangoDatabase(options["database"]))
        self.stdout.write(f"deleted {deleted} expired step row(s)")

"""The project's Celery app, set up as a Django project sets up its own.

A worker runs it (``celery -A tests.django_project.celery_app worker``, see
:class:`tests.helpers.Worker`); the settings come from Django's, ``CELERY_``-prefixed,
so ``CELERY_IDEMPOTENCY_DATABASE = "django"`` is read as ``idempotency_database``.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")

app = Celery("django_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def events() -> redis.Redis:
    """Where the tasks report to the test (a client per call: pool processes fork)."""
    return redis.Redis.from_url(app.conf.get("test_events_url"), decode_responses=True)


@signals.worker_ready.connect(weak=False)
def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    events().rpush(f"ready:{sender.hostname}", "1")

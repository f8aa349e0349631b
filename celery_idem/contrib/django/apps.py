"""The Django app of celery_idem: its step table, by migration."""

from __future__ import annotations

from django.apps import AppConfig


class CeleryIdemConfig(AppConfig):  # type: ignore[misc]
    """``celery_idem.contrib.django``: add it to ``INSTALLED_APPS`` and migrate."""

    name = "celery_idem.contrib.django"
    label = "celery_idem"
    verbose_name = "celery-idem"
    default_auto_field = "django.db.models.AutoField"

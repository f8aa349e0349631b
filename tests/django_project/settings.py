"""Settings of the test project: PostgreSQL database ``test``, a schema of the test's own."""

from __future__ import annotations

import json
import os
from typing import Any

SECRET_KEY = "celery-idem-tests"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["celery_idem.contrib.django", "tests.django_project.ledger"]


def _database(schema: str) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "test",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("IDEM_DJANGO_PORT", "5432"),
        "OPTIONS": {"options": f"-c search_path={schema}", "connect_timeout": 2},
    }


DATABASES = {"default": _database(os.environ["IDEM_DJANGO_SCHEMA"])}
if os.environ.get("IDEM_DJANGO_OTHER_SCHEMA"):
    DATABASES["other"] = _database(os.environ["IDEM_DJANGO_OTHER_SCHEMA"])

# Celery reads the CELERY_-prefixed settings (app.config_from_object(namespace="CELERY")).
CELERY_IDEMPOTENCY_DATABASE = "django"
for _name, _value in json.loads(os.environ.get("IDEM_TEST_CONF", "{}")).items():
    globals()[f"CELERY_{_name.upper()}"] = _value

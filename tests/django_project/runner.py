"""Run one scenario of the Django tests in a process of its own: set up, migrate, run.

``python -m tests.django_project.runner <module>:<function>`` with
``IDEM_DJANGO_SCHEMA`` (and the settings' other variables) and ``IDEM_DJANGO_CONTEXT``
(JSON: ``redis_url``, and ``proxy: true`` to reach PostgreSQL through a
:class:`tests.helpers.Proxy` the scenario can cut) in the environment. Django is set
up, every database alias is migrated for real (``migrate``), then the function is
called with a :class:`Context`; what it returns is printed as JSON on the last line,
after :data:`RESULT`. An assertion that fails in the scenario fails the process.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

#: What the line holding the scenario's result starts with.
RESULT = "scenario result: "


@dataclass
class Context:
    """What a scenario gets: the test's Redis, and the proxy in front of PostgreSQL if asked."""

    redis_url: str
    proxy: Any = None

    def app(self, **conf: Any) -> Any:
        """An eager app of ``tests.worker_app`` whose transactions go to Django's ``default``."""
        from tests.worker_app import make_app

        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": self.redis_url,
                "test_events_url": self.redis_url,
                "idempotency_database": "django",
                **conf,
            }
        )
        app.effects = {}
        return app


def main(target: str) -> None:
    context = json.loads(os.environ.get("IDEM_DJANGO_CONTEXT", "{}"))
    proxy = None
    if context.get("proxy"):
        from tests.helpers import Proxy

        proxy = Proxy("127.0.0.1", 5432)
        os.environ["IDEM_DJANGO_PORT"] = str(proxy.port)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    for alias in connections:
        call_command("migrate", database=alias, verbosity=0)
    module, _, name = target.partition(":")
    scenario = getattr(importlib.import_module(module), name)
    try:
        result = scenario(Context(context["redis_url"], proxy))
    finally:
        connections.close_all()
        if proxy is not None:
            proxy.close()
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

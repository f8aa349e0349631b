"""The benchmark's no-op task on the bases of celery-once and celery-singleton.

Configured per their documentation: celery-once through ``app.conf.ONCE``
(``celery_once.backends.Redis`` with a ``url``), celery-singleton through
``singleton_backend_url``; the peers benchmark points both at the records server.
Both are given ``acks_late=True`` like the other tasks, so the broker does the same
work for every variant (their own default is Celery's, ``acks_late=False``).
"""

from __future__ import annotations

from celery import Celery
from celery_once import QueueOnce
from celery_singleton import Singleton

from ..probe import probe


def register(app: Celery) -> None:
    """Define ``bench.once`` and ``bench.singleton`` on ``app``."""

    @app.task(base=QueueOnce, shared=False, name="bench.once", acks_late=True, reject_on_worker_lost=True)
    def once(i: int) -> None:
        probe.body_start()
        probe.body_end()

    @app.task(
        base=Singleton, shared=False, name="bench.singleton", acks_late=True, reject_on_worker_lost=True
    )
    def singleton(i: int) -> None:
        probe.body_start()
        probe.body_end()

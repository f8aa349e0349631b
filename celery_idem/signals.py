"""Signals celery_idem sends, for metrics, logs and alerts.

Receivers get ``sender`` = the task and the keyword arguments listed:

* :data:`task_replayed`: a delivery returned a recorded outcome without running
  (``request``, ``key``, ``token``, ``failed``);
* :data:`task_conflict`: a delivery found a live run holding its key
  (``request``, ``key``, ``holder``, ``policy``);
* :data:`lease_taken_over`: a delivery took over the key of a run that stopped
  renewing its lease (``request``, ``key``, ``token``);
* :data:`lease_lost`: a run finished but could not commit, because another run
  took its key over (``request``, ``key``, ``token``).

The Celery signals celery_idem handles are connected in :mod:`celery_idem.hooks`.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["lease_lost", "lease_taken_over", "task_conflict", "task_replayed"]

task_replayed = Signal(name="celery_idem.task_replayed", providing_args={"request", "key", "token", "failed"})
task_conflict = Signal(
    name="celery_idem.task_conflict", providing_args={"request", "key", "holder", "policy"}
)
lease_taken_over = Signal(name="celery_idem.lease_taken_over", providing_args={"request", "key", "token"})
lease_lost = Signal(name="celery_idem.lease_lost", providing_args={"request", "key", "token"})

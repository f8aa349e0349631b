"""Signals celery_idem sends, and the Celery signals it handles.

Our signals, for metrics and logs (receivers get ``sender`` = the task and the
keyword arguments listed):

* :data:`task_replayed`: a delivery returned a recorded outcome without running
  (``request``, ``key``, ``token``, ``failed``);
* :data:`task_conflict`: a delivery found a live run holding its key
  (``request``, ``key``, ``holder``, ``policy``);
* :data:`lease_taken_over`: a delivery took over the key of a run that stopped
  renewing its lease (``request``, ``key``, ``token``);
* :data:`lease_lost`: a run finished but could not commit, because another run
  took its key over (``request``, ``key``, ``token``).

Celery hooks, connected when ``celery_idem`` is imported: validate options at
worker start, give forked pool processes their own connections, and free the key
of a run terminated by ``revoke(terminate=True)``.
"""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.utils.dispatch import Signal
from celery.utils.log import get_logger

from .broker import supported
from .config import atomic_fetch_transport, check_app_settings, resolve
from .errors import ImproperlyConfigured
from .lease import reset_renewer
from .store import BACKEND_ERRORS, describe_error, reset_stores

__all__ = [
    "lease_lost",
    "lease_taken_over",
    "release_revoked",
    "reset_after_fork",
    "task_conflict",
    "task_replayed",
    "validate_on_worker_start",
]

logger = get_logger(__name__)

task_replayed = Signal(name="celery_idem.task_replayed", providing_args={"request", "key", "token", "failed"})
task_conflict = Signal(
    name="celery_idem.task_conflict", providing_args={"request", "key", "holder", "policy"}
)
lease_taken_over = Signal(name="celery_idem.lease_taken_over", providing_args={"request", "key", "token"})
lease_lost = Signal(name="celery_idem.lease_lost", providing_args={"request", "key", "token"})


@signals.worker_init.connect(weak=False)
def validate_on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Re-resolve every idempotent task's options against the worker's final config.

    Also switches a Redis broker to :class:`celery_idem.broker.Transport`, whose
    fetch cannot lose a message (see ``idempotency_atomic_redis_fetch``).

    Settings may change after the tasks were bound (in ``celeryd_init`` handlers,
    say), so they are resolved again here. A bad setting stops the worker with the
    :class:`~celery_idem.errors.ImproperlyConfigured` message: Celery logs and
    swallows exceptions raised by signal handlers, so this one exits instead.
    """
    from .task import IdempotentTask

    app = sender.app
    try:
        check_app_settings(app)
        for task in app.tasks.values():
            if isinstance(task, IdempotentTask):
                type(task)._resolved_idempotency = resolve(app, type(task))
        transport = atomic_fetch_transport(app)
    except ImproperlyConfigured as exc:
        raise SystemExit(f"celery-idem: {exc}") from exc
    if transport is not None and supported():
        # Before the consumer connects: every connection it opens uses this transport.
        app.conf.broker_transport = transport
        logger.info("celery-idem: fetching messages with %s", transport)


@signals.worker_process_init.connect(weak=False)
def reset_after_fork(**kwargs: Any) -> None:
    """Give a new pool process its own Redis connections and renewal thread."""
    reset_stores()
    reset_renewer()


@signals.task_revoked.connect(weak=False)
def release_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **kwargs: Any) -> None:
    """Free the key of a run killed by ``revoke(terminate=True)`` instead of waiting out its lease."""
    from .task import IdempotentTask

    if not terminated or not isinstance(sender, IdempotentTask) or request is None:
        return
    try:
        released = sender.release_terminated(request)
    except BACKEND_ERRORS as exc:
        logger.warning(
            "celery-idem: could not release the key of revoked task %s: %s", request.id, describe_error(exc)
        )
        return
    if released:
        logger.info("celery-idem: released the key of terminated task %s", request.id)

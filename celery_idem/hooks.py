"""The Celery signals celery_idem handles, connected when ``celery_idem`` is imported.

* ``worker_init``: validate every idempotent task's options against the worker's
  final configuration, switch a Redis broker to celery_idem's transport, and add
  the :class:`~celery_idem.eventloop.ReadyAwarePoll` bootstep;
* ``worker_process_init``: give a forked pool process its own Redis and database
  connections and renewal thread;
* ``before_task_publish``: leave an idempotent task's ``expires`` to the worker
  (``idempotency_worker_expiry``).

Nothing here connects to Redis or imports redis-py or kombu's Redis transport at
import time: a process that only sends tasks never loads them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals
from celery.utils.log import get_logger

from .config import atomic_fetch_transport, check_app_settings, check_connection, resolve
from .errors import ImproperlyConfigured, describe_error
from .eventloop import ReadyAwarePoll
from .task import WITHOUT_BROKER_TTL, IdempotentTask

__all__ = ["ReportFetch", "drop_broker_ttl", "reset_after_fork", "validate_on_worker_start"]

logger = get_logger(__name__)

#: Celery's default ``worker_lost_wait``.
_CELERY_LOST_WAIT = 10.0


@signals.worker_init.connect(weak=False)
def validate_on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Re-resolve every idempotent task's options against the worker's final config.

    Also switches a Redis broker to :class:`celery_idem.broker.Transport`, whose
    fetch cannot lose a message (see ``idempotency_atomic_redis_fetch``), and adds
    the bootstep that keeps the event loop from stalling between late-acknowledged
    tasks (:mod:`celery_idem.eventloop`).

    Only for apps with at least one :class:`~celery_idem.IdempotentTask`: the
    ``celery idem`` command loads this package into every ``celery`` process, and a
    worker of an app that does not use celery_idem must not change.

    Settings may change after the tasks were bound (in ``celeryd_init`` handlers,
    say), so they are resolved again here. A bad setting stops the worker with the
    :class:`~celery_idem.errors.ImproperlyConfigured` message: Celery logs and
    swallows exceptions raised by signal handlers, so this one exits instead.
    """
    app = sender.app
    # The ``celery idem`` command imports this package into every ``celery`` process:
    # a worker of an app with no idempotent task is left as Celery made it.
    idempotent = [task for task in app.tasks.values() if isinstance(task, IdempotentTask)]
    if not idempotent:
        return
    try:
        check_app_settings(app)
        for task in idempotent:
            config = type(task)._resolved_idempotency = resolve(app, type(task))
            check_connection(config)
        transport = atomic_fetch_transport(app)
    except ImproperlyConfigured as exc:
        raise SystemExit(f"celery-idem: {exc}") from exc
    from .request import WORKER_LOST_WAIT, WatchPoolProcesses

    # Read by the worker right after this signal, when it builds its blueprint.
    app.steps["worker"].add(ReadyAwarePoll)
    app.steps["worker"].add(WatchPoolProcesses)
    if "worker_lost_wait" not in app.conf.changes and sender.worker_lost_wait == _CELERY_LOST_WAIT:
        # Report a dead pool process's tasks after 1 s, not 10: their messages come
        # back sooner, and celery_idem has freed their keys already.
        sender.worker_lost_wait = WORKER_LOST_WAIT
    sender.celery_idem_fetch = None
    if transport is not None:
        reason = _transport_fallback_reason()
        if reason is None:
            # Before the consumer connects: every connection it opens uses this transport.
            app.conf.broker_transport = transport
            sender.celery_idem_fetch = (logging.INFO, "celery-idem: fetching messages with %s", (transport,))
        else:
            sender.celery_idem_fetch = (
                logging.WARNING,
                "celery-idem: fetching messages with kombu's own Redis transport: %s; "
                "a worker killed while fetching can lose a message",
                (reason,),
            )
        app.steps["worker"].add(ReportFetch)


class ReportFetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Logs which fetch the worker's Redis broker uses, once the worker's logging is set up.

    The choice is made in ``worker_init``, before the consumer connects, but the
    ``celery worker`` command configures logging after that signal: a line logged
    there reaches no handler. Worker steps start after logging is set up.
    """

    def start(self, worker: Any) -> None:
        """Log the fetch chosen at ``worker_init``, if the broker is Redis."""
        # None for a later worker of the same app whose broker is not Redis.
        report = getattr(worker, "celery_idem_fetch", None)
        if report is not None:
            level, message, args = report
            logger.log(level, message, *args)


def _transport_fallback_reason() -> str | None:
    try:
        from .broker import fallback_reason
    except ImportError as exc:  # kombu's Redis transport itself is unusable here
        return f"celery_idem.broker cannot be imported ({describe_error(exc)})"
    return fallback_reason()


@signals.worker_process_init.connect(weak=False)
def reset_after_fork(**kwargs: Any) -> None:
    """Give a new pool process its own Redis and database connections and renewal thread."""
    from celery import current_app

    from .effects import reset_databases
    from .lease import reset_renewer
    from .store import reset_stores

    reset_stores()
    reset_renewer()
    # The pool process's app: Celery made it current before sending the signal.
    reset_databases(current_app._get_current_object())


@signals.before_task_publish.connect(weak=False)
def drop_broker_ttl(sender: Any = None, properties: Any = None, **kwargs: Any) -> None:
    """Publish an idempotent task's message without the broker's per-message TTL.

    Celery turns ``expires`` into both a message header, which the worker checks,
    and the AMQP ``expiration`` property, which RabbitMQ applies by dropping the
    message unseen. Only while :meth:`IdempotentTask.apply_async` publishes one with
    ``idempotency_worker_expiry`` on; the header stays, so a worker that receives
    the message after it expired discards it and records it as REVOKED.
    """
    if properties is not None and WITHOUT_BROKER_TTL.get():
        properties.pop("expiration", None)

"""The worker main process's side of a delivery of an :class:`~celery_idem.IdempotentTask`.

A pool process that dies mid-task (``SIGKILL``, the OOM killer, a hard time limit,
``revoke(terminate=True)``, a cold shutdown) holds its key until its lease runs
out, and the redelivery of its message waits that long. The worker's main process
can know of the death at once, so :class:`IdempotentRequest`, the ``Request`` class
of every ``IdempotentTask``, frees the key then. Celery itself reports the death
(``WorkerLostError``) only after ``worker_lost_wait`` and its pool's next
maintenance tick, seconds later; so the main process also watches each pool process
it hands an idempotent task to, with a ``pidfd`` in its event loop (Linux 5.3 and
newer), and frees the keys of the tasks that process was running as soon as it
exits, and has Celery's pool report the death (and re-queue the message) once
``worker_lost_wait`` has passed, which celery_idem's worker hook lowers to one
second unless the app sets it (:data:`WORKER_LOST_WAIT`). It is safe against the redelivery: the main process gives each delivery a
run id, which the pool process records with its lease, and the release matches the
task id and that run id, so a later run of the same message keeps its lease. The
key is computed in the main process exactly as the pool process computes it (the
``idempotency_key`` header, else the task's key strategy over the message's
arguments, which the main process has), for every key strategy.
"""

from __future__ import annotations

import os
from typing import Any

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker.request import Request

from .errors import IdempotencyKeyError, describe_error
from .keys import new_run_id

__all__ = ["WORKER_LOST_WAIT", "IdempotentRequest", "WatchPoolProcesses"]

#: ``worker_lost_wait`` in the workers of apps using celery_idem unless the app sets
#: it: how long the pool waits for a result a dead pool process may still have sent
#: (it reads what is left in the process's result pipe anyway) before reporting
#: ``WorkerLostError``. Celery's default is ten seconds.
WORKER_LOST_WAIT = 1.0

logger = get_logger(__name__)

#: What the main process reports when a pool process ended without reporting back.
_RUN_ENDED = (WorkerLostError, Terminated, TimeLimitExceeded, SystemExit, KeyboardInterrupt)


class IdempotentRequest(Request):  # type: ignore[misc]
    """Celery's ``Request``, which frees the key of a run its pool process died in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .delivery import RUN_FIELD

        super().__init__(*args, **kwargs)
        self._celery_idem_run = new_run_id()
        # Sent to the pool process with the rest of the request: the run records it.
        self._request_dict[RUN_FIELD] = self._celery_idem_run

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """A pool process took the task: watch that process (see the module's documentation)."""
        super().on_accepted(pid, time_accepted)
        if pid and pid != os.getpid():
            _watcher.watch(pid)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        """Free the key of a run that died in its pool process, then let Celery handle the failure."""
        exc = exc_info.exception
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback
        if isinstance(exc, _RUN_ENDED):
            self._free_key(f"{type(exc).__name__}: {exc}")
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        """At the hard time limit the pool process is killed: free its key too."""
        if not soft:
            self._free_key(f"hard time limit ({timeout}s)")
        return super().on_timeout(soft, timeout)

    def free_key(self, why: str) -> None:
        """Free this run's key if it still holds it (its process ended: ``why``)."""
        self._free_key(why)

    def _free_key(self, why: str) -> None:
        from .delivery import key_material
        from .keys import record_key
        from .store import BACKEND_ERRORS, store_for

        task = self.task
        config = task.resolved_idempotency
        try:
            material = key_material(config, self._request_dict, self.id, self.args, self.kwargs)
        except IdempotencyKeyError:
            return  # this run never had a key: it never ran
        key = record_key(config.key_prefix, task.name, material)
        try:
            freed = store_for(config.redis_url, config.redis_options).release_run(
                key, self.id, self._celery_idem_run, config.result_ttl_ms, task.name
            )
        except BACKEND_ERRORS as exc:
            logger.warning(
                "celery-idem: could not free %s of %s[%s] after its process ended (%s): %s; "
                "it frees itself when its lease ends",
                key,
                self.name,
                self.id,
                why,
                describe_error(exc),
            )
            return
        if freed:
            logger.warning(
                "celery-idem: freed %s: the process running %s[%s] ended without recording it (%s)",
                key,
                self.name,
                self.id,
                why,
            )


class _Watcher:
    """Watches pool processes running idempotent tasks, to free their keys when one exits."""

    def __init__(self) -> None:
        self._pidfds: dict[int, int] = {}
        self._pid = os.getpid()
        #: The worker's pool (set by :class:`WatchPoolProcesses`) and its lost-wait.
        self.pool: Any = None
        self.lost_wait = WORKER_LOST_WAIT

    def watch(self, pid: int) -> None:
        """Free the keys of the idempotent tasks ``pid`` runs as soon as it exits."""
        if self._pid != os.getpid():  # a forked copy: nothing of the parent's is ours
            self._pidfds, self._pid = {}, os.getpid()
        if pid in self._pidfds or not hasattr(os, "pidfd_open"):
            return
        from kombu.asynchronous import get_event_loop

        hub = get_event_loop()
        if hub is None:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (Celery reports it), or no pidfd on this kernel
            return
        self._pidfds[pid] = pidfd
        hub.add_reader(pidfd, self._exited, hub, pid)

    def _exited(self, hub: Any, pid: int) -> None:
        from celery.worker import state

        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            hub.remove(pidfd)
            os.close(pidfd)
        running = [
            request
            for request in list(state.active_requests)
            if isinstance(request, IdempotentRequest) and request.worker_pid == pid
        ]
        for request in running:
            request.free_key(f"its pool process {pid} exited")
        maintain = getattr(self.pool, "maintain_pool", None)
        if running and maintain is not None:
            # The pool reports the lost tasks (and Celery re-queues their messages)
            # at its first maintenance after worker_lost_wait; have it come then.
            hub.call_later(self.lost_wait + 0.05, maintain)


class WatchPoolProcesses(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: give the process watcher the worker's pool and its ``worker_lost_wait``."""

    name = "celery_idem.WatchPoolProcesses"
    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> None:
        """Remember the pool (it starts after this step is created)."""
        _watcher.pool = worker.pool
        _watcher.lost_wait = float(worker.worker_lost_wait or WORKER_LOST_WAIT)


_watcher = _Watcher()

"""``IdempotentTask``: a Celery task that runs once per idempotency key.

The class holds the task's options, computes the key on the producer side
(:meth:`IdempotentTask.apply_async`) and hands every delivery in a worker to
:func:`celery_idem.delivery.deliver`, the state machine of a delivery.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task

from .config import IdempotencyConfig, resolve
from .keys import KEY_HEADER, PAYLOAD_HEADER, payload_digests, record_key, user_key

if TYPE_CHECKING:
    from .effects import Run

__all__ = ["RUN_ATTRIBUTE", "WITHOUT_BROKER_TTL", "IdempotentTask"]

#: Where the current run (:class:`celery_idem.effects.Run`) is kept on the request context.
RUN_ATTRIBUTE = "_celery_idem_run"

#: Set while an idempotent task with ``expires`` is published: the publish hook
#: (:func:`celery_idem.hooks.drop_broker_ttl`) then leaves the expiry to the worker.
WITHOUT_BROKER_TTL: ContextVar[bool] = ContextVar("celery_idem_without_broker_ttl", default=False)


class IdempotentTask(Task):  # type: ignore[misc]
    """A task whose body runs once per idempotency key, however often it is delivered.

    Use it as the base of a task; every ``idempotency_*`` option can be given here,
    as a task option, or app-wide in ``app.conf`` (see the README's options table)::

        @app.task(base=IdempotentTask, idempotency_key=("order_id",))
        def charge(order_id, amount_cents): ...

    Guarantees, given a Redis server that keeps its data: while a key's record lives
    (``idempotency_result_ttl`` after the run finished), its body has run to
    completion at most once, and every delivery of it returns that run's result. A
    run cut off before committing (its worker died, or it was paused past its lease)
    is taken over by a later delivery under a higher fencing token, and the run that
    lost the lease cannot record its result.

    Calling the task as a plain function (``charge(1, 100)``) runs the body directly,
    like any Celery task called directly: there is no message to deduplicate.

    Defaults differ from :class:`celery.Task` in two ways: ``acks_late`` and
    ``reject_on_worker_lost`` are True, because a task that is safe to deliver twice
    should be acknowledged after it ran, not before, so a crash re-delivers it.
    """

    acks_late = True
    reject_on_worker_lost = True
    #: The worker main process's side of a delivery: frees the key of a run whose
    #: pool process died (see :mod:`celery_idem.request`).
    Request = "celery_idem.request:IdempotentRequest"

    #: Redis URL of the records (default: the result backend's, else the broker's).
    idempotency_redis_url: ClassVar[str | None] = None
    #: Extra keyword arguments for the redis-py client.
    idempotency_redis_options: ClassVar[dict[str, Any] | None] = None
    #: Namespace of every Redis key (default ``"idem"``).
    idempotency_key_prefix: ClassVar[str | None] = None
    #: ``"task_id"`` (default), ``"args"``, argument names, or a function of the arguments.
    idempotency_key: ClassVar[Any] = None
    #: Seconds a finished result is kept and served to duplicates (default one day).
    idempotency_result_ttl: ClassVar[float | None] = None
    #: Lease length in seconds, renewed every third of it while the body runs (default 10).
    idempotency_lock_ttl: ClassVar[float | None] = None
    #: What a duplicate does while a live run holds the key: retry, wait, raise, drop.
    idempotency_on_conflict: ClassVar[str | None] = None
    #: Bound, in seconds, of the ``wait`` conflict policy (default 60).
    idempotency_wait_timeout: ClassVar[float | None] = None
    #: What a delivery does when Redis is unreachable: retry, run, raise.
    idempotency_on_backend_error: ClassVar[str | None] = None
    #: Exception classes recorded as the outcome and re-raised to duplicates.
    idempotency_cache_errors: ClassVar[Any] = None
    #: Largest encoded result that can be recorded (default 1 MiB).
    idempotency_max_result_bytes: ClassVar[int | None] = None
    #: ``expires`` enforced by the worker (recorded as REVOKED), not as a broker TTL (default True).
    idempotency_worker_expiry: ClassVar[bool | None] = None
    #: PostgreSQL URL of ``self.idempotency.transaction`` (psycopg 3).
    idempotency_database_url: ClassVar[str | None] = None
    #: Keyword arguments of ``psycopg.connect``.
    idempotency_database_options: ClassVar[dict[str, Any] | None] = None
    #: Instead of a URL: a SQLAlchemy ``Engine``, ``"django"`` / ``"django:<alias>"``, or a ``Database``.
    idempotency_database: ClassVar[Any] = None
    #: Run the whole body in one database transaction with its result (default False).
    idempotency_transaction: ClassVar[bool | None] = None
    #: Refuse a key reused with other arguments (``IdempotencyPayloadMismatch``); None: by key strategy.
    idempotency_validate_payload: ClassVar[bool | None] = None
    #: ``apply_async`` publishes nothing when a record for the key exists (default False).
    idempotency_dedupe_on_submit: ClassVar[bool | None] = None
    #: Seconds a submit-side "queued" marker lives if its message is never run (default 3600).
    idempotency_submit_ttl: ClassVar[float | None] = None

    _resolved_idempotency: ClassVar[IdempotencyConfig | None] = None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Resolve and validate this task's options as soon as it joins an app."""
        super().on_bound(app)
        cls._resolved_idempotency = resolve(app, cls)

    @property
    def resolved_idempotency(self) -> IdempotencyConfig:
        """This task's resolved options."""
        config = type(self)._resolved_idempotency
        if config is None:
            config = type(self)._resolved_idempotency = resolve(self._get_app(), type(self))
        return config

    @property
    def idempotency(self) -> Run | None:
        """The current run: ``key``, ``token``, ``fence``, ``lost``, ``transaction()``, ``step()``.

        None outside a protected run (a direct call, or a run under
        ``idempotency_on_backend_error="run"`` while Redis is away). See
        :class:`celery_idem.effects.Run`: ``transaction`` and ``step`` make a side
        effect once per key; ``fence`` (higher for every run that takes the key over)
        can be passed to the system the body writes to, so it can refuse a write
        from a run older than one it has already seen.
        """
        return getattr(self.request, RUN_ATTRIBUTE, None)

    def record_key_for(self, args: Any = None, kwargs: Any = None, task_id: str | None = None) -> str:
        """Return the Redis key a call with these arguments (and task id) would use."""
        config = self.resolved_idempotency
        material = config.key.material(task_id, tuple(args or ()), dict(kwargs or {}))
        return record_key(config.key_prefix, self.name, material)

    # -- producer side -------------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the task, with its key material in the ``idempotency_key`` header.

        ``idempotency_key="..."`` sets this call's key. Otherwise the key is computed
        here when it does not depend on the task id, so a bad argument fails in the
        caller, not in the worker; a header already present (a retry) is kept. The
        digests of the arguments go in the ``idempotency_payload`` header when they
        are checked (``idempotency_validate_payload``).

        With ``idempotency_dedupe_on_submit``, a call whose key already has a record
        (queued, running or finished) is not sent: the ``AsyncResult`` of the task id
        the record names is returned (see :mod:`celery_idem.submit`).

        With ``expires`` and ``idempotency_worker_expiry`` (the default), the message
        carries its expiry for the worker only, without the broker's per-message TTL
        Celery also sets: RabbitMQ drops a message whose TTL passed while it waited,
        unseen, so nobody records it and ``result.get()`` waits forever, whereas a
        worker that receives an expired message records it as REVOKED.
        """
        config = self.resolved_idempotency
        override = options.pop("idempotency_key", None)
        headers = dict(options.get("headers") or {})
        material = headers.get(KEY_HEADER)
        if override is not None:
            material = headers[KEY_HEADER] = user_key(override, "the idempotency_key passed to apply_async")
        elif material is None and not config.key.needs_task_id:
            material = headers[KEY_HEADER] = config.key.material(task_id, args or (), kwargs or {})
        elif material is None and task_id is not None:
            material = config.key.material(task_id, args or (), kwargs or {})
        if material is not None and PAYLOAD_HEADER not in headers and config.validates(material):
            headers[PAYLOAD_HEADER] = payload_digests(config.signature, args or (), kwargs or {})
        if headers:
            options["headers"] = headers
        if config.dedupe_on_submit and material is not None and self._dedupes(task_id, options):
            from .submit import submit

            return submit(self, material, args, kwargs, task_id, producer, link, link_error, shadow, options)
        return self.publish(args, kwargs, task_id, producer, link, link_error, shadow, **options)

    def _dedupes(self, task_id: str | None, options: dict[str, Any]) -> bool:
        # Not a retry or re-queue of the running task (its own record holds the key),
        # nor a member of a group or chord (Celery waits for its own task id).
        request = self.request
        own = not request.called_directly and task_id is not None and request.id == task_id
        return not own and not options.get("group_id") and not options.get("chord")

    def publish(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the message as :meth:`celery.Task.apply_async` does, headers already made."""
        if options.get("expires") is None or not self.resolved_idempotency.worker_expiry:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        token = WITHOUT_BROKER_TTL.set(True)
        try:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        finally:
            WITHOUT_BROKER_TTL.reset(token)

    # -- worker side ---------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            return super().__call__(*args, **kwargs)
        # The worker side, with redis-py, is loaded by the first delivery only.
        from .delivery import deliver

        return deliver(self, request, args, kwargs)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Retry as :meth:`celery.Task.retry` does, first freeing the key for the retry.

        When the retry will be sent (the retry budget is not spent), the key is
        released before the message goes out, so the retried delivery acquires it at
        once instead of finding its own run still holding it.
        """
        run = self.idempotency
        limit = self.max_retries if max_retries is None else max_retries
        if run is not None and (limit is None or self.request.retries < limit):
            from .delivery import release

            release(run)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

"""``IdempotentTask``: a Celery task that runs once per idempotency key.

The state machine of a delivery, in :meth:`IdempotentTask._deliver`:

1. compute the key (message header, else the task's key strategy); no key, no run;
2. one ``EVALSHA`` against the record: ACQUIRED, FINISHED or BUSY;
3. FINISHED: return the recorded result (or raise the recorded failure) as this
   delivery's own outcome, without running the body;
4. BUSY: apply ``idempotency_on_conflict`` (re-queue, wait, raise or drop);
5. ACQUIRED: run the body while the lease is renewed, then commit the result under
   this run's fencing token, or release the key so a retry can run.
"""

from __future__ import annotations

import random
import time
from typing import Any, ClassVar, NoReturn

from celery import Task, states
from celery.exceptions import Ignore, Reject, Retry, TaskPredicate
from celery.utils.log import get_logger
from kombu.serialization import prepare_accept_content

from . import signals
from .codec import decode_failure, decode_result, encode_failure, encode_result
from .config import IdempotencyConfig, resolve
from .errors import (
    BackendUnavailable,
    DuplicateTaskInProgress,
    IdempotencyKeyError,
    LeaseLost,
    ResultNotSerializable,
    ResultTooLarge,
)
from .keys import KEY_HEADER, record_key, user_key
from .lease import Lease, renewer
from .store import BACKEND_ERRORS, Acquired, Busy, Finished, Outcome, RecordStore, describe_error, store_for

__all__ = ["REQUEUES_HEADER", "IdempotentTask"]

logger = get_logger(__name__)

#: Message header counting how often a delivery re-queued itself (for back-off).
REQUEUES_HEADER = "idempotency_requeues"

#: Where the lease of the current run is kept on the request context.
_LEASE_ATTRIBUTE = "_celery_idem_lease"

#: Back-off of re-queued deliveries: first delay, and the cap while Redis is away.
_FIRST_DELAY = 0.5
_BACKEND_RETRY_CAP = 30.0


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
    #: Lease length in seconds, renewed every third of it while the body runs (default 30).
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
    def idempotency(self) -> Lease | None:
        """The lease of the current run: ``key``, fencing ``token`` and ``lost``.

        None outside a protected run (a direct call, or a run under
        ``idempotency_on_backend_error="run"`` while Redis is away). Pass ``token`` to
        the system the body writes to, so it can refuse a write carrying a lower
        token than one it has already seen.
        """
        return getattr(self.request, _LEASE_ATTRIBUTE, None)

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
        caller, not in the worker; a header already present (a retry) is kept.
        """
        override = options.pop("idempotency_key", None)
        headers = dict(options.get("headers") or {})
        if override is not None:
            headers[KEY_HEADER] = user_key(override, "the idempotency_key passed to apply_async")
            options["headers"] = headers
        elif KEY_HEADER not in headers and not self.resolved_idempotency.key.needs_task_id:
            headers[KEY_HEADER] = self.resolved_idempotency.key.material(task_id, args or (), kwargs or {})
            options["headers"] = headers
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)

    # -- worker side ---------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or request.called_directly:
            return super().__call__(*args, **kwargs)
        return self._deliver(request, args, kwargs)

    def _deliver(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        config = self.resolved_idempotency
        material = self._key_material(config, request, args, kwargs)
        key = record_key(config.key_prefix, self.name, material)
        store = store_for(config.redis_url, config.redis_options)
        wait_until = None
        poll = 0.05
        while True:
            try:
                claim = store.acquire(key, request.id, config.lease_ms, config.result_ttl_ms)
            except BACKEND_ERRORS as exc:
                return self._on_backend_error(config, store, request, material, args, kwargs, exc)

            if isinstance(claim, Acquired):
                return self._run_holding(config, store, key, claim, request, args, kwargs)

            if isinstance(claim, Finished):
                return self._replay(key, claim)

            assert isinstance(claim, Busy)
            busy = DuplicateTaskInProgress(key, claim.holder, claim.lease_left)
            # A redelivery of the very message being run (visibility timeout, or a
            # republish with the same id) is always re-queued until the holder
            # finishes: raising or dropping it would record a failure under the
            # running task's id, or lose the work if the holder then died.
            same_message = claim.holder == request.id and not request.is_eager
            policy = "retry" if same_message else config.on_conflict
            signals.task_conflict.send(
                sender=self, request=request, key=key, holder=claim.holder, policy=policy
            )
            if same_message:
                self._requeue(
                    request, material, self._conflict_delay(config, request, claim), busy, quiet=True
                )
            if policy == "wait" or (policy == "retry" and request.is_eager):
                # In eager mode there is no broker to re-queue to, so "retry" waits.
                now = time.monotonic()
                wait_until = wait_until or now + config.wait_timeout
                if now >= wait_until:
                    raise busy
                time.sleep(min(poll, claim.lease_left + 0.01, wait_until - now))
                poll = min(poll * 2, 1.0)
                continue
            if policy == "retry":
                self._requeue(
                    request, material, self._conflict_delay(config, request, claim), busy, quiet=False
                )
            if policy == "raise":
                raise busy
            logger.info("celery-idem: dropping %s[%s]: %s", self.name, request.id, busy)
            if not request.ignore_result:
                self.update_state(
                    task_id=request.id, state=states.IGNORED, meta={"duplicate_of": claim.holder, "key": key}
                )
            raise Ignore()

    def _key_material(self, config: IdempotencyConfig, request: Any, args: Any, kwargs: Any) -> str:
        header = (request.headers or {}).get(KEY_HEADER)
        if header is not None:
            return user_key(header, f"the {KEY_HEADER} message header")
        return config.key.material(request.id, args, kwargs)

    def _run_holding(
        self,
        config: IdempotencyConfig,
        store: RecordStore,
        key: str,
        claim: Acquired,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if claim.taken_over:
            signals.lease_taken_over.send(sender=self, request=request, key=key, token=claim.token)
            logger.warning(
                "celery-idem: %s[%s] took over %s from a run that stopped renewing its lease (token %d)",
                self.name,
                request.id,
                key,
                claim.token,
            )
        lease = Lease(store, key, claim.token, config.lease_ms, config.result_ttl_ms)
        setattr(request, _LEASE_ATTRIBUTE, lease)
        renewer().hold(lease)
        try:
            try:
                result = self.run(*args, **kwargs)
            except TaskPredicate:
                self._release(lease)
                raise
            except config.cache_errors as exc:
                self._commit(config, lease, True, encode_failure(exc, self.backend, self.serializer))
                raise
            except BaseException:
                self._release(lease)
                raise
            try:
                outcome = encode_result(result, self.serializer, self.name, config.max_result_bytes)
            except (ResultNotSerializable, ResultTooLarge) as exc:
                # The body ran: record the failure so duplicates do not run it again.
                self._commit(config, lease, True, encode_failure(exc, self.backend, self.serializer))
                raise
            self._commit(config, lease, False, outcome)
            return result
        finally:
            renewer().drop(lease)

    def _commit(self, config: IdempotencyConfig, lease: Lease, failed: bool, outcome: Outcome) -> None:
        renewer().drop(lease)
        # A short Redis outage (a restart, a failover) must not turn a finished run
        # into a re-run: keep trying for as long as the lease would last.
        give_up = time.monotonic() + config.lock_ttl
        delay = 0.05
        while True:
            try:
                lease.store.commit(lease.key, lease.token, failed, outcome, lease.keep_ms)
            except LeaseLost:
                lease.settled = True
                signals.lease_lost.send(sender=self, request=self.request, key=lease.key, token=lease.token)
                logger.error(
                    "celery-idem: %s[%s] lost its lease on %s", self.name, self.request.id, lease.key
                )
                raise
            except BACKEND_ERRORS as exc:
                if time.monotonic() + delay > give_up:
                    raise BackendUnavailable(lease.store.url, describe_error(exc)) from exc
                logger.warning(
                    "celery-idem: commit of %s failed (%s); trying again", lease.key, describe_error(exc)
                )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            else:
                lease.settled = True
                return

    def _release(self, lease: Lease) -> None:
        renewer().drop(lease)
        if lease.settled:
            return
        lease.settled = True
        try:
            lease.store.release(lease.key, lease.token, lease.keep_ms)
        except BACKEND_ERRORS as exc:
            logger.warning(
                "celery-idem: could not release %s (%s); it frees itself when the lease ends in %.1fs",
                lease.key,
                describe_error(exc),
                lease.lease_ms / 1000,
            )

    def _replay(self, key: str, finished: Finished) -> Any:
        accept = prepare_accept_content(self.app.conf.accept_content)
        signals.task_replayed.send(
            sender=self, request=self.request, key=key, token=finished.token, failed=finished.failed
        )
        logger.info(
            "celery-idem: %s[%s] already ran (token %d); returning its recorded %s",
            self.name,
            self.request.id,
            finished.token,
            "failure" if finished.failed else "result",
        )
        if finished.failed:
            raise decode_failure(finished.outcome, accept, self.backend, key)
        return decode_result(finished.outcome, accept, key)

    def _on_backend_error(
        self,
        config: IdempotencyConfig,
        store: RecordStore,
        request: Any,
        material: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
    ) -> Any:
        error = BackendUnavailable(store.url, describe_error(exc))
        if config.on_backend_error == "run":
            logger.warning("celery-idem: %s; running %s[%s] unprotected", error, self.name, request.id)
            return self.run(*args, **kwargs)
        if config.on_backend_error == "raise" or request.is_eager:
            raise error from exc
        delay = self._backoff(request, cap=_BACKEND_RETRY_CAP)
        self._requeue(request, material, delay, error, quiet=False)

    def _conflict_delay(self, config: IdempotencyConfig, request: Any, claim: Busy) -> float:
        # Come back no later than the holder's lease could run out, so a crashed
        # holder is taken over within about one lease.
        return self._backoff(request, cap=min(claim.lease_left + 0.05, config.lock_ttl))

    def _backoff(self, request: Any, cap: float) -> float:
        requeues = int((request.headers or {}).get(REQUEUES_HEADER, 0))
        delay = min(cap, _FIRST_DELAY * 2 ** min(requeues, 16))
        # A message held for its countdown longer than the Redis transport's
        # visibility timeout is delivered again; stay well under it.
        visibility = (self.app.conf.broker_transport_options or {}).get("visibility_timeout")
        if visibility:
            delay = min(delay, visibility / 2)
        return float(delay * random.uniform(0.8, 1.0))

    def _requeue(self, request: Any, material: str, delay: float, reason: Exception, quiet: bool) -> NoReturn:
        """Send this delivery again after ``delay`` seconds without using the retry budget."""
        headers = dict(request.headers or {})
        headers[KEY_HEADER] = material
        headers[REQUEUES_HEADER] = int(headers.get(REQUEUES_HEADER, 0)) + 1
        signature = self.signature_from_request(
            request, request.args, request.kwargs, countdown=delay, retries=request.retries, headers=headers
        )
        try:
            signature.apply_async()
        except Exception as exc:
            # Put the delivery back rather than lose it.
            raise Reject(exc, requeue=True) from exc
        if quiet:
            logger.info("celery-idem: %s[%s] re-queued in %.2fs: %s", self.name, request.id, delay, reason)
            raise Ignore()
        raise Retry(f"re-queued in {delay:.2f}s: {reason}", exc=reason, when=delay)

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
        lease = self.idempotency
        limit = self.max_retries if max_retries is None else max_retries
        if lease is not None and (limit is None or self.request.retries < limit):
            self._release(lease)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    def release_terminated(self, request: Any) -> bool:
        """Free the key of a run this worker terminated (``revoke(terminate=True)``).

        Called from the worker's main process, which does not know the run's fencing
        token, so the release is checked against the holder's task id. Returns False
        when the key cannot be known without the arguments (they are not in the
        revoked request) or is not held by that task: the lease then ends by itself.
        """
        config = self.resolved_idempotency
        header = (request.headers or {}).get(KEY_HEADER)
        if header is None and not config.key.needs_task_id:
            return False
        try:
            material = self._key_material(config, request, (), {})
        except IdempotencyKeyError:
            return False
        store = store_for(config.redis_url, config.redis_options)
        key = record_key(config.key_prefix, self.name, material)
        return store.release_holder(key, request.id, config.result_ttl_ms)

"""The state machine of one delivery of an idempotent task, in :func:`deliver`.

1. compute the key (message header, else the task's key strategy); no key, no run;
   give the callbacks stable ids (:func:`celery_idem.canvas.pin_callback_ids`);
2. one ``EVALSHA`` against the record: ACQUIRED, FINISHED, BUSY or MISMATCH;
3. FINISHED: return the recorded result (or raise the recorded failure) as this
   delivery's own outcome, without running the body, and warn of what Celery then
   sends or counts again that may run twice (:func:`celery_idem.canvas.warn_of_repeats`);
4. BUSY: apply ``idempotency_on_conflict`` (re-queue, wait, raise or drop);
5. MISMATCH: the key's record is for other arguments: fail, touching nothing;
6. ACQUIRED: run the body while the lease is renewed, then commit the result under
   this run's fencing token, or release the key so a retry can run.

Every decision is logged once, on Celery's task logger (``celery_idem.delivery``), as
``celery-idem decision=... key=... task=... id=... token=... fence=...``
(``key=value`` pairs a log pipeline can split): INFO for the normal paths, WARNING
for takeovers, lost leases and backend errors.

This module is loaded by the first delivery a process runs, with redis-py: a
process that only sends tasks never imports it.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from celery import states
from celery.exceptions import Ignore, Reject, Retry, TaskPredicate
from celery.utils.log import get_task_logger
from kombu.serialization import prepare_accept_content

from . import signals
from .canvas import pin_callback_ids, warn_of_repeats
from .codec import decode_failure, decode_result, encode_failure, encode_result
from .config import IdempotencyConfig
from .effects import Run
from .errors import (
    BackendUnavailable,
    DuplicateTaskInProgress,
    IdempotencyPayloadMismatch,
    LeaseLost,
    ResultNotSerializable,
    ResultTooLarge,
    describe_error,
)
from .keys import (
    KEY_HEADER,
    PAYLOAD_HEADER,
    differing_arguments,
    new_run_id,
    payload_digests,
    record_key,
    user_key,
)
from .lease import Lease, renewer
from .store import BACKEND_ERRORS, Acquired, Busy, Finished, Mismatch, Outcome, RecordStore, store_for
from .task import RUN_ATTRIBUTE

if TYPE_CHECKING:
    from .task import IdempotentTask

__all__ = [
    "BACKEND_ERRORS_HEADER",
    "REQUEUES_HEADER",
    "RUN_FIELD",
    "deliver",
    "key_material",
    "log_decision",
    "payload_of",
    "release",
]

#: Celery's task logger: lines carry the task's name and id in the worker's task log format.
logger = get_task_logger(__name__)

#: This machine's name, for records of deliveries that know no worker node name (eager ones).
_HOST = socket.gethostname()

#: Message header counting how often a delivery re-queued itself (for back-off).
REQUEUES_HEADER = "idempotency_requeues"
#: Message header counting the backend errors a delivery met since it last got
#: through to Redis (the acquire that gets through counts them).
BACKEND_ERRORS_HEADER = "idempotency_backend_errors"

#: Field of the request (stamped by :class:`celery_idem.request.IdempotentRequest`)
#: holding the id of this delivery's run.
RUN_FIELD = "celery_idem_run"

#: Back-off of re-queued deliveries: first delay, the cap of a duplicate waiting for
#: a live holder (so it comes back within a second of the holder finishing), and the
#: cap while Redis is away.
_FIRST_DELAY = 0.25
_CONFLICT_CAP = 1.0
_BACKEND_RETRY_CAP = 30.0


def log_decision(level: int, decision: str, key: str, task: str, task_id: str | None, **fields: Any) -> None:
    """One line per decision: ``celery-idem decision=... key=... task=... id=... (more key=value)``."""
    if not logger.isEnabledFor(level):
        return
    extra = "".join(f" {name}={value}" for name, value in fields.items() if value is not None)
    logger.log(level, "celery-idem decision=%s key=%s task=%s id=%s%s", decision, key, task, task_id, extra)


def deliver(task: IdempotentTask, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one delivery of ``task``: at most one body per key, every duplicate gets its outcome."""
    config = task.resolved_idempotency
    material = key_material(config, request.headers, request.id, args, kwargs)
    key = record_key(config.key_prefix, task.name, material)
    payload = payload_of(config, material, request.headers, args, kwargs)
    # Every delivery of this message sends its callbacks under the same ids.
    pin_callback_ids(request)
    store = store_for(config.redis_url, config.redis_options)
    # The id of this run: stamped by the worker's main process (IdempotentRequest), so
    # that it can free the key if it sees this process die; made here otherwise.
    run_id = getattr(request, RUN_FIELD, None) or new_run_id()
    errors = int((request.headers or {}).get(BACKEND_ERRORS_HEADER, 0))
    host = getattr(request, "hostname", None) or _HOST
    policy = "wait" if config.on_conflict == "retry" and request.is_eager else config.on_conflict
    wait_until = None
    poll = 0.05
    while True:
        try:
            claim = store.acquire(
                key,
                request.id,
                config.lease_ms,
                config.result_ttl_ms,
                run_id,
                task.name,
                policy,
                payload,
                errors,
                host,
            )
        except BACKEND_ERRORS as exc:
            return _on_backend_error(task, config, store, request, material, key, args, kwargs, exc)
        errors = 0

        if isinstance(claim, Acquired):
            return _run_holding(task, config, store, key, claim, request, args, kwargs)

        if isinstance(claim, Finished):
            return _replay(task, key, claim)

        if isinstance(claim, Mismatch):
            assert payload
            differ = differing_arguments(claim.payload, payload)
            log_decision(40, "payload_mismatch", key, task.name, request.id, arguments=",".join(differ))
            raise IdempotencyPayloadMismatch(key, differ)

        assert isinstance(claim, Busy)
        busy = DuplicateTaskInProgress(key, claim.holder, claim.lease_left)
        # A redelivery of the very message being run (visibility timeout, or a
        # republish with the same id) is always re-queued until the holder
        # finishes: raising or dropping it would record a failure under the
        # running task's id, or lose the work if the holder then died.
        same_message = claim.holder == request.id and not request.is_eager
        applied = "retry" if same_message else policy
        signals.task_conflict.send(sender=task, request=request, key=key, holder=claim.holder, policy=applied)
        log_decision(
            20,
            f"conflict_{applied}",
            key,
            task.name,
            request.id,
            holder=claim.holder,
            token=claim.token,
            lease_left=f"{claim.lease_left:.2f}",
        )
        if same_message:
            _requeue(task, request, material, _conflict_delay(task, config, request, claim), busy, quiet=True)
        if applied == "wait":
            now = time.monotonic()
            wait_until = wait_until or now + config.wait_timeout
            if now >= wait_until:
                raise busy
            time.sleep(min(poll, claim.lease_left + 0.01, wait_until - now))
            poll = min(poll * 2, 1.0)
            continue
        if applied == "retry":
            _requeue(
                task, request, material, _conflict_delay(task, config, request, claim), busy, quiet=False
            )
        if applied == "raise":
            raise busy
        if not request.ignore_result:
            task.update_state(
                task_id=request.id, state=states.IGNORED, meta={"duplicate_of": claim.holder, "key": key}
            )
        raise Ignore()


def key_material(
    config: IdempotencyConfig, headers: Mapping[str, Any] | None, task_id: str, args: Any, kwargs: Any
) -> str:
    """The key material of a delivery: its ``idempotency_key`` header, else the task's strategy."""
    header = (headers or {}).get(KEY_HEADER)
    if header is not None:
        return user_key(header, f"the {KEY_HEADER} message header")
    return config.key.material(task_id, args, kwargs)


def payload_of(
    config: IdempotencyConfig, material: str, headers: Mapping[str, Any] | None, args: Any, kwargs: Any
) -> str:
    """The argument digests a delivery checks its record against, or ``""`` when it checks none."""
    if not config.validates(material):
        return ""
    header = (headers or {}).get(PAYLOAD_HEADER)
    if isinstance(header, str) and header:
        return header
    return payload_digests(config.signature, args, kwargs)


def _run_holding(
    task: IdempotentTask,
    config: IdempotencyConfig,
    store: RecordStore,
    key: str,
    claim: Acquired,
    request: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if claim.taken_over:
        signals.lease_taken_over.send(sender=task, request=request, key=key, token=claim.token)
    log_decision(
        30 if claim.taken_over else 20,
        "takeover" if claim.taken_over else "acquired",
        key,
        task.name,
        request.id,
        token=claim.token,
        fence=claim.fence,
        steps=len(claim.steps) or None,
    )
    lease = Lease(store, key, claim.token, config.lease_ms, config.result_ttl_ms, task.name)
    run = Run(task, config, lease, claim.fence, claim.first, claim.steps)
    setattr(request, RUN_ATTRIBUTE, run)
    renewer().hold(lease)
    outcome: Outcome | None = None
    try:
        try:
            if config.transaction:
                # The whole body in one database transaction with its result.
                result, outcome = run.whole_body(lambda: task.run(*args, **kwargs))
            else:
                result = task.run(*args, **kwargs)
        except TaskPredicate:
            release(run)
            raise
        except BackendUnavailable as exc:
            # Redis or the database went away mid-body (a step or a transaction
            # could not be made or stored): free the key, then the backend-error
            # policy; what the body stored stays for the next attempt to replay.
            release(run)
            if config.on_backend_error != "retry" or request.is_eager:
                raise
            material = key_material(config, request.headers, request.id, args, kwargs)
            _requeue(
                task, request, material, _backoff(task, request, cap=_BACKEND_RETRY_CAP), exc, quiet=False
            )
        except config.cache_errors as exc:
            _commit(task, run, True, encode_failure(exc, task.backend, task.serializer))
            raise
        except BaseException:
            release(run)
            raise
        if outcome is None:
            try:
                # As Celery's backends store it: result objects (AsyncResult,
                # GroupResult) in their tuple form, which a duplicate then returns.
                value = task.backend.prepare_value(result)
                outcome = encode_result(value, task.serializer, task.name, config.max_result_bytes)
            except (ResultNotSerializable, ResultTooLarge) as exc:
                # The body ran: record the failure so duplicates do not run it again.
                _commit(task, run, True, encode_failure(exc, task.backend, task.serializer))
                raise
        _commit(task, run, False, outcome)
        return result
    finally:
        renewer().drop(lease)


def _commit(task: IdempotentTask, run: Run, failed: bool, outcome: Outcome) -> None:
    lease = run.lease
    config = task.resolved_idempotency
    renewer().drop(lease)
    # A short Redis outage (a restart, a failover) must not turn a finished run
    # into a re-run: keep trying for as long as the lease would last.
    give_up = time.monotonic() + lease.lease_ms / 1000
    delay = 0.05
    errors = 0
    while True:
        try:
            replicas = lease.store.commit(
                lease.key,
                lease.token,
                failed,
                outcome,
                lease.keep_ms,
                lease.task,
                (*run.counts(), errors),
                config.min_replicas,
                config.min_replicas_timeout_ms,
            )
        except LeaseLost:
            lease.settled = True
            signals.lease_lost.send(sender=task, request=task.request, key=lease.key, token=lease.token)
            log_decision(
                30, "lease_lost", lease.key, task.name, task.request.id, token=lease.token, fence=run.fence
            )
            raise
        except BACKEND_ERRORS as exc:
            errors += 1
            if time.monotonic() + delay > give_up:
                raise BackendUnavailable(lease.store.url, describe_error(exc)) from exc
            log_decision(30, "commit_retry", lease.key, task.name, task.request.id, error=type(exc).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        else:
            lease.settled = True
            if replicas is not None and replicas < config.min_replicas:
                # Recorded on the primary, which is what decides: a failover to a
                # replica that missed it before it replicates runs the body again.
                log_decision(
                    30,
                    "commit_not_replicated",
                    lease.key,
                    task.name,
                    task.request.id,
                    replicas=replicas,
                    wanted=config.min_replicas,
                )
            log_decision(
                20,
                "failure_recorded" if failed else "committed",
                lease.key,
                task.name,
                task.request.id,
                token=lease.token,
                fence=run.fence,
            )
            return


def release(run: Run) -> None:
    """Free the key held by ``run`` without an outcome, unless the run already settled it."""
    lease = run.lease
    renewer().drop(lease)
    if lease.settled:
        return
    lease.settled = True
    request_id = getattr(run.task.request, "id", None)
    try:
        freed = lease.store.release(lease.key, lease.token, lease.keep_ms, lease.task, run.counts())
    except BACKEND_ERRORS as exc:
        log_decision(
            30,
            "release_failed",
            lease.key,
            lease.task,
            request_id,
            token=lease.token,
            error=type(exc).__name__,
            frees_in=f"{lease.lease_ms / 1000:.1f}s",
        )
        return
    log_decision(
        20 if freed else 30,
        "released" if freed else "lease_lost",
        lease.key,
        lease.task,
        request_id,
        token=lease.token,
    )


def _replay(task: IdempotentTask, key: str, finished: Finished) -> Any:
    accept = prepare_accept_content(task.app.conf.accept_content)
    signals.task_replayed.send(
        sender=task, request=task.request, key=key, token=finished.token, failed=finished.failed
    )
    log_decision(
        20,
        "replayed_failure" if finished.failed else "replayed",
        key,
        task.name,
        task.request.id,
        token=finished.token,
    )
    warn_of_repeats(task, task.request, key, finished.failed)
    if finished.failed:
        raise decode_failure(finished.outcome, accept, task.backend, key)
    return decode_result(finished.outcome, accept, key)


def _on_backend_error(
    task: IdempotentTask,
    config: IdempotencyConfig,
    store: RecordStore,
    request: Any,
    material: str,
    key: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: Exception,
) -> Any:
    error = BackendUnavailable(store.url, describe_error(exc))
    decision = {"run": "backend_error_run_unprotected", "raise": "backend_error_raise"}
    log_decision(
        30,
        decision.get(config.on_backend_error, "backend_error_retry"),
        key,
        task.name,
        request.id,
        error=type(exc).__name__,
    )
    if config.on_backend_error == "run":
        return task.run(*args, **kwargs)
    if config.on_backend_error == "raise" or request.is_eager:
        raise error from exc
    delay = _backoff(task, request, cap=_BACKEND_RETRY_CAP)
    _requeue(task, request, material, delay, error, quiet=False)


def _conflict_delay(task: IdempotentTask, config: IdempotencyConfig, request: Any, claim: Busy) -> float:
    # Come back within a second of the holder finishing, and no later than its lease
    # could run out, so a crashed holder is taken over within about one lease.
    if claim.lease_left + 0.05 <= _CONFLICT_CAP:
        # The lease ends first: come back just after it, when a dead holder's key is free.
        return claim.lease_left + 0.05
    return _backoff(task, request, cap=_CONFLICT_CAP)


def _backoff(task: IdempotentTask, request: Any, cap: float) -> float:
    requeues = int((request.headers or {}).get(REQUEUES_HEADER, 0))
    delay = min(cap, _FIRST_DELAY * 2 ** min(requeues, 16))
    # A message held for its countdown longer than the Redis transport's
    # visibility timeout is delivered again; stay well under it.
    visibility = (task.app.conf.broker_transport_options or {}).get("visibility_timeout")
    if visibility:
        delay = min(delay, visibility / 2)
    return float(delay * random.uniform(0.8, 1.0))


def _requeue(
    task: IdempotentTask, request: Any, material: str, delay: float, reason: Exception, quiet: bool
) -> NoReturn:
    """Send this delivery again after ``delay`` seconds without using the retry budget."""
    headers = dict(request.headers or {})
    headers[KEY_HEADER] = material
    headers[REQUEUES_HEADER] = int(headers.get(REQUEUES_HEADER, 0)) + 1
    # The backend errors met so far, for the counters: counted by the acquire that
    # gets through, so a re-queue that followed one starts again from zero.
    unreachable = isinstance(reason, BackendUnavailable)
    headers[BACKEND_ERRORS_HEADER] = int(headers.get(BACKEND_ERRORS_HEADER, 0)) + 1 if unreachable else 0
    signature = task.signature_from_request(
        request, request.args, request.kwargs, countdown=delay, retries=request.retries, headers=headers
    )
    try:
        signature.apply_async()
    except Exception as exc:
        # Put the delivery back rather than lose it.
        raise Reject(exc, requeue=True) from exc
    if quiet:
        raise Ignore()
    raise Retry(f"re-queued in {delay:.2f}s: {reason}", exc=reason, when=delay)

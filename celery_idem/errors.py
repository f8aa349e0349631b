"""Every exception celery_idem raises, under one base class.

Each exception keeps the values it was built from in ``args`` so that Celery can
store it in a result backend and rebuild it on the client side, and its message
says what happened and, where the caller can act on it, what to do.
"""

from __future__ import annotations

from celery.exceptions import ImproperlyConfigured as _CeleryImproperlyConfigured

__all__ = [
    "BackendUnavailable",
    "DatabaseUnavailable",
    "DuplicateStepName",
    "DuplicateTaskInProgress",
    "FenceRefused",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotencyPayloadMismatch",
    "ImproperlyConfigured",
    "LeaseLost",
    "RecordNotReadable",
    "ResultNotSerializable",
    "ResultTooLarge",
    "StepMismatch",
    "describe_error",
]


class IdempotencyError(Exception):
    """Base class of every celery_idem exception."""


class ImproperlyConfigured(IdempotencyError, _CeleryImproperlyConfigured):  # type: ignore[misc]
    """A setting or task option has an invalid value; the message names it.

    Raised when a task class is bound to its app and when the worker starts, so a
    typo stops the worker instead of silently running tasks unprotected.
    """


class IdempotencyKeyError(IdempotencyError):
    """The idempotency key of a call cannot be computed.

    The task is not run (and, when raised by ``apply_async``, not sent): running it
    without a key would run it unprotected. The message names the argument or the
    key function at fault.
    """


class IdempotencyPayloadMismatch(IdempotencyError):
    """The key of this call was used by a call with other arguments.

    Raised instead of returning another call's result (or running under its key):
    two different calls share a key, which is a bug of the caller (a key from too
    few arguments, or a per-call key reused). Names the arguments that differ, never
    their values. See ``idempotency_validate_payload``.
    """

    def __init__(self, key: str, arguments: list[str]) -> None:
        super().__init__(key, arguments)
        self.key = key
        #: The names of the arguments whose values differ.
        self.arguments = arguments

    def __str__(self) -> str:
        return (
            f"{self.key} was used by a call with other arguments ({', '.join(self.arguments)} differ); "
            "two calls share this key: key on more arguments, or give each call its own key"
        )


class DuplicateTaskInProgress(IdempotencyError):
    """Another live worker holds the key of this call.

    Raised by the ``raise`` conflict policy, and by ``wait`` when the holder has not
    finished within ``idempotency_wait_timeout``.
    """

    def __init__(self, key: str, holder: str, lease_left: float) -> None:
        super().__init__(key, holder, lease_left)
        #: The Redis key of the record.
        self.key = key
        #: Task id of the run that holds the lease.
        self.holder = holder
        #: Seconds until the holder's lease runs out unless it is renewed.
        self.lease_left = lease_left

    def __str__(self) -> str:
        return (
            f"{self.key} is held by task {self.holder} (lease ends in {self.lease_left:.1f}s unless renewed)"
        )


class LeaseLost(IdempotencyError):
    """This run no longer holds its lease, so its result was not recorded.

    Another run took the key over (this one was paused or cut off from Redis for
    longer than ``idempotency_lock_ttl``); the other run's result stands. Side
    effects this run made can be refused by comparing fencing tokens: this run's
    token is lower than the one now holding or having finished the key.
    """

    def __init__(self, key: str, token: int, state: str, current_token: int) -> None:
        super().__init__(key, token, state, current_token)
        #: The Redis key of the record.
        self.key = key
        #: The fencing token this run held.
        self.token = token
        #: What the record says now: ``running``, ``done``, ``failed``, ``free`` or ``missing``.
        self.state = state
        #: The record's fencing token now (0 when the record is missing).
        self.current_token = current_token

    def __str__(self) -> str:
        now = (
            f"{self.state} under token {self.current_token}"
            if self.current_token != self.token
            else self.state
        )
        return (
            f"lost the lease on {self.key} (fencing token {self.token}); "
            f"the record is now {now}, so this run's result was not recorded"
        )


class FenceRefused(LeaseLost):
    """A run with a higher fence has already written to the database for this key.

    Raised by ``self.idempotency.transaction`` in a run that was taken over (it was
    paused, or cut off, past its lease): its transaction was rolled back, so none of
    its writes happened.
    """

    def __init__(self, key: str, token: int, fence: int, current_fence: int, step: str) -> None:
        IdempotencyError.__init__(self, key, token, fence, current_fence, step)
        self.key = key
        self.token = token
        self.state = "superseded"
        self.current_token = 0
        #: This run's fence, and the higher one already in the database.
        self.fence = fence
        self.current_fence = current_fence
        #: The step this run tried to write.
        self.step = step

    def __str__(self) -> str:
        return (
            f"a run of {self.key} with a higher fence ({self.current_fence}) has already written "
            f"to the database; this run (fence {self.fence}) was taken over, and its transaction "
            f"{self.step!r} was rolled back"
        )


class StepMismatch(IdempotencyError):
    """A step stored for this key was called with other arguments than this call's.

    The code of the task changed under a key that was still running (or a step's
    arguments depend on something outside the task's arguments): the stored value
    may not be the answer to this call, so it is not returned. Give the step another
    ``name=`` if it is a different step now.
    """

    def __init__(self, key: str, step: str) -> None:
        super().__init__(key, step)
        self.key = key
        self.step = step

    def __str__(self) -> str:
        return (
            f"step {self.step!r} of {self.key} was stored for other arguments than this call's; "
            "the task's code changed under a running key: give the step another name= if it "
            "is a different step now"
        )


class DuplicateStepName(IdempotencyError):
    """One run called two steps (or transactions) by the same name.

    Steps are told apart by name (by default the function's qualified name): a
    second call under the same name would replay the first one's value. Pass
    ``name=`` to tell the calls apart.
    """

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step

    def __str__(self) -> str:
        return (
            f"this run already called a step named {self.step!r}; pass name='...' to give each "
            "call of the same function its own name"
        )


class BackendUnavailable(IdempotencyError):
    """The Redis server that keeps the records could not be reached.

    With ``idempotency_on_backend_error="raise"`` the task fails with it; with
    ``"retry"`` it is the reason given for re-queuing the task.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        #: The Redis URL, without password.
        self.url = url
        #: What the client reported.
        self.reason = reason

    def __str__(self) -> str:
        return f"idempotency records at {self.url} are unreachable: {self.reason}"


class DatabaseUnavailable(BackendUnavailable):
    """The database of ``self.idempotency.transaction`` could not be reached.

    The transaction was rolled back. The run follows ``idempotency_on_backend_error``
    like a Redis outage: ``retry`` frees the key and re-queues the delivery.
    """

    def __str__(self) -> str:
        return f"the database at {self.url} is unreachable: {self.reason}"


class ResultNotSerializable(IdempotencyError):
    """The task's return value cannot be encoded with the task's serializer.

    The body has already run, so the failure is recorded in place of the result:
    duplicates get this error instead of running the body again.
    """

    def __init__(self, task: str, serializer: str, reason: str) -> None:
        super().__init__(task, serializer, reason)
        self.task = task
        self.serializer = serializer
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"the result of {self.task} cannot be encoded with the {self.serializer!r} "
            f"serializer ({self.reason}); return a value that serializer supports"
        )


class ResultTooLarge(IdempotencyError):
    """The encoded result is larger than ``idempotency_max_result_bytes``.

    Recorded in place of the result, like :class:`ResultNotSerializable`.
    """

    def __init__(self, task: str, size: int, limit: int) -> None:
        super().__init__(task, size, limit)
        self.task = task
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"the result of {self.task} encodes to {self.size} bytes, over "
            f"idempotency_max_result_bytes={self.limit}; return less (a reference to "
            f"the data, say) or raise the limit"
        )


class RecordNotReadable(IdempotencyError):
    """A finished record cannot be decoded by this worker.

    Its content type is not in the app's ``accept_content`` (it was written by a
    worker with another serializer), or its data is corrupt. The task is not run:
    the record says it already ran.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"the record {self.key} cannot be read: {self.reason}"


def describe_error(exc: BaseException) -> str:
    """``"ConnectionError: Error 111 connecting to ..."``, for messages and logs."""
    return f"{type(exc).__name__}: {exc}"

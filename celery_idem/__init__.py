"""celery_idem: effectively-once execution of Celery tasks.

Make a task idempotent with ``base=IdempotentTask``; see the README for options,
guarantees and limits.

Importing the package connects its worker hooks (:mod:`celery_idem.hooks`) and
loads neither redis-py nor kombu's Redis transport: the worker side is loaded by
the first delivery a worker runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import hooks as _hooks  # noqa: F401  (connects the worker hooks)
from .errors import (
    BackendUnavailable,
    DatabaseUnavailable,
    DuplicateStepName,
    DuplicateTaskInProgress,
    FenceRefused,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyPayloadMismatch,
    ImproperlyConfigured,
    LeaseLost,
    RecordNotReadable,
    ResultNotSerializable,
    ResultTooLarge,
    StepMismatch,
)
from .task import IdempotentTask

if TYPE_CHECKING:
    from .lease import Lease

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "DatabaseUnavailable",
    "DuplicateStepName",
    "DuplicateTaskInProgress",
    "FenceRefused",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotencyPayloadMismatch",
    "IdempotentTask",
    "ImproperlyConfigured",
    "Lease",
    "LeaseLost",
    "RecordNotReadable",
    "ResultNotSerializable",
    "ResultTooLarge",
    "StepMismatch",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lease lives with the worker side (redis-py): load it only when asked for.
    if name == "Lease":
        from .lease import Lease

        return Lease
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

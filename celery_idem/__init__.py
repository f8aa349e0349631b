"""celery_idem: effectively-once execution of Celery tasks.

Make a task idempotent with ``base=IdempotentTask``; see the README for options,
guarantees and limits.
"""

from __future__ import annotations

from . import signals as _signals  # noqa: F401  (connects the worker hooks)
from .errors import (
    BackendUnavailable,
    DuplicateTaskInProgress,
    IdempotencyError,
    IdempotencyKeyError,
    ImproperlyConfigured,
    LeaseLost,
    RecordNotReadable,
    ResultNotSerializable,
    ResultTooLarge,
)
from .lease import Lease
from .task import IdempotentTask

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "DuplicateTaskInProgress",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotentTask",
    "ImproperlyConfigured",
    "Lease",
    "LeaseLost",
    "RecordNotReadable",
    "ResultNotSerializable",
    "ResultTooLarge",
    "__version__",
]

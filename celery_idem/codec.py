"""Encoding of the outcomes kept in records: results and cached failures.

Outcomes are encoded with the task's serializer through kombu, exactly as Celery
encodes messages, and decoded only when their content type is one the app accepts
(``accept_content``): a record written with ``pickle`` is never unpickled by a worker
that does not accept pickle. Failures are encoded the way Celery's result backends
encode them, so the exception a duplicate re-raises is the one the first run raised.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads

from .errors import RecordNotReadable, ResultNotSerializable, ResultTooLarge
from .store import Outcome

if TYPE_CHECKING:
    from celery.backends.base import Backend

__all__ = ["decode_failure", "decode_result", "encode_failure", "encode_result"]


def _outcome(value: Any, serializer: str) -> Outcome:
    content_type, content_encoding, data = dumps(value, serializer=serializer)
    if isinstance(data, str):
        data = data.encode(content_encoding if content_encoding not in ("binary", None) else "utf-8")
    return Outcome(bytes(data), content_type, content_encoding)


def encode_result(value: Any, serializer: str, task_name: str, max_bytes: int) -> Outcome:
    """Encode a task's return value, within ``max_bytes``."""
    try:
        outcome = _outcome(value, serializer)
    except (EncodeError, TypeError, ValueError) as exc:
        raise ResultNotSerializable(task_name, serializer, str(exc)) from exc
    if len(outcome.data) > max_bytes:
        raise ResultTooLarge(task_name, len(outcome.data), max_bytes)
    return outcome


def encode_failure(exc: BaseException, backend: Backend, serializer: str) -> Outcome:
    """Encode an exception so that :func:`decode_failure` rebuilds it.

    Falls back to JSON (Celery's portable exception form) when the task's serializer
    cannot encode this exception.
    """
    try:
        return _outcome(backend.prepare_exception(exc, serializer), serializer)
    except (EncodeError, TypeError, ValueError):
        return _outcome(backend.prepare_exception(exc, "json"), "json")


def decode_result(outcome: Outcome, accept: Collection[str], key: str) -> Any:
    """Decode a stored result, refusing content types the app does not accept."""
    try:
        return loads(outcome.data, outcome.content_type, outcome.content_encoding, accept=accept)
    except (ContentDisallowed, DecodeError) as exc:
        raise RecordNotReadable(key, str(exc)) from exc


def decode_failure(outcome: Outcome, accept: Collection[str], backend: Backend, key: str) -> BaseException:
    """Rebuild a stored failure as an exception instance."""
    exc = backend.exception_to_python(decode_result(outcome, accept, key))
    if not isinstance(exc, BaseException):
        raise RecordNotReadable(key, f"the stored failure is a {type(exc).__name__}, not an exception")
    return exc

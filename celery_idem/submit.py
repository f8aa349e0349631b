"""Submit-side deduplication (``idempotency_dedupe_on_submit``).

``apply_async`` of a task with the option asks the record store, in one round trip,
whether its key has a record: queued (sent, not yet run), running or finished
within its TTL. If it has, nothing is published and the caller gets the
``AsyncResult`` of the task id the record names, so a double-clicked request yields
one message and one result handle. If it has not, the same script writes a
``queued`` marker naming this call's task id, which expires after
``idempotency_submit_ttl`` if the message is never consumed, and the message is
sent; a message that cannot be sent withdraws its marker. Messages that bypass
``apply_async`` (``send_task``, other producers) are still deduplicated by the
worker, as always. Loaded on the first such call, with redis-py.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from .errors import BackendUnavailable, IdempotencyPayloadMismatch, describe_error
from .keys import PAYLOAD_HEADER, differing_arguments, record_key
from .store import BACKEND_ERRORS, Mismatch, Sent, store_for

if TYPE_CHECKING:
    from .task import IdempotentTask

__all__ = ["submit"]


def submit(
    task: IdempotentTask,
    material: str,
    args: Any,
    kwargs: Any,
    task_id: str | None,
    producer: Any,
    link: Any,
    link_error: Any,
    shadow: str | None,
    options: dict[str, Any],
) -> Any:
    """Send the call unless its key has a record; return its ``AsyncResult`` either way."""
    config = task.resolved_idempotency
    task_id = task_id or str(uuid.uuid4())
    key = record_key(config.key_prefix, task.name, material)
    payload = (options.get("headers") or {}).get(PAYLOAD_HEADER, "")
    store = store_for(config.redis_url, config.redis_options)
    try:
        decision = store.submit(key, task_id, payload, config.submit_ttl_ms, task.name)
    except BACKEND_ERRORS as exc:
        if config.on_backend_error == "raise":
            raise BackendUnavailable(store.url, describe_error(exc)) from exc
        # Send it: the worker deduplicates it as any message.
        return task.publish(args, kwargs, task_id, producer, link, link_error, shadow, **options)
    if isinstance(decision, Sent):
        return task.AsyncResult(decision.holder)
    if isinstance(decision, Mismatch):
        raise IdempotencyPayloadMismatch(key, differing_arguments(decision.payload, payload))
    try:
        return task.publish(args, kwargs, task_id, producer, link, link_error, shadow, **options)
    except BaseException:
        try:
            store.withdraw(key, task_id, config.result_ttl_ms)
        except BACKEND_ERRORS:
            pass  # the marker expires after idempotency_submit_ttl
        raise

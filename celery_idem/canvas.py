"""What Celery sends or counts again when a delivery replays a recorded outcome.

A replayed delivery succeeds (or fails) again, so Celery does again what follows the
task: it sends the ``link`` callbacks (the ``link_error`` errbacks, for a recorded
failure) and the chain's next step, and returns the task's part of its chord. Two
things here make as much of that land once as can, and say what cannot:

* :func:`pin_callback_ids` gives each callback and errback without a task id one
  derived from the delivery's task id and its place in the list, so that every
  delivery of a message sends them under the same ids, and a callback that is an
  ``IdempotentTask`` keyed on its task id (the default) returns its recorded result
  instead of running again. Celery would give them a fresh id per send.
* :func:`warn_of_repeats`, called by a replay, logs one WARNING naming what may run
  twice: a callback, errback or chain step that is not an ``IdempotentTask`` (or an
  errback Celery calls inside the worker, which no message protects), and a chord
  part on a result backend that may count it again (:func:`_chord_repeat`).

Chords need nothing more where the backend counts a header task once however often
it reports: Celery's Redis backend from 5.7 on keeps the (task id, index) pairs it
has counted and claims the body's dispatch with a token; the database backend and
the other backends that poll the header's results (``celery.chord_unlock``) count
distinct task ids. Before 5.7 the Redis backend adds each part to a sorted set of
encoded results: a replay, whose result encodes as the first run's did, is
absorbed, but one that lands as the chord completes sends the body again (under
its frozen task id, so an idempotent body returns its record), and one that comes
back after the chord failed fails it again. An unordered chord
(``result_chord_ordered=False``) pushes parts onto a list, where a replay counts as
one more part.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import celery
from celery import states
from celery.backends.base import Backend
from celery.utils.functional import arity_greater
from celery.utils.log import get_logger

from .task import IdempotentTask

__all__ = ["pin_callback_ids", "warn_of_repeats"]

logger = get_logger(__name__)

#: Namespace of the task ids :func:`pin_callback_ids` derives (uuid5 of the parent's id and place).
CALLBACK_ID_NAMESPACE = uuid.UUID("5d0c7c1e-8f3b-4c43-9a53-3d5c8b0e6a21")

#: Celery's Redis result backend counts a chord part once per (task id, index) from 5.7 on.
REDIS_COUNTS_PARTS_ONCE = tuple(celery.VERSION[:2]) >= (5, 7)


def pin_callback_ids(request: Any) -> None:
    """Give the delivery's callbacks and errbacks stable task ids where they have none.

    The ids are uuid5 of this delivery's task id, ``link`` or ``link_error`` and the
    signature's place (into groups, chains and chords too), so every delivery of one
    message, and its re-queued copies, send them under the same ids. Ids the caller
    set (a frozen signature) are kept. The request gets new lists: the signatures a
    caller passed to ``apply()`` are not changed.
    """
    for field, kind in (("callbacks", "link"), ("errbacks", "link_error")):
        signatures = getattr(request, field, None)
        if signatures:
            seed = f"{request.id}:{kind}"
            setattr(request, field, [_pinned(sig, f"{seed}:{i}") for i, sig in enumerate(signatures)])


def warn_of_repeats(task: IdempotentTask, request: Any, key: str, failed: bool) -> None:
    """Log one WARNING if replaying this outcome sends or counts something that may run twice."""
    repeats: list[str] = []
    app = task.app
    if failed:
        for errback in request.errbacks or ():
            repeats += [f"link_error {name}" for name in _unprotected(app, task.backend, errback, True)]
    else:
        for callback in request.callbacks or ():
            repeats += [f"link {name}" for name in _unprotected(app, task.backend, callback, False)]
        if request.chain:
            next_step = request.chain[-1]
            repeats += [f"chain step {name}" for name in _unprotected(app, task.backend, next_step, False)]
    chord = _chord_repeat(task, request)
    if chord:
        repeats.append(chord)
    if repeats:
        logger.warning(
            "celery-idem: %s[%s] replayed the recorded %s of %s; sent or counted again, "
            "these may run twice: %s",
            task.name,
            request.id,
            "failure" if failed else "result",
            key,
            "; ".join(repeats),
        )


def _pinned(sig: Mapping[str, Any], seed: str) -> dict[str, Any]:
    copy = dict(sig)
    kind = copy.get("subtask_type")
    kwargs = dict(copy.get("kwargs") or {})
    if kind in ("group", "chain"):
        kwargs["tasks"] = [_pinned(child, f"{seed}.{i}") for i, child in enumerate(kwargs.get("tasks") or ())]
        copy["kwargs"] = kwargs
    elif kind == "chord":
        header = kwargs.get("header")
        if isinstance(header, Mapping):
            kwargs["header"] = _pinned(header, f"{seed}.h")
        elif header:
            kwargs["header"] = [_pinned(child, f"{seed}.h{i}") for i, child in enumerate(header)]
        if kwargs.get("body"):
            kwargs["body"] = _pinned(kwargs["body"], f"{seed}.b")
        copy["kwargs"] = kwargs
    else:
        options = dict(copy.get("options") or {})
        if not options.get("task_id"):
            options["task_id"] = str(uuid.uuid5(CALLBACK_ID_NAMESPACE, seed))
        copy["options"] = options
    return copy


def _tasks_of(sig: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The task signatures a (possibly nested) signature sends."""
    kind = sig.get("subtask_type")
    kwargs = sig.get("kwargs") or {}
    if kind in ("group", "chain"):
        for child in kwargs.get("tasks") or ():
            yield from _tasks_of(child)
    elif kind == "chord":
        header = kwargs.get("header")
        for child in [header] if isinstance(header, Mapping) else header or ():
            yield from _tasks_of(child)
        if kwargs.get("body"):
            yield from _tasks_of(kwargs["body"])
    else:
        yield sig


def _unprotected(app: Any, backend: Backend, sig: Mapping[str, Any], errback: bool) -> list[str]:
    """Names of the tasks ``sig`` sends that a second send may run again."""
    names = []
    for leaf in _tasks_of(sig):
        name = str(leaf.get("task"))
        registered = app.tasks.get(name)
        if not isinstance(registered, IdempotentTask):
            # Not registered here: it may be idempotent where it runs, but this worker cannot tell.
            names.append(name if registered is not None else f"{name} (not registered here)")
        elif errback and _called_in_worker(backend, registered, leaf):
            names.append(f"{name} (called in the worker, not sent)")
    return names


def _called_in_worker(backend: Backend, task: Any, sig: Mapping[str, Any]) -> bool:
    # Celery calls an errback taking more than the task id as a function, in the
    # failed task's process (backend._call_task_errbacks): no delivery protects it.
    header = getattr(task, "__header__", None)
    if header is None or isinstance(header, partial):  # bound tasks are always sent
        return False
    count_stored = getattr(backend, "_errback_arity_greater", None)  # 5.7: counts the stored arguments
    if count_stored is not None:
        return bool(count_stored(task.app.signature(dict(sig)), 1))
    return bool(arity_greater(header, 1))


def _chord_repeat(task: IdempotentTask, request: Any) -> str | None:
    """What returning this replayed chord part again may do, or None if it is counted once."""
    if not request.chord or not request.group:
        return None
    backend = task.backend
    part = f"its part of chord {request.group}"
    if type(backend).on_chord_part_return is Backend.on_chord_part_return:
        return None  # counted by celery.chord_unlock, which polls the header's results by task id
    from celery.backends.redis import RedisBackend

    if not isinstance(backend, RedisBackend):
        name = type(backend).__name__
        return f"{part} (counted again by {name}: the chord may complete before its last header task)"
    if REDIS_COUNTS_PARTS_ONCE:
        return None
    conf = task.app.conf
    ordered = (conf.result_backend_transport_options or {}).get("result_chord_ordered", True)
    if not ordered or conf.result_serializer != "json" or task.serializer != "json":
        # An unordered chord pushes every part onto a list, and a result serialized
        # another way may not encode as the first run's did: the part is added again.
        return (
            f"{part} (added again by Celery's Redis backend before 5.7: the chord body may start "
            "early, with this result twice and another header result missing)"
        )
    repeats = []
    body = _unprotected(task.app, backend, request.chord, False)
    if body:
        repeats.append(
            f"the chord body {', '.join(body)} (sent again if this part lands as the chord completes)"
        )
    # Before 5.7 the backend keeps a failed chord's parts, so every part that comes
    # back completes it again, and fails it again. The body's state says whether it
    # failed; one that cannot be read is warned of, since the replay must go on.
    body_id = (request.chord.get("options") or {}).get("task_id")
    try:
        chord_failed = bool(body_id) and backend.get_state(body_id) in states.PROPAGATE_STATES
    except Exception:
        chord_failed = True
    if chord_failed:
        repeats.append(f"the failure of chord {request.group} (its body's error callbacks)")
    return "; ".join(repeats) or None

"""A redis-py connection that counts round trips, by the thread that made them.

redis-py writes every request with one ``send_packed_command`` call, a pipeline
included, and then reads its replies: one call is one round trip. Install it with
``idempotency_redis_options={"connection_class": CountingConnection}``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from redis.connection import Connection

__all__ = ["RENEWER_THREAD", "CountingConnection", "count_statement", "round_trips", "statements"]

#: Name of celery_idem's lease renewal thread (``celery_idem.lease``).
RENEWER_THREAD = "celery-idem-renewer"

_lock = threading.Lock()
_sends: Counter[str] = Counter()


def _role() -> str:
    return "renewer" if threading.current_thread().name == RENEWER_THREAD else "task"


class CountingConnection(Connection):
    """Counts requests sent, as ``task`` (any thread but the renewer) or ``renewer``."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        role = _role()
        with _lock:
            _sends[role] += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def round_trips() -> dict[str, int]:
    """Round trips counted so far in this process, by role."""
    with _lock:
        return {"task": _sends["task"], "renewer": _sends["renewer"]}


_statements: Counter[str] = Counter()


def count_statement(kind: str) -> None:
    """Count one SQL statement sent by this process (``kind``: what sent it)."""
    with _lock:
        _statements[kind] += 1


def statements() -> dict[str, int]:
    """SQL statements counted so far in this process, by kind."""
    with _lock:
        return dict(_statements)

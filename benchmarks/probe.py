"""What a benchmark worker records about its own deliveries.

Bodies mark when they start and end, Celery's ``task_prerun`` / ``task_postrun``
signals mark each delivery (a duplicate that is served from its record runs no
body, but is still a delivery). Everything is kept in memory shared by the worker's
processes (made when the worker's main process imports this module, so that the
children of a prefork pool, forked later, count together) and sent to the control
server once, when the expected number of deliveries has finished, so that measuring
adds no round trip to any task.
"""

from __future__ import annotations

import multiprocessing
import time

# Slots of the shared array.
_BODIES, _BODY_FIRST, _BODY_LAST, _DELIVERIES, _DELIVERY_FIRST, _DELIVERY_LAST = range(6)


class Probe:
    """Counters and timestamps of one worker (``time.perf_counter`` seconds, a clock
    that all processes of the machine share on Linux)."""

    def __init__(self) -> None:
        self._lock = multiprocessing.Lock()
        self._values = multiprocessing.RawArray("d", 6)

    @property
    def bodies(self) -> int:
        return int(self._values[_BODIES])

    def body_start(self) -> None:
        if not self._values[_BODY_FIRST]:
            with self._lock:
                if not self._values[_BODY_FIRST]:
                    self._values[_BODY_FIRST] = time.perf_counter()

    def body_end(self) -> None:
        with self._lock:
            self._values[_BODIES] += 1
            self._values[_BODY_LAST] = time.perf_counter()

    def delivery_start(self) -> None:
        if not self._values[_DELIVERY_FIRST]:
            with self._lock:
                if not self._values[_DELIVERY_FIRST]:
                    self._values[_DELIVERY_FIRST] = time.perf_counter()

    def delivery_end(self) -> int:
        """Count a finished delivery; returns the worker's count so far."""
        with self._lock:
            self._values[_DELIVERIES] += 1
            self._values[_DELIVERY_LAST] = time.perf_counter()
            return int(self._values[_DELIVERIES])

    def summary(self) -> dict[str, float | int | None]:
        """Counts, spans (first body start to last body end, the same for deliveries),
        and the last body's end, to time a run from a moment of the benchmark's."""
        with self._lock:
            values = list(self._values)
        body_span = (
            values[_BODY_LAST] - values[_BODY_FIRST] if values[_BODY_FIRST] and values[_BODY_LAST] else None
        )
        delivery_span = None
        if values[_DELIVERY_FIRST] and values[_DELIVERY_LAST]:
            delivery_span = values[_DELIVERY_LAST] - values[_DELIVERY_FIRST]
        return {
            "bodies": int(values[_BODIES]),
            "body_span": body_span,
            "body_last": values[_BODY_LAST] or None,
            "deliveries": int(values[_DELIVERIES]),
            "delivery_span": delivery_span,
        }


probe = Probe()

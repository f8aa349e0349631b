"""What a benchmark worker records about its own deliveries.

Bodies mark when they start and end, Celery's ``task_prerun`` / ``task_postrun``
signals mark each delivery (a duplicate that is served from its record runs no
body, but is still a delivery). Everything is kept in the worker's memory and sent
to the control server once, when the expected number of deliveries has finished,
so that measuring adds no round trip to any task.
"""

from __future__ import annotations

import time


class Probe:
    """Counters and timestamps of one worker process (``time.perf_counter`` seconds)."""

    def __init__(self) -> None:
        self.bodies = 0
        self.body_first: float | None = None
        self.body_last: float | None = None
        self.deliveries = 0
        self.delivery_first: float | None = None
        self.delivery_last: float | None = None

    def body_start(self) -> None:
        if self.body_first is None:
            self.body_first = time.perf_counter()

    def body_end(self) -> None:
        self.bodies += 1
        self.body_last = time.perf_counter()

    def delivery_start(self) -> None:
        if self.delivery_first is None:
            self.delivery_first = time.perf_counter()

    def delivery_end(self) -> int:
        self.deliveries += 1
        self.delivery_last = time.perf_counter()
        return self.deliveries

    def summary(self) -> dict[str, float | int | None]:
        """Counts and spans: first body start to last body end, and the same for deliveries."""
        body_span = None
        if self.body_first is not None and self.body_last is not None:
            body_span = self.body_last - self.body_first
        delivery_span = None
        if self.delivery_first is not None and self.delivery_last is not None:
            delivery_span = self.delivery_last - self.delivery_first
        return {
            "bodies": self.bodies,
            "body_span": body_span,
            "deliveries": self.deliveries,
            "delivery_span": delivery_span,
        }


probe = Probe()

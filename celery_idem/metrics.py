"""Prometheus metrics: the counters of :mod:`celery_idem.store`, read from Redis at each scrape.

The counters live in Redis (64 shard hashes per key prefix, see
:func:`celery_idem.keys.shard_stats_keys`), so one collector anywhere reports what
every worker, pool process and host did, across restarts: no per-process registry,
no multiprocess mode. Each scrape costs one pipelined round trip.

Metrics, one family per counter of :data:`celery_idem.store.COUNTERS`, named
``celery_idem_<counter>_total`` with the task's name as the label ``name`` (as
celery-exporter labels tasks), and ``celery_idem_up``: 1 when the scrape read the
counters, 0 when Redis could not be reached (the scrape itself still succeeds).
Neither keys nor hosts are labels, so the series stay few.

Needs ``prometheus_client`` (``pip install 'celery-idem[prometheus]'``)::

    from prometheus_client import REGISTRY
    from celery_idem.metrics import IdempotencyCollector

    REGISTRY.register(IdempotencyCollector.for_app(app))   # does not touch Redis

``celery -A proj idem metrics --port 9808`` serves it on its own; docs/operations.md
shows how to serve it from a worker's main process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ImproperlyConfigured
from .store import COUNTERS

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["NAMESPACE", "IdempotencyCollector"]

#: The prefix of every metric name.
NAMESPACE = "celery_idem"


class IdempotencyCollector(Collector):
    """A Prometheus collector of celery-idem's counters in the Redis at ``url``, under ``prefix``.

    Registering it reads nothing (it describes its metrics without Redis); every
    scrape reads the counters once. A scrape while Redis is down or misconfigured
    answers ``celery_idem_up 0`` and no counters, rather than failing.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, prefix: str = "idem") -> None:
        self.url = url
        self.options = MappingProxyType(dict(options or {}))
        self.prefix = prefix

    @classmethod
    def for_app(cls, app: Celery) -> IdempotencyCollector:
        """The collector of ``app``'s records, at the URL and prefix its settings give (app-wide)."""
        from .config import resolve
        from .task import IdempotentTask

        config = resolve(app, IdempotentTask)
        return cls(config.redis_url, config.redis_options, config.key_prefix)

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples: what registering needs, without Redis."""
        yield from self._families()
        yield self._up(None)

    def collect(self) -> Iterator[Metric]:
        """Read the counters from Redis and yield them, with ``celery_idem_up``."""
        import redis

        from .store import store_for

        try:
            totals = store_for(self.url, self.options).stats(self.prefix)
        except (redis.exceptions.RedisError, ImproperlyConfigured):
            yield self._up(0)
            return
        families = self._families()
        for family, counter in zip(families, COUNTERS):
            for task, counts in sorted(totals.items()):
                family.add_metric([task], counts.get(counter, 0))
        yield from families
        yield self._up(1)

    @staticmethod
    def _families() -> list[CounterMetricFamily]:
        return [
            CounterMetricFamily(f"{NAMESPACE}_{counter}", f"celery-idem: {meaning}", labels=["name"])
            for counter, meaning in COUNTERS.items()
        ]

    @staticmethod
    def _up(value: int | None) -> GaugeMetricFamily:
        help_text = "1 when the last scrape read celery-idem's counters from Redis, 0 when it could not"
        if value is None:
            return GaugeMetricFamily(f"{NAMESPACE}_up", help_text)
        return GaugeMetricFamily(f"{NAMESPACE}_up", help_text, value=value)

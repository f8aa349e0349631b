"""The Prometheus collector: counters read from Redis at scrape time, ``celery_idem_up`` when it is down."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_idem.keys import record_key
from celery_idem.metrics import IdempotencyCollector
from celery_idem.store import COUNTERS, Acquired, Outcome, RecordStore, store_for
from celery_idem.testing import RedisServer, free_port
from tests.helpers import ROOT
from tests.test_cli import subprocess_env
from tests.worker_app import make_app

LEASE, KEEP = 10_000, 60_000
RESULT = Outcome(b'"ok"', "application/json", "utf-8")


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    """Every sample of a scrape, parsed by prometheus_client's own parser: name -> {labels: value}."""
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def run_once(store: RecordStore, task: str, name: str, failed: bool = False) -> None:
    claim = store.acquire(record_key("idem", task, name), f"id-{name}", LEASE, KEEP, f"r-{name}", task)
    assert isinstance(claim, Acquired)
    store.commit(record_key("idem", task, name), claim.token, failed, RESULT, KEEP, task)


def test_a_scrape_reports_every_counter_per_task_under_the_name_label(
    store: RecordStore, redis_url: str
) -> None:
    for i in range(3):
        run_once(store, "shop.charge", f"c{i}")
    run_once(store, "shop.refund", "r0", failed=True)
    store.acquire(record_key("idem", "shop.charge", "c0"), "dup", LEASE, KEEP, "r-dup", "shop.charge")
    registry = CollectorRegistry()
    registry.register(IdempotencyCollector(redis_url))
    samples = scrape(registry)

    assert samples["celery_idem_up"] == {(): 1.0}
    charge, refund = (("name", "shop.charge"),), (("name", "shop.refund"),)
    assert samples["celery_idem_executed_total"] == {charge: 3.0, refund: 1.0}
    assert samples["celery_idem_succeeded_total"] == {charge: 3.0, refund: 0.0}
    assert samples["celery_idem_failures_recorded_total"] == {charge: 0.0, refund: 1.0}
    assert samples["celery_idem_replayed_total"] == {charge: 1.0, refund: 0.0}
    counters = {name for name in samples if name.endswith("_total")}
    assert counters == {f"celery_idem_{counter}_total" for counter in COUNTERS}
    # One prefix; the only label is the task's name (no key hashes, no hosts).
    assert all(name.startswith("celery_idem_") for name in samples)
    assert {label for values in samples.values() for labels in values for label, _ in labels} == {"name"}


def test_registering_the_collector_does_not_touch_redis(redis_url: str, raw: redis.Redis) -> None:
    raw.ping()
    before = raw.info("stats")["total_connections_received"]
    for registry in (CollectorRegistry(), CollectorRegistry(auto_describe=True)):
        registry.register(IdempotencyCollector(redis_url))
    app = make_app({"idempotency_redis_url": redis_url, "idempotency_key_prefix": "shop"})
    collector = IdempotencyCollector.for_app(app)
    app.close()
    assert (collector.url, collector.prefix) == (redis_url, "shop")
    assert raw.info("stats")["total_connections_received"] == before


def test_a_scrape_while_redis_is_down_answers_up_0_and_no_error() -> None:
    with RedisServer() as server:
        run_once(store_for(server.url, {}), "shop.charge", "c0")
        registry = CollectorRegistry()
        registry.register(IdempotencyCollector(server.url))
        assert scrape(registry)["celery_idem_up"] == {(): 1.0}
        server.stop()
        down = scrape(registry)
        assert down == {"celery_idem_up": {(): 0.0}}
        server.start()  # empty again (no persistence): up, and no counters to report
        assert scrape(registry)["celery_idem_up"] == {(): 1.0}
    nobody = CollectorRegistry()
    nobody.register(IdempotencyCollector("redis://127.0.0.1:1/0"))
    assert scrape(nobody) == {"celery_idem_up": {(): 0.0}}


def test_the_metrics_command_serves_the_collector(store: RecordStore, redis_url: str) -> None:
    run_once(store, "shop.charge", "c0")
    port = free_port()
    command = ["-A", "tests.worker_app", "idem", "metrics", "--port", str(port), "--addr", "127.0.0.1"]
    server = subprocess.Popen(
        [sys.executable, "-m", "celery", *command],
        env=subprocess_env({"idempotency_redis_url": redis_url}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # printed once it listens
        assert f"http://127.0.0.1:{port}/metrics" in line, (
            line,
            server.stderr.read() if server.poll() else "",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        server.terminate()
        server.wait(30)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert [s.value for s in families["celery_idem_up"].samples] == [1.0]
    executed = families["celery_idem_executed"]
    assert executed.type == "counter"
    assert [(s.name, s.labels, s.value) for s in executed.samples if s.name.endswith("_total")] == [
        ("celery_idem_executed_total", {"name": "shop.charge"}, 1.0)
    ]
    assert json.dumps(sorted(families)).count("python_") == 0  # its own registry: only celery-idem's metrics

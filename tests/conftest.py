"""Fixtures: private Redis servers, real workers, apps.

Every test gets the session's private redis-server, emptied first (it is ours alone),
and tests that stop or restart Redis start their own with :class:`RedisServer`.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from celery import Celery
from celery.result import allow_join_result

from celery_idem.lease import reset_renewer
from celery_idem.store import RecordStore, reset_stores, store_for
from celery_idem.testing import RedisServer
from tests.helpers import Worker
from tests.worker_app import make_app

_names = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
        # Result objects left in reference cycles (tests' apps hold them) unsubscribe
        # from their result channel when collected. Before celery 5.7 each one that is
        # collected after this server stopped retries the connection 20 times, a
        # second apart: hundreds of them kept pytest from exiting for an hour. Collect
        # them while the server still answers.
        gc.collect()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def events(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=None)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _fresh_clients() -> Iterator[None]:
    # Tests start and stop Redis servers on reused ports: do not keep pools across tests.
    reset_stores()
    reset_renewer()
    # Eager tasks run in several threads flip Celery's process-wide "a task is
    # running, result.get() would block" flag without a lock; start each test clean.
    with allow_join_result():
        yield
    reset_stores()


@pytest.fixture
def store(redis_url: str) -> RecordStore:
    """The store of the session's Redis, as a worker would get it."""
    return store_for(redis_url, {})


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the session's Redis (bytes replies)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def redis_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
def worker_conf(redis_url: str) -> dict[str, Any]:
    """Redis broker (db 1), Redis result backend (db 2), records and reports in db 0."""
    return {
        "broker_url": redis_db(redis_url, 1),
        "result_backend": redis_db(redis_url, 2),
        "idempotency_redis_url": redis_url,
        "test_events_url": redis_url,
        "idempotency_lock_ttl": 2,
    }


@pytest.fixture
def start_worker(events: redis.Redis, request: pytest.FixtureRequest) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(conf: dict[str, Any], **options: Any) -> Worker:
        worker = Worker(f"w{next(_names)}", conf, events, **options)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for worker in workers:
            print(f"----- log of {worker.name} -----\n{worker.log()[-8000:]}")


@pytest.fixture
def producer(worker_conf: dict[str, Any]) -> Iterator[Callable[..., Celery]]:
    """Build the same app the workers run, to send tasks and read results."""
    apps: list[Celery] = []

    def build(conf: dict[str, Any] | None = None) -> Celery:
        app = make_app(conf if conf is not None else worker_conf)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)

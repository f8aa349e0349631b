"""Fixtures: private Redis servers, real workers, apps.

Every test gets the session's private redis-server, emptied first (it is ours alone),
and tests that stop or restart Redis start their own with :class:`RedisServer`.
"""

from __future__ import annotations

import gc
import itertools
import os
import uuid
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from celery import Celery
from celery.result import allow_join_result
from kombu import Connection

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


RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_available() -> bool:
    try:
        with Connection(RABBITMQ_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_conf(request: pytest.FixtureRequest, redis_url: str) -> Iterator[dict[str, Any]]:
    """Worker settings for one broker, with a queue of this test's own.

    Tests list it before ``start_worker``, so it is torn down after their workers
    stopped: a worker still running would declare the deleted queue again.
    """
    queue = f"test-{uuid.uuid4().hex[:12]}"
    if request.param == "rabbitmq":
        if not rabbitmq_available():
            if os.environ.get("CI"):
                pytest.fail(f"RabbitMQ is not reachable at {RABBITMQ_URL} and CI is set")
            pytest.skip(f"RabbitMQ is not reachable at {RABBITMQ_URL}")
        broker = {"broker_url": RABBITMQ_URL}
    else:
        broker = {
            "broker_url": redis_db(redis_url, 1),
            # A SIGKILLed worker's unacked messages come back after this.
            "broker_transport_options": {
                "visibility_timeout": 5,
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
            },
        }
    yield {
        **broker,
        "result_backend": redis_db(redis_url, 2),
        "idempotency_redis_url": redis_url,
        "test_events_url": redis_url,
        "idempotency_lock_ttl": 2,
        "task_default_queue": queue,
    }
    if request.param == "rabbitmq":
        with Connection(RABBITMQ_URL) as connection:
            connection.default_channel.queue_delete(queue)


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A schema of this test's own in the ``test`` database, dropped afterwards, with a ledger.

    The ledger has no unique constraint: a duplicated side effect shows as a row.
    """
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} and CI is set")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    schema = f"idem_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"CREATE TABLE {schema}.ledger (id serial PRIMARY KEY, order_id text, cents int)")
    yield schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def schema_url(schema: str, url: str = POSTGRES_URL) -> str:
    """``url`` with ``search_path`` set to ``schema``."""
    return f"{url}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """A PostgreSQL URL whose tables live in this test's own schema."""
    return schema_url(pg_schema)

"""The record store's guarantees on every Redis topology, a failover in the middle of a storm,
and what ``idempotency_min_replicas`` adds against replication loss.

Each topology is started once for the module: a plain server and the same over its unix
socket (the controls), a TLS server verifying client certificates, a Sentinel group (a
primary, a replica, three sentinels) and a cluster of three primaries with a replica
each. Every test goes through ``store_for`` (what a worker uses) or a real worker whose
broker is RabbitMQ and whose records live on the topology.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import redis
import redis.sentinel
from kombu import Connection

from celery_idem.errors import LeaseLost
from celery_idem.keys import record_key
from celery_idem.store import (
    _ACQUIRE,
    _COMMIT,
    Acquired,
    Busy,
    Finished,
    Outcome,
    RecordStore,
    Send,
    Sent,
    store_for,
)
from celery_idem.testing import RedisCluster, RedisSentinelGroup, RedisServer
from tests.conftest import RABBITMQ_URL, rabbitmq_available, redis_db
from tests.helpers import acquired, lease_ended, outcome, runs
from tests.worker_app import make_app

LEASE = 10_000
KEEP = 60_000
RESULT = Outcome(b'{"paid": true}', "application/json", "utf-8")

TOPOLOGIES = ["plain", "unix", "tls", "sentinel", "cluster"]


@dataclass
class Topology:
    """A running topology: how the records are reached, and its servers for inspection."""

    name: str
    url: str
    options: dict[str, Any]
    #: Plain clients of the servers that take writes now (they change in a failover).
    primaries: Callable[[], list[redis.Redis]]
    #: The classes of redis-py connection this topology's clients use.
    connection_class: type
    running: Any = field(default=None, repr=False)

    @contextmanager
    def primary_clients(self) -> Iterator[list[redis.Redis]]:
        clients = self.primaries()
        try:
            yield clients
        finally:
            for client in clients:
                client.close()

    def store(self, **options: Any) -> RecordStore:
        return store_for(self.url, {**self.options, **options})


def _cluster_primaries(cluster: RedisCluster) -> list[redis.Redis]:
    clients = []
    for node in cluster.nodes:
        client = node.client()
        if client.info("replication")["role"] == "master":
            clients.append(client)
        else:
            client.close()
    return clients


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    name = request.param
    if name in ("plain", "unix"):
        with RedisServer(unixsocket=True) as server:
            url, cls = (
                (server.url, redis.Connection)
                if name == "plain"
                else (
                    server.unix_url,
                    redis.UnixDomainSocketConnection,
                )
            )
            yield Topology(name, url, {}, lambda: [server.client()], cls, server)
    elif name == "tls":
        with RedisServer(tls=True) as server:
            assert server.tls_files is not None
            options = server.tls_files.client_options()
            yield Topology(name, server.url, options, lambda: [server.client()], redis.SSLConnection, server)
    elif name == "sentinel":
        with RedisSentinelGroup() as group:
            yield Topology(
                name,
                group.url,
                {"master_name": group.master_name},
                lambda: [group.primary.client()],
                redis.sentinel.SentinelManagedConnection,
                group,
            )
    else:
        with RedisCluster() as cluster:
            yield Topology(
                name, cluster.url, {}, lambda: _cluster_primaries(cluster), redis.Connection, cluster
            )


def key(name: str) -> str:
    """A record key of its own for each call (records outlive tests within the module)."""
    return record_key("idem", "tests.core", f"{name}-{uuid.uuid4().hex[:8]}")


# -- the core behaviour ---------------------------------------------------------------


def test_a_first_acquire_holds_the_lease_and_a_second_finds_it_busy(topology: Topology) -> None:
    store, k = topology.store(), key("acquire")
    assert acquired(store.acquire(k, "a", LEASE, KEEP), 1, False)
    busy = store.acquire(k, "b", LEASE, KEEP)
    assert isinstance(busy, Busy) and busy.holder == "a" and busy.token == 1
    assert 0 < busy.lease_left <= LEASE / 1000
    with topology.primary_clients() as primaries:  # on the topology's own primary, nowhere else
        # SCAN, not EXISTS: a cluster node answers MOVED for a key of another's slot.
        assert sum(len(list(primary.scan_iter(match=k))) for primary in primaries) == 1


def test_a_duplicate_after_the_commit_replays_the_result(topology: Topology) -> None:
    store, k = topology.store(), key("commit")
    claim = store.acquire(k, "a", LEASE, KEEP)
    assert isinstance(claim, Acquired)
    assert store.commit(k, claim.token, False, RESULT, KEEP) is None  # no WAIT asked for
    replay = store.acquire(k, "b", LEASE, KEEP)
    assert replay == Finished(token=1, failed=False, outcome=RESULT)
    record = store.read(k)
    assert record is not None and (record.state, record.holder) == ("done", "a")


def test_an_expired_lease_is_taken_over_and_the_old_run_cannot_commit(topology: Topology) -> None:
    store, k = topology.store(), key("takeover")
    first = store.acquire(k, "a", 100, KEEP)
    assert isinstance(first, Acquired)
    lease_ended(store.client, k)
    second = store.acquire(k, "b", LEASE, KEEP)
    assert acquired(second, 2, True)
    assert isinstance(second, Acquired) and second.fence > first.fence
    with pytest.raises(LeaseLost):
        store.commit(k, first.token, False, RESULT, KEEP)
    store.commit(k, 2, False, RESULT, KEEP)
    record = store.read(k)
    assert record is not None and (record.state, record.holder, record.token) == ("done", "b", 2)


_sends: Counter[str] = Counter()
_sends_lock = threading.Lock()


def counting(base: type) -> type:
    """``base`` counting each write of a request (one round trip) by the server it went to."""

    class Counting(base):  # type: ignore[valid-type, misc]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            where = getattr(self, "path", None) or f"{self.host}:{self.port}"
            with _sends_lock:
                _sends[where] += 1
            super().send_packed_command(command, check_health)

    return Counting


def test_many_leases_renew_in_one_round_trip_per_node(topology: Topology) -> None:
    if topology.name == "cluster":
        # RedisCluster takes no connection_class: wrap each node's pool once it exists.
        store = topology.store()
        for node in store.client.get_nodes():
            pool = node.redis_connection.connection_pool
            pool.connection_class = counting(pool.connection_class)
            pool.reset()
    else:
        store = topology.store(connection_class=counting(topology.connection_class))
    keys = [key(f"renew{i}") for i in range(40)]
    for k in keys:
        assert isinstance(store.acquire(k, "a", LEASE, KEEP), Acquired)
    leases = [(k, 1, LEASE, KEEP) for k in keys]
    store.renew(leases)  # loads the renewal script where it is missing
    with topology.primary_clients() as primaries:
        for primary in primaries:
            primary.config_resetstat()
        with _sends_lock:
            _sends.clear()
        assert store.renew(leases) == [True] * len(keys)
        with _sends_lock:
            sent = dict(_sends)
        per_node = {
            f"127.0.0.1:{p.connection_pool.connection_kwargs['port']}": p.info("commandstats").get(
                "cmdstat_evalsha", {"calls": 0}
            )["calls"]
            for p in primaries
        }
    if topology.name == "cluster":
        owners = Counter(store.client.get_node_from_key(k).name for k in keys)
        assert len(owners) == 3  # the leases are spread over every primary
        assert sent == dict.fromkeys(owners, 1)  # one round trip per node, not one per lease
        assert per_node == dict(owners)
    else:
        assert list(sent.values()) == [1]
        assert list(per_node.values()) == [len(keys)]


def test_a_stored_step_is_handed_to_the_next_run_and_refused_to_a_stale_one(topology: Topology) -> None:
    store, k = topology.store(), key("step")
    first = store.acquire(k, "a", LEASE, KEEP)
    assert isinstance(first, Acquired)
    store.store_step(k, first.token, "charge", b"ch_1")
    assert store.release(k, first.token, KEEP) is True
    second = store.acquire(k, "b", LEASE, KEEP)
    assert isinstance(second, Acquired) and not second.first
    assert second.token == 2 and dict(second.steps) == {"charge": b"ch_1"}
    with pytest.raises(LeaseLost):
        store.store_step(k, first.token, "receipt", b"r_1")


def test_release_frees_the_key_only_for_its_holder(topology: Topology) -> None:
    store, k = topology.store(), key("release")
    assert isinstance(store.acquire(k, "a", LEASE, KEEP), Acquired)
    assert store.release(k, 2, KEEP) is False  # not the holder's token
    assert store.release(k, 1, KEEP) is True
    assert store.release(k, 1, KEEP) is False
    assert acquired(store.acquire(k, "b", LEASE, KEEP), 2, False)
    assert store.release_holder(k, "a", KEEP) is False
    assert store.release_holder(k, "b", KEEP) is True


def test_a_second_submit_of_a_key_is_told_the_first_task_id(topology: Topology) -> None:
    store, k = topology.store(), key("submit")
    assert store.submit(k, "task-1", "", 60_000) == Send()
    assert store.submit(k, "task-2", "", 60_000) == Sent("task-1")
    record = store.read(k)
    assert record is not None and (record.state, record.holder) == ("queued", "task-1")
    assert store.withdraw(k, "task-1", KEEP) is True
    assert store.submit(k, "task-3", "", 60_000) == Send()


def test_every_call_path_reloads_its_script_after_script_flush(topology: Topology) -> None:
    store = topology.store()
    keys = [key(f"flush{i}") for i in range(12)]  # over every primary of a cluster

    def flushed() -> None:
        with topology.primary_clients() as primaries:
            for primary in primaries:
                primary.script_flush()
                assert primary.script_exists(_ACQUIRE.sha) == [False]

    flushed()
    for k in keys:
        assert acquired(store.acquire(k, "a", LEASE, KEEP), 1, False)
    flushed()
    assert store.renew([(k, 1, LEASE, KEEP) for k in keys]) == [True] * len(keys)
    flushed()
    for k in keys[:4]:
        store.store_step(k, 1, "s", b"v")
    flushed()
    for k in keys[:4]:
        store.commit(k, 1, False, RESULT, KEEP)
    flushed()
    assert [store.release(k, 1, KEEP) for k in keys[4:8]] == [True] * 4
    flushed()
    assert [store.release_holder(k, "a", KEEP) for k in keys[8:]] == [True] * 4
    flushed()
    assert [store.submit(key("flush-submit"), "t", "", 60_000) for _ in range(4)] == [Send()] * 4
    assert all(isinstance(store.acquire(k, "b", LEASE, KEEP), Finished) for k in keys[:4])


# -- a real worker on each topology -------------------------------------------------


@pytest.fixture
def rabbit_conf(redis_url: str, topology: Topology) -> Iterator[dict[str, Any]]:
    """A worker on RabbitMQ (a queue of this test's own) whose records live on ``topology``."""
    if not rabbitmq_available():
        pytest.skip(f"RabbitMQ is not reachable at {RABBITMQ_URL}")
    queue = f"test-{uuid.uuid4().hex[:12]}"
    yield {
        "broker_url": RABBITMQ_URL,
        "result_backend": redis_db(redis_url, 2),
        "idempotency_redis_url": topology.url,
        "idempotency_redis_options": topology.options,
        "test_events_url": redis_url,
        "idempotency_lock_ttl": 2,
        "task_default_queue": queue,
    }
    with Connection(RABBITMQ_URL) as connection:
        connection.default_channel.queue_delete(queue)


def test_a_worker_runs_each_key_once_with_its_records_on_the_topology(
    topology: Topology, rabbit_conf: dict[str, Any], start_worker: Any, producer: Any, events: redis.Redis
) -> None:
    start_worker(rabbit_conf, concurrency=2)
    app = producer(rabbit_conf)
    by_label, validated = app.tasks["t.by_label"], app.tasks["t.validated"]
    label = f"core-{topology.name}"
    first, again = by_label.delay(label), by_label.delay(label)  # two task ids, one key
    assert outcome(first, 30) == outcome(again, 30)
    assert runs(events, label) == 1
    sent = validated.delay(f"{label}-submit", 5)
    assert validated.delay(f"{label}-submit", 5).id == sent.id  # deduplicated when sent
    assert outcome(sent, 30)["amount"] == 5
    assert runs(events, f"{label}-submit") == 1
    record = topology.store().read(by_label.record_key_for((label,)))
    assert record is not None and record.state == "done"


# -- a failover in the middle of a storm ----------------------------------------------


def _caught_up(topology: Topology) -> None:
    """Return once the replica has every write the primary took so far (WAIT after a write).

    Needed before ``SENTINEL FAILOVER``, which promotes the replica as it is; ``CLUSTER
    FAILOVER`` itself waits for the replica to catch up before it takes over.
    """
    if topology.name == "cluster":
        return
    with topology.primary_clients() as primaries:
        for primary in primaries:
            primary.set("test:replication-probe", 1)
            assert primary.wait(1, 10_000) == 1


@pytest.mark.parametrize("topology", ["sentinel", "cluster"], indirect=True)
def test_a_failover_mid_storm_reruns_nothing_committed_before_it_and_loses_nothing(
    topology: Topology, rabbit_conf: dict[str, Any], start_worker: Any, producer: Any, events: redis.Redis
) -> None:
    start_worker(rabbit_conf, concurrency=2)
    app = producer(rabbit_conf)
    task = app.tasks["t.by_label"]
    tag = uuid.uuid4().hex[:6]
    before = [f"before-{tag}-{i}" for i in range(20)]
    during = [f"during-{tag}-{i}" for i in range(30)]

    committed = {label: outcome(result, 60) for label, result in [(b, task.delay(b)) for b in before]}
    _caught_up(topology)
    running = {label: task.delay(label, 0.1) for label in during}
    events.blpop([f"started:{during[2]}"], timeout=30)  # the storm is under way
    assert events.llen(f"finished:{during[-1]}") == 0  # and far from over when the failover starts
    if topology.name == "cluster":
        cluster: RedisCluster = topology.running
        moved = task.record_key_for((before[0],))
        on_it = [
            b
            for b in before
            if cluster.primary_port(task.record_key_for((b,))) == cluster.primary_port(moved)
        ]
        new_primary = cluster.failover(moved)
        assert on_it and all(cluster.primary_port(task.record_key_for((b,))) == new_primary for b in on_it)
    else:
        topology.running.failover()
    replays = {label: task.delay(label) for label in before}
    repeats = {label: task.delay(label) for label in during}

    for label in before:
        assert outcome(replays[label], 60) == committed[label]  # the record survived the failover
        assert runs(events, label) == 1
    finished, refused = {}, []
    for label, result in running.items():
        try:
            finished[label] = outcome(result, 60)
        except LeaseLost:
            # Its record was written to the old primary after the replica was promoted
            # (Sentinel does not wait for the replica): the commit found no record.
            refused.append(label)
    for label in during:
        assert outcome(repeats[label], 60)["label"] == label  # nothing lost: every key has its result
    ran_twice = [label for label in during if runs(events, label) > 1]
    assert set(ran_twice) >= set(refused)
    if topology.name == "cluster":
        # CLUSTER FAILOVER waits for the replica to catch up before it takes over: nothing is lost.
        assert ran_twice == [] and refused == []
        assert all(outcome(repeats[label], 60) == finished[label] for label in during)
    store = topology.store()
    for label in [*before, *during]:
        record = store.read(task.record_key_for((label,)))
        assert record is not None and record.state == "done"
    with topology.primary_clients() as primaries:
        # The promoted replica had no scripts (Redis does not replicate SCRIPT LOAD): the worker loaded them.
        assert all(primary.script_exists(_ACQUIRE.sha, _COMMIT.sha) == [True, True] for primary in primaries)


# -- replication loss and idempotency_min_replicas ------------------------------------


@dataclass
class Replicated:
    primary: RedisServer
    replica: RedisServer


def _in_sync(primary: RedisServer, replica: RedisServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with primary.client() as client:
        while client.info("replication").get("connected_slaves") != 1 or client.wait(1, 100) != 1:
            if time.monotonic() > deadline:
                raise AssertionError(f"the replica never synced:\n{replica.log_tail()}")
            client.set("test:sync-probe", 1)


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    sync = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")
    with RedisServer(args=sync) as primary:
        with RedisServer(args=(*sync, "--replicaof", "127.0.0.1", str(primary.port))) as replica:
            _in_sync(primary, replica)
            yield Replicated(primary, replica)


def test_a_commit_waits_for_its_replica_which_then_holds_the_result(replicated: Replicated) -> None:
    store, k = store_for(replicated.primary.url, {}), key("wait")
    assert isinstance(store.acquire(k, "a", LEASE, KEEP), Acquired)
    assert store.commit(k, 1, False, RESULT, KEEP, min_replicas=1, replicas_timeout_ms=5000) == 1
    with replicated.replica.client() as replica:
        assert replica.hget(k, "state") == b"done"  # no race: WAIT returned after the replica had it


def test_a_commit_its_replicas_missed_stands_on_the_primary_and_says_so(replicated: Replicated) -> None:
    store, k = store_for(replicated.primary.url, {}), key("unreplicated")
    assert isinstance(store.acquire(k, "a", LEASE, KEEP), Acquired)
    replicated.replica.stop()
    try:
        started = time.monotonic()
        assert store.commit(k, 1, False, RESULT, KEEP, min_replicas=1, replicas_timeout_ms=200) == 0
        assert time.monotonic() - started >= 0.2
        assert store.acquire(k, "b", LEASE, KEEP) == Finished(token=1, failed=False, outcome=RESULT)
        with pytest.raises(LeaseLost):  # a refused commit is refused, waited for or not
            store.commit(k, 7, False, RESULT, KEEP, min_replicas=1, replicas_timeout_ms=50)
    finally:
        replicated.replica.start()
        _in_sync(replicated.primary, replicated.replica)


def test_a_task_whose_commit_misses_its_replicas_logs_a_warning_and_returns_its_result(
    replicated: Replicated, redis_url: str, events: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    def app(**conf: Any) -> Any:
        return make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": replicated.primary.url,
                "test_events_url": redis_url,
                "idempotency_min_replicas": 1,
                **conf,
            }
        )

    task = app().tasks["t.by_label"]
    with caplog.at_level(logging.INFO, logger="celery_idem"):
        assert task.apply(("replicated",)).get()["label"] == "replicated"
    assert "decision=commit_not_replicated" not in caplog.text
    replicated.replica.stop()
    try:
        task = app(idempotency_min_replicas_timeout=0.1).tasks["t.by_label"]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="celery_idem"):
            first = task.apply(("alone",)).get()
            assert task.apply(("alone",)).get() == first  # recorded: the duplicate replays it
        warnings = [r for r in caplog.records if "commit_not_replicated" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert "replicas=0 wanted=1" in warnings[0].getMessage()
        assert runs(events, "alone") == 1
    finally:
        replicated.replica.start()
        _in_sync(replicated.primary, replicated.replica)


def test_min_replicas_is_a_wait_after_the_commit_on_the_records_connection() -> None:
    # What the store writes: the script and the WAIT in one request, WAIT second.
    with RedisServer() as server:
        seen: list[bytes] = []

        class Recording(redis.Connection):
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                seen.append(b"".join(command) if isinstance(command, list) else command)
                super().send_packed_command(command, check_health)

        store, k = store_for(server.url, {"connection_class": Recording}), key("packed")
        warm = key("warm")  # the server loads the commit script first
        store.acquire(warm, "a", LEASE, KEEP)
        store.commit(warm, 1, False, RESULT, KEEP)
        store.acquire(k, "a", LEASE, KEEP)
        seen.clear()
        assert store.commit(k, 1, False, RESULT, KEEP, min_replicas=2, replicas_timeout_ms=10) == 0
        request = b"".join(seen)
        assert request.index(b"EVALSHA") < request.index(b"WAIT") and b"$1\r\n2\r\n$2\r\n10\r\n" in request
        assert len(seen) == 1  # one write

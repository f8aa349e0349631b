"""Exact counters, kept by the scripts that decide, and safe against calls sent twice.

Every decision a script makes counts itself in the counters of the record's shard,
in the same script (no round trip of its own); a script sent again after its reply
was lost (redis-py would send it up to ten more times; the store sends it once more)
changes and counts nothing more.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_idem.errors import LeaseLost
from celery_idem.keys import SHARDS, record_key, shard_stats_keys
from celery_idem.store import Acquired, Busy, Finished, Outcome, RecordStore, store_for
from tests.helpers import Proxy

TASK = "shop.charge"
LEASE, KEEP = 10_000, 60_000
RESULT = Outcome(b'"ok"', "application/json", "utf-8")


def key(name: str) -> str:
    return record_key("idem", TASK, name)


def counters(store: RecordStore) -> dict[str, int]:
    return store.stats("idem").get(TASK, {})


def test_each_decision_counts_once_under_its_task(store: RecordStore) -> None:
    first = store.acquire(key("a"), "t1", LEASE, KEEP, "r1", TASK)
    assert isinstance(first, Acquired)
    assert isinstance(store.acquire(key("a"), "t2", LEASE, KEEP, "r2", TASK, "retry"), Busy)
    assert isinstance(store.acquire(key("a"), "t3", LEASE, KEEP, "r3", TASK, "drop"), Busy)
    store.store_step(key("a"), first.token, "receipt", b"x", TASK)
    store.commit(key("a"), first.token, False, RESULT, KEEP, TASK, (2, 1, 1, 0))
    assert isinstance(store.acquire(key("a"), "t4", LEASE, KEEP, "r4", TASK), Finished)
    b = store.acquire(key("b"), "t5", LEASE, KEEP, "r5", TASK)
    assert isinstance(b, Acquired)
    store.release(key("b"), b.token, KEEP, TASK)
    assert counters(store) == {
        "executed": 2,
        "conflicts_retry": 1,
        "conflicts_drop": 1,
        "steps_run": 1,
        "succeeded": 1,
        "steps_replayed": 2,
        "transactions_run": 1,
        "transactions_replayed": 1,
        "replayed": 1,
        "released": 1,
    }


def test_counters_of_many_keys_are_summed_over_the_shards(store: RecordStore, raw: redis.Redis) -> None:
    for i in range(500):
        claim = store.acquire(key(f"k{i}"), f"t{i}", LEASE, KEEP, f"r{i}", TASK)
        assert isinstance(claim, Acquired)
        store.commit(key(f"k{i}"), claim.token, i % 5 == 0, RESULT, KEEP, TASK)
    shards = [k for k in shard_stats_keys("idem") if raw.exists(k)]
    assert len(shards) > SHARDS // 2  # spread, not one global key
    assert counters(store) == {"executed": 500, "succeeded": 400, "failures_recorded": 100}


def test_a_taken_over_lease_counts_one_takeover_and_one_lost_lease(
    store: RecordStore, raw: redis.Redis
) -> None:
    old = store.acquire(key("t"), "t1", 50, KEEP, "r1", TASK)
    assert isinstance(old, Acquired)
    raw.hset(key("t"), "expires", 0)  # its lease ran out
    new = store.acquire(key("t"), "t2", LEASE, KEEP, "r2", TASK)
    assert isinstance(new, Acquired) and new.taken_over
    assert store.renew([(key("t"), old.token, LEASE, KEEP, TASK)]) == [False]
    with pytest.raises(LeaseLost):
        store.commit(key("t"), old.token, False, RESULT, KEEP, TASK)
    with pytest.raises(LeaseLost):
        store.store_step(key("t"), old.token, "s", b"x", TASK)
    assert store.release(key("t"), old.token, KEEP, TASK) is False
    found = counters(store)
    assert (found["executed"], found["takeovers"], found["leases_lost"]) == (2, 1, 1)


def test_the_main_processs_release_of_a_dead_run_counts_apart(store: RecordStore) -> None:
    store.acquire(key("d"), "t1", LEASE, KEEP, "r1", TASK)
    assert store.release_run(key("d"), "t1", "r1", KEEP, TASK) is True
    assert counters(store) == {"executed": 1, "freed_after_crash": 1}


def test_backend_errors_met_before_are_counted_once_by_the_acquire_that_gets_through(
    store: RecordStore,
) -> None:
    store.acquire(key("e"), "t1", LEASE, KEEP, "r1", TASK, errors=3)
    store.acquire(key("e"), "t1", LEASE, KEEP, "r1", TASK, errors=3)  # the same call, sent again
    assert counters(store)["backend_errors"] == 3


@pytest.fixture
def through_proxy(redis_server: Any, redis_url: str) -> Any:
    proxy = Proxy("127.0.0.1", redis_server.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    yield proxy, store_for(url, {"socket_timeout": 0.5})
    proxy.close()


@pytest.mark.parametrize("verb", ["acquire", "replay", "conflict", "commit", "step", "release"])
def test_a_call_whose_reply_was_lost_and_that_is_sent_again_counts_once(
    through_proxy: Any, store: RecordStore, verb: str
) -> None:
    # The script runs on the server, its reply is lost, the call times out and is sent
    # again on a new connection: the counters move as for one call.
    proxy, lossy = through_proxy
    k = key(f"lost-{verb}")
    lossy.acquire(key("warm-up"), "w", LEASE, KEEP, "w", "")  # connected, scripts loaded
    held = None
    if verb in ("replay", "conflict", "commit", "step", "release"):
        held = store.acquire(k, "t1", LEASE, KEEP, "r1", TASK)
        assert isinstance(held, Acquired)
        if verb == "replay":
            store.commit(k, held.token, False, RESULT, KEEP, TASK)
    before = counters(store)
    proxy.lose_replies()
    if verb == "acquire":
        claim = lossy.acquire(k, "t1", LEASE, KEEP, "r1", TASK)
        assert isinstance(claim, Acquired) and claim.token == 1
        counter = "executed"
    elif verb == "replay":
        assert isinstance(lossy.acquire(k, "t2", LEASE, KEEP, "r2", TASK), Finished)
        counter = "replayed"
    elif verb == "conflict":
        assert isinstance(lossy.acquire(k, "t2", LEASE, KEEP, "r2", TASK, "retry"), Busy)
        counter = "conflicts_retry"
    elif verb == "commit":
        assert held is not None
        lossy.commit(k, held.token, False, RESULT, KEEP, TASK)
        counter = "succeeded"
    elif verb == "step":
        assert held is not None
        lossy.store_step(k, held.token, "receipt", b"x", TASK)
        counter = "steps_run"
    else:
        assert held is not None
        assert lossy.release(k, held.token, KEEP, TASK) in (True, False)  # the resend finds it freed
        counter = "released"
    assert proxy.dropped  # the first reply was lost: the call was sent twice
    after = counters(store)
    assert after.get(counter, 0) - before.get(counter, 0) == 1
    assert {name: n for name, n in after.items() if name != counter} == {
        name: n for name, n in before.items() if name != counter
    }

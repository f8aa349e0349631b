"""The record store against a real Redis: states, fencing tokens, TTLs, scripts, outages.

Every test runs the Lua scripts on a private redis-server. Leases expire by Redis
server time, so tests that need an expired lease take a tiny one and poll until the
server says it ran out; nothing here waits on a sleep or asserts on a duration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import re
import threading
import time
from importlib.resources import files
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from celery_idem.errors import LeaseLost
from celery_idem.keys import record_key
from celery_idem.store import (
    BACKEND_ERRORS,
    Acquired,
    Busy,
    Finished,
    Outcome,
    Record,
    RecordStore,
    store_for,
)
from celery_idem.testing import RedisServer
from tests.helpers import acquired, record_key_of

LEASE = 10_000
KEEP = 60_000
#: A lease short enough to run out while a test polls for it.
SHORT = 50
#: How long a test polls for something Redis is about to do before giving up.
DEADLINE = 10.0

RESULT = Outcome(b'{"answer":42}', "application/json", "utf-8")
#: Not text in any encoding: the store must hand the bytes back untouched.
BINARY = Outcome(b"\x80\x00\xff\xfe binary", "application/x-python-serialize", "binary")
FAILURE = Outcome(b'{"exc_type":"ValueError","exc_message":["bad"]}', "application/json", "utf-8")
#: SHA1 of each script, as Redis knows it: acquire.lua comes after payload.lua, whose
#: function it calls.
_LUA = files("celery_idem") / "lua"
SCRIPTS = {
    name: hashlib.sha1(
        b"".join((_LUA / f"{part}.lua").read_bytes() + b"\n" for part in uses)
        + (_LUA / f"{name}.lua").read_bytes()
    ).hexdigest()
    for name, uses in (
        ("acquire", ("payload",)),
        ("commit", ()),
        ("release", ()),
        ("renew", ()),
        ("step", ()),
    )
}


key = record_key_of


def unfenced(record: Record | None) -> Record | None:
    """``record`` without its fence, which follows the server's clock, for comparisons."""
    return None if record is None else dataclasses.replace(record, fence=0, expires=None)


def take_over(store: RecordStore, name: str, holder: str, lease_ms: int = LEASE) -> Acquired:
    """Acquire ``name`` for ``holder`` as soon as the (short) lease on it runs out."""
    give_up = time.monotonic() + DEADLINE
    while True:
        claim = store.acquire(name, holder, lease_ms, KEEP)
        if isinstance(claim, Acquired):
            return claim
        assert isinstance(claim, Busy), claim
        assert time.monotonic() < give_up, f"the lease on {name} never ran out: {claim}"


#: Fields the scripts keep to count each decision once; not part of a record's state.
BOOKKEEPING = (b"losttok", b"rrun", b"crun", b"erun")


def snapshot(raw: redis.Redis, name: str) -> dict[bytes, bytes]:
    return {field: value for field, value in raw.hgetall(name).items() if field not in BOOKKEEPING}


# -- acquire ------------------------------------------------------------------------


def test_acquire_on_a_new_key_takes_the_lease_with_token_1(store: RecordStore) -> None:
    assert acquired(store.acquire(key(), "a", LEASE, KEEP), 1, False)


def test_only_the_acquisition_that_makes_the_record_is_first(store: RecordStore) -> None:
    # "first" lets a transaction skip looking for an earlier run's step row.
    claim = store.acquire(key(), "a", LEASE, KEEP)
    assert isinstance(claim, Acquired) and claim.first
    assert store.release(key(), claim.token, KEEP)
    again = store.acquire(key(), "b", LEASE, KEEP)
    assert isinstance(again, Acquired) and not again.first
    taken = take_over(store, key("short"), "c") if store.acquire(key("short"), "x", SHORT, KEEP) else None
    assert taken is not None and not taken.first


def test_acquire_while_the_lease_is_live_returns_busy_with_holder_time_left_and_token(
    store: RecordStore,
) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    busy = store.acquire(key(), "b", LEASE, KEEP)
    assert isinstance(busy, Busy)
    assert busy.holder == "a"
    assert busy.token == 1
    assert 0 < busy.lease_left <= LEASE / 1000


def test_acquire_after_commit_returns_finished_with_the_exact_outcome(store: RecordStore) -> None:
    for name, outcome in (("json", RESULT), ("binary", BINARY)):
        claim = store.acquire(key(name), "a", LEASE, KEEP)
        assert isinstance(claim, Acquired)
        store.commit(key(name), claim.token, False, outcome, KEEP)
        assert store.acquire(key(name), "b", LEASE, KEEP) == Finished(token=1, failed=False, outcome=outcome)


def test_failed_commit_is_returned_as_a_failure(store: RecordStore) -> None:
    claim = store.acquire(key(), "a", LEASE, KEEP)
    assert isinstance(claim, Acquired)
    store.commit(key(), claim.token, True, FAILURE, KEEP)
    assert store.acquire(key(), "b", LEASE, KEEP) == Finished(token=1, failed=True, outcome=FAILURE)


# -- takeover and fencing ------------------------------------------------------------


def test_expired_lease_is_taken_over_with_the_next_token(store: RecordStore) -> None:
    store.acquire(key(), "a", SHORT, KEEP)
    assert acquired(take_over(store, key(), "b"), 2, True)
    record = store.read(key())
    assert record is not None
    assert (record.state, record.token, record.holder) == ("running", 2, "b")


def test_old_holder_cannot_commit_after_takeover_and_the_new_result_stands(store: RecordStore) -> None:
    store.acquire(key(), "a", SHORT, KEEP)
    take_over(store, key(), "b")
    store.commit(key(), 2, False, RESULT, KEEP)

    with pytest.raises(LeaseLost) as lost:
        store.commit(key(), 1, False, BINARY, KEEP)

    assert unfenced(store.read(key())) == Record(state="done", token=2, holder="b", outcome=RESULT)
    assert store.acquire(key(), "c", LEASE, KEEP) == Finished(token=2, failed=False, outcome=RESULT)
    assert lost.value.key == key()
    assert lost.value.token == 1
    # errors.LeaseLost documents state as one of running/done/failed/free/missing.
    assert lost.value.state == "done"


def test_lease_lost_while_the_new_holder_runs_names_the_state_running(store: RecordStore) -> None:
    store.acquire(key(), "a", SHORT, KEEP)
    take_over(store, key(), "b")

    with pytest.raises(LeaseLost) as lost:
        store.commit(key(), 1, False, RESULT, KEEP)

    assert lost.value.token == 1
    assert lost.value.state == "running"


def test_old_holder_cannot_release_or_renew_after_takeover_and_the_record_is_untouched(
    store: RecordStore, raw: redis.Redis
) -> None:
    store.acquire(key(), "a", SHORT, KEEP)
    take_over(store, key(), "b")
    before = snapshot(raw, key())
    ttl_before = raw.pttl(key())

    assert store.release(key(), 1, KEEP) is False
    assert store.renew([(key(), 1, 10 * LEASE, 10 * KEEP)]) == [False]

    assert snapshot(raw, key()) == before
    assert 0 < raw.pttl(key()) <= ttl_before  # not extended by the old holder's renewal
    busy = store.acquire(key(), "c", LEASE, KEEP)
    assert isinstance(busy, Busy) and (busy.holder, busy.token) == ("b", 2)


def test_fencing_token_rises_after_a_release(store: RecordStore) -> None:
    assert acquired(store.acquire(key(), "a", LEASE, KEEP), 1, False)
    assert store.release(key(), 1, KEEP) is True
    assert acquired(store.acquire(key(), "b", LEASE, KEEP), 2, False)


def test_fencing_tokens_strictly_increase_over_many_takeovers(store: RecordStore) -> None:
    tokens = [store.acquire(key(), "h0", SHORT, KEEP)]
    for i in range(1, 6):
        tokens.append(take_over(store, key(), f"h{i}", lease_ms=SHORT))
    assert [claim.token for claim in tokens] == [1, 2, 3, 4, 5, 6]
    assert [claim.taken_over for claim in tokens] == [False] + [True] * 5


# -- commit and release ----------------------------------------------------------------


def test_commit_repeated_with_the_same_token_succeeds_as_after_a_lost_reply(
    store: RecordStore, raw: redis.Redis
) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    store.commit(key(), 1, False, RESULT, KEEP)
    store.commit(key(), 1, False, RESULT, KEEP)
    assert unfenced(store.read(key())) == Record(state="done", token=1, holder="a", outcome=RESULT)
    assert KEEP - 5_000 < raw.pttl(key()) <= KEEP


def test_commit_after_release_raises_lease_lost_with_state_free(store: RecordStore) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    store.release(key(), 1, KEEP)
    with pytest.raises(LeaseLost) as lost:
        store.commit(key(), 1, False, RESULT, KEEP)
    assert (lost.value.token, lost.value.state) == (1, "free")
    assert unfenced(store.read(key())) == Record(state="free", token=1, holder=None, outcome=None)


def test_commit_on_a_missing_record_raises_lease_lost_with_state_missing(
    store: RecordStore, raw: redis.Redis
) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    raw.delete(key())  # as when the record expired
    with pytest.raises(LeaseLost) as lost:
        store.commit(key(), 1, False, RESULT, KEEP)
    assert (lost.value.token, lost.value.state) == (1, "missing")
    assert store.read(key()) is None


def test_release_by_token_frees_only_a_running_record_held_by_that_token(
    store: RecordStore, raw: redis.Redis
) -> None:
    assert store.release(key(), 1, KEEP) is False  # no record
    store.acquire(key(), "a", LEASE, KEEP)
    before = snapshot(raw, key())
    assert store.release(key(), 2, KEEP) is False
    assert snapshot(raw, key()) == before
    assert store.release(key(), 1, KEEP) is True
    assert unfenced(store.read(key())) == Record(state="free", token=1, holder=None, outcome=None)
    assert store.release(key(), 1, KEEP) is False  # already free

    store.acquire(key("done"), "a", LEASE, KEEP)
    store.commit(key("done"), 1, False, RESULT, KEEP)
    assert store.release(key("done"), 1, KEEP) is False
    assert unfenced(store.read(key("done"))) == Record(state="done", token=1, holder="a", outcome=RESULT)


def test_release_holder_frees_only_a_running_record_held_by_that_task(
    store: RecordStore, raw: redis.Redis
) -> None:
    assert store.release_holder(key(), "a", KEEP) is False  # no record
    store.acquire(key(), "a", LEASE, KEEP)
    before = snapshot(raw, key())
    assert store.release_holder(key(), "b", KEEP) is False
    assert snapshot(raw, key()) == before
    assert store.release_holder(key(), "a", KEEP) is True
    assert unfenced(store.read(key())) == Record(state="free", token=1, holder=None, outcome=None)
    assert store.release_holder(key(), "a", KEEP) is False  # already free

    store.acquire(key("done"), "a", LEASE, KEEP)
    store.commit(key("done"), 1, False, RESULT, KEEP)
    assert store.release_holder(key("done"), "a", KEEP) is False
    assert unfenced(store.read(key("done"))) == Record(state="done", token=1, holder="a", outcome=RESULT)


# -- TTLs ------------------------------------------------------------------------------


def test_running_record_lives_for_lease_plus_keep(store: RecordStore, raw: redis.Redis) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    assert LEASE + KEEP - 5_000 < raw.pttl(key()) <= LEASE + KEEP


def test_committed_record_lives_for_keep(store: RecordStore, raw: redis.Redis) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    store.commit(key(), 1, False, RESULT, KEEP)
    assert KEEP - 5_000 < raw.pttl(key()) <= KEEP


def test_released_record_lives_for_keep(store: RecordStore, raw: redis.Redis) -> None:
    store.acquire(key(), "a", LEASE, KEEP)
    store.release(key(), 1, KEEP)
    assert KEEP - 5_000 < raw.pttl(key()) <= KEEP


# -- renew -----------------------------------------------------------------------------


def test_renew_reports_for_each_lease_whether_it_is_still_held(store: RecordStore, raw: redis.Redis) -> None:
    for name in ("held1", "held2", "released", "committed"):
        store.acquire(key(name), "a", LEASE, KEEP)
    store.acquire(key("taken"), "a", SHORT, KEEP)
    take_over(store, key("taken"), "b")
    store.release(key("released"), 1, KEEP)
    store.commit(key("committed"), 1, False, RESULT, KEEP)
    taken_before = snapshot(raw, key("taken"))

    longer = 5 * LEASE
    held = store.renew(
        [
            (key("held1"), 1, longer, KEEP),
            (key("taken"), 1, longer, KEEP),
            (key("held2"), 1, longer, KEEP),
            (key("released"), 1, longer, KEEP),
            (key("committed"), 1, longer, KEEP),
            (key("missing"), 1, longer, KEEP),
        ]
    )

    assert held == [True, False, True, False, False, False]
    for name in ("held1", "held2"):
        assert longer + KEEP - 5_000 < raw.pttl(key(name)) <= longer + KEEP
        busy = store.acquire(key(name), "c", LEASE, KEEP)
        assert isinstance(busy, Busy) and busy.lease_left > LEASE / 1000
    assert snapshot(raw, key("taken")) == taken_before
    assert raw.pttl(key("committed")) <= KEEP
    assert not raw.exists(key("missing"))
    assert store.renew([]) == []


# -- scripts ---------------------------------------------------------------------------


def _flush_scripts(raw: redis.Redis) -> None:
    raw.script_flush()
    assert raw.script_exists(*SCRIPTS.values()) == [False] * len(SCRIPTS)


def _loaded(raw: redis.Redis, name: str) -> bool:
    return bool(raw.script_exists(SCRIPTS[name])[0])


def test_every_operation_reloads_its_script_after_script_flush(store: RecordStore, raw: redis.Redis) -> None:
    names = [key(str(i)) for i in range(4)]

    _flush_scripts(raw)
    assert acquired(store.acquire(names[0], "a", LEASE, KEEP), 1, False)
    assert _loaded(raw, "acquire")
    for name in names[1:]:
        store.acquire(name, "a", LEASE, KEEP)

    _flush_scripts(raw)
    assert store.renew([(name, 1, LEASE, KEEP) for name in names]) == [True] * len(names)
    assert _loaded(raw, "renew")

    _flush_scripts(raw)
    store.commit(names[0], 1, False, RESULT, KEEP)
    assert _loaded(raw, "commit")
    assert unfenced(store.read(names[0])) == Record(state="done", token=1, holder="a", outcome=RESULT)

    _flush_scripts(raw)
    assert store.release(names[1], 1, KEEP) is True
    assert _loaded(raw, "release")

    _flush_scripts(raw)
    assert store.release_holder(names[2], "a", KEEP) is True
    assert _loaded(raw, "release")
    assert [raw.hget(name, "state") for name in names] == [b"done", b"free", b"free", b"running"]


def test_every_key_lives_in_one_cluster_slot_by_its_hash_tag(store: RecordStore, raw: redis.Redis) -> None:
    materials = ["id:abc", "args:{not-a-tag}", "}{", "{x}{y}", "", "ü" * 300]
    for material in materials:
        name = record_key("idem", "tests.task", material)
        tags = re.findall(r"\{[^{}]*\}", name)
        assert len(tags) == 1 and name.count("{") == 1 and name.count("}") == 1, name
        assert key_slot(name.encode()) == key_slot(tags[0][1:-1].encode())

    # Every key the scripts touch, through a whole life cycle, is a tagged record key.
    names = [record_key("idem", "tests.task", m) for m in materials]
    for name in names:
        store.acquire(name, "a", LEASE, KEEP)
    store.renew([(name, 1, LEASE, KEEP) for name in names])
    store.commit(names[0], 1, False, RESULT, KEEP)
    store.release(names[1], 1, KEEP)
    store.release_holder(names[2], "a", KEEP)
    assert sorted(raw.keys("*")) == sorted(name.encode() for name in names)


# -- read ------------------------------------------------------------------------------


def test_read_returns_none_for_a_missing_key_and_the_record_otherwise(store: RecordStore) -> None:
    assert store.read(key()) is None
    store.acquire(key(), "a", LEASE, KEEP)
    assert unfenced(store.read(key())) == Record(state="running", token=1, holder="a", outcome=None)
    store.commit(key(), 1, True, BINARY, KEEP)
    assert unfenced(store.read(key())) == Record(state="failed", token=1, holder="a", outcome=BINARY)


# -- Redis restarts and outages ---------------------------------------------------------


def test_finished_record_survives_a_redis_restart_with_appendonly() -> None:
    with RedisServer(appendonly=True) as server:
        store = store_for(server.url, {})
        store.acquire(key(), "a", LEASE, KEEP)
        store.commit(key(), 1, False, BINARY, KEEP)

        server.restart()

        assert store.acquire(key(), "b", LEASE, KEEP) == Finished(token=1, failed=False, outcome=BINARY)


def test_a_call_cut_off_by_a_timeout_leaves_no_reply_for_the_next_call() -> None:
    # The store keeps its connections between calls: a reply that arrives after
    # its call gave up must never be read as the answer to the next call.
    with RedisServer() as server:
        store = store_for(server.url, {"socket_timeout": 0.5})
        store.acquire(key("done"), "a", LEASE, KEEP)
        store.commit(key("done"), 1, False, RESULT, KEEP)
        admin = redis.Redis.from_url(server.url, socket_timeout=None)
        admin.client_pause(1500)  # every client's commands wait
        with pytest.raises(BACKEND_ERRORS):
            store.acquire(key("done"), "b", LEASE, KEEP)  # would answer FINISHED
        admin.ping()  # returns when the pause is over
        assert acquired(store.acquire(key("new"), "c", LEASE, KEEP), 1, False)
        admin.close()


def test_a_connection_the_server_closed_while_idle_is_reopened() -> None:
    with RedisServer() as server:
        store = store_for(server.url, {})
        assert isinstance(store.acquire(key("a"), "a", LEASE, KEEP), Acquired)
        admin = redis.Redis.from_url(server.url)
        admin.client_kill_filter(_type="normal", skipme=True)  # the store's idle connection
        assert isinstance(store.acquire(key("b"), "b", LEASE, KEEP), Acquired)
        admin.close()


def test_unreachable_redis_raises_a_backend_error() -> None:
    with RedisServer() as server:
        store = store_for(server.url, {})
        assert isinstance(store.acquire(key(), "a", LEASE, KEEP), Acquired)
        server.stop()
        with pytest.raises(BACKEND_ERRORS):
            store.acquire(key(), "b", LEASE, KEEP)
        with pytest.raises(BACKEND_ERRORS):
            store.renew([(key(), 1, LEASE, KEEP)])


# -- concurrency -----------------------------------------------------------------------


def _winner_and_others(results: list[Any]) -> tuple[Acquired, list[Busy]]:
    acquired = [r for r in results if isinstance(r[1], Acquired)]
    assert len(acquired) == 1, results
    winner, claim = acquired[0]
    busy = [r[1] for r in results if not isinstance(r[1], Acquired)]
    assert all(isinstance(b, Busy) for b in busy), results
    assert all((b.holder, b.token) == (winner, claim.token) for b in busy), (winner, results)
    return claim, busy


def test_32_threads_acquiring_one_key_at_once_get_exactly_one_lease(store: RecordStore) -> None:
    count = 32
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def contend(i: int) -> None:
        barrier.wait(DEADLINE)
        results[i] = (f"t{i}", store.acquire(key(), f"t{i}", LEASE, KEEP))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    claim, busy = _winner_and_others(results)
    assert acquired(claim, 1, False)
    assert len(busy) == count - 1


def _contend_in_process(url: str, name: str, holder: str, barrier: Any, results: Any) -> None:
    store = store_for(url, {})  # this process's own client
    store.client.ping()  # connect before the race, so the race is on the script
    barrier.wait(DEADLINE)
    results.put((holder, store.acquire(name, holder, LEASE, KEEP)))


def test_8_processes_acquiring_one_key_at_once_get_exactly_one_lease(redis_url: str) -> None:
    count = 8
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    processes = [
        context.Process(target=_contend_in_process, args=(redis_url, key(), f"p{i}", barrier, results))
        for i in range(count)
    ]
    for process in processes:
        process.start()
    try:
        collected = [results.get(timeout=30) for _ in range(count)]
    finally:
        for process in processes:
            process.join(30)
    assert [process.exitcode for process in processes] == [0] * count
    claim, busy = _winner_and_others(collected)
    assert acquired(claim, 1, False)
    assert len(busy) == count - 1

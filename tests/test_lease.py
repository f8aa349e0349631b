"""Lease renewal against a real Redis: held leases outlive their length, lost ones are noticed,
one renewal tick is one round trip, and a Redis outage only costs a warning.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import redis
from redis.connection import Connection

from celery_idem import lease as lease_module
from celery_idem.lease import Lease, Renewer, renewer
from celery_idem.store import Acquired, Busy, Outcome, RecordStore, store_for
from celery_idem.testing import RedisServer
from tests.helpers import acquired, record_key_of

KEEP = 60_000
LEASE = 10_000
SHORT = 50
DEADLINE = 10.0
RESULT = Outcome(b"42", "application/json", "utf-8")


key = record_key_of


def hold(store: RecordStore, name: str, holder: str, lease_ms: int) -> Lease:
    claim = store.acquire(name, holder, lease_ms, KEEP)
    assert isinstance(claim, Acquired), claim
    return Lease(store, name, claim.token, lease_ms, KEEP)


def take_over(store: RecordStore, name: str, holder: str) -> Acquired:
    """Acquire ``name`` for ``holder`` as soon as the lease on it runs out."""
    give_up = time.monotonic() + DEADLINE
    while True:
        claim = store.acquire(name, holder, LEASE, KEEP)
        if isinstance(claim, Acquired):
            return claim
        assert isinstance(claim, Busy), claim
        assert time.monotonic() < give_up, f"the lease on {name} never ran out: {claim}"


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_held_lease_outlives_its_length_until_dropped(store: RecordStore, raw: redis.Redis) -> None:
    lease_ms = 300
    lease = hold(store, key(), "runner", lease_ms)
    keeper = Renewer()
    keeper.hold(lease)
    try:
        # Lease expiry is decided by the server's clock, so measure with it too.
        start = server_ms(raw)
        give_up = time.monotonic() + DEADLINE
        polls = 0
        while server_ms(raw) - start < 3 * lease_ms:
            busy = store.acquire(key(), "intruder", lease_ms, KEEP)
            assert isinstance(busy, Busy), f"lease lost after {server_ms(raw) - start} ms: {busy}"
            assert (busy.holder, busy.token) == ("runner", lease.token)
            assert time.monotonic() < give_up
            polls += 1
        assert polls > 0
        assert not lease.lost
    finally:
        keeper.drop(lease)

    assert acquired(take_over(store, key(), "intruder"), lease.token + 1, True)


def test_renewal_that_finds_the_lease_taken_over_marks_it_lost(
    store: RecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    lease = hold(store, key(), "a", SHORT)
    take_over(store, key(), "b")
    keeper = Renewer()
    keeper.hold(lease)

    with caplog.at_level(logging.WARNING, logger="celery_idem.lease"):
        keeper.renew([lease])
    keeper.drop(lease)

    assert lease.lost
    assert any("lost the lease" in r.getMessage() for r in caplog.records)
    record = store.read(key())
    assert record is not None and (record.state, record.token, record.holder) == ("running", 2, "b")


def test_renewal_does_not_mark_given_up_or_still_held_leases_lost(store: RecordStore) -> None:
    # A run drops its lease from the renewer before committing or releasing it; a
    # renewal already under way then finds it gone, which is not a loss.
    keeper = Renewer()
    committed = hold(store, key("committed"), "a", LEASE)
    store.commit(committed.key, committed.token, False, RESULT, KEEP)
    released = hold(store, key("released"), "a", LEASE)
    store.release(released.key, released.token, KEEP)
    held = hold(store, key("held"), "a", LEASE)
    keeper.hold(held)

    keeper.renew([committed, released, held])
    keeper.drop(held)

    assert (committed.lost, released.lost, held.lost) == (False, False, False)


class CountingConnection(Connection):
    """A connection that counts the writes it sends: one write, then its replies, is one round trip."""

    sends = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


@pytest.mark.parametrize("count", [1, 10, 100])
def test_one_renewal_tick_is_one_round_trip_whatever_the_number_of_leases(
    redis_url: str, raw: redis.Redis, count: int
) -> None:
    client = redis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RecordStore(client, redis_url)
    leases = [hold(store, key(str(i)), "a", LEASE) for i in range(count)]
    keeper = Renewer()
    keeper.renew(leases)  # connect and load the script: neither is part of a steady tick

    before = raw.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    CountingConnection.sends = 0
    keeper.renew(leases)
    sends = CountingConnection.sends
    after = raw.info("commandstats")["cmdstat_evalsha"]["calls"]

    assert sends == 1
    assert after - before == count
    assert not any(lease.lost for lease in leases)
    client.close()


def test_renewal_tick_without_redis_logs_a_warning_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RedisServer() as server:
        store = store_for(server.url, {})
        lease = hold(store, key(), "a", LEASE)
        server.stop()

        with caplog.at_level(logging.WARNING, logger="celery_idem.lease"):
            Renewer().renew([lease])

    assert not lease.lost  # unknown is not lost: the lease may still be held
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not renew 1 lease(s)" in r.getMessage() for r in warnings), caplog.text


def test_renewer_after_a_fork_is_a_new_renewer(monkeypatch: pytest.MonkeyPatch) -> None:
    first = renewer()
    assert renewer() is first
    monkeypatch.setattr(first, "_pid", os.getpid() + 1)  # as seen from a forked child

    second = renewer()

    assert second is not first
    assert second._pid == os.getpid()
    assert renewer() is second
    assert lease_module._renewer is second

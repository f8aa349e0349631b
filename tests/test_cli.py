"""``celery -A proj idem ...``: the operator's command, against real Redis and real workers.

Commands run through Celery's own ``celery`` group (the entry point's path), in-process
with click's runner on an app this module holds (``-A tests.test_cli:cli_app``), or as a
``celery`` subprocess on ``tests.worker_app``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import click
import pytest
import redis
from celery import Celery
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from celery_idem import cli
from celery_idem.keys import record_key, steps_key
from celery_idem.store import COUNTERS, Acquired, Outcome, RecordStore
from celery_idem.testing import free_port
from tests.helpers import ROOT, Worker, lease_ended, runs
from tests.worker_app import make_app

#: The app ``-A tests.test_cli:cli_app`` loads; set by the ``run`` fixture.
cli_app: Celery | None = None

LEASE, KEEP = 10_000, 60_000
JSON_RESULT = Outcome(b'{"charge": 7}', "application/json", "utf-8")


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()


@pytest.fixture
def run(redis_url: str) -> Iterator[Callable[..., Result]]:
    """Run ``celery -A tests.test_cli:cli_app idem ARGS`` in-process, on the test's Redis."""
    global cli_app
    apps: list[Celery] = []

    def invoke(*args: str, conf: dict[str, Any] | None = None, input: str | None = None) -> Result:
        global cli_app
        cli_app = make_app({"idempotency_redis_url": redis_url, **(conf or {})})
        apps.append(cli_app)
        return _runner().invoke(celery, ["-A", f"{__name__}:cli_app", "idem", *args], input=input)

    yield invoke
    cli_app = None
    for app in apps:
        app.close()


def subprocess_env(conf: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, "IDEM_TEST_CONF": json.dumps(conf), "PYTHONPATH": str(ROOT)}


def celery_idem(
    conf: dict[str, Any], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.worker_app idem ARGS`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "idem", *args],
        env=subprocess_env(conf),
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
    )


def shown(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, (result.output, result.stderr)
    value: dict[str, Any] = json.loads(result.stdout)
    return value


# -- loading -------------------------------------------------------------------------


def test_the_entry_point_loads_the_idem_group_not_click_plugins_broken_stub() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="celery.commands") if e.name == "idem"]
    assert entry.value == "celery_idem.cli:idem"
    assert entry.load() is cli.idem
    assert celery.commands["idem"] is cli.idem  # what `celery` itself registered
    assert isinstance(cli.idem, click.Group)
    assert set(cli.idem.commands) == {"show", "list", "release", "purge", "stats", "metrics"}


def test_the_cli_module_imports_alone_and_loads_neither_redis_nor_prometheus() -> None:
    # The module is imported by every `celery` process, workers included.
    check = (
        "import sys, celery_idem.cli; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'prometheus_client') "
        "or m == 'kombu.transport.redis' or m == 'celery_idem.store'); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT, timeout=60)
    listed = subprocess.run(
        [sys.executable, "-m", "celery", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert listed.returncode == 0
    (line,) = [line for line in listed.stdout.splitlines() if line.strip().startswith("idem ")]
    assert "could not load plugin" not in line and "Inspect, free, purge" in line


# -- stats after a storm through a real worker ------------------------------------------


def test_stats_json_after_a_storm_equals_what_the_workers_did(
    worker_conf: dict[str, Any],
    start_worker: Callable[..., Worker],
    producer: Callable[..., Celery],
    events: redis.Redis,
) -> None:
    worker = start_worker(worker_conf, concurrency=2)
    app = producer()
    results = []
    labels = [f"L{i}" for i in range(10)]
    failing = [f"C{i}" for i in range(3)]
    for _ in range(2):  # every call submitted twice, under fresh task ids
        results += [app.tasks["t.by_args"].delay(label, 0.2) for label in labels]
        results += [app.tasks["t.cached_errors"].delay(label, 0.2, "cached") for label in failing]
    for result in results:
        result.ready()
        result.get(timeout=60, propagate=False)

    def conflicts(names: list[str]) -> int:
        return sum(int(events.llen(f"conflict:{name}")) for name in names)

    zero = dict.fromkeys(COUNTERS, 0)
    expected = {
        "t.by_args": {
            **zero,
            "executed": sum(runs(events, label) for label in labels),
            "succeeded": len(labels),
            "replayed": len(labels),
            "conflicts_retry": conflicts(labels),
        },
        "t.cached_errors": {
            **zero,
            "executed": sum(runs(events, label) for label in failing),
            "failures_recorded": len(failing),
            "replayed": len(failing),
            "conflicts_retry": conflicts(failing),
        },
    }
    assert expected["t.by_args"]["executed"] == len(labels)  # nothing crashed: one body per call
    stats = celery_idem(worker_conf, "stats", "--json")  # the entry point's path, in a process of its own
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == expected

    # The record of one call, found from its arguments as the worker keyed it.
    found = celery_idem(worker_conf, "show", "--task", "t.by_args", "--args", '["L0", 0.2]', "--json")
    assert found.returncode == 0, found.stderr
    record = json.loads(found.stdout)
    ids = {results[0].id, results[len(labels) + len(failing)].id}  # the two calls of L0
    assert (record["state"], record["task"], record["host"]) == ("done", "t.by_args", worker.hostname)
    assert record["holder"] in ids
    assert record["result"]["preview"].startswith("{'label': 'L0'")


# -- show ----------------------------------------------------------------------------


def key(name: str, task: str = "t.by_label") -> str:
    return record_key("idem", task, name)


def test_show_reports_each_state(run: Callable[..., Result], store: RecordStore, raw: redis.Redis) -> None:
    running = store.acquire(key("running"), "tid-r", LEASE, KEEP, "r1", "t.by_label", host="w9@host")
    assert isinstance(running, Acquired)
    store.store_step(key("running"), running.token, "receipt", b"x", "t.by_label")
    view = shown(run("show", key("running"), "--json"))
    assert (view["state"], view["holder"], view["host"], view["task"]) == (
        "running",
        "tid-r",
        "w9@host",
        "t.by_label",
    )
    assert (view["token"], view["fence"], view["steps"]) == (1, running.fence, ["receipt"])
    assert 0 < view["lease_left"] <= LEASE / 1000 and view["ttl"] > 0
    text = run("show", key("running"))
    assert "tid-r on w9@host" in text.stdout and "a live run renews it" in text.stdout

    done = store.acquire(key("done"), "tid-d", LEASE, KEEP, "r2", "t.by_label", host="w9@host")
    assert isinstance(done, Acquired)
    store.commit(key("done"), done.token, False, JSON_RESULT, KEEP, "t.by_label")
    view = shown(run("show", key("done"), "--json"))
    assert (view["state"], view["lease_left"], view["steps"]) == ("done", None, [])
    assert view["result"]["preview"] == "{'charge': 7}" and 0 < view["ttl"] <= KEEP / 1000

    failed = store.acquire(key("failed"), "tid-f", LEASE, KEEP, "r3", "t.by_label")
    assert isinstance(failed, Acquired)
    failure = Outcome(b'{"exc_type": "ValueError", "exc_message": ["no"]}', "application/json", "utf-8")
    store.commit(key("failed"), failed.token, True, failure, KEEP, "t.by_label")
    assert "ValueError" in shown(run("show", key("failed"), "--json"))["result"]["preview"]

    free = store.acquire(key("free"), "tid-x", LEASE, KEEP, "r4", "t.by_label", host="w9@host")
    assert isinstance(free, Acquired)
    store.release(key("free"), free.token, KEEP, "t.by_label")
    view = shown(run("show", key("free"), "--json"))
    assert (view["state"], view["holder"], view["host"], view["token"]) == ("free", None, None, 1)

    # Submit-side deduplication writes a queued marker naming the task id to be sent.
    app = make_app({"idempotency_redis_url": store.url})
    validated = app.tasks["t.validated"]
    store.submit(validated.record_key_for(("Q",)), "tid-q", "", KEEP, "t.validated")
    view = shown(run("show", "--task", "t.validated", "--args", '["Q"]', "--json"))
    assert (view["state"], view["holder"], view["task"]) == ("queued", "tid-q", "t.validated")
    app.close()

    # A result in a content type the app does not accept is never decoded (pickle here).
    pickled = store.acquire(key("pickled"), "tid-p", LEASE, KEEP, "r5", "t.by_label")
    assert isinstance(pickled, Acquired)
    evil = Outcome(b"\x80\x04K\x01.", "application/x-python-serialize", "binary")
    store.commit(key("pickled"), pickled.token, False, evil, KEEP, "t.by_label")
    result = shown(run("show", key("pickled"), "--json"))["result"]
    assert result["preview"] is None and "accept_content" in result["not_decoded"]


def test_show_finds_a_record_by_task_id_and_by_key_material(
    run: Callable[..., Result], store: RecordStore
) -> None:
    by_id = key("id:tid-7", "t.by_id")
    store.acquire(by_id, "tid-7", LEASE, KEEP, "r", "t.by_id")
    assert shown(run("show", "--task-id", "tid-7", "--json"))["key"] == by_id
    assert shown(run("show", "--task-id", "tid-7", "--task", "t.by_id", "--json"))["key"] == by_id
    # A task keyed on its arguments: the record the task id holds, found by a scan.
    by_label = key("args:whatever")
    store.acquire(by_label, "tid-8", LEASE, KEEP, "r", "t.by_label")
    assert shown(run("show", "--task-id", "tid-8", "--json"))["key"] == by_label
    # A per-call key (key material) with its task.
    per_call = key("web-7f3a", "t.by_id")
    store.acquire(per_call, "tid-9", LEASE, KEEP, "r", "t.by_id")
    assert shown(run("show", "web-7f3a", "--task", "t.by_id", "--json"))["key"] == per_call
    missing = run("show", key("nothing"))
    assert missing.exit_code == 1 and "no record" in missing.stderr


# -- list ----------------------------------------------------------------------------


def test_list_scans_20000_records_with_filters_and_a_limit(
    run: Callable[..., Result], raw: redis.Redis
) -> None:
    states = ("done", "running", "failed", "free", "queued")
    pipe = raw.pipeline(transaction=False)
    for i in range(20_000):
        task = "t.by_label" if i % 2 else "t.by_args"
        name = record_key("idem", task, f"m{i}")
        pipe.hset(name, mapping={"state": states[i % 5], "token": 1, "holder": f"id{i}", "task": task})
        if i % 100 == 0:
            pipe.hset(steps_key(name), "s", "v")  # steps and counters are not records
    pipe.hincrby("idem:{s00}:stats", "t.by_args\x1fexecuted", 1)
    pipe.execute()

    started = time.monotonic()
    everything = shown_list(run("list", "--json"))
    assert len(everything) == 20_000 and len({row["key"] for row in everything}) == 20_000
    assert time.monotonic() - started < 30
    assert len(shown_list(run("list", "--limit", "10", "--json"))) == 10
    running = shown_list(run("list", "--state", "running", "--json"))
    assert len(running) == 4_000 and {row["state"] for row in running} == {"running"}
    two = shown_list(run("list", "--state", "done", "--state", "free", "--json"))
    assert len(two) == 8_000
    # i % 5 == 1 (running) and odd i (t.by_label): i % 10 == 1.
    both = shown_list(run("list", "--state", "running", "--task", "t.by_label", "--json"))
    assert len(both) == 2_000 and {row["task"] for row in both} == {"t.by_label"}
    text = run("list", "--state", "failed", "--limit", "3")
    assert text.exit_code == 0 and len(text.stdout.splitlines()) == 3 and "3 records" in text.stderr
    assert "scanning" not in text.stderr  # no progress bar when stderr is not a terminal


def shown_list(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, (result.output, result.stderr)
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


# -- release -------------------------------------------------------------------------


def test_release_refuses_a_live_lease_and_frees_it_with_force(
    run: Callable[..., Result], store: RecordStore
) -> None:
    claim = store.acquire(key("live"), "tid-l", LEASE, KEEP, "r", "t.by_label", host="w9@host")
    assert isinstance(claim, Acquired)
    refused = run("release", key("live"), input="y\n")
    assert refused.exit_code == 1 and "being renewed by tid-l on w9@host" in refused.stderr
    assert store.read(key("live")).state == "running"  # type: ignore[union-attr]
    freed = run("release", "--force", key("live"))
    assert freed.exit_code == 0, freed.stderr
    record = store.read(key("live"))
    assert record is not None and (record.state, record.token, record.holder) == ("free", 1, None)
    # The run that was holding it cannot record its result now.
    from celery_idem.errors import LeaseLost

    with pytest.raises(LeaseLost):
        store.commit(key("live"), claim.token, False, JSON_RESULT, KEEP, "t.by_label")
    assert store.stats("idem")["t.by_label"]["freed_by_operator"] == 1


def test_release_of_an_expired_lease_asks_first(
    run: Callable[..., Result], store: RecordStore, raw: redis.Redis
) -> None:
    claim = store.acquire(key("dead"), "tid-d", 200, KEEP, "r", "t.by_label")
    assert isinstance(claim, Acquired)
    lease_ended(raw, key("dead"))
    declined = run("release", key("dead"), input="n\n")
    assert declined.exit_code == 1 and store.read(key("dead")).state == "running"  # type: ignore[union-attr]
    accepted = run("release", key("dead"), input="y\n")
    assert accepted.exit_code == 0 and "released" in accepted.stdout
    assert store.read(key("dead")).state == "free"  # type: ignore[union-attr]
    again = run("release", key("dead"), "-f")
    assert again.exit_code == 1 and "not running" in again.stderr
    # The next delivery runs under a higher token and fence.
    after = store.acquire(key("dead"), "tid-e", LEASE, KEEP, "r2", "t.by_label")
    assert isinstance(after, Acquired) and after.token == 2 and after.fence > claim.fence


# -- purge ---------------------------------------------------------------------------


def test_purge_counts_first_and_deletes_only_after_confirmation(
    run: Callable[..., Result], store: RecordStore, raw: redis.Redis
) -> None:
    for name, task in (("a", "t.by_label"), ("b", "t.by_label"), ("c", "t.by_id"), ("run", "t.by_label")):
        claim = store.acquire(key(name, task), f"tid-{name}", LEASE, KEEP, "r", task)
        assert isinstance(claim, Acquired)
        store.store_step(key(name, task), claim.token, "s", b"v", task)
        if name != "run":
            store.release(key(name, task), claim.token, KEEP, task)
    dry = run("purge", "--dry-run")
    assert dry.exit_code == 0 and "3 records to delete" in dry.stdout and "free 3" in dry.stdout
    declined = run("purge", input="n\n")
    assert declined.exit_code == 1 and raw.exists(key("a")) and raw.exists(key("c", "t.by_id"))
    one_task = run("purge", "--task", "t.by_label", input="y\n")
    assert one_task.exit_code == 0 and "deleted 2 records" in one_task.stdout
    assert not raw.exists(key("a")) and not raw.exists(steps_key(key("a")))
    assert raw.exists(key("c", "t.by_id")) and raw.exists(key("run"))  # other task, and running: kept
    forced = run("purge", "-f", "--state", "running")
    assert forced.exit_code == 0 and "deleted 1 record" in forced.stdout
    assert not raw.exists(key("run")) and not raw.exists(steps_key(key("run")))
    assert raw.exists(key("c", "t.by_id"))


# -- exit codes ------------------------------------------------------------------------


def test_exit_codes_ok_usage_and_unreachable_or_misconfigured_redis(run: Callable[..., Result]) -> None:
    assert run("stats", "--json").exit_code == 0
    assert run("list", "--state", "bogus").exit_code == 2
    assert run("show").exit_code == 2
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    for command in (["stats"], ["list"], ["show", key("x")], ["release", "-f", key("x")], ["purge", "-f"]):
        down = run(*command, conf={"idempotency_redis_url": nobody})
        assert down.exit_code == 69, (command, down.output, down.stderr)
        assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr + down.stdout
        assert "127.0.0.1" in down.stderr
    bad = run("stats", conf={"idempotency_redis_url": "http://example.com/0"})
    assert bad.exit_code == 69 and bad.stderr.count("\n") == 1 and "idempotency_redis_url" in bad.stderr


def test_a_worker_of_an_app_without_idempotent_tasks_is_left_as_celery_made_it(redis_url: str) -> None:
    # The plugin loads celery_idem, and so its worker hooks, into every `celery` process.
    from types import SimpleNamespace

    from celery_idem.hooks import validate_on_worker_start

    plain = Celery("plain", broker=redis_url, set_as_current=False)

    @plain.task(name="plain.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    worker = SimpleNamespace(app=plain, worker_lost_wait=10.0)
    validate_on_worker_start(sender=worker)
    assert (
        plain.conf.broker_transport is None and not plain.steps["worker"] and worker.worker_lost_wait == 10.0
    )
    ours = make_app({"broker_url": redis_url, "idempotency_redis_url": redis_url})
    worker = SimpleNamespace(app=ours, worker_lost_wait=10.0)
    validate_on_worker_start(sender=worker)
    assert ours.conf.broker_transport == "celery_idem.broker:Transport" and ours.steps["worker"]
    plain.close()
    ours.close()

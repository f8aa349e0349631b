"""``celery -A proj idem ...``: what the records hold, and freeing, purging and counting them.

A click group registered under Celery's ``celery.commands`` entry point, so ``celery
--help`` lists it and it reads the app's settings as every Celery subcommand does
(``ctx.obj.app``). Exit status: 0 done, 1 refused or aborted, 2 a usage error (click's),
69 (``EX_UNAVAILABLE``) when the records' Redis cannot be reached or its URL is wrong,
said in one line on stderr.

Celery loads this module into every ``celery`` process, workers included, and
click-plugins turns an import error here into a silent "could not load plugin" stub:
the module imports only click and Celery's own CLI helpers, which ``celery`` has
loaded already, and makes no connection; redis-py, the store and prometheus_client are
imported when a subcommand runs. The tests check that the entry point loads this
group and that the module imports alone without redis-py.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_FAILURE, EX_UNAVAILABLE

from .errors import ImproperlyConfigured, describe_error
from .keys import STATES

if TYPE_CHECKING:
    from .store import Record, RecordDetails, RecordStore

__all__ = ["idem"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: What ``purge`` deletes unless ``--state`` says otherwise: running records are kept,
#: since deleting one lets a duplicate run beside the live run.
_PURGED_BY_DEFAULT = ("queued", "done", "failed", "free")
#: Characters of a result shown by ``show``.
_PREVIEW = 200
_STATE = click.Choice(STATES)


@dataclass(frozen=True)
class _Target:
    """Where the records of the app (or of one of its tasks) are, as its workers see them."""

    store: RecordStore
    prefix: str
    keep_ms: int
    #: The URL (with its password) and options the store was made from.
    url: str
    options: Mapping[str, Any]


def _unavailable(message: str) -> CeleryCommandException:
    return CeleryCommandException(message=message, exit_code=EX_UNAVAILABLE)


def _refused(message: str) -> CeleryCommandException:
    return CeleryCommandException(message=message, exit_code=EX_FAILURE)


def _target(ctx: click.Context, task_name: str | None = None) -> _Target:
    """The records' store, key prefix and result TTL of ``task_name``, else of the app's settings."""
    from .config import resolve
    from .store import store_for
    from .task import IdempotentTask

    app = ctx.obj.app
    task = app.tasks.get(task_name) if task_name else None
    try:
        if isinstance(task, IdempotentTask):
            config = task.resolved_idempotency
        else:
            # A task class with no options of its own resolves to the app's settings.
            config = resolve(app, IdempotentTask)
        store = store_for(config.redis_url, config.redis_options)
    except ImproperlyConfigured as exc:
        raise _unavailable(f"celery idem: {exc}") from exc
    ctx.meta["celery_idem.url"] = store.url
    return _Target(store, config.key_prefix, config.result_ttl_ms, config.redis_url, config.redis_options)


def _redis_errors_exit_69(command: _F) -> _F:
    """Turn any redis-py error into one line on stderr and exit status 69, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return command(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            url = click.get_current_context().meta.get("celery_idem.url", "the records' Redis")
            raise _unavailable(
                f"celery idem: cannot use the records' Redis at {url}: {describe_error(exc)}"
            ) from exc

    return wrapper  # type: ignore[return-value]


def _json_option(command: _F) -> _F:
    return click.option(
        "-j", "--json", "as_json", cls=CeleryOption, is_flag=True, help_group="Output", help="Print JSON."
    )(command)


def _filter_options(state_help: str) -> Callable[[_F], _F]:
    """The ``--state`` and ``--task`` filters of ``list`` and ``purge``."""

    def decorate(command: _F) -> _F:
        command = click.option(
            "--task", "task_name", cls=CeleryOption, help_group="Filters", help="Only records of this task."
        )(command)
        return click.option(
            "--state",
            "states",
            cls=CeleryOption,
            type=_STATE,
            multiple=True,
            help_group="Filters",
            help=state_help,
        )(command)

    return decorate


@click.group(name="idem")
def idem() -> None:
    """Inspect, free, purge and count celery-idem's idempotency records."""


# -- show ----------------------------------------------------------------------------


@idem.command(cls=CeleryCommand)
@click.argument("key", required=False)
@click.option("--task", "task_name", cls=CeleryOption, help_group="Which record", help="The task's name.")
@click.option(
    "--task-id",
    cls=CeleryOption,
    help_group="Which record",
    help="The task id of a call (the key of a task keyed by task id, else the record it holds).",
)
@click.option(
    "--args", "args_json", cls=CeleryOption, help_group="Which record", help="The call's args, a JSON list."
)
@click.option(
    "--kwargs",
    "kwargs_json",
    cls=CeleryOption,
    help_group="Which record",
    help="The call's kwargs, a JSON object.",
)
@_json_option
@click.pass_context
@handle_preload_options
@_redis_errors_exit_69
def show(
    ctx: click.Context,
    key: str | None,
    task_name: str | None,
    task_id: str | None,
    args_json: str | None,
    kwargs_json: str | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Show one record: its state, holder, fencing token and fence, lease or TTL, steps and result.

    KEY is the Redis key, as the worker's log lines give it (key=...); with --task it
    may instead be the key material (a per-call idempotency_key, or the header). Or
    name the call: --task-id ID (with or without --task), or --task NAME with --args
    and --kwargs, from which the key is computed as the worker computes it.
    """
    target = _target(ctx, task_name)
    keys = _keys_of(ctx, target, key, task_name, task_id, args_json, kwargs_json)
    found = None
    for candidate in keys:
        found = target.store.details(candidate)
        if found is not None:
            break
    if found is None and task_id and key is None:
        found = _held_by(target, task_id, task_name)
    if found is None:
        raise _refused(f"no record for task id {task_id}" if task_id else f"no record for {keys[0]}")
    view = _view(ctx, found)
    if as_json:
        ctx.obj.echo(json.dumps(view, indent=2))
        return
    for name, value in _lines(view):
        ctx.obj.echo(f"{name:<8}  {value}")


def _keys_of(
    ctx: click.Context,
    target: _Target,
    key: str | None,
    task_name: str | None,
    task_id: str | None,
    args_json: str | None,
    kwargs_json: str | None,
) -> list[str]:
    """The Redis keys the options of ``show`` name (several for a task id without a task)."""
    from .keys import record_key, user_key
    from .task import IdempotentTask

    app = ctx.obj.app
    given = [name for name, value in (("KEY", key), ("--task-id", task_id)) if value is not None]
    if len(given) > 1 or (given and (args_json or kwargs_json)):
        raise click.UsageError("give one of KEY, --task-id, or --task with --args/--kwargs")
    if key is not None:
        if key.startswith(f"{target.prefix}:{{") or task_name is None:
            return [key]
        return [record_key(target.prefix, task_name, user_key(key, "KEY"))]
    if task_id is not None:
        names = (
            [task_name] if task_name else [n for n, t in app.tasks.items() if isinstance(t, IdempotentTask)]
        )
        return [record_key(target.prefix, name, f"id:{task_id}") for name in names]
    if task_name is None:
        raise click.UsageError("give KEY, --task-id ID, or --task NAME with --args/--kwargs")
    task = app.tasks.get(task_name)
    if not isinstance(task, IdempotentTask):
        raise click.UsageError(f"{task_name!r} is not an IdempotentTask of this app")
    call_args, call_kwargs = _loads(args_json, list, "--args", []), _loads(kwargs_json, dict, "--kwargs", {})
    config = task.resolved_idempotency
    if config.key.needs_task_id:
        raise click.UsageError(f"{task_name} is keyed by task id: give --task-id")
    from .errors import IdempotencyKeyError

    try:
        return [record_key(config.key_prefix, task.name, config.key.material(None, call_args, call_kwargs))]
    except IdempotencyKeyError as exc:
        raise click.UsageError(str(exc)) from exc


def _loads(text: str | None, kind: type, option: str, default: Any) -> Any:
    if text is None:
        return default
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from exc
    if not isinstance(value, kind):
        raise click.BadParameter(f"must be a JSON {'list' if kind is list else 'object'}", param_hint=option)
    return value


def _held_by(target: _Target, task_id: str, task_name: str | None) -> RecordDetails | None:
    """The record whose holder is ``task_id`` (a task keyed on its arguments), by a scan."""
    for _, batch in target.store.scan(target.prefix):
        for name, record in batch:
            if record.holder == task_id and (task_name is None or record.task == task_name):
                return target.store.details(name)
    return None


def _view(ctx: click.Context, found: RecordDetails) -> dict[str, Any]:
    record = found.record
    view: dict[str, Any] = {
        "key": found.key,
        "state": record.state,
        "task": record.task,
        "holder": record.holder,
        "host": record.host,
        "token": record.token,
        "fence": record.fence,
        "lease_left": found.lease_left_ms / 1000 if found.lease_left_ms is not None else None,
        "ttl": found.ttl_ms / 1000 if found.ttl_ms is not None else None,
        "steps": list(found.steps),
    }
    if record.outcome is not None:
        view["result"] = _preview(ctx, record.outcome)
    return view


def _preview(ctx: click.Context, outcome: Any) -> dict[str, Any]:
    """The outcome decoded only if its content type is one the app accepts (never unpickled otherwise)."""
    from kombu.exceptions import ContentDisallowed, DecodeError
    from kombu.serialization import loads, prepare_accept_content

    shown: dict[str, Any] = {"content_type": outcome.content_type, "bytes": len(outcome.data)}
    accept = prepare_accept_content(ctx.obj.app.conf.accept_content)
    try:
        value = loads(outcome.data, outcome.content_type, outcome.content_encoding, accept=accept)
    except ContentDisallowed:
        shown["preview"] = None
        shown["not_decoded"] = f"{outcome.content_type} is not in the app's accept_content"
    except DecodeError as exc:
        shown["preview"] = None
        shown["not_decoded"] = f"cannot be decoded: {exc}"
    else:
        text = repr(value)
        shown["preview"] = text if len(text) <= _PREVIEW else text[: _PREVIEW - 3] + "..."
    return shown


def _lines(view: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    yield "key", view["key"]
    yield "state", view["state"]
    if view["task"]:
        yield "task", view["task"]
    if view["holder"]:
        yield "holder", view["holder"] + (f" on {view['host']}" if view["host"] else "")
    yield "token", str(view["token"])
    yield "fence", str(view["fence"])
    left = view["lease_left"]
    if left is not None:
        yield (
            "lease",
            (
                f"{left:.1f}s left (a live run renews it)"
                if left > 0
                else f"ended {-left:.1f}s ago, not renewed (the holder died or is stalled)"
            ),
        )
    yield "ttl", "no expiry" if view["ttl"] is None else f"{view['ttl']:.1f}s"
    steps = view["steps"]
    yield "steps", f"{len(steps)}" + (f" ({', '.join(steps)})" if steps else "")
    result = view.get("result")
    if result is not None:
        what = f"({result['content_type']}, {result['bytes']} bytes)"
        shown = result["preview"] if result["preview"] is not None else f"not shown: {result['not_decoded']}"
        yield "result", f"{shown} {what}"


# -- list ----------------------------------------------------------------------------


def _matching(
    target: _Target, states: Sequence[str], task_name: str | None, progress: bool
) -> Iterator[tuple[str, Record]]:
    """The records of ``target`` in ``states`` (any if empty) and of ``task_name`` (any if None), by SCAN."""
    bar: Any = None
    if progress:
        bar = click.progressbar(
            length=max(int(target.store.client.dbsize()), 1), label="scanning", file=sys.stderr
        )
        bar.__enter__()
    try:
        for scanned, batch in target.store.scan(target.prefix):
            if bar is not None:
                bar.update(scanned)
            for name, record in batch:
                if (not states or record.state in states) and (task_name is None or record.task == task_name):
                    yield name, record
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@idem.command(name="list", cls=CeleryCommand)
@_filter_options("Only records in this state (repeat for several).")
@click.option(
    "--limit",
    cls=CeleryOption,
    type=click.IntRange(min=1),
    help_group="Filters",
    help="Stop after N records.",
)
@_json_option
@click.pass_context
@handle_preload_options
@_redis_errors_exit_69
def list_(
    ctx: click.Context,
    states: tuple[str, ...],
    task_name: str | None,
    limit: int | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """List records (by SCAN, never KEYS): state, task, holder, host, token and key."""
    target = _target(ctx, task_name)
    progress = not as_json and sys.stderr.isatty()
    found = []
    for name, record in _matching(target, states, task_name, progress):
        found.append((name, record))
        if limit is not None and len(found) >= limit:
            break
    if as_json:
        rows = [
            {
                "key": name,
                "state": r.state,
                "task": r.task,
                "holder": r.holder,
                "host": r.host,
                "token": r.token,
                "fence": r.fence,
            }
            for name, r in found
        ]
        ctx.obj.echo(json.dumps(rows, indent=2))
        return
    for name, r in found:
        ctx.obj.echo(
            f"{r.state:<8} {r.task or '-':<30} {r.holder or '-':<36} {r.host or '-':<20} {r.token:>4} {name}"
        )
    ctx.obj.echo(f"{len(found)} record{'' if len(found) == 1 else 's'}", err=True)


# -- release -------------------------------------------------------------------------


@idem.command(cls=CeleryCommand)
@click.argument("key")
@click.option(
    "-f",
    "--force",
    cls=CeleryOption,
    is_flag=True,
    help_group="Release Options",
    help="Don't prompt, and free the key even while a live run renews its lease.",
)
@click.pass_context
@handle_preload_options
@_redis_errors_exit_69
def release(ctx: click.Context, key: str, force: bool, **kwargs: Any) -> None:
    """Free a running KEY by hand, so that the next delivery runs the body.

    Refused while the lease is still being renewed (a live run holds it) unless
    --force: the freed run then cannot record its result, and a redelivery may run
    the body beside it. A key whose lease ran out unrenewed (its worker died or is
    stalled) is freed after a confirmation. The fencing token and fence are kept,
    so the next run's are higher.
    """
    target = _target(ctx)
    found = target.store.details(key)
    if found is None:
        raise _refused(f"no record for {key}")
    record = found.record
    if record.state != "running":
        raise _refused(f"{key} is {record.state}, not running: nothing to release")
    holder = f"{record.holder} on {record.host}" if record.host else str(record.holder)
    left = (found.lease_left_ms or 0) / 1000
    if left > 0 and not force:
        raise _refused(
            f"refused: the lease on {key} is being renewed by {holder} ({left:.1f}s left); "
            "--force frees it anyway (that run then cannot record its result)"
        )
    if record.task:
        keep_ms = _target(ctx, record.task).keep_ms
    else:
        keep_ms = target.keep_ms
    if not force:
        click.confirm(
            f"Free {key}, held under token {record.token} by {holder} (lease ended {-left:.1f}s ago)?",
            abort=True,
            err=True,
        )
    freed = target.store.release_by_operator(key, record.token, keep_ms, record.task or "", live=force)
    if freed == 2:
        raise _refused(f"refused: the lease on {key} was renewed meanwhile; the run holding it is alive")
    if freed == 0:
        raise _refused(f"{key} changed meanwhile (another run acquired it, or it finished): not freed")
    ctx.obj.echo(f"released {key} (token {record.token})")


# -- purge ---------------------------------------------------------------------------


@idem.command(cls=CeleryCommand)
@_filter_options("Only records in this state (repeat; default all but running).")
@click.option(
    "-f", "--force", cls=CeleryOption, is_flag=True, help_group="Purging Options", help="Don't prompt."
)
@click.option(
    "--dry-run",
    cls=CeleryOption,
    is_flag=True,
    help_group="Purging Options",
    help="Count what would be deleted, delete nothing.",
)
@click.pass_context
@handle_preload_options
@_redis_errors_exit_69
def purge(
    ctx: click.Context,
    task_name: str | None,
    states: tuple[str, ...],
    force: bool,
    dry_run: bool,
    **kwargs: Any,
) -> None:
    """Delete records and their steps: counted first, then deleted after a confirmation.

    A deleted record is forgotten: a later duplicate of its key runs the body again.
    Running records are kept unless --state running is given. Each record is deleted
    only if it is still in the chosen states when its turn comes.
    """
    target = _target(ctx, task_name)
    wanted = states or _PURGED_BY_DEFAULT
    progress = sys.stderr.isatty()
    counts = dict.fromkeys(wanted, 0)
    for _, record in _matching(target, wanted, task_name, progress):
        counts[record.state] += 1
    total = sum(counts.values())
    which = f" of task {task_name}" if task_name else ""
    detail = ", ".join(f"{state} {n}" for state, n in counts.items())
    ctx.obj.echo(f"{total} record{'' if total == 1 else 's'}{which} to delete ({detail})")
    if dry_run or total == 0:
        return
    if not force:
        click.confirm(
            f"{ctx.obj.style('WARNING', fg='red')}: delete these {total} records and their steps? "
            "Their keys' next deliveries run again.\n(to skip this prompt use the -f option)",
            abort=True,
            err=True,
        )
    deleted = 0
    pending: list[str] = []
    for name, _ in _matching(target, wanted, task_name, progress):
        pending.append(name)
        if len(pending) >= 1000:
            deleted += target.store.purge(pending, wanted, task_name or "")
            pending = []
    deleted += target.store.purge(pending, wanted, task_name or "")
    ctx.obj.echo(f"deleted {deleted} record{'' if deleted == 1 else 's'}")


# -- stats ---------------------------------------------------------------------------


@idem.command(cls=CeleryCommand)
@click.option(
    "--task", "task_name", cls=CeleryOption, help_group="Filters", help="Only this task's counters."
)
@_json_option
@click.pass_context
@handle_preload_options
@_redis_errors_exit_69
def stats(ctx: click.Context, task_name: str | None, as_json: bool, **kwargs: Any) -> None:
    """The counters of every task (summed over workers, hosts and restarts; see docs/operations.md)."""
    from .store import COUNTERS

    target = _target(ctx, task_name)
    totals = target.store.stats(target.prefix)
    if task_name is not None:
        totals = {task_name: totals.get(task_name, {})}
    full = {task: {name: counts.get(name, 0) for name in COUNTERS} for task, counts in sorted(totals.items())}
    if as_json:
        ctx.obj.echo(json.dumps(full, indent=2))
        return
    if not full:
        ctx.obj.echo("no counters yet")
    for task, counts in full.items():
        ctx.obj.echo(task)
        for name, value in counts.items():
            if value:
                ctx.obj.echo(f"  {name:<24} {value}")


# -- metrics -------------------------------------------------------------------------


@idem.command(cls=CeleryCommand)
@click.option(
    "--port", cls=CeleryOption, type=int, default=9808, show_default=True, help_group="Server", help="Port."
)
@click.option(
    "--addr", cls=CeleryOption, default="0.0.0.0", show_default=True, help_group="Server", help="Address."
)
@click.pass_context
@handle_preload_options
def metrics(ctx: click.Context, port: int, addr: str, **kwargs: Any) -> None:
    """Serve the counters to Prometheus at http://ADDR:PORT/metrics, read from Redis at each scrape."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise _unavailable(
            f"celery idem metrics needs prometheus_client ({exc}): pip install 'celery-idem[prometheus]'"
        ) from exc
    from .metrics import IdempotencyCollector

    target = _target(ctx)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IdempotencyCollector(target.url, target.options, target.prefix))
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise _unavailable(f"celery idem metrics: cannot listen on {addr}:{port}: {exc}") from exc
    ctx.obj.echo(f"serving celery-idem metrics of {target.store.url} on http://{addr}:{port}/metrics")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass

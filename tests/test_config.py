"""Settings: resolution order, defaults, validation, and validation at worker start.

Tasks are bound lazily: ``app.finalize()`` (or the first access to ``app.tasks``)
binds them, which resolves and validates their options.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery, Task

from celery_idem import IdempotentTask, ImproperlyConfigured, LeaseLost
from celery_idem.config import DEFAULTS, IdempotencyConfig
from celery_idem.keys import record_key
from tests.helpers import ROOT, worker_command

WORKER_FLAGS = [
    "-P",
    "solo",
    "-c",
    "1",
    "-l",
    "INFO",
    "--without-heartbeat",
    "--without-gossip",
    "--without-mingle",
]


def make_app(conf: dict[str, Any] | None = None) -> Celery:
    app = Celery("c", broker="memory://", set_as_current=False)
    if conf:
        app.conf.update(conf)
    return app


def add_task(app: Celery, name: str = "t", bind: bool = False, **options: Any) -> None:
    if bind:

        @app.task(base=IdempotentTask, shared=False, name=name, bind=True, **options)
        def bound(self: Task, order_id: int, amount: int = 0) -> int:
            return order_id

    else:

        @app.task(base=IdempotentTask, shared=False, name=name, **options)
        def plain(order_id: int, amount: int = 0) -> int:
            return order_id


def resolved(app: Celery, name: str = "t") -> IdempotencyConfig:
    app.finalize()
    return app.tasks[name].resolved_idempotency


def resolve_task(conf: dict[str, Any] | None = None, **options: Any) -> IdempotencyConfig:
    app = make_app(conf)
    add_task(app, **options)
    return resolved(app)


def rejection(conf: dict[str, Any] | None = None, **options: Any) -> str:
    """Bind a task with these settings and return the message it is rejected with."""
    app = make_app(conf)
    add_task(app, **options)
    with pytest.raises(ImproperlyConfigured) as info:
        app.finalize()
    return str(info.value)


# -- resolution order ------------------------------------------------------------------

# option: (field, task value, app.conf value, default, how to compare a resolved field)
OPTIONS: dict[str, tuple[str, Any, Any, Any, Any]] = {
    "idempotency_redis_url": (
        "redis_url",
        "redis://task:6379/0",
        "redis://conf:6379/0",
        "redis://localhost:6379/0",
        str,
    ),
    "idempotency_redis_options": ("redis_options", {"socket_timeout": 1}, {"socket_timeout": 2}, {}, dict),
    "idempotency_key_prefix": ("key_prefix", "task-prefix", "conf-prefix", "idem", str),
    "idempotency_key": ("key", ("order_id",), "args", "task_id", repr),
    "idempotency_result_ttl": ("result_ttl", 10, 20, 86400, float),
    "idempotency_lock_ttl": ("lock_ttl", 5, 7, 10, float),
    "idempotency_on_conflict": ("on_conflict", "raise", "drop", "retry", str),
    "idempotency_wait_timeout": ("wait_timeout", 3, 4, 60, float),
    "idempotency_on_backend_error": ("on_backend_error", "run", "raise", "retry", str),
    "idempotency_cache_errors": ("cache_errors", (KeyError,), (ValueError,), (), tuple),
    "idempotency_max_result_bytes": ("max_result_bytes", 100, 200, 1048576, int),
    "idempotency_worker_expiry": ("worker_expiry", False, False, True, bool),
    "idempotency_dedupe_on_submit": ("dedupe_on_submit", True, True, False, bool),
    "idempotency_submit_ttl": ("submit_ttl", 5, 7, 3600, float),
    "idempotency_min_replicas": ("min_replicas", 1, 2, 0, int),
    "idempotency_min_replicas_timeout": ("min_replicas_timeout", 0.5, 2, 1.0, float),
    "idempotency_validate_payload": ("validate_payload", False, False, None, lambda v: v),
    "idempotency_database_url": (
        "database",
        "postgresql://task@db/shop",
        "postgresql://conf@db/shop",
        None,
        lambda value: getattr(value, "target", value),
    ),
}

#: Options that only make sense together with another; tested on their own below.
JOINT = {"idempotency_database_options", "idempotency_database", "idempotency_transaction"}


def expected(option: str, value: Any) -> Any:
    # For idempotency_key the comparison is repr: a key strategy's repr is the setting that built it.
    return OPTIONS[option][4](value)


def actual(config: IdempotencyConfig, option: str) -> Any:
    field, *_, compare = OPTIONS[option]
    return compare(getattr(config, field))


def test_resolution_table_covers_every_option() -> None:
    assert set(OPTIONS) | JOINT == set(DEFAULTS)
    assert {field for field, *_ in OPTIONS.values()} | {"transaction", "signature"} == {
        f.name for f in dataclasses.fields(IdempotencyConfig)
    }


@pytest.mark.parametrize("option", list(OPTIONS))
def test_task_option_beats_app_setting(option: str) -> None:
    _, task_value, conf_value, _, _ = OPTIONS[option]
    config = resolve_task({option: conf_value}, **{option: task_value})
    assert actual(config, option) == expected(option, task_value)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_app_setting_beats_default(option: str) -> None:
    _, _, conf_value, _, _ = OPTIONS[option]
    config = resolve_task({option: conf_value})
    assert actual(config, option) == expected(option, conf_value)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_default_applies_when_neither_task_nor_app_sets_option(option: str) -> None:
    _, _, _, default, _ = OPTIONS[option]
    if DEFAULTS[option] is not None:
        assert expected(option, DEFAULTS[option]) == expected(option, default)
    assert actual(resolve_task(), option) == expected(option, default)


def test_attribute_of_a_base_class_beats_app_setting_and_task_option_beats_it() -> None:
    class Slow(IdempotentTask):
        idempotency_lock_ttl = 11

    app = make_app({"idempotency_lock_ttl": 7})

    @app.task(base=Slow, shared=False, name="inherits")
    def inherits(order_id: int) -> int:
        return order_id

    @app.task(base=Slow, shared=False, name="overrides", idempotency_lock_ttl=5)
    def overrides(order_id: int) -> int:
        return order_id

    assert resolved(app, "inherits").lock_ttl == 11
    assert resolved(app, "overrides").lock_ttl == 5


def test_falsy_values_override_like_any_other_value() -> None:
    assert resolve_task({"idempotency_wait_timeout": 0}).wait_timeout == 0
    assert resolve_task({"idempotency_wait_timeout": 5}, idempotency_wait_timeout=0).wait_timeout == 0
    config = resolve_task({"idempotency_cache_errors": [KeyError]}, idempotency_cache_errors=())
    assert config.cache_errors == ()


# -- the Redis URL's default -----------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "url"),
    [
        pytest.param(
            {"result_backend": "redis://backend:6379/2", "broker_url": "redis://broker:6379/1"},
            "redis://backend:6379/2",
            id="redis-backend-first",
        ),
        pytest.param(
            {"result_backend": "rediss://backend:6380/0"}, "rediss://backend:6380/0", id="rediss-backend"
        ),
        pytest.param(
            # Not a scheme of Celery's result backends: nothing to reuse.
            {"result_backend": "unix:///run/redis.sock"},
            "redis://localhost:6379/0",
            id="unix-backend",
        ),
        pytest.param(
            {"result_backend": "redis+socket:///run/redis.sock"},
            "redis+socket:///run/redis.sock",
            id="redis+socket-backend",
        ),
        pytest.param(
            {"result_backend": "rpc://", "broker_url": "redis://broker:6379/1"},
            "redis://broker:6379/1",
            id="non-redis-backend-redis-broker",
        ),
        pytest.param(
            {"result_backend": "db+sqlite:///results.db", "broker_url": "rediss://broker:6380/1"},
            "rediss://broker:6380/1",
            id="rediss-broker",
        ),
        pytest.param(
            {"broker_url": "redis+socket:///run/broker.sock"},
            "redis+socket:///run/broker.sock",
            id="redis+socket-broker",
        ),
        pytest.param(
            {"broker_url": ["redis://first:6379/1", "redis://second:6379/1"]},
            "redis://first:6379/1",
            id="broker-list",
        ),
        pytest.param(
            {"broker_url": "redis://first:6379/1;redis://second:6379/1"},
            "redis://first:6379/1",
            id="broker-failover-string",
        ),
        pytest.param(
            {"broker_url": "redis://first:6379/1; redis://second:6379/1"},
            "redis://first:6379/1",
            id="broker-failover-string-with-space",
        ),
        pytest.param({"broker_url": "amqp://guest@rabbit//"}, "redis://localhost:6379/0", id="amqp-broker"),
        pytest.param({}, "redis://localhost:6379/0", id="memory-broker"),
        pytest.param(
            {"result_backend": "redis://backend:6379/2", "idempotency_redis_url": "redis://records:6379/3"},
            "redis://records:6379/3",
            id="explicit-setting-wins",
        ),
    ],
)
def test_redis_url_defaults_to_result_backend_then_broker_then_localhost(
    conf: dict[str, Any], url: str
) -> None:
    assert resolve_task(conf).redis_url == url


@pytest.mark.parametrize("url", ["amqp://guest@rabbit//", "memory://", "localhost:6379", 6379])
def test_explicit_non_redis_url_is_rejected_naming_the_option(url: Any) -> None:
    assert "idempotency_redis_url" in rejection({"idempotency_redis_url": url})
    assert "idempotency_redis_url" in rejection(idempotency_redis_url=url)


# -- invalid values --------------------------------------------------------------------

POLICY_CHOICES = {
    "idempotency_on_conflict": "retry, wait, raise, drop",
    "idempotency_on_backend_error": "retry, run, raise",
}


@pytest.mark.parametrize(
    ("option", "value", "suggestion"),
    [
        ("idempotency_on_conflict", "retyr", "retry"),
        ("idempotency_on_conflict", "wiat", "wait"),
        ("idempotency_on_backend_error", "retyr", "retry"),
        ("idempotency_on_backend_error", "raize", "raise"),
    ],
)
@pytest.mark.parametrize("where", ["task", "app.conf"])
def test_misspelled_policy_is_rejected_listing_choices_and_suggesting_close_match(
    where: str, option: str, value: str, suggestion: str
) -> None:
    message = rejection({option: value}) if where == "app.conf" else rejection(**{option: value})
    assert option in message
    assert POLICY_CHOICES[option] in message
    assert repr(value) in message
    assert f"did you mean {suggestion!r}" in message


@pytest.mark.parametrize("option", list(POLICY_CHOICES))
@pytest.mark.parametrize("value", ["explode", "", 3, ["retry"]])
def test_unknown_policy_is_rejected_listing_choices(option: str, value: Any) -> None:
    message = rejection(**{option: value})
    assert option in message
    assert POLICY_CHOICES[option] in message


SECONDS = ["idempotency_result_ttl", "idempotency_lock_ttl", "idempotency_wait_timeout"]

INVALID = [
    *(
        pytest.param(option, value, id=f"{option}={value!r}")
        for option in SECONDS
        for value in ["10", -1, -0.5, True, False, float("nan"), float("inf"), [5]]
    ),
    pytest.param("idempotency_lock_ttl", 0.05, id="lock_ttl-below-0.1"),
    pytest.param("idempotency_lock_ttl", 0, id="lock_ttl-zero"),
    pytest.param("idempotency_result_ttl", 0, id="result_ttl-zero"),
    *(
        pytest.param("idempotency_max_result_bytes", value, id=f"max_result_bytes={value!r}")
        for value in [0, -1, 1.5, 1024.0, True, "1024"]
    ),
    *(
        pytest.param("idempotency_min_replicas", value, id=f"min_replicas={value!r}")
        for value in [-1, 1.0, True, "1", None.__class__]
    ),
    *(
        pytest.param("idempotency_min_replicas_timeout", value, id=f"min_replicas_timeout={value!r}")
        for value in [0, -1, "1", float("inf")]
    ),
    *(
        pytest.param("idempotency_key_prefix", value, id=f"key_prefix={value!r}")
        for value in ["", "a{b}", "{", "x}", 5]
    ),
    *(
        pytest.param("idempotency_worker_expiry", value, id=f"worker_expiry={value!r}")
        for value in [0, 1, "yes", None.__class__]
    ),
    pytest.param("idempotency_redis_options", ["socket_timeout", 5], id="redis_options-list"),
    pytest.param("idempotency_redis_options", "socket_timeout=5", id="redis_options-str"),
    pytest.param(
        "idempotency_redis_options", {"decode_responses": True}, id="redis_options-decode_responses"
    ),
    pytest.param("idempotency_cache_errors", [KeyError, int], id="cache_errors-non-exception-class"),
    pytest.param("idempotency_cache_errors", 42, id="cache_errors-int"),
    pytest.param("idempotency_cache_errors", KeyError("x"), id="cache_errors-exception-instance"),
    pytest.param("idempotency_cache_errors", "builtins.int", id="cache_errors-dotted-non-exception"),
    pytest.param("idempotency_cache_errors", ["no_such_module_xyz.Error"], id="cache_errors-missing-module"),
    pytest.param(
        "idempotency_cache_errors", "celery_idem.errors.NoSuchError", id="cache_errors-missing-name"
    ),
    pytest.param("idempotency_key", "order_id", id="key-unknown-string"),
    pytest.param("idempotency_key", [], id="key-empty-list"),
    pytest.param("idempotency_key", ("order_id", 5), id="key-list-with-non-str"),
    pytest.param("idempotency_key", ("order_id", "customer"), id="key-names-missing-argument"),
    pytest.param("idempotency_key", 5, id="key-int"),
]


@pytest.mark.parametrize(("option", "value"), INVALID)
@pytest.mark.parametrize("where", ["task", "app.conf"])
def test_invalid_value_is_rejected_naming_the_option(where: str, option: str, value: Any) -> None:
    message = rejection({option: value}) if where == "app.conf" else rejection(**{option: value})
    assert option in message


def test_rejection_of_a_number_says_what_was_given() -> None:
    message = rejection(idempotency_lock_ttl=0.05)
    assert "at least 0.1" in message and "0.05" in message
    assert "'10'" in rejection(idempotency_result_ttl="10")


def test_unimportable_cache_error_name_is_named_in_the_message() -> None:
    message = rejection(idempotency_cache_errors=["builtins.KeyError", "no_such_module_xyz.Error"])
    assert "'no_such_module_xyz.Error'" in message
    assert "cannot be imported" in message


def test_key_naming_missing_argument_names_it() -> None:
    message = rejection(idempotency_key=("order_id", "customer"))
    assert "'customer'" in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("idempotency_lock_ttl", 0.1),
        ("idempotency_wait_timeout", 0),
        ("idempotency_result_ttl", 0.5),
        ("idempotency_max_result_bytes", 1),
        ("idempotency_min_replicas", 0),
        ("idempotency_min_replicas_timeout", 0.001),
        ("idempotency_redis_options", {"decode_responses": False, "socket_timeout": 5}),
        ("idempotency_key_prefix", "my-app:idem"),
    ],
)
def test_boundary_values_are_accepted(option: str, value: Any) -> None:
    config = resolve_task(**{option: value})
    assert actual(config, option) == expected(option, value)


# -- accepted forms --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "classes"),
    [
        pytest.param(KeyError, (KeyError,), id="single-class"),
        pytest.param([KeyError, LeaseLost], (KeyError, LeaseLost), id="list-of-classes"),
        pytest.param((KeyError,), (KeyError,), id="tuple-of-classes"),
        pytest.param("builtins.KeyError", (KeyError,), id="dotted-name"),
        pytest.param(
            ["builtins.KeyError", "celery_idem.errors.LeaseLost"],
            (KeyError, LeaseLost),
            id="list-of-dotted-names",
        ),
        pytest.param(["builtins.KeyError", ValueError], (KeyError, ValueError), id="mixed"),
        pytest.param("celery_idem.errors:LeaseLost", (LeaseLost,), id="colon-name"),
    ],
)
@pytest.mark.parametrize("where", ["task", "app.conf"])
def test_cache_errors_accepts_classes_and_dotted_names(
    where: str, value: Any, classes: tuple[type, ...]
) -> None:
    option = "idempotency_cache_errors"
    config = resolve_task({option: value}) if where == "app.conf" else resolve_task(**{option: value})
    assert config.cache_errors == classes


def test_key_naming_argument_not_in_signature_is_allowed_when_task_takes_kwargs() -> None:
    app = make_app()

    @app.task(base=IdempotentTask, shared=False, name="t", idempotency_key=("tenant", "order_id"))
    def t(order_id: int, **extra: Any) -> int:
        return order_id

    key = resolved(app).key
    assert key.material(None, (1,), {"tenant": "a"}) == key.material(None, (), {"order_id": 1, "tenant": "a"})
    assert key.material(None, (1,), {"tenant": "a"}) != key.material(None, (1,), {"tenant": "b"})


@pytest.mark.parametrize("bind", [False, True], ids=["plain", "bound"])
def test_callable_key_option_is_not_bound_as_a_method(bind: bool) -> None:
    calls: list[tuple[Any, ...]] = []

    def key_of(order_id: int, amount: int = 0) -> str:
        calls.append((order_id, amount))
        return f"order-{order_id}"

    app = make_app()
    add_task(app, bind=bind, idempotency_key=key_of)
    task = app.tasks["t"]
    config = task.resolved_idempotency
    assert config.key.material(None, (7,), {"amount": 100}) == "order-7"
    assert calls == [(7, 100)]
    assert task.record_key_for(args=(7,)) == record_key("idem", "t", "order-7")


def test_callable_key_in_app_conf_receives_the_arguments() -> None:
    config = resolve_task({"idempotency_key": lambda order_id, amount=0: f"o{order_id}"})
    assert config.key.material(None, (3, 5), {}) == "o3"


# -- named keys on bound and plain tasks -----------------------------------------------


@pytest.mark.parametrize("bind", [False, True], ids=["plain", "bound"])
@pytest.mark.parametrize("spec", [("order_id",), "args"])
def test_named_and_args_keys_use_the_run_signature_without_self(bind: bool, spec: Any) -> None:
    app = make_app()
    add_task(app, bind=bind, idempotency_key=spec)
    key = resolved(app).key
    positional = key.material(None, (1, 0), {})
    assert positional == key.material(None, (), {"order_id": 1})  # defaults applied, names bound
    assert positional == key.material(None, (1,), {"amount": 0})
    assert positional != key.material(None, (2,), {})


def test_bound_and_plain_tasks_give_the_same_key_for_the_same_arguments() -> None:
    app = make_app()
    add_task(app, "plain", idempotency_key=("order_id",))
    add_task(app, "bound", bind=True, idempotency_key=("order_id",))
    app.finalize()
    plain, bound = (app.tasks[name].resolved_idempotency.key for name in ("plain", "bound"))
    assert plain.material(None, (1, 5), {}) == bound.material(None, (1, 5), {})


def test_bound_task_cannot_key_on_self() -> None:
    assert "'self'" in rejection(bind=True, idempotency_key=("self",))


# -- misspelled option names -----------------------------------------------------------


def test_misspelled_app_setting_is_rejected_suggesting_the_option() -> None:
    app = make_app()
    app.conf.idempotency_lock_tll = 5
    add_task(app)
    with pytest.raises(ImproperlyConfigured) as info:
        app.finalize()
    assert "idempotency_lock_tll" in str(info.value)
    assert "did you mean 'idempotency_lock_ttl'" in str(info.value)


def test_misspelled_task_option_is_rejected_suggesting_the_option() -> None:
    message = rejection(idempotency_lock_tll=5)
    assert "idempotency_lock_tll" in message
    assert "did you mean 'idempotency_lock_ttl'" in message


class DjangoSettings:
    CELERY_BROKER_URL = "memory://"
    CELERY_IDEMPOTENCY_LOCK_TTL = 7


class MisspelledDjangoSettings:
    CELERY_BROKER_URL = "memory://"
    CELERY_IDEMPOTENCY_LOCK_TLL = 7


class DjangoSettingsOfAnotherLibrary:
    CELERY_BROKER_URL = "memory://"
    # Not a Celery setting: without the CELERY_ prefix Celery does not read it.
    IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


def namespaced_app(settings: type) -> Celery:
    app = Celery("c", broker="memory://", set_as_current=False)
    app.config_from_object(settings, namespace="CELERY")
    add_task(app)
    return app


def test_namespaced_setting_is_found() -> None:
    assert resolved(namespaced_app(DjangoSettings)).lock_ttl == 7


def test_misspelled_namespaced_setting_is_rejected() -> None:
    app = namespaced_app(MisspelledDjangoSettings)
    with pytest.raises(ImproperlyConfigured) as info:
        app.finalize()
    assert "idempotency_lock_ttl" in str(info.value).lower()


def test_namespaced_app_ignores_settings_outside_its_namespace() -> None:
    # Django settings hold every setting of the project; only CELERY_* ones are Celery's.
    assert (
        resolved(namespaced_app(DjangoSettingsOfAnotherLibrary)).lock_ttl == DEFAULTS["idempotency_lock_ttl"]
    )


# -- the resolved object ---------------------------------------------------------------


def test_resolved_config_is_frozen() -> None:
    config = resolve_task(idempotency_redis_options={"socket_timeout": 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lock_ttl = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.redis_options["socket_timeout"] = 1  # type: ignore[index]


def test_resolved_redis_options_are_a_copy_of_the_setting() -> None:
    options = {"socket_timeout": 5}
    config = resolve_task(idempotency_redis_options=options)
    options["socket_timeout"] = 1
    assert config.redis_options["socket_timeout"] == 5


# -- validation when a real worker starts ----------------------------------------------


def run_worker(args: list[str], conf: dict[str, Any], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a worker process to its end (a worker that starts is told to exit by the caller)."""
    return subprocess.run(
        args,
        env={**os.environ, "IDEM_TEST_CONF": json.dumps(conf), "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"idempotency_on_conflict": "retyr"}, ["idempotency_on_conflict", "retry"]),
        ({"idempotency_lock_tll": 5}, ["idempotency_lock_tll", "idempotency_lock_ttl"]),
    ],
    ids=["bad-value", "misspelled-name"],
)
def test_worker_with_bad_setting_exits_naming_it(
    worker_conf: dict[str, Any], setting: dict[str, Any], words: list[str]
) -> None:
    done = run_worker(worker_command("config@test", "-P", "solo"), {**worker_conf, **setting})
    assert done.returncode != 0, done.stdout[-4000:]
    for word in words:
        assert word in done.stdout


# A worker whose settings are changed in ``celeryd_init``, the documented hook for
# per-worker configuration: it runs after the tasks were bound, before the worker
# starts. The worker prints its resolved options and exits once it is ready.
LATE_SETTINGS_WORKER = f"""
import json, os
from celery import signals
from tests.worker_app import app

@signals.celeryd_init.connect
def late_settings(conf=None, **kwargs):
    conf.update(json.loads(os.environ["IDEM_LATE_CONF"]))

@signals.worker_ready.connect
def report_and_exit(sender=None, **kwargs):
    config = sender.app.tasks["t.by_id"].resolved_idempotency
    print(f"ready with lock_ttl={{config.lock_ttl}} on_conflict={{config.on_conflict}}", flush=True)
    os._exit(0)

app.worker_main(["worker", "-n", "late@test", *{WORKER_FLAGS!r}])
"""


def test_worker_exits_when_celeryd_init_sets_a_bad_value(worker_conf: dict[str, Any]) -> None:
    late = json.dumps({"idempotency_on_conflict": "retyr"})
    done = run_worker([sys.executable, "-c", LATE_SETTINGS_WORKER], worker_conf, IDEM_LATE_CONF=late)
    assert "ready with" not in done.stdout, done.stdout[-4000:]
    assert done.returncode != 0
    assert "idempotency_on_conflict" in done.stdout and "retry" in done.stdout


def test_worker_uses_settings_changed_in_celeryd_init(worker_conf: dict[str, Any]) -> None:
    late = json.dumps({"idempotency_lock_ttl": 9, "idempotency_on_conflict": "raise"})
    done = run_worker([sys.executable, "-c", LATE_SETTINGS_WORKER], worker_conf, IDEM_LATE_CONF=late)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "ready with lock_ttl=9.0 on_conflict=raise" in done.stdout


def test_worker_expiry_off_on_the_task_beats_the_app_setting() -> None:
    assert (
        resolve_task({"idempotency_worker_expiry": True}, idempotency_worker_expiry=False).worker_expiry
        is False
    )


# -- the database of self.idempotency.transaction ----------------------------------------


def test_database_url_with_options_is_a_postgres_spec_with_the_password_hidden() -> None:
    config = resolve_task(
        {"idempotency_database_url": "postgresql://app:secret@db/shop"},
        idempotency_database_options={"connect_timeout": 3},
    )
    assert config.database is not None
    assert (config.database.kind, config.database.where) == ("postgres", "postgresql://app:***@db/shop")
    assert dict(config.database.options) == {"connect_timeout": 3}


@pytest.mark.parametrize(("value", "alias"), [("django", "default"), ("django:orders", "orders")])
def test_django_database_names_its_alias(value: str, alias: str) -> None:
    config = resolve_task(idempotency_database=value)
    assert config.database is not None and (config.database.kind, config.database.target) == ("django", alias)


def test_a_sqlalchemy_engine_is_taken_as_it_is() -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine("postgresql+psycopg://app:pw@db/shop")
    config = resolve_task(idempotency_database=engine)
    assert config.database is not None
    assert config.database.kind == "sqlalchemy" and config.database.target is engine
    assert "pw" not in config.database.where


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"idempotency_database_url": "mysql://db/shop"}, "postgresql://"),
        ({"idempotency_database_url": "postgresql://db/a", "idempotency_database": "django"}, "not both"),
        ({"idempotency_database_options": {"connect_timeout": 3}}, "no database is"),
        ({"idempotency_database_options": ["connect_timeout"]}, "dict of connection arguments"),
        ({"idempotency_database": "djang"}, "'django' or 'django:<alias>'"),
        ({"idempotency_database": "django:"}, "'django' or 'django:<alias>'"),
        ({"idempotency_database": 42}, "SQLAlchemy Engine"),
        ({"idempotency_transaction": True}, "no database"),
        ({"idempotency_transaction": "yes", "idempotency_database": "django"}, "True or False"),
    ],
)
def test_bad_database_settings_are_refused_naming_the_option(options: dict[str, Any], needle: str) -> None:
    message = rejection(**options)
    assert needle in message
    assert any(name in message for name in options)


def test_transaction_of_the_whole_body_needs_and_gets_a_database() -> None:
    config = resolve_task(idempotency_database="django", idempotency_transaction=True)
    assert config.transaction is True

"""Settings: names, defaults, validation, and how a task's values are resolved.

Every option has one name, valid both as an app setting (``app.conf``, the default for
every task of the app) and as a task attribute (``@app.task(idempotency_lock_ttl=10)``,
which wins). :func:`resolve` is the one place that applies that order and checks the
values; it runs when a task class is bound to its app and again when the worker
starts, so a bad value stops the worker with an error naming the option.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from celery.utils.imports import symbol_by_name

from .connections import SCHEMES, connection_settings, redact
from .errors import ImproperlyConfigured
from .keys import ArgumentsKey, KeyStrategy, strategy_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "APP_DEFAULTS",
    "BACKEND_ERROR_POLICIES",
    "CONFLICT_POLICIES",
    "DEFAULTS",
    "DatabaseSpec",
    "IdempotencyConfig",
    "atomic_fetch_transport",
    "check_app_settings",
    "check_connection",
    "resolve",
]

#: Every option with its default. ``idempotency_redis_url``'s default is derived
#: from the app's other settings, see :func:`celery_idem.connections.connection_settings`.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "idempotency_redis_url": None,
        "idempotency_redis_options": {},
        "idempotency_key_prefix": "idem",
        "idempotency_key": "task_id",
        "idempotency_result_ttl": 86400,
        "idempotency_lock_ttl": 10,
        "idempotency_on_conflict": "retry",
        "idempotency_wait_timeout": 60,
        "idempotency_on_backend_error": "retry",
        "idempotency_cache_errors": (),
        "idempotency_max_result_bytes": 1048576,
        "idempotency_worker_expiry": True,
        "idempotency_database_url": None,
        "idempotency_database_options": {},
        "idempotency_database": None,
        "idempotency_transaction": False,
        "idempotency_validate_payload": None,
        "idempotency_dedupe_on_submit": False,
        "idempotency_submit_ttl": 3600,
        "idempotency_min_replicas": 0,
        "idempotency_min_replicas_timeout": 1.0,
    }
)

#: Settings of the whole app (``app.conf`` only), with their defaults.
APP_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        # Workers of an app with a redis:// or rediss:// broker fetch messages with
        # celery_idem.broker.Transport, which cannot lose a fetched message.
        "idempotency_atomic_redis_fetch": True,
    }
)

CONFLICT_POLICIES = ("retry", "wait", "raise", "drop")
BACKEND_ERROR_POLICIES = ("retry", "run", "raise")


@dataclass(frozen=True)
class DatabaseSpec:
    """Where ``self.idempotency.transaction`` writes, as configured (nothing is imported yet).

    ``kind`` is ``"postgres"`` (``idempotency_database_url``, through psycopg),
    ``"sqlalchemy"`` (an ``Engine`` in ``idempotency_database``), ``"django"`` (a
    database alias of the Django project) or ``"custom"`` (an object implementing
    :class:`celery_idem.effects.Database`).
    """

    kind: str
    #: The URL (postgres), the alias (django), or a description, without passwords.
    where: str
    #: The URL itself, the engine, the alias or the object.
    target: Any
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class IdempotencyConfig:
    """The resolved, validated options of one task."""

    redis_url: str
    redis_options: Mapping[str, Any]
    key_prefix: str
    key: KeyStrategy
    result_ttl: float
    lock_ttl: float
    on_conflict: str
    wait_timeout: float
    on_backend_error: str
    cache_errors: tuple[type[BaseException], ...]
    max_result_bytes: int
    worker_expiry: bool
    database: DatabaseSpec | None = None
    transaction: bool = False
    #: Check a key's arguments against the record's: True, False, or None (the
    #: default: for named-argument and function keys, and per-call keys).
    validate_payload: bool | None = None
    dedupe_on_submit: bool = False
    submit_ttl: float = 3600.0
    #: Replicas that must acknowledge a commit (``WAIT``) before the message is
    #: acknowledged; 0 sends no ``WAIT``.
    min_replicas: int = 0
    #: How long a commit waits for them, in seconds.
    min_replicas_timeout: float = 1.0
    #: The signature of the task's ``run``, for the payload digests.
    signature: Any = None

    @property
    def submit_ttl_ms(self) -> int:
        """How long a submit marker lives, in milliseconds."""
        return int(self.submit_ttl * 1000)

    def validates(self, material: str) -> bool:
        """Whether calls with this key material have their arguments checked.

        By default for keys on a subset of named arguments, keys from a function and
        keys given per call; never for ``"args"`` keys (the key is the arguments).
        """
        if self.validate_payload is not None:
            return self.validate_payload
        computed = material.startswith(("id:", "args:"))  # else a key given per call
        return self.key.validates_payload or not computed

    @property
    def min_replicas_timeout_ms(self) -> int:
        """How long a commit waits for its replicas, in milliseconds (at least 1: ``WAIT 0`` never ends)."""
        return max(1, int(self.min_replicas_timeout * 1000))

    @property
    def lease_ms(self) -> int:
        """Lease length in milliseconds."""
        return int(self.lock_ttl * 1000)

    @property
    def result_ttl_ms(self) -> int:
        """How long a finished record is kept, in milliseconds."""
        return int(self.result_ttl * 1000)


def resolve(app: Celery, task_cls: type) -> IdempotencyConfig:
    """Return the options of ``task_cls``: task attribute, else app setting, else default.

    Raises :class:`~celery_idem.errors.ImproperlyConfigured` naming the first bad
    option, including misspelled option names on the task or in ``app.conf``.
    """
    check_app_settings(app)
    _check_names(_class_attributes(task_cls), f"task {getattr(task_cls, 'name', task_cls)}", DEFAULTS)
    conf = app.conf
    raw: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        value = _task_attribute(task_cls, name)
        if value is None:
            value = conf.get(name)
        raw[name] = default if value is None else value

    # Cheap here (no redis-py): the URL and options are checked against redis-py
    # when the worker starts (check_connection) and when a store is made.
    url, options = connection_settings(
        app, raw["idempotency_redis_url"], _redis_options(raw["idempotency_redis_options"]), check=False
    )
    database = _database(
        raw["idempotency_database_url"], raw["idempotency_database_options"], raw["idempotency_database"]
    )
    transaction = _flag(raw["idempotency_transaction"], "idempotency_transaction")
    if transaction and database is None:
        raise ImproperlyConfigured(
            "idempotency_transaction=True runs the body in a database transaction, but no database "
            "is configured: set idempotency_database_url (PostgreSQL) or idempotency_database"
        )
    key = strategy_for(raw["idempotency_key"], _run_signature(task_cls), "idempotency_key")
    validate = raw["idempotency_validate_payload"]
    if validate is not None:
        validate = _flag(validate, "idempotency_validate_payload")
        if validate and isinstance(key, ArgumentsKey) and key.names is None:
            raise ImproperlyConfigured(
                "idempotency_validate_payload=True means nothing with idempotency_key='args': the key "
                "is made of all the arguments already; leave it unset"
            )
    return IdempotencyConfig(
        redis_url=_redis_url(url),
        redis_options=MappingProxyType(dict(options)),
        key_prefix=_key_prefix(raw["idempotency_key_prefix"]),
        key=key,
        result_ttl=_seconds(raw["idempotency_result_ttl"], "idempotency_result_ttl", minimum=0.001),
        lock_ttl=_seconds(raw["idempotency_lock_ttl"], "idempotency_lock_ttl", minimum=0.1),
        on_conflict=_choice(raw["idempotency_on_conflict"], "idempotency_on_conflict", CONFLICT_POLICIES),
        wait_timeout=_seconds(raw["idempotency_wait_timeout"], "idempotency_wait_timeout", minimum=0.0),
        on_backend_error=_choice(
            raw["idempotency_on_backend_error"], "idempotency_on_backend_error", BACKEND_ERROR_POLICIES
        ),
        cache_errors=_exception_classes(raw["idempotency_cache_errors"]),
        max_result_bytes=_positive_int(raw["idempotency_max_result_bytes"], "idempotency_max_result_bytes"),
        worker_expiry=_flag(raw["idempotency_worker_expiry"], "idempotency_worker_expiry"),
        database=database,
        transaction=transaction,
        validate_payload=validate,
        dedupe_on_submit=_flag(raw["idempotency_dedupe_on_submit"], "idempotency_dedupe_on_submit"),
        submit_ttl=_seconds(raw["idempotency_submit_ttl"], "idempotency_submit_ttl", minimum=0.001),
        min_replicas=_count(raw["idempotency_min_replicas"], "idempotency_min_replicas"),
        min_replicas_timeout=_seconds(
            raw["idempotency_min_replicas_timeout"], "idempotency_min_replicas_timeout", minimum=0.001
        ),
        signature=_run_signature(task_cls),
    )


def check_app_settings(app: Celery) -> None:
    """Reject ``idempotency_*`` settings in ``app.conf`` that are not options."""
    conf = app.conf
    # With a namespace (Django's CELERY_ prefix), keys outside it are the project's
    # own settings, which Celery never reads: only namespaced keys are checked.
    prefix = (getattr(conf, "prefix", None) or "").lower()
    names = []
    for key in conf.keys():
        name = str(key).lower()
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix) :]
        names.append(name)
    _check_names(names, "app.conf", {**DEFAULTS, **APP_DEFAULTS})


def atomic_fetch_transport(app: Celery) -> str | None:
    """The transport workers of ``app`` should use, or None to leave Celery's choice.

    ``celery_idem.broker:Transport`` when ``idempotency_atomic_redis_fetch`` is on, the
    broker is ``redis://`` or ``rediss://``, and the app does not choose a transport
    itself (``broker_transport``).
    """
    conf = app.conf
    enabled = conf.get("idempotency_atomic_redis_fetch")
    if enabled is None:
        enabled = APP_DEFAULTS["idempotency_atomic_redis_fetch"]
    if not isinstance(enabled, bool):
        raise ImproperlyConfigured(f"idempotency_atomic_redis_fetch must be True or False; got {enabled!r}")
    url = conf.get("broker_url")
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if not enabled or conf.get("broker_transport") or not isinstance(url, str):
        return None
    if urlsplit(url.split(";")[0].strip()).scheme not in ("redis", "rediss"):
        return None
    return "celery_idem.broker:Transport"


def _check_names(names: Iterable[str], where: str, known: Mapping[str, Any]) -> None:
    for name in names:
        if name.startswith("idempotency_") and name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ImproperlyConfigured(
                f"{where} sets {name!r}, which is not a celery_idem option{hint} "
                f"(options: {', '.join(known)})"
            )


def _class_attributes(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in vars(klass)}


def _task_attribute(cls: type, name: str) -> Any:
    # Read the attribute without binding it: a key function given as a task option
    # is stored on the class and would otherwise come back as a bound method.
    value = inspect.getattr_static(cls, name, None)
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return value


def _run_signature(cls: type) -> inspect.Signature:
    run = inspect.getattr_static(cls, "run")
    if isinstance(run, staticmethod):
        return inspect.signature(run.__func__)
    signature = inspect.signature(run)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _redis_url(value: Any) -> str:
    scheme = value.partition("://")[0].lower() if isinstance(value, str) else None
    if scheme not in SCHEMES:
        raise ImproperlyConfigured(
            f"idempotency_redis_url must be a {', '.join(s + '://' for s in SCHEMES)} URL; "
            f"got {redact(value) if isinstance(value, str) else repr(value)}"
        )
    return str(value)


def _redis_options(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"idempotency_redis_options must be a dict of redis-py client arguments; got {value!r}"
        )
    if value.get("decode_responses"):
        raise ImproperlyConfigured(
            "idempotency_redis_options must not set decode_responses: records hold encoded results as bytes"
        )
    return MappingProxyType(dict(value))


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise ImproperlyConfigured(
            f"idempotency_key_prefix must be a non-empty str without braces "
            f"(braces would change the Redis Cluster hash tag); got {value!r}"
        )
    return value


def _seconds(value: Any, option: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ImproperlyConfigured(f"{option} must be a number of seconds; got {value!r}")
    if value < minimum:
        raise ImproperlyConfigured(f"{option} must be at least {minimum} seconds; got {value!r}")
    return float(value)


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ImproperlyConfigured(f"{option} must be a positive int; got {value!r}")
    return value


def _count(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(f"{option} must be an int, 0 or more; got {value!r}")
    return value


_POSTGRES_SCHEMES = ("postgresql", "postgres")


def _database(url: Any, options: Any, database: Any) -> DatabaseSpec | None:
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"idempotency_database_options must be a dict of connection arguments; got {options!r}"
        )
    if url is not None and database is not None:
        raise ImproperlyConfigured(
            "set either idempotency_database_url or idempotency_database, not both "
            f"(got {redact(str(url))!r} and {database!r})"
        )
    if url is not None:
        if not isinstance(url, str) or urlsplit(url).scheme not in _POSTGRES_SCHEMES:
            raise ImproperlyConfigured(
                "idempotency_database_url must be a postgresql:// URL (psycopg 3, extra "
                f"celery-idem[postgres]); got {redact(str(url))!r}"
            )
        return DatabaseSpec("postgres", redact(url), url, MappingProxyType(dict(options)))
    if database is None:
        if options:
            raise ImproperlyConfigured(
                "idempotency_database_options is set but no database is: set idempotency_database_url"
            )
        return None
    if isinstance(database, str):
        kind, _, alias = database.partition(":")
        if kind != "django" or (_ and not alias):
            raise ImproperlyConfigured(
                "idempotency_database as a string must be 'django' or 'django:<alias>' (a Django "
                f"database alias); got {database!r}"
            )
        return DatabaseSpec("django", alias or "default", alias or "default")
    if (type(database).__module__ or "").startswith("sqlalchemy"):
        # Told apart without importing SQLAlchemy: a Connection or a Session also
        # has begin(), but celery_idem needs the Engine, to open transactions of its own.
        if not any(
            cls.__name__ == "Engine" and cls.__module__.startswith("sqlalchemy.engine")
            for cls in type(database).__mro__
        ):
            raise ImproperlyConfigured(
                "idempotency_database must be a SQLAlchemy Engine (sqlalchemy.create_engine(...)), "
                "on which celery_idem opens a transaction per call and hands fn its Connection; "
                f"got a {type(database).__name__}"
            )
        return DatabaseSpec("sqlalchemy", redact(str(database.url)), database)
    if all(hasattr(database, name) for name in ("atomic", "unavailable", "conflict", "where")):
        return DatabaseSpec("custom", str(database.where), database)
    raise ImproperlyConfigured(
        "idempotency_database must be a SQLAlchemy Engine, 'django' or 'django:<alias>', or an "
        f"object implementing celery_idem.effects.Database; got {database!r}"
    )


def _flag(value: Any, option: str) -> bool:
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"{option} must be True or False; got {value!r}")
    return value


def _choice(value: Any, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ImproperlyConfigured(f"{option} must be one of {', '.join(choices)}; got {value!r}{hint}")
    return str(value)


def _exception_classes(value: Any) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    classes = []
    for item in items:
        cls = item
        if isinstance(item, str):
            try:
                cls = symbol_by_name(item)
            except (ImportError, AttributeError, ValueError) as exc:
                raise ImproperlyConfigured(
                    f"idempotency_cache_errors names {item!r}, which cannot be imported: {exc}"
                ) from exc
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ImproperlyConfigured(
                f"idempotency_cache_errors must list exception classes (or their dotted names); got {item!r}"
            )
        classes.append(cls)
    return tuple(classes)


def check_connection(config: IdempotencyConfig) -> None:
    """Check the records' URL and options against redis-py (loads it), without connecting."""
    from .connections import parse

    parse(config.redis_url, config.redis_options)

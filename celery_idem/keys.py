"""Idempotency keys: which calls count as the same call.

A key is built in two steps. A *strategy* turns a call into key material, a short
string that travels in the ``idempotency_key`` message header; the material and the
task name are then hashed into the Redis key of the record. Both steps are pure
functions of their inputs, so the producer, the worker and any other process agree
on the key whatever Python version or host they run on.

Canonical encoding of arguments (the ``"args"`` and named-argument strategies):

* arguments are bound to the task's signature with defaults applied, so
  ``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(1)`` (when ``b`` defaults to 2) are one call;
* ``str``, ``int``, ``float``, ``bool`` and ``None`` encode as themselves; ``1``,
  ``1.0`` and ``True`` are three different values; ``-0.0`` is ``0.0``;
* ``list`` and ``tuple`` are both JSON arrays (a message serialized as JSON turns
  tuples into lists, and the key must not change on the way);
* every other value is a one-member JSON object naming its type, so no user value
  can be mistaken for another: ``{"map": {...}}`` for a ``dict`` with ``str`` keys,
  ``{"bytes": base64}``, ``{"decimal": "15E-1"}`` (significant digits and exponent,
  so ``Decimal("1.50")`` is ``Decimal("1.5")`` and no digit is ever rounded away),
  ``{"uuid": "..."}``, ``{"datetime": iso}`` (aware datetimes in UTC, so one instant
  is one value; naive ones as they are), ``{"date": iso}``, and ``{"int": hex}``
  for integers of more than 2000 bits;
* subclasses of ``str``, ``int`` and ``float`` (``IntEnum``, ``StrEnum``) encode as
  their plain value; anything else raises :class:`~celery_idem.errors.IdempotencyKeyError`
  naming the argument.

The result is JSON with sorted keys, no spaces, ASCII only, hashed with SHA-256.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import inspect
import itertools
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .errors import IdempotencyKeyError, ImproperlyConfigured

__all__ = [
    "KEY_HEADER",
    "PAYLOAD_HEADER",
    "SHARDS",
    "STATES",
    "ArgumentsKey",
    "CallableKey",
    "KeyStrategy",
    "TaskIdKey",
    "canonical_json",
    "differing_arguments",
    "encode_value",
    "new_run_id",
    "payload_digests",
    "record_key",
    "record_pattern",
    "shard_of",
    "shard_stats_keys",
    "stats_key",
    "steps_key",
    "strategy_for",
    "user_key",
]

#: Message header carrying the key material of a call.
KEY_HEADER = "idempotency_key"
#: Message header with the digests of the call's arguments (``idempotency_validate_payload``).
PAYLOAD_HEADER = "idempotency_payload"


def canonical_json(value: Any) -> bytes:
    """Serialize an already-encoded value as canonical JSON bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def encode_value(value: Any, where: str) -> Any:
    """Return the canonical, JSON-ready form of one argument value.

    ``where`` names the value in error messages (``"order['items'][2]"``).
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return "" + value
    if isinstance(value, int):
        value = int(value)
        # Python refuses to print huge ints in decimal (a limit each process may
        # lower to 640 digits); past 2000 bits the key spells them in hex instead.
        return {"int": hex(value)} if value.bit_length() > 2000 else value
    if isinstance(value, float):
        return float(value) + 0.0  # -0.0 + 0.0 is 0.0
    if isinstance(value, (list, tuple)):
        return [encode_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        encoded = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise IdempotencyKeyError(
                    f"argument {where!r} is a mapping with a {type(name).__name__} key "
                    f"({name!r}); only str keys can be part of an idempotency key"
                )
            encoded["" + name] = encode_value(item, f"{where}[{name!r}]")
        return {"map": encoded}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {"decimal": _decimal_text(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, datetime.datetime):
        if value.utcoffset() is not None:
            try:
                value = value.astimezone(datetime.timezone.utc)
            except OverflowError:
                raise IdempotencyKeyError(
                    f"argument {where!r} is an aware datetime whose UTC time is outside the "
                    "range datetime can represent"
                ) from None
        return {"datetime": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"date": value.isoformat()}
    raise IdempotencyKeyError(
        f"argument {where!r} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which has no canonical encoding (supported: str, int, float, bool, None, list, "
        "tuple, dict with str keys, bytes, Decimal, UUID, datetime, date); pass a "
        "supported value, key on other arguments with idempotency_key=('name', ...), "
        "or give idempotency_key a function"
    )


def _decimal_text(value: decimal.Decimal) -> str:
    # Built from the digits, not with normalize(): that rounds to, and spells by,
    # the calling thread's decimal context, which differs between processes.
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "-Infinity" if value.is_signed() else "Infinity"
    if value.is_zero():
        return "0"
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    kept = list(digits)
    while kept[-1] == 0:
        kept.pop()
        exponent += 1
    return f"{'-' if sign else ''}{''.join(map(str, kept))}E{exponent}"


#: How many shards the records are spread over. Each shard is one Redis Cluster
#: hash tag (``{s00}`` to ``{s63}``), shared by its records, their steps and the
#: shard's counters, so every script touches one slot and the counters of a whole
#: keyspace are the sum of 64 hashes.
SHARDS = 64


#: The states a record can be in: ``queued`` (a submit-side marker: sent, not run yet),
#: ``running`` (a run holds the lease), ``done`` / ``failed`` (an outcome is recorded),
#: ``free`` (a run gave its lease back without an outcome; the next delivery runs).
STATES = ("queued", "running", "done", "failed", "free")


_run_prefix: tuple[int, str] = (0, "")
_run_counter = itertools.count()


def new_run_id() -> str:
    """An id for one delivery's run, unique across processes and hosts.

    A random prefix made once per process (again after a fork) and a counter: cheaper
    than a UUID per delivery, which costs a system call for its randomness.
    """
    global _run_prefix
    pid = os.getpid()
    if _run_prefix[0] != pid:
        _run_prefix = (pid, uuid.uuid4().hex[:16])
    return f"{_run_prefix[1]}{next(_run_counter):x}"


def payload_digests(signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """The digests of a call's arguments, by name, as canonical JSON (``idempotency_validate_payload``).

    Arguments are bound to the task's signature with defaults applied, as for
    argument keys; each value is encoded canonically and hashed (16 hex digits of
    SHA-256), so the record tells which arguments differ without holding their values.
    An argument without a canonical encoding gets a null digest and is not compared.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise IdempotencyKeyError(
            f"the arguments do not match the task's signature {signature}: {exc}"
        ) from exc
    bound.apply_defaults()
    digests: dict[str, str | None] = {}
    for name, value in bound.arguments.items():
        try:
            digests[name] = _digest(encode_value(value, name))[:16]
        except IdempotencyKeyError:
            digests[name] = None  # no canonical encoding: left out of the check
    return canonical_json(digests).decode()


def differing_arguments(stored: str, given: str) -> list[str]:
    """The names of the arguments whose digests differ between two :func:`payload_digests`.

    An argument without a canonical encoding (its digest is null) is not compared.
    """
    old, new = json.loads(stored), json.loads(given)
    return sorted(
        name
        for name in set(old) | set(new)
        if old.get(name, "") is not None and new.get(name, "") is not None and old.get(name) != new.get(name)
    )


def record_key(prefix: str, task_name: str, material: str) -> str:
    """Return the Redis key of the record for ``material`` of ``task_name``.

    ``<prefix>:{sNN}<sha256>``: the digest of the task name and the material, so
    any material (a user's own string included) becomes a key of fixed length that
    cannot reach outside ``prefix``, behind the hash tag of its shard.
    """
    digest = _digest({"key": material, "task": task_name})
    return f"{prefix}:{{{shard_of(digest)}}}{digest}"


def record_pattern(prefix: str) -> str:
    """The SCAN pattern matching every record under ``prefix``, and not their steps or counters."""
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix)
    return escaped + ":{s[0-9][0-9]}" + "?" * 64


def shard_of(digest: str) -> str:
    """The shard (hash tag) of a record digest: ``s00`` to ``s63``."""
    return f"s{int(digest[:4], 16) % SHARDS:02d}"


def steps_key(record: str) -> str:
    """Return the Redis key of the steps stored for ``record`` (same hash slot)."""
    return f"{record}:steps"


def stats_key(record: str) -> str:
    """Return the key of the counters of ``record``'s shard (same hash slot)."""
    prefix, _, rest = record.rpartition(":{")
    return f"{prefix}:{{{rest.split('}', 1)[0]}}}:stats"


def shard_stats_keys(prefix: str) -> list[str]:
    """The counter keys of every shard of ``prefix``."""
    return [f"{prefix}:{{s{n:02d}}}:stats" for n in range(SHARDS)]


def user_key(value: Any, source: str) -> str:
    """Check a key chosen by the user (per call, or by a key function) and return it."""
    if not isinstance(value, str) or not value:
        raise IdempotencyKeyError(
            f"{source} must be a non-empty str, got {type(value).__name__} {value!r:.80}"
        )
    return value


class KeyStrategy(Protocol):
    """Turns one call of a task into key material."""

    #: True when the material needs the task id, which a producer may not know yet.
    needs_task_id: bool
    #: True when two calls with one key may differ in their arguments, so that
    #: ``idempotency_validate_payload`` checks them by default.
    validates_payload: bool

    def material(self, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Return the key material of one call."""


class TaskIdKey:
    """Every message id is its own key: protects against redelivery and republishing."""

    needs_task_id = True
    validates_payload = False

    def material(self, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Return ``id:<task id>``."""
        if not task_id:
            raise IdempotencyKeyError("idempotency_key='task_id' needs a task id and this call has none")
        return f"id:{task_id}"

    def __repr__(self) -> str:
        return "'task_id'"


class ArgumentsKey:
    """Calls with equal arguments (all of them, or the named ones) share a key."""

    needs_task_id = False

    def __init__(self, signature: inspect.Signature, names: tuple[str, ...] | None) -> None:
        self.signature = signature
        self.names = names
        #: A key on some of the arguments leaves the others free to differ.
        self.validates_payload = names is not None

    def material(self, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Return ``args:<sha256 of the canonical arguments>``."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise IdempotencyKeyError(
                f"the arguments do not match the task's signature {self.signature}: {exc}"
            ) from exc
        bound.apply_defaults()
        if self.names is None:
            values = bound.arguments
        else:
            values = {name: self._named(bound.arguments, name) for name in self.names}
        encoded = {name: encode_value(value, name) for name, value in values.items()}
        return f"args:{_digest(encoded)}"

    def _named(self, arguments: Mapping[str, Any], name: str) -> Any:
        if name in self.signature.parameters:
            return arguments[name]
        extra: Mapping[str, Any] = next(
            (arguments[p.name] for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD),
            {},
        )
        if name not in extra:
            raise IdempotencyKeyError(
                f"idempotency_key names the argument {name!r}, which this call does not pass"
            )
        return extra[name]

    def __repr__(self) -> str:
        return "'args'" if self.names is None else repr(self.names)


class CallableKey:
    """The user's function returns the key of each call."""

    needs_task_id = False
    validates_payload = True

    def __init__(self, function: Callable[..., str]) -> None:
        self.function = function

    def material(self, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Call the function with the task's arguments and check what it returns."""
        name = getattr(self.function, "__qualname__", repr(self.function))
        try:
            value = self.function(*args, **kwargs)
        except Exception as exc:
            raise IdempotencyKeyError(f"the idempotency_key function {name} raised {exc!r}") from exc
        return user_key(value, f"the idempotency_key function {name}'s return value")

    def __repr__(self) -> str:
        return getattr(self.function, "__qualname__", repr(self.function))


def strategy_for(spec: Any, signature: inspect.Signature, option: str) -> KeyStrategy:
    """Build the strategy for an ``idempotency_key`` setting, or explain what is wrong.

    ``signature`` is the signature of the task's ``run``; named arguments are checked
    against it so a typo fails when the task is bound, not on the first message.
    """
    if spec == "task_id":
        return TaskIdKey()
    if spec == "args":
        return ArgumentsKey(signature, None)
    if isinstance(spec, (list, tuple)):
        names = tuple(spec)
        if not names or not all(isinstance(n, str) for n in names):
            raise ImproperlyConfigured(
                f"{option} as a list must name at least one argument, all as str; got {spec!r}"
            )
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [n for n in names if n not in signature.parameters]
        if unknown and not has_var_kw:
            raise ImproperlyConfigured(
                f"{option} names {', '.join(map(repr, unknown))}, which the task's "
                f"signature {signature} does not have"
            )
        return ArgumentsKey(signature, names)
    if callable(spec):
        return CallableKey(spec)
    raise ImproperlyConfigured(
        f"{option} must be 'task_id', 'args', a list of argument names or a callable; got {spec!r}"
    )

"""Idempotency keys: which calls count as the same call, and the Redis key they get.

Everything here is pure computation: no Redis, no worker. The IdempotentTask tests at
the end stub Celery's sending (``celery.Task.apply_async``) to see what would go out.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import inspect
import math
import os
import re
import subprocess
import sys
import uuid
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import celery
import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_idem import IdempotentTask
from celery_idem.errors import IdempotencyKeyError, ImproperlyConfigured
from celery_idem.keys import KEY_HEADER, ArgumentsKey, CallableKey, TaskIdKey, record_key, strategy_for

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc
RECORD_KEY = re.compile(r"^idem:\{s[0-6][0-9]\}[0-9a-f]{64}$")


def body(a, b=None, *rest, c=0, **extra):
    """The signature most tests key on: every kind of parameter, with defaults."""


def material(*args, **kwargs) -> str:
    """Key material of ``body(*args, **kwargs)`` under ``idempotency_key="args"``."""
    return strategy_for("args", inspect.signature(body), "idempotency_key").material(None, args, kwargs)


def key_of(value: Any) -> str:
    return material(value)


def key_error(*args, **kwargs) -> IdempotencyKeyError:
    with pytest.raises(IdempotencyKeyError) as info:
        material(*args, **kwargs)
    return info.value


# -- the "args" strategy: binding to the signature ------------------------------------


def test_positional_and_keyword_spellings_give_one_key():
    def f(a, b=2):
        pass

    strategy = strategy_for("args", inspect.signature(f), "idempotency_key")
    assert isinstance(strategy, ArgumentsKey)
    spellings = [((1,), {"b": 2}), ((), {"a": 1, "b": 2}), ((1,), {}), ((1, 2), {}), ((), {"b": 2, "a": 1})]
    materials = {strategy.material(None, args, kwargs) for args, kwargs in spellings}
    assert len(materials) == 1
    assert materials.pop().startswith("args:")


def test_different_argument_values_give_different_keys():
    assert material(1, 2) != material(1, 3)
    assert material(1, 2) != material(2, 2)
    assert material(1, c=1) != material(1)
    assert material(1, 2) != material(2, 1)


def test_var_positional_and_var_keyword_arguments_are_part_of_the_key():
    assert material(1, 2, 3) != material(1, 2)
    assert material(1, 2, 3, 4) != material(1, 2, 4, 3)
    assert material(1, x=1) != material(1)
    assert material(1, x=1) != material(1, y=1)
    assert material(1, x=1, y=2) == material(1, y=2, x=1)


def test_arguments_that_do_not_match_the_signature_raise_key_error():
    def f(a, /, b, *, c):
        pass

    strategy = strategy_for("args", inspect.signature(f), "idempotency_key")
    for args, kwargs in [
        ((1, 2), {}),  # c missing
        ((1, 2, 3), {"c": 3}),  # one positional too many
        ((1, 2), {"c": 3, "d": 4}),  # unexpected keyword
        ((), {"a": 1, "b": 2, "c": 3}),  # positional-only passed by keyword
    ]:
        with pytest.raises(IdempotencyKeyError, match="do not match the task's signature"):
            strategy.material(None, args, kwargs)
    assert strategy.material(None, (1, 2), {"c": 3}) == strategy.material(None, (1,), {"b": 2, "c": 3})


# -- the "args" strategy: canonical encoding of values --------------------------------


def test_list_and_tuple_give_one_key():
    assert key_of([1, [2, 3]]) == key_of((1, (2, 3))) == key_of([1, (2, 3)])
    assert key_of([]) == key_of(())


def test_dict_key_order_does_not_matter():
    assert key_of({"a": 1, "b": {"x": 1, "y": 2}}) == key_of({"b": {"y": 2, "x": 1}, "a": 1})


def test_int_float_and_bool_are_different_values():
    assert len({key_of(1), key_of(1.0), key_of(True)}) == 3
    assert len({key_of(0), key_of(0.0), key_of(False), key_of(None)}) == 4


def test_negative_zero_float_is_zero():
    assert key_of(-0.0) == key_of(0.0)


def test_decimal_trailing_zeros_do_not_matter():
    assert key_of(Decimal("1.50")) == key_of(Decimal("1.5")) == key_of(Decimal("1.500000"))
    assert key_of(Decimal("100")) == key_of(Decimal("1E+2")) == key_of(Decimal("100.00"))
    assert key_of(Decimal("1.5")) != key_of(Decimal("1.51"))
    assert key_of(Decimal("1.5")) != key_of(1.5)
    assert key_of(Decimal("1")) != key_of(1)


def test_decimal_zero_of_any_sign_and_exponent_is_one_value():
    zeros = [Decimal("0"), Decimal("-0"), Decimal("0.000"), Decimal("-0E+5"), Decimal("0E-30")]
    assert len({key_of(z) for z in zeros}) == 1
    assert key_of(Decimal(0)) != key_of(0)


def test_decimals_that_differ_beyond_the_context_precision_give_different_keys():
    # The default decimal context keeps 28 digits; the key must not round to it.
    assert key_of(Decimal("1.0000000000000000000000000001")) != key_of(Decimal("1"))
    assert key_of(Decimal("12345678901234567890123456789.5")) != key_of(
        Decimal("12345678901234567890123456789.6")
    )


def test_decimal_key_does_not_depend_on_the_callers_decimal_context():
    # A producer and a worker may run with different decimal contexts (an
    # application sets its own precision); they must still agree on the key.
    expected = [key_of(Decimal("3.14159265358979323846")), key_of(Decimal("1E+30"))]
    with localcontext() as context:
        context.prec = 6
        context.capitals = 0
        assert [key_of(Decimal("3.14159265358979323846")), key_of(Decimal("1E+30"))] == expected


def test_decimals_with_extreme_exponents_are_encoded_exactly():
    # Decimal exponents are unbounded; the key must not overflow or underflow.
    assert key_of(Decimal("1E+1000000")) != key_of(Decimal("1E+999999"))
    assert key_of(Decimal("1E-1000030")) != key_of(Decimal("0"))


def test_aware_datetimes_of_one_instant_give_one_key():
    instant = dt.datetime(2024, 3, 31, 12, 0, tzinfo=UTC)
    spellings = [
        instant,
        instant.astimezone(dt.timezone(dt.timedelta(hours=2))),
        instant.astimezone(dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
        dt.datetime(2024, 3, 31, 21, 45, tzinfo=dt.timezone(dt.timedelta(hours=9, minutes=45))),
    ]
    assert len({key_of(d) for d in spellings}) == 1
    assert key_of(instant) != key_of(instant + dt.timedelta(microseconds=1))


def test_naive_datetime_differs_from_aware_datetime():
    naive = dt.datetime(2024, 3, 31, 12, 0)
    assert key_of(naive) != key_of(naive.replace(tzinfo=UTC))
    assert key_of(naive) == key_of(dt.datetime(2024, 3, 31, 12, 0, 0, 0))
    assert key_of(naive) != key_of(naive.replace(hour=13))


def test_date_differs_from_datetime_at_midnight():
    assert key_of(dt.date(2024, 3, 31)) != key_of(dt.datetime(2024, 3, 31))
    assert key_of(dt.date(2024, 3, 31)) != key_of("2024-03-31")


def test_bytes_differ_from_str():
    assert key_of(b"abc") != key_of("abc")
    assert key_of(b"abc") == key_of(bytearray(b"abc")) == key_of(memoryview(b"abc"))
    assert key_of(b"") != key_of("")


def test_uuid_differs_from_its_str():
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert key_of(value) != key_of(str(value))
    assert key_of(value) == key_of(uuid.UUID(str(value).upper()))


def test_str_int_and_float_subclasses_encode_as_plain_values():
    class Colour(str, enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    class Ratio(float):
        pass

    assert key_of(Colour.RED) == key_of("red")
    assert key_of(Level.HIGH) == key_of(3)
    assert key_of(Level.HIGH) != key_of(3.0)
    assert key_of(Name("ann")) == key_of("ann")
    assert key_of(Ratio(0.5)) == key_of(0.5)
    assert key_of({Name("k"): Colour.RED}) == key_of({"k": "red"})
    if sys.version_info >= (3, 11):
        assert key_of(enum.StrEnum("Size", {"L": "large"}).L) == key_of("large")


def test_dicts_shaped_like_type_tags_do_not_collide_with_tagged_values():
    assert key_of({"bytes": "AA=="}) != key_of(b"\x00")
    assert key_of({"decimal": "1.5"}) != key_of(Decimal("1.5"))
    assert key_of({"date": "2024-03-31"}) != key_of(dt.date(2024, 3, 31))
    assert key_of({"datetime": "2024-03-31T00:00:00"}) != key_of(dt.datetime(2024, 3, 31))
    uid = uuid.UUID(int=7)
    assert key_of({"uuid": str(uid)}) != key_of(uid)
    assert key_of({"map": {"a": 1}}) != key_of({"a": 1})


@pytest.mark.parametrize(
    ("args", "kwargs", "path"),
    [
        ((object(),), {}, "a"),
        ((1, {1, 2}), {}, "b"),
        ((1, None, "ok", [1, frozenset()]), {}, "rest[1][1]"),
        ((), {"a": 1, "order": {"items": [1, 2, {3}]}}, "extra['order']['items'][2]"),
        ((), {"a": {"lines": [{"sku": "x", "qty": object()}]}}, "a['lines'][0]['qty']"),
        ((), {"a": {"items": {1: "one"}}}, "a['items']"),
        ((enum.Enum("Plain", "X").X,), {}, "a"),
    ],
)
def test_unsupported_values_raise_key_error_naming_the_argument_path(args, kwargs, path):
    assert path in str(key_error(*args, **kwargs))


def test_unsupported_value_error_names_the_argument_path_and_the_type():
    def place(order, note=None):
        pass

    strategy = strategy_for("args", inspect.signature(place), "idempotency_key")
    with pytest.raises(IdempotencyKeyError) as info:
        strategy.material(None, ({"items": [1, 2, {3}]},), {})
    assert "order['items'][2]" in str(info.value)
    assert "builtins.set" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
        10**5000,
    ],
    ids=["aware-before-utc-min", "aware-after-utc-max", "int-of-5001-digits"],
)
def test_key_failure_is_always_an_idempotency_key_error(value):
    # Values of supported types at the edge of what can be encoded: they either get
    # a key or fail with IdempotencyKeyError naming the argument, never with a bare
    # ValueError or OverflowError escaping from apply_async.
    try:
        key_of(value)
    except IdempotencyKeyError as exc:
        assert "'a'" in str(exc)


# -- named-argument strategy ----------------------------------------------------------


def test_only_the_named_arguments_are_part_of_the_key():
    def charge(order_id, amount_cents, *, note=""):
        pass

    strategy = strategy_for(("order_id",), inspect.signature(charge), "idempotency_key")
    assert strategy.material(None, (7, 100), {}) == strategy.material(
        None, (7,), {"amount_cents": 999, "note": "x"}
    )
    assert strategy.material(None, (7, 100), {}) == strategy.material(
        None, (), {"order_id": 7, "amount_cents": 1}
    )
    assert strategy.material(None, (7, 100), {}) != strategy.material(None, (8, 100), {})
    both = strategy_for(["order_id", "note"], inspect.signature(charge), "idempotency_key")
    assert both.material(None, (7, 100), {}) == both.material(None, (7, 5), {"note": ""})
    assert both.material(None, (7, 100), {}) != both.material(None, (7, 100), {"note": "x"})


def test_named_arguments_that_do_not_match_the_signature_raise_key_error():
    def charge(order_id, amount_cents):
        pass

    strategy = strategy_for(("order_id",), inspect.signature(charge), "idempotency_key")
    with pytest.raises(IdempotencyKeyError, match="do not match"):
        strategy.material(None, (7,), {})


def test_unknown_argument_name_fails_at_build_time():
    def charge(order_id, amount_cents):
        pass

    with pytest.raises(ImproperlyConfigured, match="'orderid'"):
        strategy_for(("orderid",), inspect.signature(charge), "idempotency_key")


def test_name_reachable_through_var_keyword_is_accepted_and_read_from_it():
    def charge(order_id, **options):
        pass

    strategy = strategy_for(("tenant",), inspect.signature(charge), "idempotency_key")
    assert strategy.material(None, (1,), {"tenant": "t1"}) == strategy.material(None, (2,), {"tenant": "t1"})
    assert strategy.material(None, (1,), {"tenant": "t1"}) != strategy.material(None, (1,), {"tenant": "t2"})


def test_name_only_reachable_through_var_keyword_and_not_passed_raises_key_error():
    def charge(order_id, **options):
        pass

    strategy = strategy_for(("tenant",), inspect.signature(charge), "idempotency_key")
    with pytest.raises(IdempotencyKeyError, match="'tenant'"):
        strategy.material(None, (1,), {"other": 2})


@pytest.mark.parametrize("spec", [(), [], ("a", 1), "order_id", 42, None])
def test_invalid_key_settings_raise_improperly_configured(spec):
    with pytest.raises(ImproperlyConfigured, match="idempotency_key"):
        strategy_for(spec, inspect.signature(body), "idempotency_key")


# -- key functions and task ids -------------------------------------------------------


def test_key_function_is_called_with_the_tasks_arguments():
    seen = []

    def order_key(order_id, amount_cents=0, **extra):
        seen.append((order_id, amount_cents, extra))
        return f"order-{order_id}"

    strategy = strategy_for(order_key, inspect.signature(body), "idempotency_key")
    assert isinstance(strategy, CallableKey)
    assert not strategy.needs_task_id
    assert strategy.material("some-id", (7,), {"amount_cents": 100, "note": "x"}) == "order-7"
    assert seen == [(7, 100, {"note": "x"})]


@pytest.mark.parametrize("returned", [7, None, b"order-7", ""])
def test_key_function_returning_a_non_str_or_empty_value_raises_key_error_naming_it(returned):
    def order_key(*args, **kwargs):
        return returned

    strategy = strategy_for(order_key, inspect.signature(body), "idempotency_key")
    with pytest.raises(IdempotencyKeyError, match="order_key"):
        strategy.material(None, (1,), {})


def test_key_function_that_raises_gives_key_error_naming_it():
    def order_key(order):
        return order["id"]

    strategy = strategy_for(order_key, inspect.signature(body), "idempotency_key")
    with pytest.raises(IdempotencyKeyError, match=r"order_key.*KeyError") as info:
        strategy.material(None, ({},), {})
    assert isinstance(info.value.__cause__, KeyError)


def test_task_id_key_is_the_message_id_and_needs_one():
    strategy = strategy_for("task_id", inspect.signature(body), "idempotency_key")
    assert isinstance(strategy, TaskIdKey)
    assert strategy.needs_task_id
    assert strategy.material("abc", (1,), {}) == strategy.material("abc", (2,), {}) == "id:abc"
    with pytest.raises(IdempotencyKeyError, match="task id"):
        strategy.material(None, (1,), {})


# -- record keys ----------------------------------------------------------------------


def test_record_key_is_the_prefix_and_a_hash_tag_of_64_hex_digits():
    key = record_key("idem", "shop.charge", material(1))
    assert RECORD_KEY.match(key), key
    assert record_key("other", "shop.charge", material(1)).startswith("other:{")


def test_task_name_is_part_of_the_record_key():
    assert record_key("idem", "shop.charge", "m") != record_key("idem", "shop.refund", "m")
    assert record_key("idem", "shop.charge", "m") != record_key("idem", "shop.charge", "n")
    # No separator ambiguity between task name and material.
    assert record_key("idem", "a:b", "c") != record_key("idem", "a", "b:c")
    assert record_key("idem", "shop.charge", "m") == record_key("idem", "shop.charge", "m")


@pytest.mark.parametrize(
    "hostile",
    ["}", "{", "}{", "a}\n{b", "x" * 1_000_000, "\n".join(["{evil}"] * 1000), "é\x00☕", " "],
)
def test_any_user_key_gives_a_fixed_length_key_inside_the_prefix(hostile):
    key = record_key("idem", "shop.charge", hostile)
    assert RECORD_KEY.match(key), key
    assert len(key) == len("idem:{s00}") + 64
    # Redis Cluster hashes the text between the first "{" and the next "}": the shard,
    # one of 64, chosen by the digest.
    tag = key[key.index("{") + 1 : key.index("}")]
    assert tag == f"s{int(key[-64:-60], 16) % 64:02d}"


# -- golden value and cross-process stability ------------------------------------------

GOLDEN_ARGS = (
    {"sku": "café ☕", "qty": 3, "price": Decimal("12.50"), "tags": ("gift", "fragile")},
    [1, 1.0, True, None, -0.0, 2**70],
    b"\x00\xff",
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
)
GOLDEN_KWARGS = {
    "c": dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "logged": dt.datetime(2024, 3, 31, 1, 30, 0, 250),
    "due": dt.date(2024, 4, 1),
}
# Committed on purpose: records written by one version of celery_idem (or one
# process) must be found by the next. If this test fails, the canonical encoding
# changed, and every record already in Redis would silently stop matching its calls.
# GOLDEN_JSON is the documented encoding of the call, spelled out for the reader.
GOLDEN_JSON = (
    r'{"a":{"map":{"price":{"decimal":"125E-1"},"qty":3,"sku":"caf\u00e9 \u2615","tags":["gift","fragile"]}},'
    r'"b":[1,1.0,true,null,0.0,1180591620717411303424],"c":{"datetime":"2024-03-30T23:30:00+00:00"},'
    r'"extra":{"map":{"due":{"date":"2024-04-01"},"logged":{"datetime":"2024-03-31T01:30:00.000250"}}},'
    r'"rest":[{"bytes":"AP8="},{"uuid":"12345678-1234-5678-1234-567812345678"}]}'
)
GOLDEN_MATERIAL = "args:3a32268750aa9cc4494c0b685955924f206db9ea8c935e2b56068bd9215121db"
GOLDEN_RECORD_KEY = "idem:{s22}a7d6f265fdd18d5870ae7200f8f151db9269f8a380a7831ecb421d555ad8f333"


def golden_record_key() -> str:
    return record_key("idem", "shop.charge", material(*GOLDEN_ARGS, **GOLDEN_KWARGS))


def test_encoding_of_a_fixed_call_never_changes():
    assert GOLDEN_MATERIAL == "args:" + hashlib.sha256(GOLDEN_JSON.encode("ascii")).hexdigest()
    assert material(*GOLDEN_ARGS, **GOLDEN_KWARGS) == GOLDEN_MATERIAL
    assert golden_record_key() == GOLDEN_RECORD_KEY


def test_key_is_the_same_in_a_fresh_process_whatever_its_hash_seed():
    script = "from tests.test_keys import golden_record_key; print(golden_record_key())"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "1", "4242")
    ]
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.strip() == GOLDEN_RECORD_KEY == golden_record_key()


# -- properties -----------------------------------------------------------------------
#
# ``same`` is the equality the encoding must implement, written independently of it:
# structural and type-aware (bool, int and float are distinct kinds; list and tuple
# are one), Decimals by numeric value, aware datetimes by instant, naive ones by fields.

OFFSETS = st.integers(-1439, 1439).map(lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)))
# Years 2..9998 so that every aware value has a UTC instant in datetime's range.
EARLIEST, LATEST = dt.datetime(2, 1, 1), dt.datetime(9998, 12, 31)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.dates(),
    st.datetimes(min_value=EARLIEST, max_value=LATEST),
    st.datetimes(min_value=EARLIEST, max_value=LATEST, timezones=OFFSETS),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
    ),
    max_leaves=12,
)


def kind(value: Any) -> str:
    if value is None:
        return "none"
    for name, types in [
        ("bool", bool),
        ("int", int),
        ("float", float),
        ("str", str),
        ("bytes", (bytes, bytearray)),
        ("seq", (list, tuple)),
        ("map", dict),
        ("decimal", Decimal),
        ("uuid", uuid.UUID),
    ]:
        if isinstance(value, types):
            return name
    if isinstance(value, dt.datetime):
        return "naive" if value.utcoffset() is None else "aware"
    if isinstance(value, dt.date):
        return "date"
    raise AssertionError(f"no kind for {value!r}")


def same(x: Any, y: Any) -> bool:
    if kind(x) != kind(y):
        return False
    if kind(x) == "seq":
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if kind(x) == "map":
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if kind(x) == "aware":
        return x.replace(tzinfo=None) - x.utcoffset() == y.replace(tzinfo=None) - y.utcoffset()
    # Decimal equality is exact (no context rounding); -0.0 == 0.0 for floats.
    return x == y


class Text(str):
    pass


class Integer(int):
    pass


class Real(float):
    pass


def respellings(value: Any) -> st.SearchStrategy[Any]:
    """Values ``same`` as ``value`` but spelled differently."""
    k = kind(value)
    if k == "seq":
        items = st.tuples(*[respellings(item) for item in value])
        return items.flatmap(lambda parts: st.sampled_from([list(parts), tuple(parts)]))
    if k == "map":
        respelled = st.fixed_dictionaries({name: respellings(item) for name, item in value.items()})
        return respelled.flatmap(
            lambda d: st.permutations(list(d)).map(lambda order: {name: d[name] for name in order})
        )
    if k == "str":
        return st.sampled_from([value, Text(value)])
    if k == "int":
        return st.sampled_from([value, Integer(value)])
    if k == "float":
        return st.sampled_from([value, Real(value), -value] if value == 0 else [value, Real(value)])
    if k == "bytes":
        return st.sampled_from([value, bytearray(value)])
    if k == "decimal":
        return decimal_respellings(value)
    if k == "aware":
        return OFFSETS.map(value.astimezone)
    return st.just(value)


def decimal_respellings(value: Decimal) -> st.SearchStrategy[Decimal]:
    if not value.is_finite():
        return st.just(value)
    sign, digits, exponent = value.as_tuple()
    if value.is_zero():
        return st.builds(lambda s, e: Decimal((s, (0,), e)), st.integers(0, 1), st.integers(-40, 40))
    # Drop some trailing zeros, then add some: the same number, another exponent.
    text = "".join(map(str, digits))
    stripped = text.rstrip("0")
    removable = len(text) - len(stripped)

    def spell(drop: int, add: int) -> Decimal:
        kept = text[: len(text) - drop] + "0" * add
        return Decimal((sign, tuple(map(int, kept)), exponent + drop - add))

    return st.builds(spell, st.integers(0, removable), st.integers(0, 5))


def neighbours(value: Any) -> st.SearchStrategy[Any]:
    """Values close to ``value`` that are not ``same`` as it."""
    k = kind(value)
    near: list[Any] = []
    more: list[st.SearchStrategy[Any]] = []
    if k == "none":
        near = [False, 0, 0.0, "", b"", [], {}]
    elif k == "bool":
        near = [not value, int(value), float(value)]
    elif k == "int":
        near = [value + 1, value - 1, Decimal(value), str(value)]
        if abs(value) < 2**53:
            near.append(float(value))
        if value in (0, 1):
            near.append(bool(value))
    elif k == "float":
        near = [math.nextafter(value, 0.0 if math.isinf(value) else math.inf)]
        if value != 0:
            near.append(-value)
        if math.isfinite(value):
            near.append(Decimal(value))
            if value.is_integer():
                near.append(int(value))
    elif k == "str":
        near = [value + "a", "a" + value, value.encode()]
    elif k == "bytes":
        near = [value + b"\x00", bytes(value).decode("latin-1")]
    elif k == "decimal":
        near = [-value if value.is_infinite() else next_decimal(value)]
        if value.is_finite() and value == value.to_integral_value() and value.adjusted() < 100:
            near.append(int(value))
    elif k == "uuid":
        near = [uuid.UUID(int=(value.int + 1) % 2**128), str(value)]
    elif k == "date":
        near = [value + dt.timedelta(days=1) if value < dt.date.max else value - dt.timedelta(days=1)]
        near.append(dt.datetime(value.year, value.month, value.day))
    elif k == "naive":
        near = [value + dt.timedelta(microseconds=1), value.replace(tzinfo=UTC), value.date()]
    elif k == "aware":
        near = [value + dt.timedelta(microseconds=1), value.replace(tzinfo=None)]
    elif k == "seq":
        near = [[*value, None], {"": list(value)}]
        if value:
            near.append(list(value[:-1]))
            more.append(
                st.integers(0, len(value) - 1).flatmap(
                    lambda i: neighbours(value[i]).map(lambda item: [*value[:i], item, *value[i + 1 :]])
                )
            )
    elif k == "map":
        near = [{**value, "\x00new": None}, list(value.values())]
        if value:
            names = sorted(value)
            near.append({name: value[name] for name in names[1:]})
            renamed = names[0] + "x"
            if renamed not in value:
                near.append({renamed if name == names[0] else name: item for name, item in value.items()})
            more.append(
                st.sampled_from(names).flatmap(
                    lambda name: neighbours(value[name]).map(lambda item: {**value, name: item})
                )
            )
    return st.one_of(st.sampled_from(near), *more)


def next_decimal(value: Decimal) -> Decimal:
    """The Decimal one unit above ``value`` in its last digit, computed exactly."""
    sign, digits, exponent = value.as_tuple()
    bumped = int("".join(map(str, digits))) + 1
    return Decimal((sign, tuple(map(int, str(bumped))), exponent))


PROPERTY = settings(max_examples=200, deadline=None)


@PROPERTY
@given(
    values,
    values,
    st.lists(values, max_size=3),
    values,
    st.dictionaries(st.text(max_size=5), values, max_size=3),
)
def test_positional_and_keyword_spellings_give_one_key_for_any_values(a, b, rest, c, extra):
    extra = {name: value for name, value in extra.items() if name not in ("a", "b", "c")}
    positional = material(a, b, *rest, c=c, **extra)
    if not rest:
        assert material(a=a, b=b, c=c, **extra) == positional
        assert material(a, b=b, c=c, **extra) == positional
    if not rest and b is None:
        assert material(a, c=c, **extra) == positional
    if type(c) is int and c == 0:
        assert material(a, b, *rest, **extra) == positional


@PROPERTY
@given(st.data())
def test_respelled_values_give_one_key(data):
    value = data.draw(values, label="value")
    other = data.draw(respellings(value), label="respelled")
    assert same(value, other)
    assert key_of(value) == key_of(other)


@PROPERTY
@given(st.data())
def test_two_values_share_a_key_if_and_only_if_they_are_the_same(data):
    value = data.draw(values, label="value")
    other = data.draw(st.one_of(values, respellings(value), neighbours(value)), label="other")
    assert (key_of(value) == key_of(other)) == same(value, other)


@PROPERTY
@given(st.data())
def test_neighbouring_values_give_different_keys(data):
    value = data.draw(values, label="value")
    other = data.draw(neighbours(value), label="neighbour")
    assert not same(value, other)
    assert key_of(value) != key_of(other)


# -- IdempotentTask -------------------------------------------------------------------


def charge(order_id, amount_cents=100, *, currency="EUR"):
    return order_id


def order_key(order_id, *args, **kwargs):
    return f"order-{order_id}"


@pytest.fixture
def app():
    # Eager, with an in-memory broker: nothing here leaves the process or needs Redis.
    app = Celery("k", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.idempotency_key_prefix = "kp"
    yield app
    app.close()


def make_task(app: Celery, name: str, key: Any, function=charge, **options: Any):
    return app.task(base=IdempotentTask, shared=False, lazy=False, name=name, idempotency_key=key, **options)(
        function
    )


@pytest.fixture
def sent(monkeypatch) -> list[dict[str, Any]]:
    """What ``apply_async`` would have handed to Celery, instead of sending it."""
    calls: list[dict[str, Any]] = []

    def fake_apply_async(self, args=None, kwargs=None, task_id=None, *rest, **options):
        calls.append({"args": args, "kwargs": kwargs, "headers": options.get("headers"), "options": options})
        return "sent"

    monkeypatch.setattr(celery.Task, "apply_async", fake_apply_async)
    return calls


def test_record_key_for_is_the_strategys_material_under_the_task_name_and_prefix(app):
    task = make_task(app, "k.by_args", "args")
    strategy = strategy_for("args", inspect.signature(charge), "idempotency_key")
    expected = record_key("kp", "k.by_args", strategy.material(None, (7,), {"amount_cents": 5}))
    assert task.record_key_for((7,), {"amount_cents": 5}) == expected
    assert task.record_key_for((), {"order_id": 7, "amount_cents": 5, "currency": "EUR"}) == expected
    assert task.record_key_for([7, 5]) == expected
    assert task.record_key_for((7, 6)) != expected


def test_same_call_of_two_tasks_gives_two_record_keys(app):
    one = make_task(app, "k.one", "args")
    two = make_task(app, "k.two", "args")
    assert one.record_key_for((7,)) != two.record_key_for((7,))


def test_bound_task_keys_on_its_arguments_without_self(app):
    def bound(self, order_id, amount_cents=100):
        pass

    def unbound(order_id, amount_cents=100):
        pass

    task = make_task(app, "k.bound", "args", function=bound, bind=True)
    strategy = strategy_for("args", inspect.signature(unbound), "idempotency_key")
    assert task.record_key_for((7,)) == record_key("kp", "k.bound", strategy.material(None, (7, 100), {}))
    assert task.record_key_for((7,)) == task.record_key_for((), {"order_id": 7, "amount_cents": 100})


def test_named_and_function_keys_given_as_task_options_are_used(app):
    named = make_task(app, "k.named", ("order_id",))
    assert named.record_key_for((7, 1)) == named.record_key_for((7, 2))
    by_function = make_task(app, "k.function", order_key)
    assert by_function.record_key_for((7, 1)) == record_key("kp", "k.function", "order-7")


def test_unknown_argument_name_in_task_options_fails_when_the_task_is_declared(app):
    with pytest.raises(ImproperlyConfigured, match="'orderid'"):
        make_task(app, "k.typo", ("orderid",))


def test_apply_async_sends_the_key_material_in_a_header(app, sent):
    task = make_task(app, "k.by_args", "args")
    assert task.apply_async((7,), {"amount_cents": 5}) == "sent"
    task.apply_async((), {"order_id": 7, "amount_cents": 5})
    task.delay(7, 5)
    headers = [call["headers"][KEY_HEADER] for call in sent]
    assert len(set(headers)) == 1
    assert record_key("kp", task.name, headers[0]) == task.record_key_for((7, 5))


def test_apply_async_keeps_a_key_header_already_present(app, sent):
    task = make_task(app, "k.by_args", "args")
    task.apply_async((7,), headers={KEY_HEADER: "from-first-delivery", "other": 1})
    headers = sent[0]["headers"]
    assert (headers[KEY_HEADER], headers["other"]) == ("from-first-delivery", 1)


def test_apply_async_leaves_task_id_keys_to_the_worker(app, sent):
    task = make_task(app, "k.by_id", "task_id")
    task.apply_async((7,))
    assert KEY_HEADER not in (sent[0]["headers"] or {})


def test_per_call_key_goes_in_the_header_as_given(app, sent):
    task = make_task(app, "k.by_args", "args")
    task.apply_async((object(),), idempotency_key="x")
    assert sent[0]["headers"][KEY_HEADER] == "x"
    assert "idempotency_key" not in sent[0]["options"]


@pytest.mark.parametrize("override", ["", 7, b"x", ["x"]])
def test_per_call_key_that_is_not_a_non_empty_str_raises_before_sending(app, sent, override):
    task = make_task(app, "k.by_args", "args")
    with pytest.raises(IdempotencyKeyError, match="apply_async"):
        task.apply_async((7,), idempotency_key=override)
    assert sent == []


def test_unsupported_argument_raises_key_error_in_the_caller_before_sending(app, sent):
    task = make_task(app, "k.by_args", "args")
    with pytest.raises(IdempotencyKeyError, match="order_id"):
        task.apply_async((object(),))
    with pytest.raises(IdempotencyKeyError, match="do not match"):
        task.apply_async((7,), {"nope": 1})
    assert sent == []

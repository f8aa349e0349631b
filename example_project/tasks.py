"""The payment tasks.

``charge_order`` charges an order once per order id, ``send_receipt`` sends one
receipt per charge, ``checkout`` chains the two, and ``settle_batch`` runs longer
than its lease, which its worker renews while it runs.

Every ledger row is written through ``self.idempotency.transaction``: the row
commits in one database transaction with celery_idem's record that this key wrote
it, so a run that takes the key over after a crash (the worker died after the row
committed, before the task's result was recorded in Redis) is handed the row's id
instead of writing a second one. ``send_receipt``'s e-mail goes through
``self.idempotency.step``, which stores the provider's answer in Redis. The bodies
wait a moment before, inside and after their writes, standing in for a payment
provider's and the database's latency, so a process killed mid-task (the demo
kills many) is caught at any of those moments.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task
from celery.exceptions import Ignore

from celery_idem import IdempotentTask

from . import ledger, monitoring, settings
from .celery import app

if TYPE_CHECKING:
    from celery_idem.effects import Run

__all__ = ["charge_order", "checkout", "send_receipt", "settle_batch"]

T = TypeVar("T")

#: ``EXAMPLE_TASK_BASE=plain`` puts the same tasks on ``celery.Task``, for the demo's
#: comparison. A plain task ignores the ``idempotency_*`` options below; it gets
#: ``acks_late`` and ``reject_on_worker_lost`` from the app's settings.
Base: type[Task] = IdempotentTask if settings.TASK_BASE == "idempotent" else Task


def transaction(task: Task, fn: Callable[..., T], *args: Any) -> T:
    """``task.idempotency.transaction(fn, *args)``: ``fn(conn, *args)`` commits once per key.

    A plain ``celery.Task`` has no ``idempotency`` (nor has an idempotent task run
    unprotected while Redis is away): ``fn`` then runs in a transaction of its own
    each time the body runs, so a re-run writes again.
    """
    run: Run | None = getattr(task, "idempotency", None)
    if run is None:
        return ledger.for_this_process().write(fn, *args)
    return run.transaction(fn, *args)


def step(task: Task, fn: Callable[..., T], *args: Any) -> T:
    """``task.idempotency.step(fn, *args)``: ``fn``'s value is stored, and later runs get it back."""
    run: Run | None = getattr(task, "idempotency", None)
    if run is None:
        return fn(*args)
    return run.step(fn, *args)


def call_provider() -> None:
    """Stand-in for a call to the payment provider."""
    time.sleep(random.uniform(0.025, 0.1))


def record_charge(conn: Any, order_id: int, amount_cents: int) -> int:
    """The charge row, and the rest of the transaction's bookkeeping (10-30 ms)."""
    charge_id = ledger.record_charge(conn, order_id, amount_cents)
    monitoring.trace("in transaction", order_id)
    time.sleep(random.uniform(0.01, 0.03))
    return charge_id


@app.task(base=Base, bind=True, idempotency_key=("order_id",))
def charge_order(self: Task, order_id: int, amount_cents: int) -> dict[str, int]:
    """Charge ``order_id``: once per order id, whichever message asks for it."""
    monitoring.count(self, "executed")
    monitoring.trace("started", order_id)
    call_provider()
    charge_id = transaction(self, record_charge, order_id, amount_cents)
    monitoring.trace("charged", order_id)
    call_provider()
    monitoring.trace("returning", order_id)
    return {"charge_id": charge_id, "order_id": order_id, "amount_cents": amount_cents}


def receipt_key(charge: dict[str, int]) -> str:
    """One receipt per charge.

    The default key, the task id, would not do: two checkouts of one order carry
    different receipt task ids, and both are handed the same charge.
    """
    return f"charge-{charge['charge_id']}"


def email_receipt(charge: dict[str, int]) -> str:
    """Stand-in for the e-mail provider: send the receipt, return the provider's message id."""
    call_provider()
    return f"msg-{uuid.uuid4().hex[:16]}"


@app.task(base=Base, bind=True, idempotency_key=receipt_key)
def send_receipt(self: Task, charge: dict[str, Any]) -> dict[str, Any]:
    """E-mail the receipt of a charge, and record it."""
    monitoring.count(self, "executed")
    message_id = step(self, email_receipt, charge)
    receipt_id = transaction(self, ledger.record_receipt, charge["order_id"], charge["charge_id"], message_id)
    return {"receipt_id": receipt_id, "message_id": message_id, **charge}


def checkout(order_id: int, amount_cents: int) -> Any:
    """The checkout workflow: charge the order, then send its receipt."""
    return charge_order.s(order_id, amount_cents) | send_receipt.s()


@app.task(base=Base, bind=True, idempotency_key=("batch_id",), idempotency_lock_ttl=1)
def settle_batch(self: Task, batch_id: int, seconds: float) -> dict[str, Any]:
    """Settle a batch with the bank, which takes ``seconds``: longer than the 1 s lease.

    The worker renews the lease every third of a second while the body runs, so
    duplicates wait for this run instead of taking its key over. Should a renewal
    find the lease gone (the worker was paused past it), the body stops: the run
    that took the key over does the settlement (and the transaction would refuse
    this run's write, its fence being lower).
    """
    monitoring.count(self, "executed")
    started = time.monotonic()
    run = getattr(self, "idempotency", None)
    while time.monotonic() - started < seconds:
        if run is not None and run.lost:
            raise Ignore()
        time.sleep(0.1)
    settlement_id = transaction(self, ledger.record_settlement, batch_id)
    return {
        "settlement_id": settlement_id,
        "batch_id": batch_id,
        "seconds": round(time.monotonic() - started, 2),
    }

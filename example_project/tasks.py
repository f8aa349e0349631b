"""The payment tasks.

``charge_order`` charges an order once per order id, ``send_receipt`` sends one
receipt per charge, ``checkout`` chains the two, and ``settle_batch`` runs longer
than its lease, which its worker renews while it runs.

Every body writes to the ledger under its run's fencing token
(``self.idempotency.token``), so the ledger can refuse a run whose lease was taken
over (see :mod:`example_project.ledger`). The bodies wait a moment before and after
their write, standing in for a payment provider's latency: a worker killed during a
storm is caught mid-task, sometimes after the write and before the result was
recorded.
"""

from __future__ import annotations

import random
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from celery_idem import IdempotentTask

from . import ledger, monitoring, settings
from .celery import app

__all__ = ["charge_order", "checkout", "send_receipt", "settle_batch"]

#: ``EXAMPLE_TASK_BASE=plain`` puts the same tasks on ``celery.Task``, for the demo's
#: comparison. A plain task ignores the ``idempotency_*`` options below; it gets
#: ``acks_late`` and ``reject_on_worker_lost`` from the app's settings.
Base: type[Task] = IdempotentTask if settings.TASK_BASE == "idempotent" else Task


def fence(task: Task) -> int | None:
    """The fencing token of the run, None when it is not protected (a plain task)."""
    lease = getattr(task, "idempotency", None)
    return lease.token if lease is not None else None


def call_provider() -> None:
    """Stand-in for a call to the payment provider."""
    time.sleep(random.uniform(0.025, 0.1))


@app.task(base=Base, bind=True, idempotency_key=("order_id",))
def charge_order(self: Task, order_id: int, amount_cents: int) -> dict[str, int]:
    """Charge ``order_id``: once per order id, whichever message asks for it."""
    monitoring.count(self, "executed")
    call_provider()
    charge_id = ledger.for_this_process().record_charge(order_id, amount_cents, fence(self), self.request.id)
    call_provider()
    return {"charge_id": charge_id, "order_id": order_id, "amount_cents": amount_cents}


def receipt_key(charge: dict[str, int]) -> str:
    """One receipt per charge.

    The default key, the task id, would not do: two checkouts of one order carry
    different receipt task ids, and both are handed the same charge.
    """
    return f"charge-{charge['charge_id']}"


@app.task(base=Base, bind=True, idempotency_key=receipt_key)
def send_receipt(self: Task, charge: dict[str, int]) -> dict[str, int]:
    """Send (here: record) the receipt of a charge."""
    monitoring.count(self, "executed")
    call_provider()
    receipt_id = ledger.for_this_process().record_receipt(
        charge["order_id"], charge["charge_id"], fence(self), self.request.id
    )
    return {"receipt_id": receipt_id, **charge}


def checkout(order_id: int, amount_cents: int) -> Any:
    """The checkout workflow: charge the order, then send its receipt."""
    return charge_order.s(order_id, amount_cents) | send_receipt.s()


@app.task(base=Base, bind=True, idempotency_key=("batch_id",), idempotency_lock_ttl=1)
def settle_batch(self: Task, batch_id: int, seconds: float) -> dict[str, Any]:
    """Settle a batch with the bank, which takes ``seconds``: longer than the 1 s lease.

    The worker renews the lease every third of a second while the body runs, so
    duplicates wait for this run instead of taking its key over. Should a renewal
    find the lease gone (the worker was paused past it), the body stops: the run
    that took the key over does the settlement.
    """
    monitoring.count(self, "executed")
    started = time.monotonic()
    lease = getattr(self, "idempotency", None)
    while time.monotonic() - started < seconds:
        if lease is not None and lease.lost:
            raise Ignore()
        time.sleep(0.1)
    settlement_id = ledger.for_this_process().record_settlement(batch_id, fence(self), self.request.id)
    return {
        "settlement_id": settlement_id,
        "batch_id": batch_id,
        "seconds": round(time.monotonic() - started, 2),
    }

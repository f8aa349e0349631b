"""A small payments app on Celery whose tasks are idempotent with celery_idem.

``tasks.py`` charges orders (``charge_order``, one charge per order id), sends a
receipt per charge (``send_receipt``), chains both as ``checkout`` and settles
batches in a long task (``settle_batch``). The ledger rows (``ledger.py``, SQLite
or PostgreSQL) are written through ``self.idempotency.transaction``, in one
database transaction with celery_idem's record of them, so a run that takes over
from a killed one does not write them again; the receipt's e-mail is a
``self.idempotency.step``.

Run a worker from the repository root (Redis on localhost by default)::

    celery -A example_project worker -l INFO

and send work from a shell in the repository root::

    python -c "from example_project.tasks import checkout; print(checkout(1, 500).delay().get())"

Sending the same order again returns the first charge's receipt: the body does not
run twice. Settings come from the environment (see ``settings.py``):

* ``BROKER_URL``: the broker (default ``redis://localhost:6379/0``);
* ``REDIS_URL``: idempotency records, results and counters (default ``BROKER_URL``
  if it is a Redis URL, else ``redis://localhost:6379/0``);
* ``LEDGER_URL``: ``sqlite:///path`` (default ``example_project/ledger.sqlite3``,
  through SQLAlchemy) or ``postgresql://user:password@host/db`` (through psycopg 3;
  ``pip install 'celery-idem[demo]'`` installs both);
* ``EXAMPLE_TASK_BASE=plain``: run the same tasks on ``celery.Task``, to compare;
* ``EXAMPLE_QUEUE``: the queue to send to and consume (default ``celery``).

``python -m example_project.demo`` (``make demo``) runs a duplicate storm against
two workers and prints what ran, what was served from cache and what the ledger
holds.
"""

from __future__ import annotations

from .celery import app

__all__ = ["app"]

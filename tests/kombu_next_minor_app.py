"""``tests.worker_app`` in a worker that sees kombu 5.8.0, a minor version past ``TESTED_KOMBU``.

Every kombu that installs beside a supported celery (5.3.6 or newer) is a minor
version the transport was tested with, so the one way a worker meets an untested
kombu is a kombu released after this package: the next minor. This module makes
the worker see one by setting ``kombu.__version__`` before ``celery_idem.broker`` is
imported (the worker imports it lazily, when ``worker_init`` checks the version);
everything else is the installed kombu, whose own fetch the worker then keeps.
"""

from __future__ import annotations

import kombu

NEXT_MINOR = "5.8.0"
kombu.__version__ = NEXT_MINOR

from tests.worker_app import app  # noqa: E402

__all__ = ["NEXT_MINOR", "app"]

"""The same drain workload with other Celery deduplication plugins, for comparison.

They are not dependencies of celery_idem: ``pip install -r
benchmarks/peers/requirements.txt`` installs them; nothing here installs anything.
"""

from __future__ import annotations

import importlib.util

__all__ = ["REQUIREMENTS", "missing"]

REQUIREMENTS = "benchmarks/peers/requirements.txt"


def missing() -> list[str]:
    """Import names of the peer packages that are not installed."""
    return [name for name in ("celery_once", "celery_singleton") if importlib.util.find_spec(name) is None]

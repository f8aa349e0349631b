"""Benchmarks of celery_idem: worker throughput, Redis cost, lease renewal, duplicates.

Run them with ``python -m benchmarks.run`` (``make bench``); docs/benchmarks.md says
how they measure and how to read the numbers.
"""

"""The duplicate-storm demo: ``python -m example_project.demo`` (``make demo``).

``cli`` starts Redis and runs one storm per task base in a process of its own
(``storm``), which starts two workers (``workers``), sends the scenarios with a
progress bar (``progress``), kills tasks mid-body (``killer``) and workers, and
counts the outcome; ``report`` prints the tables.
Run ``python -m example_project.demo --help`` for the options.
"""

"""A Django project for the tests of ``celery_idem.contrib.django``.

Only processes of its own load it (``runner.py``, ``manage.py``, a worker running
``celery_app.py``): Django is never set up in the pytest process, so nothing of it
reaches the rest of the suite. ``settings.py`` reads the databases from the
environment: ``IDEM_DJANGO_SCHEMA`` (required), ``IDEM_DJANGO_OTHER_SCHEMA`` (a
second alias, ``other``), ``IDEM_DJANGO_PORT``; Celery's settings come from
``IDEM_TEST_CONF``, as for ``tests.worker_app``.
"""

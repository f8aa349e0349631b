"""Integrations with other libraries, each imported only by the apps that use it.

* :mod:`celery_idem.contrib.postgres`: ``self.idempotency.transaction`` on PostgreSQL
  through psycopg 3 (``idempotency_database_url``);
* :mod:`celery_idem.contrib.sqlalchemy`: through a SQLAlchemy ``Engine``
  (``idempotency_database = engine``);
* :mod:`celery_idem.contrib.django`: through Django's ORM, with a migration for the
  step table (``idempotency_database = "django"``).
"""

"""``manage.py celery_idem_purge_steps``."""

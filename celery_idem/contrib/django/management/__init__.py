"""Django management commands of celery_idem."""

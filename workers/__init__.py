"""Celery side of the sidecar: ``celery -A workers worker`` / ``beat`` / ``flower``."""

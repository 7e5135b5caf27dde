"""Celery side of the sidecar: ``celery -A workers worker`` / ``beat`` / ``flower``."""

from workers.application import app

__all__ = ["app"]

"""The SLIP queue worker: ``celery -A worker worker -Q gpu,cpu`` (see :mod:`worker.app`)."""

from worker.app import app, create_app
from worker.settings import Settings

__all__ = ["Settings", "app", "create_app"]

"""The SLIP queue worker: ``celery -A worker worker -Q gpu,cpu`` (the app is built in :mod:`worker.celery`).

Importing this package builds nothing and reads no environment; :func:`worker.app.create_app` makes an
app from :class:`worker.settings.Settings`.
"""

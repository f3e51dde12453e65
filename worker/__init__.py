"""The SLIP queue worker: ``celery -A worker worker -Q gpu,cpu`` (the app is built in :mod:`worker.celery`).

The task code: one chunk of any job kind (:mod:`worker.tasks`), the failure policy, the segment and training
units, the per-process resources. The job model they share with the producer lives in :mod:`jobs`.
Importing this package builds nothing and reads no environment; :func:`worker.app.create_app` makes an
app from :class:`jobs.settings.Settings`.
"""

"""The shared job model of SLIP queue, imported by the workers (``worker/``) and the producer (``producer/``).

A job of any kind (segment, train, evaluate, train-sam) is a manifest, its unit pages and one completion
record per chunk in the object store (:mod:`jobs.ledger`), three Redis keys (:mod:`jobs.board`), and task
messages ``(job, chunk, attempt)`` on Celery (:mod:`jobs.broker`); each worker's reaper
(:mod:`jobs.reaper`) mends what Celery's redelivery does not. Status and the read side: :mod:`jobs.status`,
:mod:`jobs.view`. See docs/ARCHITECTURE.md. Importing this package builds nothing and reads no environment.
"""

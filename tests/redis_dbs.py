"""Which db of the shared Redis (127.0.0.1:6379) each test module uses: one table, so that no two modules share
a db and a stray worker (a crashed run's, or one left from a walkthrough) breaks one module at most.

db 0, the product's default URL, is left to people working by hand on this machine; tests that need a server
of their own start one on a free port (``bench.servers.private_redis``) and use its db 0. A module that starts
workers on its db flushes it before and after.
"""

from __future__ import annotations

SESSION = 15  # tests/queue: the session worker (fixture ``worker``), shared by the modules that use it
FAILURE_POLICY = 14  # tests/queue/test_queue_failure_policy.py (the filter and generator defaults modules only
#                      need a broker URL for their settings and use this one too: they start no worker)
REAPER = 13  # tests/queue/test_reaper.py
TRAINING = 12  # tests/train/test_queue_training.py
FLOWER = 11  # tests/queue/test_flower.py
WORKER_START = 10  # tests/queue/test_worker_start.py
TRAIN_SAM = 9  # tests/train/test_queue_train_sam.py
EXPORTS = 8  # tests/exports/test_queue_exports.py
DEMO = 7  # tests/queue/test_queue_demo.py: the demo's own worker
S3_QUEUE = 6  # tests/queue/test_store_s3.py: the queue on an S3 store
PRIORITY = 5  # tests/queue/test_broker_priority.py: nothing listens, the messages stay where they were sent
BAD_MODELS = 4  # tests/queue/test_queue_demo.py: workers that must never start serving
REVIEW = 3  # tests/review/test_review_queue.py (slow)

ALL = {name: db for name, db in globals().items() if name.isupper() and isinstance(db, int)}

"""A chunk sent again (its worker died, its message vanished) is served before every first send: through the
real Celery app, kombu's Redis transport and kombu's public consumer API (the order a worker is served in),
with nothing read from kombu's own keys. The queue depth comes from kombu's public API too."""

from __future__ import annotations

from queue_helpers import flush, redis_url

from jobs.broker import MODEL_QUEUE, celery_app, queue_depths, sender, task_id
from jobs.settings import Settings
import redis_dbs

PRIORITY_DB = redis_dbs.PRIORITY  # nothing listens here: the messages stay where the sender put them


def test_a_chunk_sent_again_is_served_before_first_sends(tmp_path):
    flush(PRIORITY_DB)
    app = celery_app(Settings(broker_url=redis_url(PRIORITY_DB), store=str(tmp_path / "store")))
    job = "20991231-000000-abcdef"
    try:
        assert queue_depths(app) == {"gpu": 0, "cpu": 0}  # a queue never used counts 0
        send = sender(app)
        for chunk in range(3):
            send("segment", job, chunk, 0, again=False)
        send("segment", job, 7, 1, again=True)
        assert queue_depths(app)["gpu"] == 4
        served = []
        with app.connection_for_read() as connection, connection.SimpleQueue(MODEL_QUEUE) as queue:
            while True:
                try:
                    message = queue.get(block=True, timeout=1)
                except queue.Empty:
                    break
                served.append((message.headers["id"], message.decode()[1]))
                message.ack()
        assert [s[0] for s in served] == [task_id(job, 7, 1)] + [task_id(job, c, 0) for c in range(3)]
        assert served[0][1] == {"job": job, "chunk": 7, "attempt": 1}  # the message names the chunk, not its items
        assert queue_depths(app)["gpu"] == 0
    finally:
        app.close()
        flush(PRIORITY_DB)

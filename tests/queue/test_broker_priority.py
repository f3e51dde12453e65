"""A chunk sent again (its worker died, its message vanished) is served before every first send: through the
real Celery app and kombu's Redis transport, the worker's pop order over the lists ``worker.broker`` names
takes it first, and ``holdings`` sees messages at every priority."""

from __future__ import annotations

import json

import redis

from queue_helpers import REDIS_HOST, REDIS_PORT, flush, redis_url
from worker.app import create_app
from worker.broker import MODEL_QUEUE, holdings, queue_lists
from worker.feeder import publisher
from worker.jobs import Item, SegmentParams, SegmentRequest, SegmentSpec
from worker.settings import Settings

PRIORITY_DB = 5  # nothing listens here: the messages stay where the publisher put them


def _request(chunk: int) -> SegmentRequest:
    spec = SegmentSpec(prompts=("a cat",), sam="tiny-random", clip="tiny-random", params=SegmentParams())
    item = Item(index=chunk, image_key=f"inputs/{'a' * 64}.png", image_sha="a" * 64, name="a.png")
    return SegmentRequest(job_id="20991231-000000-abcdef", chunk=chunk, items=(item,), spec=spec)


def test_a_chunk_sent_again_is_served_before_first_sends(tmp_path):
    flush(PRIORITY_DB)
    app = create_app(Settings(broker_url=redis_url(PRIORITY_DB), store=str(tmp_path / "store")))
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=PRIORITY_DB)
    try:
        publish = publisher(app)
        for chunk in range(3):
            publish(_request(chunk), f"first-{chunk}", False)
        publish(_request(7), "again-7", True)
        held = holdings(client, (MODEL_QUEUE,))
        assert held.queued == {"first-0", "first-1", "first-2", "again-7"}
        served = []
        while (popped := client.brpop(list(queue_lists(MODEL_QUEUE)), timeout=1)) is not None:
            served.append(json.loads(popped[1])["headers"]["id"])  # BRPOP over the lists: a worker's order
        assert served == ["again-7", "first-0", "first-1", "first-2"]
    finally:
        client.close()
        app.close()
        flush(PRIORITY_DB)

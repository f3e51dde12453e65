"""Object store, settings, payloads and the proposals cache format (no worker needed)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from jobs.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from jobs.settings import Settings
from jobs.store import TEMP_DIR, Store, content_type, input_key, sync_filesystem, validate_key
from slip.errors import ConfigError, InputError, PromptError
from slip.types import FilterStat, MaskSet, Proposals

from queue_helpers import make_images


@pytest.mark.parametrize(
    "key",
    ["../x", "a/../b", "a/..", "/etc/passwd", "C:/x", "a\\b", "..\\x", "a//b", "a/", "", ".hidden", "a/./b",
     "a/.tmp-1-x", "sp ace", "caf\u00e9", "a/b\x00"],
)
def test_bad_keys_are_rejected(tmp_path, key):
    with pytest.raises(InvalidKeyError):
        validate_key(key)
    store = Store(str(tmp_path))
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get_bytes(key)
    assert store.list() == []


def test_round_trip_and_listing(tmp_path):
    store = Store(str(tmp_path / "root"))
    store.put_bytes("a/b/c.bin", b"\x00\x01")
    store.put_json("a/d.json", {"k": [1, 2]})
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01"
    assert store.get_json("a/d.json") == {"k": [1, 2]}
    assert store.exists("a/d.json") and not store.exists("a/missing")
    (tmp_path / "root" / "a" / ".tmp-dead-x").write_bytes(b"half")  # a crashed writer's leftover
    assert store.list("a") == ["a/b/c.bin", "a/d.json"]
    assert store.list() == ["a/b/c.bin", "a/d.json"]
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("a/missing")
    store.delete("a/d.json")
    assert not store.exists("a/d.json")


def test_overwrite_is_atomic_replace(tmp_path):
    store = Store(str(tmp_path))
    store.put_bytes("k/v.txt", b"old")
    inode = os.stat(tmp_path / "k" / "v.txt").st_ino
    store.put_bytes("k/v.txt", b"new")
    assert store.get_bytes("k/v.txt") == b"new"
    assert os.stat(tmp_path / "k" / "v.txt").st_ino != inode, "a new file was renamed over the old one"
    assert sorted(os.listdir(tmp_path / "k")) == ["v.txt"]


def test_failed_write_leaves_no_temp_file(tmp_path):
    store = Store(str(tmp_path))
    store.put_bytes("d/inner/file.bin", b"x")  # makes d/inner a directory
    with pytest.raises(StoreError):
        store.put_bytes("d/inner", b"cannot replace a directory")  # the rename fails
    assert sorted(os.listdir(tmp_path / "d")) == ["inner"]
    assert store.get_bytes("d/inner/file.bin") == b"x"
    with pytest.raises(TypeError):
        store.put_bytes("d/text.bin", "not bytes")  # the write itself fails
    assert sorted(os.listdir(tmp_path / "d")) == ["inner"]


def test_semantic_errors_fail_at_once_as_one_line_store_errors(tmp_path):
    store = Store(str(tmp_path), retries=8, backoff_s=1.0, max_backoff_s=8.0)  # a retry would take >= 0.8 s
    store.put_bytes("d/inner/file.bin", b"x")
    started = time.monotonic()
    for call in (lambda: store.put_bytes("d/inner", b"y"), lambda: store.get_bytes("d/inner")):
        with pytest.raises(StoreError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and "'d/inner'" in message and "not retried" in message, message
    assert time.monotonic() - started < 0.5
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("d/inner/file.bin/below")  # a file as a folder: simply not there
    assert not store.exists("d/inner/file.bin/below") and not store.exists("d/inner"), "a folder is not an object"


def test_put_many_renames_in_order_with_the_last_key_last(tmp_path):
    store = Store(str(tmp_path))
    files = {"r/mask_0.png": b"m0", "r/overlay_0.png": b"o0", "r/segments.json": b"{}"}
    assert store.put_many(files) == list(files)
    assert {k: store.get_bytes(k) for k in files} == files
    changed = {k: os.stat(tmp_path / k).st_ctime_ns for k in files}  # a rename sets the ctime
    assert max(changed, key=changed.get) == "r/segments.json"
    assert os.listdir(tmp_path / TEMP_DIR) == [] and store.list() == sorted(files)
    # a rename that fails (a folder in the way) stops the batch before the commit marker
    store.put_bytes("q/taken/x.bin", b"x")
    with pytest.raises(StoreError, match="q/segments.json"):
        store.put_many({"q/a.png": b"a", "q/taken": b"b", "q/segments.json": b"{}"})
    assert not store.exists("q/segments.json") and os.listdir(tmp_path / TEMP_DIR) == []
    with pytest.raises(InvalidKeyError):
        store.put_many({"z/a.png": b"a", "z/../b": b"b"})
    assert not store.exists("z/a.png"), "keys are validated before anything is written"
    sync_filesystem(str(tmp_path))  # the barrier itself works here


def test_temporaries_live_in_one_hidden_folder_and_stale_ones_are_swept(tmp_path):
    store = Store(str(tmp_path))
    store.put_bytes("a/b.bin", b"x")
    temp = tmp_path / TEMP_DIR
    stale, fresh = temp / ".tmp-dead", temp / ".tmp-live"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert store.list() == ["a/b.bin"]
    assert store.sweep_temporaries(600) == 1  # a writer elsewhere: gone once older than the limit
    assert sorted(p.name for p in temp.iterdir()) == [".tmp-live"]
    assert Store(str(tmp_path / "fresh")).sweep_temporaries(0) == 0
    # a writer of this host that is gone: swept at once, whatever its age (test_reaper.py: the reaper does it)


def test_content_types_and_options():
    assert [content_type(k) for k in ("a.json", "b.png", "c.jpg", "d.safetensors", "e")] == [
        "application/json", "image/png", "image/jpeg", "application/octet-stream", "application/octet-stream"]
    for bad in ({"retries": -1}, {"backoff_s": -1.0}, {"backoff_s": 2.0, "max_backoff_s": 1.0}):
        with pytest.raises(ConfigError, match="backoff_s"):
            Store("memory://slip-opts/x", **bad)
    assert Store("memory://slip-opts/x", retries=2, backoff_s=1.0, max_backoff_s=1.5).retry_budget_s == 2.5


def test_fsspec_urls_slot_in():
    store = Store("memory://slip-test-bucket/prefix")
    store.put_json("jobs/j1/manifest.json", {"ok": True})
    assert store.get_json("jobs/j1/manifest.json") == {"ok": True}
    assert store.list("jobs") == ["jobs/j1/manifest.json"]
    assert store.put_many({"r/m.png": b"1", "r/segments.json": b"{}"}) == ["r/m.png", "r/segments.json"]
    assert store.exists("r/segments.json") and store.sweep_temporaries(0) == 0
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("r/missing.json")


def test_inputs_are_content_addressed_and_deduplicated(tmp_path):
    from producer.client import QueueClient

    images = make_images(tmp_path / "imgs", 2)
    copy = tmp_path / "imgs" / "copy_of_0.png"
    copy.write_bytes(images[0].read_bytes())
    client = QueueClient(Settings.from_env({"SLIP_STORE": str(tmp_path / "store")}))
    items = client.upload([images[0], copy, images[1]])
    assert items[0].image_key == items[1].image_key != items[2].image_key
    assert items[0].image_key == input_key(items[0].image_sha, "png")
    assert len(client.store.list("inputs")) == 2
    again = client.upload([images[1]])
    assert again[0].image_key == items[2].image_key and len(client.store.list("inputs")) == 2


def test_expand_paths(tmp_path):
    from slip.inputs import expand_paths

    make_images(tmp_path / "d" / "sub", 2)
    (tmp_path / "d" / "notes.txt").write_text("ignored in directories")
    single = make_images(tmp_path / "e", 1, prefix="one")
    found = expand_paths([tmp_path / "d", str(tmp_path / "e" / "*.png"), single[0]])
    assert [p.name for p in found] == ["img_000.png", "img_001.png", "one_000.png"]
    with pytest.raises(InputError, match="no such file"):
        expand_paths([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="no images"):
        expand_paths([str(tmp_path / "nothing*.png")])


def test_settings_from_env():
    from jobs.settings import PRODUCER_MODELS

    s = Settings.from_env({})
    assert s.broker_url == s.result_backend == "redis://127.0.0.1:6379/0" and s.store == "./slip-store"
    assert (s.models.sam, s.models.clip, s.models.device) == ("vit_b", "openai/clip-vit-base-patch32", "auto")
    assert (s.dead_after_s, s.heartbeat_s, s.lost_after_s, s.max_attempts) == (10.0, 10.0 / 6, 30.0, 3)
    s = Settings.from_env({"SLIP_BROKER_URL": "redis://h:1/2", "SLIP_MAX_ATTEMPTS": "5", "SLIP_DEVICE": "cuda:1"})
    assert s.result_backend == "redis://h:1/2" and s.max_attempts == 5 and s.models.device == "cuda:1"
    for env in ({"SLIP_MAX_ATTEMPTS": "zero"}, {"SLIP_MAX_ATTEMPTS": "0"}, {"SLIP_DEVICE": "gpu0"},
                {"SLIP_DTYPE": "fp8"}, {"SLIP_BROKER_URL": "amqp://x"},
                {"SLIP_TASK_TIME_LIMIT": "100", "SLIP_VISIBILITY_TIMEOUT": "100"}):
        with pytest.raises(ConfigError, match=next(iter(env)) if len(env) == 1 else "VISIBILITY"):
            Settings.from_env(env)
    # a producer reads the models a job names, not the device it never uses
    s = Settings.from_env({"SLIP_DEVICE": "gpu0", "SLIP_SAM": "synth"}, models=PRODUCER_MODELS)
    assert s.models.sam == "synth" and s.models.device == "auto"


def test_celery_app_configuration():
    from worker.app import create_app

    conf = create_app(Settings.from_env({"SLIP_TASK_TIME_LIMIT": "60", "SLIP_VISIBILITY_TIMEOUT": "90"}),
                      worker=True).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1, "one model copy per GPU unless asked"
    assert conf.broker_transport_options["visibility_timeout"] == 90 > conf.task_time_limit == 60
    assert conf.task_soft_time_limit < conf.task_time_limit and conf.result_expires
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert {q.name for q in conf.task_queues} == {"gpu", "cpu"}
    assert conf.task_routes["slip.segment"]["queue"] == "gpu" and conf.task_routes["slip.health"]["queue"] == "cpu"
    assert all(conf.task_routes[f"slip.{name}"]["queue"] == "gpu" for name in ("train", "evaluate", "train_sam"))


def test_request_keys_are_deterministic():
    """Result keys come from the resolved request (the worker's weights), never from the spec strings."""
    from jobs.model import Item
    from jobs.segment import SegmentSpec
    from slip.options import SegmentOptions
    from slip.request import ModelRef, resolve
    from worker.processing import result_key

    item = Item(index=0, image_key="inputs/" + "a" * 64 + ".png", image_sha="a" * 64)
    spec = SegmentSpec(prompts=[" a cat "], sam="vit_b", clip="c")
    assert spec.prompts == ("a cat",)
    sam, clip = ModelRef("vit_b", "vit_b", "1" * 64), ModelRef("c", "hf-clip", "2" * 64)

    def key(spec: SegmentSpec, sam: ModelRef = sam, clip: ModelRef = clip) -> str:
        request = resolve(spec.options, sam=sam, sam_generator={}, sam_filters=None, ranker=clip,
                          ranker_threshold=None)
        return result_key(item, request, spec)

    same = SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", options=SegmentOptions(top_k=5, points_per_side=None))
    explicit = SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", options=SegmentOptions(points_per_side=32))
    assert key(spec) == key(same) == key(explicit), "the same effective request, however it was given"
    assert key(spec).startswith(f"results/{'a' * 64}/") and len(key(spec).rsplit("/", 1)[1]) == 64
    others = [key(SegmentSpec(prompts=["a dog"], sam="vit_b", clip="c")),
              key(spec, sam=ModelRef("vit_b", "vit_b", "3" * 64)),  # other SAM weights
              key(spec, clip=ModelRef("c", "hf-clip", "4" * 64)),  # other ranker weights
              key(SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", options=SegmentOptions(top_k=3))),
              key(SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", options=SegmentOptions(points_per_side=16)))]
    assert len({key(spec), *others}) == 6
    for bad in ([], [""], ["   "], ["x" * 301]):
        with pytest.raises(PromptError):
            SegmentSpec(prompts=bad, sam="vit_b", clip="c")
    with pytest.raises(InvalidKeyError):
        Item(index=0, image_key="inputs/../../etc/passwd", image_sha="a" * 64)


def test_proposals_record_round_trip(tmp_path):
    """The proposals cache (worker.proposals): segment records and embeddings written and read back."""
    from slip.request import ModelRef, SegmentOptions, resolve
    from worker.proposals import (
        CachedProposals,
        embeddings_key,
        load_embeddings,
        load_proposals,
        proposals_key,
        save_embeddings,
        save_proposals,
    )

    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros((3, 20, 30), dtype=torch.bool)
    masks[0, :, :] = True
    masks[1, 2:5, 1:4] = True
    masks[2] = torch.rand((20, 30), generator=gen) > 0.5
    ys, xs = [m.nonzero()[:, 0] for m in masks], [m.nonzero()[:, 1] for m in masks]
    segments = MaskSet(
        masks=masks,
        boxes=torch.tensor([[x.min(), y.min(), x.max(), y.max()] for x, y in zip(xs, ys)], dtype=torch.float32),
        predicted_iou=torch.rand(3, generator=gen),
        stability_score=torch.rand(3, generator=gen),
        point_coords=torch.rand((3, 2), generator=gen) * 20,
        crop_boxes=torch.tensor([[0, 0, 30, 20]] * 3, dtype=torch.float32),
    )
    proposals = Proposals(segments=segments, filter_stats=(FilterStat("containment", {"threshold": 0.8}, 5, 2),), generated=5)
    request = resolve(SegmentOptions(), sam=ModelRef("s", "vit_b", "1" * 64), sam_generator={}, sam_filters=None,
                      ranker=ModelRef("c", "hf-clip", "2" * 64), ranker_threshold=None)
    store = Store(str(tmp_path))
    key = proposals_key("a" * 64, request)
    assert key == f"proposals/{'a' * 64}/{request.proposal_digest()}/segments.json"
    assert load_proposals(store, key) is None
    save_proposals(store, key, CachedProposals.of(proposals), request)
    back = load_proposals(store, key)
    assert store.get_json(key)["identity"] == request.proposal_identity()
    assert back.generated == 5 and back.image_size == (20, 30)
    assert back.filters == [{"name": "containment", "params": {"threshold": 0.8}, "before": 5, "removed": 2}]
    decoded = back.masks()
    for name in ("masks", "boxes", "predicted_iou", "stability_score", "point_coords", "crop_boxes"):
        assert torch.equal(getattr(decoded, name), getattr(segments, name)), name
    embeddings = torch.nn.functional.normalize(torch.rand((3, 8), generator=gen), dim=1)
    ekey = embeddings_key("a" * 64, request)
    assert ekey.startswith(key.rsplit("/", 1)[0] + "/embeddings/") and request.embedding_digest() in ekey
    assert load_embeddings(store, ekey, torch.device("cpu")) is None
    save_embeddings(store, ekey, embeddings)
    assert torch.equal(load_embeddings(store, ekey, torch.device("cpu")), embeddings)
    # an older format is recomputed, a malformed entry is a one-line store error
    store.put_json(key, {**store.get_json(key), "format_version": 1})
    assert load_proposals(store, key) is None
    store.put_json(key, {"format_version": 2, "image_size": {"height": 4}})
    with pytest.raises(StoreError, match="malformed"):
        load_proposals(store, key)
    store.put_bytes(ekey, b"not safetensors")
    with pytest.raises(StoreError, match="malformed"):
        load_embeddings(store, ekey, torch.device("cpu"))
    empty = CachedProposals.of(Proposals(segments=MaskSet.empty(4, 5), filter_stats=(), generated=0))
    save_proposals(store, key, empty, request)
    assert load_proposals(store, key).masks().image_size == (4, 5) and load_proposals(store, key).segments == []

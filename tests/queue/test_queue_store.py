"""Object store, settings, payloads and the proposals cache format (no worker needed)."""

from __future__ import annotations

import os

import pytest
import torch

from slip.errors import ConfigError, InputError, InvalidKeyError, ObjectNotFoundError, PromptError, StoreError
from slip.types import FilterStat, MaskSet, Proposals
from worker.jobs import Item, SegmentParams, SegmentSpec
from worker.proposals import proposals_from_record, proposals_record
from worker.settings import Settings
from worker.store import Store, input_key, validate_key

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


def test_fsspec_urls_slot_in():
    store = Store("memory://slip-test-bucket/prefix")
    store.put_json("jobs/j1/manifest.json", {"ok": True})
    assert store.get_json("jobs/j1/manifest.json") == {"ok": True}
    assert store.list("jobs") == ["jobs/j1/manifest.json"]


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
    from producer.client import expand_paths

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
    s = Settings.from_env({})
    assert s.broker_url == s.result_backend == "redis://127.0.0.1:6379/0" and s.store == "./slip-store"
    assert (s.sam, s.clip, s.device) == ("vit_b", "openai/clip-vit-base-patch32", "auto")
    s = Settings.from_env({"SLIP_BROKER_URL": "redis://h:1/2", "SLIP_MAX_DELIVERIES": "5", "SLIP_DEVICE": "cuda:1"})
    assert s.result_backend == "redis://h:1/2" and s.max_deliveries == 5 and s.device == "cuda:1"
    for env in ({"SLIP_MAX_DELIVERIES": "zero"}, {"SLIP_MAX_DELIVERIES": "0"}, {"SLIP_DEVICE": "gpu0"},
                {"SLIP_DTYPE": "fp8"}, {"SLIP_BROKER_URL": "amqp://x"},
                {"SLIP_TASK_TIME_LIMIT": "100", "SLIP_VISIBILITY_TIMEOUT": "100"}):
        with pytest.raises(ConfigError, match=next(iter(env)) if len(env) == 1 else "VISIBILITY"):
            Settings.from_env(env)


def test_celery_app_configuration():
    from worker.app import create_app

    conf = create_app(Settings.from_env({"SLIP_TASK_TIME_LIMIT": "60", "SLIP_VISIBILITY_TIMEOUT": "90"})).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1, "one model copy per GPU unless asked"
    assert conf.broker_transport_options["visibility_timeout"] == 90 > conf.task_time_limit == 60
    assert conf.task_soft_time_limit < conf.task_time_limit and conf.result_expires
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert {q.name for q in conf.task_queues} == {"gpu", "cpu"}
    assert conf.task_routes["slip.segment"]["queue"] == "gpu" and conf.task_routes["slip.health"]["queue"] == "cpu"


def test_request_keys_are_deterministic():
    item = Item(index=0, image_key="inputs/" + "a" * 64 + ".png", image_sha="a" * 64)
    spec = SegmentSpec(prompts=[" a cat "], sam="vit_b", clip="c")
    assert spec.prompts == ("a cat",)
    same = SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", params=SegmentParams(top_k=5, points_per_side=None))
    assert spec.result_key(item) == same.result_key(item) == f"results/{'a' * 64}/{spec.request_digest()}"
    others = [SegmentSpec(prompts=["a dog"], sam="vit_b", clip="c"), SegmentSpec(prompts=["a cat"], sam="vit_l", clip="c"),
              SegmentSpec(prompts=["a cat"], sam="vit_b", clip="d"),
              SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", params=SegmentParams(top_k=3)),
              SegmentSpec(prompts=["a cat"], sam="vit_b", clip="c", params=SegmentParams(points_per_side=32))]
    assert len({spec.request_digest(), *(o.request_digest() for o in others)}) == 6
    for bad in ([], [""], ["   "], ["x" * 301]):
        with pytest.raises(PromptError):
            SegmentSpec(prompts=bad, sam="vit_b", clip="c")
    with pytest.raises(InvalidKeyError):
        Item(index=0, image_key="inputs/../../etc/passwd", image_sha="a" * 64)


def test_proposals_record_round_trip():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand((3, 20, 30), generator=gen) > 0.5
    segments = MaskSet(
        masks=masks,
        boxes=torch.tensor([[0, 0, 29, 19], [1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float32),
        predicted_iou=torch.rand(3, generator=gen),
        stability_score=torch.rand(3, generator=gen),
        point_coords=torch.rand((3, 2), generator=gen) * 20,
        crop_boxes=torch.tensor([[0, 0, 30, 20]] * 3, dtype=torch.float32),
    )
    proposals = Proposals(segments=segments, filter_stats=(FilterStat("containment", {"threshold": 0.8}, 5, 2),), generated=5)
    back = proposals_from_record(proposals_record(proposals, {"sam": "x"}))
    assert back.generated == 5 and back.filter_stats == proposals.filter_stats
    for name in ("masks", "boxes", "predicted_iou", "stability_score", "point_coords", "crop_boxes"):
        assert torch.equal(getattr(back.segments, name), getattr(segments, name)), name
    empty = Proposals(segments=MaskSet.empty(4, 5), filter_stats=(), generated=0)
    assert proposals_from_record(proposals_record(empty, {})).segments.image_size == (4, 5)

"""The object store on real S3: a moto S3 server process-thread on loopback (``tests/s3_server.py``), reached
through ``AWS_ENDPOINT_URL`` exactly as a deployment reaches MinIO or R2. No mock of the store: every call
is real HTTP, and outages are real (the server stops listening and is started again on the same port).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import botocore.exceptions
import pytest

from s3_server import S3Server, count_s3_requests
from jobs.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from jobs.store import Store
import redis_dbs

FAST = {"retries": 3, "backoff_s": 0.05, "max_backoff_s": 0.2}  # 4 attempts, 0.35 s of pauses at most


@pytest.fixture(scope="module")
def server():
    with S3Server() as s3:
        yield s3


@pytest.fixture
def s3(server, monkeypatch) -> S3Server:
    """The running server, with its AWS variables in this process's environment."""
    server.start()  # a test that failed half-way may have left it stopped
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return server


def new_store(s3: S3Server, **options) -> Store:
    """A Store on a fresh prefix of the test bucket (no storage options: AWS_ENDPOINT_URL routes it)."""
    return Store(s3.store_url(f"t-{uuid.uuid4().hex[:8]}"), **{**FAST, **options})


def head(s3: S3Server, store: Store, key: str) -> dict:
    return s3.client().head_object(Bucket=s3.bucket, Key=store.path(key).split("/", 1)[1])


# --- happy paths --------------------------------------------------------------------------------------------


def test_aws_endpoint_url_routes_the_store(s3):
    store = new_store(s3)
    assert store.fs.s3.meta.endpoint_url == s3.endpoint_url
    store.put_bytes("k.bin", b"1")
    assert s3.client().get_object(Bucket=s3.bucket, Key=store.path("k.bin").split("/", 1)[1])["Body"].read() == b"1"


def test_round_trip_listing_and_delete(s3):
    store = new_store(s3)
    store.put_bytes("a/b/c.bin", b"\x00\x01")
    store.put_json("a/d.json", {"k": [1, 2]})
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01"
    assert store.get_json("a/d.json") == {"k": [1, 2]}
    assert store.exists("a/d.json") and not store.exists("a/missing") and not store.exists("a/b")
    assert store.list("a") == ["a/b/c.bin", "a/d.json"] == store.list()
    assert store.list("nothing") == []
    store.delete("a/d.json")
    store.delete("a/d.json")  # deleting what is gone is fine
    assert not store.exists("a/d.json") and store.list() == ["a/b/c.bin"]
    other = Store(store.url, **FAST)  # another process's view: no stale listing cache
    other.put_bytes("a/new.bin", b"x")
    assert store.list("a") == ["a/b/c.bin", "a/new.bin"] and store.exists("a/new.bin")


def test_one_request_per_call(s3):
    store = new_store(s3)
    store.put_json("j.json", {})
    with count_s3_requests(store) as counts:
        assert store.exists("j.json") and not store.exists("nope.json")
    assert counts == {"HeadObject": 2}, "exists is one HEAD, also for a missing key"
    with count_s3_requests(store) as counts:
        store.get_bytes("j.json")
    assert counts == {"GetObject": 1}
    with count_s3_requests(store) as counts:
        with pytest.raises(ObjectNotFoundError, match="nope.json"):
            store.get_bytes("nope.json")
    assert counts == {"GetObject": 1}, "a missing key is never retried"
    with count_s3_requests(store) as counts:
        store.delete("j.json")
    assert counts == {"DeleteObject": 1}


def test_content_type_by_extension(s3):
    store = new_store(s3)
    expected = {"r/segments.json": "application/json", "r/mask_0.png": "image/png", "inputs/a.jpg": "image/jpeg",
                "e/emb.safetensors": "application/octet-stream", "x/blob.bin": "application/octet-stream"}
    store.put_many({k: b"x" for k in list(expected)[:3]})
    for key in list(expected)[3:]:
        store.put_bytes(key, b"x")
    assert {k: head(s3, store, k)["ContentType"] for k in expected} == expected


def test_put_many_writes_every_object_and_the_last_one_last(s3):
    store = new_store(s3)
    files = {f"r/mask_{i}.png": bytes([i]) * 10 for i in range(5)} | {"r/segments.json": b"{}"}
    order: list[str] = []
    client = store.fs.s3
    record = lambda request, **_: order.append(request.url.rsplit("/", 1)[-1])  # noqa: E731 (returns None)
    client.meta.events.register("before-send.s3.PutObject", record)
    try:
        assert store.put_many(files) == list(files)
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", record)
    assert sorted(order) == sorted(k.split("/")[1] for k in files) and order[-1] == "segments.json"
    assert {k: store.get_bytes(k) for k in files} == files
    assert store.put_many({}) == []
    with pytest.raises(InvalidKeyError):
        store.put_many({"ok/a.png": b"1", "../evil": b"2", "ok/segments.json": b"3"})
    assert store.list("ok") == [], "keys are validated before anything is written"


def test_put_many_never_writes_the_last_key_when_another_fails(s3):
    store = new_store(s3)

    def break_one(request, **_):  # a real connection error on every PUT of one object
        if request.method == "PUT" and request.url.endswith("/broken.png"):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)

    with count_s3_requests(store) as counts:  # same event, registered first: counts the broken attempts
        store.fs.s3.meta.events.register("before-send.s3", break_one)
        try:
            with pytest.raises(StoreError, match="broken.png.*4 attempts"):
                store.put_many({"r/a.png": b"a", "r/broken.png": b"b", "r/segments.json": b"{}"})
        finally:
            store.fs.s3.meta.events.unregister("before-send.s3", break_one)
    assert counts["PutObject"] == 1 + 4, "the good object once, the broken one retried, the marker never"
    assert store.list("r") == ["r/a.png"]


def test_no_request_to_sweep_temporaries(s3):
    store = new_store(s3)
    with count_s3_requests(store) as counts:
        assert store.sweep_temporaries(0) == 0
    assert counts == {}, "object PUTs leave no temporaries: nothing to list at worker start"


# --- outages ------------------------------------------------------------------------------------------------

CALLS = {
    "exists": lambda st: st.exists("o/k.json"),
    "get_bytes": lambda st: st.get_bytes("o/k.json"),
    "list": lambda st: st.list("o"),
    "put_bytes": lambda st: st.put_bytes("o/new.json", b"{}"),
    "put_many": lambda st: st.put_many({"o/m.png": b"1", "o/segments.json": b"{}"}),
    "delete": lambda st: st.delete("o/k.json"),
}


def test_outage_becomes_a_bounded_store_error_for_every_method(s3):
    store = new_store(s3)
    store.put_json("o/k.json", {"v": 1})
    s3.stop()
    try:
        for name, call in CALLS.items():
            started = time.monotonic()
            with count_s3_requests(store) as counts, pytest.raises(StoreError) as caught:
                call(store)
            elapsed = time.monotonic() - started
            message = str(caught.value)
            assert "\n" not in message and store.url in message and "4 attempts" in message, message
            assert "AWS_ENDPOINT_URL" in message, message
            assert sum(counts.values()) == 4, (name, counts)  # 1 + FAST retries, nothing more underneath
            assert elapsed < store.retry_budget_s + 3.0, (name, elapsed)
    finally:
        s3.start()
    assert store.get_json("o/k.json") == {"v": 1}, "the objects survive the outage"


def test_default_retry_budget_rides_out_about_30_seconds():
    store = Store("memory://slip-budget/x")
    assert 30.0 <= store.retry_budget_s * 0.8 and store.retry_budget_s <= 60.0


@pytest.mark.parametrize("name", ["get_bytes", "put_bytes", "exists", "list"])
def test_restart_within_the_retry_budget_succeeds(s3, name):
    store = new_store(s3, retries=8, backoff_s=0.1, max_backoff_s=0.8)  # 4.7 s of pauses at most
    store.put_json("o/k.json", {"v": 1})
    started = time.monotonic()
    with count_s3_requests(store) as counts:
        restarter = s3.restart_after(1.2)
        result = CALLS[name](store)
    elapsed = time.monotonic() - started
    restarter.join()
    assert result == {"get_bytes": b'{\n "v": 1\n}', "put_bytes": "o/new.json", "exists": True,
                      "list": ["o/k.json"]}[name]
    assert elapsed >= 1.2 and sum(counts.values()) >= 2, (elapsed, counts)
    if name == "put_bytes":
        assert store.get_bytes("o/new.json") == b"{}"


def test_permanent_errors_are_not_retried(s3):
    store = Store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p", retries=5, backoff_s=1.0, max_backoff_s=1.0)
    started = time.monotonic()
    with count_s3_requests(store) as counts, pytest.raises(StoreError, match="not retried.*does not exist"):
        store.put_bytes("k.json", b"{}")
    assert counts == {"PutObject": 1} and time.monotonic() - started < 1.0


# --- a real job on S3 ---------------------------------------------------------------------------------------

QUEUE_DB = redis_dbs.S3_QUEUE


@pytest.mark.integration
def test_a_job_on_s3_rides_out_an_outage(server, tmp_path):
    """`slip submit segment --wait` and a real worker, both on SLIP_STORE=s3://...; the endpoint goes down for
    3 s mid-job: every image still ends with a result, none with an error, and the CLI exits 0."""
    from queue_helpers import (REPO, TINY_CLI_ARGS, flush, make_images, queue_env, require_redis, start_worker,
                               stop_worker, wait_worker_ready)

    require_redis()
    server.start()
    prefix = f"job-{uuid.uuid4().hex[:8]}"
    env = queue_env(server.store_url(prefix), db=QUEUE_DB, SLIP_CACHE=str(tmp_path / "cache"), **server.env)
    images = make_images(tmp_path / "images", 2)
    flush(QUEUE_DB)
    worker = start_worker(env, ("gpu", "cpu"), "s3w", log_path=tmp_path / "worker.log")
    try:
        wait_worker_ready(env, "s3w", process=worker)
        cli = subprocess.Popen([sys.executable, "-m", "producer", "submit", "segment", str(tmp_path / "images"),
                                "--prompt", "a red box", "--wait", *TINY_CLI_ARGS], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        keys = lambda: [o["Key"] for o in server.client().list_objects_v2(  # noqa: E731
            Bucket=server.bucket, Prefix=prefix).get("Contents", [])]
        deadline = time.monotonic() + 120
        while not any(k.endswith("manifest.json") for k in keys()) and cli.poll() is None:
            assert time.monotonic() < deadline, "the job was never submitted"
            time.sleep(0.1)
        server.restart_after(3.0).join()  # the outage: worker and CLI must both ride it out
        output, _ = cli.communicate(timeout=240)
        assert cli.returncode == 0, output + (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    finally:
        server.start()
        stop_worker(worker)
        flush(QUEUE_DB)
    stored = keys()
    results = [k for k in stored if k.startswith(f"{prefix}/results/") and k.endswith("/segments.json")]
    assert len(results) == len(images) and not [k for k in stored if k.endswith("/error.json")], stored
    assert len([k for k in stored if k.startswith(f"{prefix}/inputs/")]) == len(images)
    kinds = {k.rsplit(".", 1)[-1]: server.client().head_object(Bucket=server.bucket, Key=k)["ContentType"]
             for k in stored if k.endswith((".json", ".png"))}
    assert kinds == {"json": "application/json", "png": "image/png"}

"""``slip demo``: the whole queue on one machine, end to end.

1. make sure Redis answers (start a local ``redis-server`` when the broker is local and none runs);
2. start a worker subprocess (``celery -A worker worker -Q gpu,cpu``) with the chosen models (by default
   the bundled synthetic-world pair; the demo refuses to run, naming the build command, when they are
   missing: it never falls back to random weights) and wait until it reports healthy;
3. generate N synthetic 2x2 composites (a circle, a star, two distractors) and submit them with two prompts;
4. follow the job with a progress bar; write ``results.coco.json``, ``results.jsonl`` and a gallery
   (``gallery/index.html``, with hit / miss marks from the scenes' own ground truth) under ``--out``;
5. stop the worker cleanly and say which models were used and how to switch to official weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import typer
from PIL import Image

from slip.errors import TransientError

DEMO_PROMPTS = ("circle", "star")  # two classes drawn in every scene, among distractors
# every scene holds both objects, so each prompt takes its best segment (the paper's argmax): the ranker's
# calibrated "not here" threshold is for images that may lack the object
DEMO_PARAMS = {"calibrated": False}
DISTRACTORS = ("square", "triangle", "heart", "hexagon", "cat", "fish", "tree", "house", "arrow", "mushroom")
WORKER_START_S = 180.0  # how long the worker may take to load its models
BUNDLED_NOTE = ("the small models bundled with slip (synth-sam 3.8 MB, synth-clip 5 MB), trained only on the "
                "synthetic world of shapes and icons: they segment these scenes, not photographs")
OFFICIAL_HOWTO = ("for real images use the official weights: `slip weights fetch vit_b` and `slip weights fetch "
                  "openai/clip-vit-base-patch32`, then `slip demo --sam vit_b --clip openai/clip-vit-base-patch32` "
                  "(workers: SLIP_SAM / SLIP_CLIP)")


def default_models() -> tuple[str, str]:
    """``(sam, clip)``: the bundled synthetic-world pair; WeightsNotFoundError naming the build command when
    it is missing (no fallback to random weights)."""
    from slip.weights import bundled_path

    bundled_path("synth-sam")
    bundled_path("synth-clip")
    return "synth", "synth"


def demo_scene(index: int, *, seed: int = 0, tile: int = 128) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scene ``index``, a 2x2 composite as in the SLIP paper's evaluation: a circle, a star and two
    distractors, one per tile in a seeded order. Returns ``(image (2 tile, 2 tile, 3) uint8, masks
    (4, 2 tile, 2 tile) bool, class names)``: the ground truth a demo result can be checked against."""
    from slip.data.synth import render_object

    rng = np.random.default_rng([seed, index])
    distractors = [str(d) for d in rng.choice(DISTRACTORS, size=2, replace=False)]
    names = [str(n) for n in rng.permutation([*DEMO_PROMPTS, *distractors])]
    image = np.zeros((2 * tile, 2 * tile, 3), np.uint8)
    masks = np.zeros((4, 2 * tile, 2 * tile), bool)
    for k, name in enumerate(names):
        y, x = (k // 2) * tile, (k % 2) * tile
        image[y : y + tile, x : x + tile], masks[k, y : y + tile, x : x + tile] = render_object(name, rng, tile)
    return image, masks, names


def generate_images(folder: Path, count: int, *, seed: int = 0, size: int = 256) -> list[Path]:
    """``count`` PNG scenes (:func:`demo_scene`): 2x2 composites of a circle, a star and two distractors."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _, _ = demo_scene(i, seed=seed, tile=size // 2)
        path = folder / f"scene_{i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def ensure_redis(broker_url: str) -> str | None:
    """None when Redis answers; otherwise start a local one (returns a note) or raise TransientError."""
    import redis

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(broker_url, socket_connect_timeout=1).ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            return False

    if answers():
        return None
    url = urlparse(broker_url)
    server = shutil.which("redis-server")
    if url.hostname not in ("127.0.0.1", "localhost") or server is None:
        raise TransientError(f"cannot reach Redis at {broker_url}: start it with `redis-server --daemonize yes`")
    port = url.port or 6379
    subprocess.run([server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                   check=True, stdout=subprocess.DEVNULL)
    for _ in range(50):
        if answers():
            return f"started redis-server on 127.0.0.1:{port} (it keeps running; stop it with `redis-cli -p {port} shutdown`)"
        time.sleep(0.1)
    raise TransientError(f"started redis-server on port {port}, but it does not answer")


def start_worker(env: dict[str, str], name: str, log_path: Path) -> subprocess.Popen:
    """``celery -A worker worker -Q gpu,cpu -P solo`` as a subprocess, logging to ``log_path``."""
    import worker

    root = str(Path(worker.__file__).resolve().parent.parent)
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "-P", "solo",
               "-n", name, "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(command, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def stop_worker(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Warm shutdown (SIGTERM: finish the current task), SIGKILL if it does not end in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(client, process: subprocess.Popen, name: str, log_path: Path, timeout_s: float) -> dict:
    """The worker's health report, or TransientError with the end of its log."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            return client.health(name, timeout_s=5.0)
        except CeleryTimeout:
            continue
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
    stop_worker(process)
    raise TransientError(f"the demo worker did not become healthy (log {log_path}): " + " | ".join(tail))


def scene_truth(name: str, *, seed: int = 0, size: int = 256) -> dict[str, np.ndarray] | None:
    """The true mask of each demo prompt in the generated image called ``name`` (``scene_0003.png``)."""
    stem = Path(name).stem
    if not stem.startswith("scene_") or not stem[6:].isdigit():
        return None
    _, masks, names = demo_scene(int(stem[6:]), seed=seed, tile=size // 2)
    return {prompt: masks[names.index(prompt)] for prompt in DEMO_PROMPTS}


def write_outputs(client, job_id: str, out: Path, *, note: str) -> list[Path]:
    """``results.coco.json``, ``results.jsonl`` and ``gallery/index.html`` of the job under ``out``."""
    from producer.exports import write_export
    from producer.gallery import write_gallery

    prompts = list(DEMO_PROMPTS)
    written = []
    for format, name in (("coco", "results.coco.json"), ("jsonl", "results.jsonl")):
        write_export(client.export_items(job_id), format=format, out=out / name, prompts=prompts, job_id=job_id)
        written.append(out / name)
    written.append(write_gallery(client.export_items(job_id), out=out / "gallery", prompts=prompts, job_id=job_id,
                                 title=f"SLIP demo: job {job_id}", note=note, truth=scene_truth))
    return written


def run_demo(*, out: Path, images: int, sam: str | None, clip: str | None, timeout_s: float, env: dict[str, str]) -> int:
    """The demo (see the module docstring); returns the exit code."""
    from jobs.settings import Settings
    from producer.client import QueueClient
    from producer.common import follow

    if sam is None or clip is None:
        default_sam, default_clip = default_models()
        sam, clip = sam or default_sam, clip or default_clip
    why = BUNDLED_NOTE if (sam, clip) == ("synth", "synth") else "as asked for"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(env, SLIP_SAM=sam, SLIP_CLIP=clip, SLIP_STORE=str((out / "store").resolve()))
    settings = Settings.from_env(env)
    note = ensure_redis(settings.broker_url)
    if note:
        typer.echo(note)
    client = QueueClient(settings)
    typer.echo(f"demo: models: SAM {sam}, ranker {clip} ({why}); each prompt takes its best segment (every scene "
               f"holds both objects, so the ranker's calibrated 'not here' threshold is off)")
    name = f"demo-{os.getpid()}@{socket.gethostname()}"
    log_path = out / "worker.log"
    worker = start_worker(env, name, log_path)
    try:
        report = wait_healthy(client, worker, name, log_path, WORKER_START_S)
        typer.echo(f"demo: worker {name} ready on {report['device']} (pid {report['pid']}, models loaded in "
                   f"{report['load_seconds']} s)")
        paths = generate_images(out / "images", images)
        job_id = client.submit_segment(paths, DEMO_PROMPTS, DEMO_PARAMS, batch_size=4,
                                       on_job=lambda j: typer.echo(f"demo: submitted {len(paths)} images as job {j}"))
        code = follow(client, job_id, timeout_s)
    finally:
        stop_worker(worker)
    written = write_outputs(client, job_id, out, note=f"{why}; {OFFICIAL_HOWTO}")
    typer.echo(f"demo: wrote {', '.join(str(p) for p in written)}; store in {out / 'store'}")
    typer.echo(f"demo: models used: SAM {sam}, ranker {clip} ({why}); {OFFICIAL_HOWTO}.")
    return code

"""A real Label Studio server (loopback, SQLite, temporary data dir, no browser) takes our export through
its API, gives the predictions back with masks equal to ours (decoded by label-studio-sdk), and its
JSON export of a review becomes the training set ``slip labels import`` promises.

Label Studio and its SDK live in the side venv ``.venv-ls`` (``bash scripts/setup-label-studio.sh``): they
pin older redis / celery than the project. The SDK calls run there (tests/review/ls_client.py); the
server starts once for this module (start-up, ~30 s on 2 cores, is the cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from producer.exports_items import Tally, answers
from producer.exports_labelstudio import config_path, write_label_studio
from producer.review_cli import labels_app
from slip.review import read_labels

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the admin's legacy API token, set at start-up
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory, review_job):
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip("Label Studio is not installed: run `bash scripts/setup-label-studio.sh` (creates .venv-ls)")
    data = tmp_path_factory.mktemp("ls-data")
    port = _free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_USERNAME": "review@example.com",
           "LABEL_STUDIO_PASSWORD": "review-password-18", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(review_job.root.parent)}
    log = open(data / "server.log", "w")
    server = subprocess.Popen([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1",
                               "--port", str(port), "--data-dir", str(data)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not start: {(data / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def round_trip(label_studio, review_job, tmp_path_factory):
    """Our export imported, read back, reviewed and exported by Label Studio (ls_client.py)."""
    work = tmp_path_factory.mktemp("ls")
    tasks = work / "tasks.json"
    write_label_studio(review_job.items, out=tasks, prompts=review_job.prompts, job_id="J18", tally=Tally(),
                       image_base=f"/data/local-files/?d={review_job.root.name}/")
    out = work / "out.json"
    subprocess.run([str(LS_VENV / "bin" / "python"), str(Path(__file__).with_name("ls_client.py")), label_studio, TOKEN,
                    str(tasks), str(config_path(tasks)), str(out), str(review_job.root)], check=True, timeout=300)
    return json.loads(out.read_text()), json.loads(tasks.read_text())


def test_predictions_read_back_equal_ours(round_trip, review_job):
    back, _ = round_trip
    done = [i for i in review_job.items if i.state == "done"]
    assert set(back["tasks"]) == {i.name for i in done}
    for item in done:  # data.image (local storage, as documented) serves the submitted file
        assert back["served"][item.name] == hashlib.sha256(item.image()).hexdigest()
    for item in done:
        task = back["tasks"][item.name]
        assert task["model_version"] == item.doc["request_digest"]
        ours = [(a.prompt, inst) for a in answers(item.doc, review_job.prompts) for inst in a.instances]
        assert len(task["results"]) == len(ours)
        for result, (prompt, inst) in zip(task["results"], ours):
            h, w = result["height"], result["width"]
            mask = np.unpackbits(np.array(result["bits"], np.uint8))[: h * w].reshape(h, w).astype(bool)
            assert result["label"] == prompt and result["score"] == pytest.approx(inst.score)
            assert np.array_equal(mask, inst.mask())


def test_review_exported_by_label_studio_changes_the_training_set(round_trip, review_job, tmp_path):
    back, tasks = round_trip
    export = tmp_path / "export.json"
    export.write_text(json.dumps(back["export"]))
    out = tmp_path / "labels"
    result = CliRunner().invoke(labels_app, ["import", str(export), "--from", "label-studio", "--out", str(out),
                                             "--images", str(review_job.root), "--heldout", "0",
                                             *[a for p in review_job.prompts for a in ("-p", p)]])
    assert result.exit_code == 0, result.output
    labels = read_labels(out)
    first, second = (t["data"]["slip_name"] for t in tasks[:2])
    assert [i["name"] for i in labels.items] == [first, second] and labels.review["unreviewed"] == len(tasks) - 2
    by_name = {i.name: i for i in review_job.items}
    accepted = labels.truth(labels.items[0])
    for answer in answers(by_name[first].doc, review_job.prompts):  # accepted: our masks, our labels
        expected = answer.instances[0].mask() if answer.instances else np.zeros((96, 96), bool)
        assert np.array_equal(accepted[answer.prompt], expected)
    relabelled = labels.truth(labels.items[1])
    (prompt, inst), *_ = [(a.prompt, i) for a in answers(by_name[second].doc, review_job.prompts) for i in a.instances]
    new = review_job.prompts[(review_job.prompts.index(prompt) + 1) % len(review_job.prompts)]
    assert np.array_equal(relabelled[new], inst.mask())
    assert [p for p, m in relabelled.items() if m.any()] == [new]
    crops = sorted(p.relative_to(out).as_posix() for p in out.glob("[!.]*/*.png") if not p.name.endswith(".mask.png"))
    assert [c.split("/")[0] for c in crops].count(new) >= 1 and len(crops) == sum(
        1 for a in answers(by_name[first].doc, review_job.prompts) if a.instances) + 1

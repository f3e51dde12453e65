"""Label Studio's side of the round trip, run with the side venv's Python (``.venv-ls/bin/python``), where
label-studio-sdk lives (it cannot share the main venv):

    .venv-ls/bin/python tests/review/ls_client.py URL TOKEN TASKS.json CONFIG.xml OUT.json IMAGES

1. creates a project with CONFIG's labelling interface, imports TASKS through the API (the SDK) and
   connects a Local Storage on IMAGES (the submitted folder), then fetches each task's ``data.image``;
2. reads every task's predictions back and decodes each brush result with the SDK's own decoder
   (``label_studio_sdk.converter.brush.decode_rle``; alpha channel > 0), polygons kept as points;
3. reviews like a person: task 0's predictions accepted as they are, task 1's first object relabelled
   as the prompt named in TASKS' first task config (the next label) and its other objects deleted; the
   rest untouched;
4. exports the project as JSON (the SDK's export call) to ``OUT.json``'s ``export`` key.

Writes OUT.json: ``{"project": id, "served": {slip_name: sha256 of the image bytes served}, "tasks": {slip_name: {"model_version", "score", "results": [{"type",
"label", "score", "height", "width", "bits": packed mask bits | null, "points": [...] | null}]}},
"export": [...]}``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request

import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle


def main(url: str, token: str, tasks_path: str, config_path: str, out_path: str, images: str) -> None:
    ls = LabelStudio(base_url=url, api_key=token)
    labels = [line.split('"')[1] for line in open(config_path).read().splitlines() if "<Label value=" in line]
    project = ls.projects.create(title="SLIP review", label_config=open(config_path).read())
    ls.projects.import_tasks(id=project.id, request=json.load(open(tasks_path)))
    # the images as the README says: a Local Storage on the submitted folder, served at data.image
    ls.import_storage.local.create(project=project.id, path=images, title="submitted images", use_blob_urls=True)
    out = {"project": project.id, "tasks": {}, "served": {}}
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    for k, task in enumerate(tasks):
        predictions = ls.predictions.list(task=task.id)
        assert len(predictions) == 1, f"task {task.id} has {len(predictions)} predictions"
        prediction = predictions[0]
        results = []
        for r in prediction.result:
            kind = r["type"]
            value = r["value"]
            h, w = r["original_height"], r["original_width"]
            bits = None
            if kind == "brushlabels":
                mask = decode_rle(value["rle"]).reshape(h, w, 4)[:, :, 3] > 0
                bits = np.packbits(mask).tolist()
            results.append({"type": kind, "label": value[kind][0], "score": r.get("score"), "height": h, "width": w,
                            "bits": bits, "points": value.get("points")})
        request = urllib.request.Request(url + task.data["image"], headers={"Authorization": f"Token {token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            out["served"][task.data["slip_name"]] = hashlib.sha256(r.read()).hexdigest()
        out["tasks"][task.data["slip_name"]] = {"model_version": prediction.model_version, "score": prediction.score,
                                                "results": results}
        if k == 0:  # accepted as predicted
            ls.annotations.create(id=task.id, result=prediction.result, was_cancelled=False)
        elif k == 1:  # the first object relabelled, the others deleted
            first = dict(prediction.result[0])
            current = first["value"][first["type"]][0]
            first["value"] = {**first["value"], first["type"]: [labels[(labels.index(current) + 1) % len(labels)]]}
            ls.annotations.create(id=task.id, result=[first], was_cancelled=False)
    out["export"] = ls.projects.exports.as_json(project.id)
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])

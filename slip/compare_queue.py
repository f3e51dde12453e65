"""``slip compare --queue``: each configuration runs as a segment job on the workers, scored like in process.

Every checked candidate (:func:`slip.compare.check_candidates`) must be served by a live worker: its heartbeat
names the engine and SAM it serves (the ranker a job names is loaded on demand, a local ranker directory is
uploaded to the store by the producer). A candidate nobody serves is one line naming the worker to start, before
any job is submitted. Each candidate is then one job over the truth's images (the same prompts, the candidate's
options); its ``segments.json`` documents are read back and scored by the in-process code (AP, AP50,
presence-aware F1). Seconds per image are the worker's own stage timings recorded in each document (the
compute time of that result, whenever it was computed), so re-running a comparison reads cached results and
still reports what they cost.

The client is injected (a :class:`producer.client.QueueClient`): this module imports nothing of the queue.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from slip.compare import ConfigScore, Truth, score_answers
from slip.errors import ConfigError

QUEUE_REFUSED = ("dtype",)  # model settings of the workers themselves: a job cannot ask for them


def check_served(checked: Sequence[tuple], workers: Sequence[Any]) -> None:
    """ConfigError naming the first candidate no live worker serves (engine and SAM), and the worker to start."""
    served = {(w.serves["engine"], w.serves["sam"]) for w in workers if w.alive and w.serves}
    for candidate, models, _ in checked:
        refused = [k for k in QUEUE_REFUSED if k in candidate.models]
        if refused:
            raise ConfigError(f"--config {candidate.name}: {refused[0]} is the workers' own setting (SLIP_"
                              f"{refused[0].upper()}); with --queue leave it out of the SPEC")
        if (models.engine, models.sam) not in served:
            have = ", ".join(f"engine={e} sam={s}" for e, s in sorted(served)) or "none"
            raise ConfigError(f"--config {candidate.name}: no live worker serves engine={models.engine} "
                              f"sam={models.sam} (live workers serve: {have}): start one with "
                              f"SLIP_ENGINE={models.engine} SLIP_SAM={models.sam} celery -A worker worker -Q gpu,cpu")


def run_queue_comparison(checked: Sequence[tuple], truth: Truth, client, *, job_size: int, workers: int,
                         examples: int = 4, timeout_s: float | None = None,
                         log=print) -> tuple[list[ConfigScore], dict]:
    """Submit one job per checked candidate (all at once: the cluster runs them side by side when several
    workers serve them), wait for each and score its results; the scores and the example answers."""
    check_served(checked, client.workers())
    files = [str(path) for _, path in truth.images]
    prompts = list(truth.prompts)
    jobs = []
    for candidate, models, options in checked:
        clip = None if models.engine == "sam3" else models.clip
        job = client.submit_segment(files, prompts, options, engine=models.engine, sam=models.sam, clip=clip)
        log(f"{candidate.name}: job {job}")
        jobs.append(job)
    scores, shown = [], {}
    for (candidate, models, _), job in zip(checked, jobs):
        start = time.perf_counter()
        status = client.wait(job, timeout_s=timeout_s)
        if not status.finished or status.counts["failed"]:
            reasons = "; ".join(f"{name}: {why}" for _, name, why in client.failed_units(status, limit=3))
            raise ConfigError(f"--config {candidate.name}: job {job} ended with {status.counts} "
                              f"({reasons or 'not finished'}): slip status {job}")
        docs = [item.doc for item in client.export_items(job)]
        score, answers = score_documents(docs, truth, name=candidate.name, spec=candidate.spec, job_size=job_size,
                                         workers=workers, positive_only=models.engine == "sam3", examples=examples)
        score.counts.update(job=job, wait_seconds=round(time.perf_counter() - start, 3))
        scores.append(score)
        shown[candidate.name] = answers
        log(f"{candidate.name}: AP {score.ap:.3f}, AP50 {score.ap50:.3f}, F1 {score.f1:.3f}, "
            f"{score.seconds_p50:.2f} s/image on the worker (p90 {score.seconds_p90:.2f})")
    return scores, shown


def score_documents(docs: Sequence[dict], truth: Truth, *, name: str, spec: str, job_size: int, workers: int,
                    positive_only: bool, examples: int = 0) -> tuple[ConfigScore, dict]:
    """Score a job's ``segments.json`` documents (in the truth's image order) as in-process results are scored
    (:func:`slip.compare.score_answers`); seconds per image: each document's recorded stage timings."""
    answers = ((image_id, result_from_document(doc), sum(doc.get("timings_s", {}).values()))
               for (image_id, _), doc in zip(truth.images, docs))
    score, shown = score_answers(answers, truth, job_size=job_size, workers=workers, name=name, spec=spec,
                                 positive_only=positive_only, examples=examples)
    score.request = docs[0]["request"] if docs else {}
    return score, shown


def result_from_document(doc: dict):
    """A :class:`slip.types.SlipResult` from a ``segments.json`` document (masks decoded, matches rebuilt)."""
    import torch

    from slip.outputs import maskset_from_records
    from slip.types import Match, Proposals, SlipResult

    height, width = doc["image_size"]["height"], doc["image_size"]["width"]
    prompts = doc["prompts"]
    segments = maskset_from_records(doc["segments"], height, width)
    similarity = torch.tensor([[s["similarity"][p] for p in prompts] for s in doc["segments"]],
                              dtype=torch.float32).reshape(len(doc["segments"]), len(prompts))
    pair = lambda p: (int(p["segment"]), float(p["score"]))  # noqa: E731
    matches = tuple(Match(prompt=m["prompt"], instances=tuple(map(pair, m["instances"])),
                          best=None if m["best"] is None else pair(m["best"]), threshold=m["threshold"],
                          top_k=tuple(map(pair, m["top_k"]))) for m in doc["matches"])
    return SlipResult(image_size=(height, width), proposals=Proposals(segments, (), int(doc["generated"])),
                      similarity=similarity, matches=matches, timings=dict(doc.get("timings_s", {})))

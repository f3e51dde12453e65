"""A simulated review (issue 18): does reviewing the most doubtful images first teach the ranker the
classes it never learnt, and does it beat reviewing images at random?

    python -m bench.review --threads 1          # the main job: 1,000 uniform composites (~35 min on 2 shared
                                                # cores once the caches exist; ~60 min more without them)
    python -m bench.review --threads 1 --no-requery --start-seed 1 --out bench/results/review-start1.json
                                                # the same job from another starting ranker (its training seed)
    python -m bench.review --pool bench/results/review-start*.json --out bench/results/review.json
                                                # pooled over starting rankers (runs nothing else)
    python -m bench.review --threads 1 --class-weights longtail --no-requery \
        --out bench/results/review-longtail.json   # the long-tailed job (second experiment)
    python -m bench.review --threads 1 --job-seed 2 --images 300 --sizes 25,50 --no-requery --tune-seeds 2 \
        --random-seeds 2 --orders doubt,errors,unclaimed,image-doubt,alternate,with-unclaimed \
        --out bench/results/review-rules.json   # choosing the doubt rule, on another job (~25 min)
    # the same with --job-seed 3 --orders doubt,alternate,unclaimed,errors,with-unclaimed
    #   --out bench/results/review-rules-seed3.json   (a second development job)
    python -m bench.review --threads 1 --job-seed 4 --sizes 25,50 --no-requery --tune-seeds 2 --orders doubt,sampled \
        --start-seed 0 --out bench/results/review-job4-sampled-start0.json   # a candidate on a 1,000-image development job
    python -m bench.review --threads 1 --job-seed 4 --sizes 25,50 --no-requery --tune-seeds 2 --pseudo 10 \
        --pseudo-prompts seen --start-seed 0 --out bench/results/review-job4-pseudo-seen-start0.json
                                                # pseudo-labels beside every review (a remedy tried and dropped)
    python -m bench.review --images 100 --ranker-per-class 40 --ranker-epochs 6 --random-seeds 1 \
        --tune-seeds 1 --sizes 25,50 --no-requery   # the small version (~3 min once the caches exist)

The world is the synthetic one (:mod:`slip.data.synth`). The job: ``--images`` 2x2 composites (tiles of
``--tile`` px) of ``--job-classes`` classes, drawn from a dataset generated with ``--job-seed`` (images no
ranker saw), queried with every class name as a prompt; each composite's 4 classes are drawn uniformly,
or with ``--class-weights`` (a long-tailed job: ``longtail`` = three of the unseen classes at weight 0.05,
each in ~3.5 % of the images). The starting ranker is the bundled synth ranker's recipe
(:mod:`slip.train.synth_clip`) trained on the 22 catalogue classes that leave out ``--unseen`` of the
job's classes (the paper's case: names the ranker never learnt). SAM's proposals are the bundled synth
SAM's, computed once per image and kept (segment once, query many), as are each segment's crop; each
ranker re-embeds those crops only.

A review of N images takes the first N images of an ordering, corrects them from the ground truth (each
tile's object and its true mask: what a careful reviewer would draw), writes them as a labels folder
(:func:`slip.review.write_labels`, what ``slip labels import`` writes, with the SAM proposals the
reviewer rejected as background crops), fine-tunes the starting ranker on it
(:func:`slip.train.finetune.fine_tune`, what ``slip train-ranker --init`` runs), recalibrates the
threshold on the reviewed images, and scores the new ranker on the images nobody reviewed (``--negatives``: the
rejected proposals per image kept as background crops; ``--pseudo K``: the starting ranker's K most certain answers
per prompt on unreviewed images trained on beside the review, :func:`confident_answers`). Every
(ordering, N) is fine-tuned with ``--tune-seeds`` seeds (the seed of initialisation, data order,
augmentation and the train/validation split of the reviewed crops: the same seeds for every ordering), so
the comparison is not one fine-tune's luck. Orderings: ``doubt`` (the product's
:func:`slip.review.doubt_order` of the starting ranker's answers, what ``--order doubt`` exports), the
candidate rules of ``--orders`` (:data:`RULES`: how the rule was chosen), and ``random``
(``--random-seeds`` seeded shuffles, each fine-tuned with every seed). The starting ranker is one draw too
(``--start-seed``; and its 24 epochs of training round differently on another machine's BLAS): the doubt order
is computed from it, so a comparison from one starting ranker can flip with another; ``--pool`` pools runs
over several (wins counted between runs of the same starting ranker). Each arm is reported as the median
with [min, max] over its runs (doubt: seeds; random: orderings x seeds), and as the share of
(doubt run, random run) pairs doubt wins (ties count half).

Accuracy is object-level, as in :mod:`slip.evaluate`: for each class present in an image, the argmax
segment of its prompt has IoU > 0.5 with the object's true mask. Reported per ordering and N: accuracy
on the unreviewed rest (the issue's curve), the starting ranker's accuracy on that same rest (the gain
is learning, not easier leftovers: doubt leaves the easy images behind), accuracy on the images that
no ordering reviewed (a common yardstick), and on the rare classes' objects (long-tailed job). Writes
``--out`` (default ``bench/results/review.json``). Caches (the ranker, the proposals and crops of the job,
every fine-tuned run) live under ``--work`` (default ``data/review-bench``): a rerun only fine-tunes what
is new.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slip.calibrate import Probe, best_threshold
from slip.data.synth import CLASS_NAMES, generate_dataset
from slip.review import (NEGATIVES, ReviewedImage, ReviewedObject, doubt_order, expected_corrections,
                         image_doubt, object_crop, prompt_certainty, rle_of, unclaimed, write_labels)
from slip.threshold import read_threshold

RESULTS = Path(__file__).parent / "results" / "review.json"
SEEN = ("circle", "square", "triangle", "star", "heart", "crescent", "cross", "arrow", "ring", "hexagon")
UNSEEN = ("fish", "bird", "cat", "butterfly", "house", "tree", "mushroom", "snowman", "turtle", "ghost")
CROP = 64  # crop side the bundled ranker recipe uses
LONGTAIL = {"cat": 0.05, "butterfly": 0.05, "house": 0.05}  # --class-weights longtail: rare unseen classes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="images in the job")
    p.add_argument("--job-classes", type=int, default=10, help="classes of the job (prompts)")
    p.add_argument("--unseen", type=int, default=5, help="job classes the starting ranker never learnt")
    p.add_argument("--job-seed", type=int, default=1, help="seed of the job's synthetic source images")
    p.add_argument("--job-per-class", type=int, default=120, help="source images per job class")
    p.add_argument("--tile", type=int, default=128, help="tile side of the 2x2 composites, px")
    p.add_argument("--ranker-per-class", type=int, default=200, help="training images per class of the starting ranker")
    p.add_argument("--ranker-epochs", type=int, default=24, help="epochs of the starting ranker (the bundle's: 24)")
    p.add_argument("--start-seed", type=int, default=0,
                   help="seed of the starting ranker's training (initialisation, order, augmentation; the bundle's: 0)")
    p.add_argument("--calibrate-composites", type=int, default=100, help="composites calibrating the starting ranker")
    p.add_argument("--sizes", default="25,50,100", help="reviewed images per curve point")
    p.add_argument("--random-seeds", type=int, default=3, help="random orderings (median reported)")
    p.add_argument("--tune-seeds", type=int, default=3, help="fine-tuning seeds per (ordering, N), the same for all")
    p.add_argument("--orders", default="doubt", help=f"doubt rules to run besides random: {', '.join(RULES)}")
    p.add_argument("--class-weights", default=None,
                   help="NAME=W,... draw weights of the job's classes (1 for a class not named); 'longtail' = "
                        + ",".join(f"{k}={v}" for k, v in LONGTAIL.items()))
    p.add_argument("--no-requery", action="store_true", help="skip the re-answer cost measurement")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the review recipe's)")
    p.add_argument("--pseudo", type=int, default=0,
                   help="pseudo-labels per prompt trained on beside every review (confident_answers: the starting "
                        "ranker's most certain answers above its threshold on unreviewed images; 0: none)")
    p.add_argument("--negatives", type=int, default=NEGATIVES,
                   help=f"rejected proposals per reviewed image written as background crops (the product's: {NEGATIVES})")
    p.add_argument("--pseudo-prompts", default=None,
                   help="the prompts that get pseudo-labels: NAME,... or 'seen' (those the starting ranker learnt); "
                        "default: every prompt")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--work", type=Path, default=Path("data/review-bench"), help="cache and work folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                   help="pool earlier results of the same job run with different starting rankers (--start-seed, or "
                        "another machine) into --out; runs nothing else")
    a = p.parse_args()
    a.weights = _weights(a.class_weights)
    unknown = [o for o in a.orders.split(",") if o not in RULES]
    if unknown:
        p.error(f"unknown --orders {', '.join(unknown)}: use {', '.join(RULES)}")
    return a


def _weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    if text == "longtail":
        return dict(LONGTAIL)
    pairs = [item.split("=", 1) for item in text.split(",")]
    return {name.strip(): float(w) for name, w in pairs}


# --- cached steps ------------------------------------------------------------------------------------


def starting_ranker(a, job_classes: tuple[str, ...], unseen: tuple[str, ...]) -> Path:
    """The synth ranker recipe on the catalogue minus ``unseen``, calibrated; cached."""
    from slip.calibrate import calibrate_rankers, save_calibration
    from slip.train.ranker import train_ranker
    from slip.train.synth_clip import SYNTH_CLIP_MODEL, SYNTH_CLIP_RECIPE

    classes = [c for c in CLASS_NAMES if c not in unseen]
    name = (f"ranker-{len(classes)}-{'-'.join(sorted(c.replace(' ', '_') for c in unseen))}-p{a.ranker_per_class}"
            f"-e{a.ranker_epochs}" + (f"-s{a.start_seed}" if a.start_seed else ""))
    out = a.work / name
    if (out / "threshold.json").is_file():
        return out
    data = a.work / f"ranker-data-p{a.ranker_per_class}"
    if not (data / "classes.json").is_file() or json.loads((data / "classes.json").read_text())["per_class"] != a.ranker_per_class:
        shutil.rmtree(data, ignore_errors=True)
        print(f"generating the starting ranker's data ({len(classes)} classes x {a.ranker_per_class})", flush=True)
        generate_dataset(data, classes=classes, per_class=a.ranker_per_class, size=128, seed=0)
    print(f"training the starting ranker without {', '.join(unseen)} ({a.ranker_epochs} epochs)", flush=True)
    work = a.work / f".{name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    train_ranker(data, work, model=SYNTH_CLIP_MODEL, config=replace(SYNTH_CLIP_RECIPE, epochs=a.ranker_epochs,
                                                                       seed=a.start_seed, device="cpu", progress=False))
    print("calibrating its threshold on composites of its own classes (SAM proposals)", flush=True)
    (run,) = calibrate_rankers(data, [str(work)], composites=a.calibrate_composites, proposals="sam", sam="synth", device="cpu")
    run = replace(run, directory=work)
    save_calibration(run)
    work.rename(out)
    return out


def job_world(a, job_classes: tuple[str, ...]) -> dict:
    """The job's composites, their SAM proposals, each proposal's crop and IoU with each tile's object; cached."""
    from slip.evaluate import sam_proposer

    cache = a.work / _job_key(a, job_classes) / f"world-{a.images}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    source = job_source(a, job_classes)
    propose = sam_proposer("synth", device="cpu")
    crops, ious, offsets, labels = [], [], [0], []
    start = time.perf_counter()
    for i in range(a.images):
        composite = source[i]
        crop_u8, iou = _segments(composite, propose)
        crops.append(crop_u8), ious.append(iou)
        offsets.append(offsets[-1] + len(iou))
        labels.append([job_classes.index(n) for n in composite.class_names])
        if (i + 1) % 50 == 0:
            print(f"  proposals: {i + 1}/{a.images} images ({time.perf_counter() - start:.0f} s)", flush=True)
    world = {"crops": np.concatenate(crops), "ious": np.concatenate(ious), "offsets": np.array(offsets),
             "labels": np.array(labels), "sam_seconds": np.array(time.perf_counter() - start)}
    np.savez(cache, **world)
    return world


def job_source(a, job_classes: tuple[str, ...]):
    """The job's composites (:class:`slip.data.composites.CompositeSource`, ``--class-weights`` applied) over a
    dataset generated with ``--job-seed`` (every image held out: no ranker saw them); the dataset is cached."""
    from slip.data.composites import CompositeSource
    from slip.data.folder import scan_folder

    data = a.work / _source_key(a, job_classes) / "source"
    if not (data / "classes.json").is_file():
        generate_dataset(data, classes=list(job_classes), per_class=a.job_per_class, size=128, seed=a.job_seed)
    folder = scan_folder(data)
    return CompositeSource(folder, folder.records, seed=a.job_seed, tile_size=a.tile, weights=a.weights)


def _segments(composite, propose) -> tuple[np.ndarray, np.ndarray]:
    from slip.crops import CropConfig, crop_segments

    segments = propose(composite.image)
    masks = segments.masks.numpy()
    crops = crop_segments(composite.image, segments, CropConfig(), CROP) if len(masks) else torch.zeros(0, 3, CROP, CROP)
    objects = composite.object_masks.reshape(4, -1)
    flat = masks.reshape(len(masks), -1)
    inter = flat.astype(np.float32) @ objects.T.astype(np.float32)
    union = flat.sum(1)[:, None] + objects.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)
    return (crops * 255).round().clamp(0, 255).to(torch.uint8).numpy(), iou


# --- scoring -----------------------------------------------------------------------------------------


class Scorer:
    """A ranker's similarities over the whole job, from the cached crops."""

    def __init__(self, spec: str | Path, world: dict, prompts: tuple[str, ...]) -> None:
        from slip.rankers.loading import load_ranker

        ranker = load_ranker(str(spec), device="cpu")
        with torch.no_grad():
            text = ranker.encode_texts(list(prompts)).float()
            rows = []
            for b in range(0, len(world["crops"]), 512):
                pixels = torch.from_numpy(world["crops"][b : b + 512]).float() / 255.0
                rows.append(ranker.encode_images(pixels).float() @ text.T)
        self.sim = torch.cat(rows).numpy() if rows else np.zeros((0, len(prompts)))
        self.world = world
        self.threshold = read_threshold(Path(spec)) if Path(spec).is_dir() else None

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        o = self.world["offsets"]
        return self.sim[o[i] : o[i + 1]], self.world["ious"][o[i] : o[i + 1]]

    def hits(self, i: int) -> list[bool]:
        """Per tile: the argmax segment of its class's prompt is its object (IoU > 0.5)."""
        sim, iou = self.image(i)
        if len(sim) == 0:
            return [False] * 4
        return [bool(iou[int(np.argmax(sim[:, c])), k] > 0.5) for k, c in enumerate(self.world["labels"][i])]

    def accuracy(self, images) -> float:
        flags = [h for i in images for h in self.hits(i)]
        return float(np.mean(flags)) if flags else float("nan")

    def certainties(self, i: int) -> list[float]:
        """Per prompt, the certainty of the image's answer (:func:`slip.review.prompt_certainty`)."""
        sim, _ = self.image(i)
        return [prompt_certainty(sim[:, p], self.threshold) for p in range(self.sim.shape[1])]

    def probes(self, images) -> list[Probe]:
        """Calibration probes of reviewed images: every prompt, present or absent."""
        out = []
        for i in images:
            sim, iou = self.image(i)
            tiles = {int(c): k for k, c in enumerate(self.world["labels"][i])}
            for c in range(sim.shape[1]):
                best = int(np.argmax(sim[:, c])) if len(sim) else None
                score = None if best is None else float(sim[best, c])
                hit = best is not None and c in tiles and bool(iou[best, tiles[c]] > 0.5)
                out.append(Probe(c in tiles, score, hit))
        return out


# --- one review --------------------------------------------------------------------------------------


class Proposals:
    """Each job image's SAM proposals as segment records with the starting ranker's similarities (what its
    segments.json holds), computed on first use and kept on disk: the labels of a review include the
    proposals the reviewer rejected (slip.review's background crops)."""

    def __init__(self, folder: Path, source, base: "Scorer", prompts) -> None:
        self.folder, self.source, self.base, self.prompts = folder, source, base, prompts
        self.folder.mkdir(parents=True, exist_ok=True)
        self._propose = None

    def __call__(self, i: int) -> list[dict]:
        from slip.outputs import segment_records

        path = self.folder / f"{i:05d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self._propose is None:
            from slip.evaluate import sam_proposer

            self._propose = sam_proposer("synth", device="cpu")
        records = segment_records(self._propose(self.source[i].image))
        sim, _ = self.base.image(i)
        if len(records) != len(sim):
            raise RuntimeError(f"image {i}: {len(records)} proposals now, {len(sim)} when the job was cached")
        for record, row in zip(records, sim):
            record["similarity"] = {p: float(v) for p, v in zip(self.prompts, row)}
        path.write_text(json.dumps(records))
        return records


def review(a, reviewed: list[int], world: dict, prompts, start: Path, run: Path, source,
           proposals: Proposals, *, seed: int, answers=()) -> tuple[Path, bool]:
    """Correct ``reviewed`` from the truth, write the labels folder (with the rejected proposals, and the
    starting ranker's ``answers`` as pseudo-labels: :func:`confident_answers`), fine-tune
    ``start`` on it with ``seed`` (:func:`slip.train.finetune.fine_tune`), recalibrate. Returns the ranker and
    whether it was reused (the same review fine-tuned before: same images, start, seed, epochs and answers)."""
    from slip.threshold import write_threshold
    from slip.train.finetune import REVIEW_RECIPE, fine_tune

    done = run / "reviewed.json"
    marker = {"reviewed": reviewed, "start": str(start), "negatives": a.negatives, "tune_seed": seed, "epochs": a.epochs,
              "pseudo": [list(t) for t in answers]}
    if done.is_file() and {"tune_seed": 0, "epochs": None, "pseudo": [], **json.loads(done.read_text())} == marker:
        return run / "ranker", True
    shutil.rmtree(run, ignore_errors=True)
    images = {}
    items = []
    for i in reviewed:
        composite = source[i]
        images[composite.index] = composite.image
        objects = tuple(ReviewedObject(prompts[int(c)], rle_of(composite.object_masks[k]))
                        for k, c in enumerate(world["labels"][i]))
        items.append(ReviewedImage(f"{i:05d}.png", i, *composite.image.shape[:2], objects, "simulated"))
    write_labels(run / "labels", items, prompts=prompts, image=lambda r: _png(images[r.index]),
                 proposals=lambda r: proposals(r.index), source="simulated", export="ground truth", job=None,
                 heldout_fraction=0.0, negatives=a.negatives)
    _write_pseudo(run / "labels", answers, source, proposals, first=len(items))
    config = replace(REVIEW_RECIPE, device="cpu", progress=False, epochs=a.epochs or REVIEW_RECIPE.epochs,
                     seed=seed, split_seed=seed)
    result = fine_tune(run / "labels", run / "ranker", init=str(start), config=config)
    scorer = Scorer(result.out, world, prompts)
    point = best_threshold(scorer.probes(reviewed))
    write_threshold(result.out, {**point.to_json(), "calibrated_on": f"{len(reviewed)} reviewed images"})
    shutil.rmtree(run / "labels")  # ~2 MB per run; the ranker and the marker are what a rerun reuses
    done.write_text(json.dumps(marker))
    return result.out, False


# --- pseudo-labels (CEAL: Wang et al. 2016), a remedy tried and dropped ---------------------------------------
# The forgetting hypothesis: doubt's fine-tunes lose seen classes its images hold few of; replaying the starting
# ranker's most certain answers on unreviewed images (--pseudo K per prompt) would keep every prompt in the
# fine-tune. It does not: the confident answers of names the ranker never learnt are wrong (review-pseudo.json: every
# prompt, both arms about 3 points lower); for the names it learnt only (--pseudo-prompts seen) doubt beats random on
# the development job 4 but both arms lose accuracy, random more (review-job4-pseudo-seen.json).


def confident_answers(sims, thresholds, *, per_prompt: int, exclude=()) -> list[tuple[int, int, int]]:
    """Pseudo-labels ``(image, prompt, segment)``, sorted: for each prompt with a threshold, among the images not in
    ``exclude`` whose best segment for it scores at least the threshold, the ``per_prompt`` where that answer is the
    most certain (:func:`slip.review.prompt_certainty`), ties to the lower image; ``sims[i]`` is ``(N, P)``."""
    skip = {int(i) for i in exclude}
    picked = []
    for p, threshold in enumerate(thresholds if per_prompt > 0 else ()):
        if threshold is None:
            continue
        ranked = sorted((-prompt_certainty(s[:, p], threshold), i, int(np.argmax(s[:, p])))
                        for i, s in enumerate(sims) if i not in skip and len(s) and s[:, p].max() >= threshold)
        picked += [(i, p, j) for _, i, j in ranked[:per_prompt]]
    return sorted(picked)


def _write_pseudo(labels: Path, answers, source, proposals: "Proposals", *, first: int) -> None:
    """Each answer's segment as a training crop of its prompt's class folder (with its mask), beside the review's
    own crops; no background crops (the image's other objects are unlabelled, not rejected). Names follow
    :func:`slip.review.write_labels`'s, the pseudo-labelled images numbered from ``first``."""
    from slip.outputs import decode_rle

    dirs = {c["name"]: c["dir"] for c in json.loads((labels / "classes.json").read_text())["classes"]}
    prompts = list(dirs)
    by_image: dict[int, list] = {}
    for i, p, j in answers:
        by_image.setdefault(i, []).append((p, j))
    for k, (i, pairs) in enumerate(sorted(by_image.items()), start=first):
        image = source[i].image
        records = proposals(i)
        for n, (p, j) in enumerate(pairs):
            mask = decode_rle([records[j]["segmentation"]], *image.shape[:2])[0]
            crop, crop_mask = object_crop(image, mask)
            path = labels / dirs[prompts[p]] / f"{k:06d}-{i:05d}-{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(path, compress_level=1)
            Image.fromarray(crop_mask.astype(np.uint8) * 255).save(path.with_name(path.stem + ".mask.png"),
                                                                 compress_level=1)


def _png(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --- what re-answering costs -----------------------------------------------------------------------


def requery_cost(a, source, start: Path, tuned: Path, prompts, *, images: int = 20, repeats: int = 3) -> dict:
    """Seconds per image of the first pass (SAM + filters, crops, embeddings, ranking) against re-answering
    with a new ranker from the cached proposals (RLE records decoded, crops, the new ranker's embeddings,
    ranking), in process, interleaved A/B per repeat; medians with [min, max]."""
    from slip.crops import CropConfig, crop_segments
    from slip.evaluate import sam_proposer
    from slip.outputs import maskset_from_records, segment_records
    from slip.rankers.loading import load_ranker
    from slip.sam import load_sam_bundle

    sam = load_sam_bundle("synth", device="cpu")
    old, new = load_ranker(str(start), device="cpu"), load_ranker(str(tuned), device="cpu")
    texts = {id(r): r.encode_texts(list(prompts)).float() for r in (old, new)}
    scenes = [source[i].image for i in range(images)]
    cached = {}

    def rank(ranker, image, segments):
        with torch.no_grad():
            emb = ranker.encode_images(crop_segments(image, segments, CropConfig(), ranker.image_size)).float()
            return (emb @ texts[id(ranker)].T).argmax(0)

    def first_pass():
        propose = sam_proposer(sam)  # a fresh memo: SAM really runs
        for k, image in enumerate(scenes):
            segments = propose(image)
            cached[k] = segment_records(segments)
            rank(old, image, segments)

    def requery():
        for k, image in enumerate(scenes):
            rank(new, image, maskset_from_records(cached[k], *image.shape[:2]))

    first_pass()  # warm-up (and the cache the re-answer reads)
    requery()
    times = {"first_pass": [], "requery": []}
    for _ in range(repeats):
        for name, run in (("first_pass", first_pass), ("requery", requery)):
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / images)
    ratio = [r / f for r, f in zip(times["requery"], times["first_pass"])]
    summary = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in times.items()}
    return {**summary, "ratio_median": statistics.median(ratio), "ratio_range": [min(ratio), max(ratio)],
            "images": images, "repeats": repeats, "image_size": list(scenes[0].shape[:2]),
            "what": "in process on the library: first pass = synth SAM + filters + crops + embeddings + argmax; "
                    "re-answer = cached RLE proposals decoded + crops + the new ranker's embeddings + argmax "
                    "(image reads and store writes not included: the queue adds those to both)"}


# --- orderings --------------------------------------------------------------------------------------
# Each rule maps the starting ranker's answers (per image its (N, P) segment x prompt similarities) and its
# threshold to a review order. "doubt" is the product's rule (slip.review.doubt_order of expected corrections:
# the same order as "errors" here, one threshold for every prompt); the others are the candidates it was chosen
# from on two development jobs (job seeds 2 and 3: review-rules.json, review-rules-seed3.json; the rule had to
# beat random at 25 and 50 images on both; of the three that did, "errors" keeps the per-prompt margin and
# threshold doubt, with "unclaimed" the one that never names a prompt). In those two files "doubt" is the earlier product rule, now
# "round-robin" (it lost to random on job seed 3); review-round-robin.json is that rule on the main job.
# "mix" and "density" are the cold-start remedies tried later on the same two jobs (review-rules-mix-density.json):
# on the main job doubt reviews more unseen-class objects than random yet learnt some classes less well at 25
# images, the pattern of uncertainty sampling picking outliers or too few typical examples. Neither beat doubt on
# both jobs, so the product rule stayed. "sampled" (doubt within a seeded random sample of 300 images) tests the tail
# hypothesis: doubt won on every starting ranker of the 300-image jobs and was a toss-up at 25 on the 1,000-image ones, as
# if the top 2.5 % of a big job were too atypical to learn from. It passed the 1,000-image development job (job seed 4:
# review-job4-sampled.json) but on the main job, from 6 starting rankers, it is no better than doubt (review-sampled.json).


def _corrections(sims, threshold) -> list[float]:
    """Per image, :func:`slip.review.expected_corrections` with one threshold for every prompt."""
    return [expected_corrections(s, [threshold] * s.shape[1]) for s in sims]


def _product(sims, threshold):
    return doubt_order(_corrections(sims, threshold))


def _certainty_row(sim: np.ndarray, threshold) -> list[float]:
    return [prompt_certainty(sim[:, p], threshold) for p in range(sim.shape[1])]


def _rounds(c: np.ndarray) -> list[int]:
    """Rounds over the columns of ``c`` (images x queues of certainty; the column whose least certain image is
    the most doubtful first), each taking its least certain image not taken yet."""
    queues = [list(np.lexsort((np.arange(len(c)), c[:, p]))) for p in range(c.shape[1])]
    turn = sorted(range(c.shape[1]), key=lambda p: (c[queues[p][0], p], p))
    taken, order = set(), []
    while len(order) < len(c):
        for p in turn:
            while queues[p] and queues[p][0] in taken:
                queues[p].pop(0)
            if queues[p]:
                taken.add(queues[p][0]), order.append(int(queues[p].pop(0)))
    return order


def _round_robin(sims, threshold) -> list[int]:
    """The earlier product rule: the prompts in turn, each taking its least certain image not taken yet."""
    return _rounds(np.array([_certainty_row(s, threshold) for s in sims]))


def _unclaimed(sim: np.ndarray, threshold) -> float:
    """:func:`slip.review.unclaimed` with one threshold for every prompt."""
    return unclaimed(sim, [threshold] * sim.shape[1])


def _with_unclaimed(sims, threshold) -> list[int]:
    """``round-robin`` with one more queue beside the prompts' own: the images with the most segments no prompt
    claims (objects the ranker cannot name) first; it takes its turn in every round like a prompt."""
    return _rounds(np.array([[*_certainty_row(s, threshold), -_unclaimed(s, threshold)] for s in sims]))


def _turns(first: list[int], second) -> list[int]:
    """Two orders of the same images taking turns (``first`` leads), each image once, at its earlier place."""
    taken, order = set(), []
    for pair in zip(first, second):
        for i in (int(j) for j in pair):
            if i not in taken:
                taken.add(i), order.append(i)
    return order


def _alternating(sims, threshold) -> list[int]:
    """``round-robin`` and ``unclaimed`` taking turns, each image once."""
    return _turns(_round_robin(sims, threshold), _by_score([_unclaimed(s, threshold) for s in sims]))


def _mix(sims, threshold) -> list[int]:
    """``doubt`` and a seeded shuffle of the job taking turns, each image once (typical images beside doubtful)."""
    return _turns(_product(sims, threshold), np.random.default_rng(7).permutation(len(sims)))


def _density(sims, threshold) -> list[int]:
    """``doubt`` weighted by how typical the image is (information density): the mean over its segments of the
    segment's mean cosine similarity, clipped at 0, to 2,000 of the job's segments (rows of ``(N, P)`` similarity
    centred on the job's mean), so outliers come later."""
    rows = np.concatenate([s for s in sims if len(s)])
    centre = rows.mean(0)

    def unit(x):
        x = x - centre
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)

    reference = unit(rows[np.random.default_rng(0).permutation(len(rows))[:2000]])
    typical = [float(np.clip(unit(s) @ reference.T, 0, None).mean()) if len(s) else 0.0 for s in sims]
    return _by_score(np.asarray(_corrections(sims, threshold)) * np.asarray(typical))


SAMPLE = 300  # images in the "sampled" rule's random sample: the size of the development jobs doubt won on


def _sampled(sims, threshold) -> list[int]:
    """``doubt`` within a seeded random sample of :data:`SAMPLE` images of the job first, then the rest of the job
    by doubt: the first 25 are the top 8 % of a 300-image job, as on the development jobs, not the top 2.5 % of
    1,000 (the tail hypothesis: the most doubtful images of a big job are atypical)."""
    inside = {int(i) for i in np.random.default_rng(300).permutation(len(sims))[:SAMPLE]}
    doubt = _product(sims, threshold)
    return [i for i in doubt if i in inside] + [i for i in doubt if i not in inside]


def _by_score(scores) -> list[int]:
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))]


RULES = {
    "doubt": _product,
    "round-robin": _round_robin,
    "image-doubt": lambda sims, t: _by_score([image_doubt(s, [t] * s.shape[1]) for s in sims]),
    "unclaimed": lambda sims, t: _by_score([_unclaimed(s, t) for s in sims]),
    "errors": _product,  # image doubt + unclaimed: the candidate the product rule was (its name in review-rules*.json)
    "with-unclaimed": _with_unclaimed,
    "alternate": _alternating,
    "mix": _mix,
    "density": _density,
    "sampled": _sampled,
}


# --- the bench ---------------------------------------------------------------------------------------


def main() -> int:
    a = parse_args()
    if a.pool:
        return pool(a.pool, a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.perf_counter()
    sizes = [int(s) for s in a.sizes.split(",")]
    job_classes = SEEN[: a.job_classes - a.unseen] + UNSEEN[: a.unseen]
    unseen = UNSEEN[: a.unseen]
    a.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    start = starting_ranker(a, job_classes, unseen)
    world = job_world(a, job_classes)
    source = job_source(a, job_classes)
    prompts = tuple(job_classes)
    base = Scorer(start, world, prompts)
    folder = a.work / _job_key(a, job_classes)
    mine = f"-s{a.start_seed}" if a.start_seed else ""  # what depends on the starting ranker: its own folders
    pseudo_prompts = _pseudo_prompts(a, prompts, unseen)
    kind = f"-p{a.pseudo}" if a.pseudo else ""  # runs with pseudo-labels: their own folders
    kind += f"-n{a.negatives}" if a.negatives != NEGATIVES else ""  # and with another number of background crops
    if a.pseudo and len(pseudo_prompts) < len(prompts):
        kind += "-" + "-".join(p.replace(" ", "_") for p in pseudo_prompts)
    proposals = Proposals(folder / f"proposals{mine}", source, base, prompts)
    everything = list(range(a.images))
    sims = [base.image(i)[0] for i in everything]
    orders = {name: RULES[name](sims, base.threshold) for name in a.orders.split(",")}
    for r in range(a.random_seeds):
        orders[f"random-{r}"] = [int(i) for i in np.random.default_rng([18, r]).permutation(a.images)]
    rare = [p for p in prompts if (a.weights or {}).get(p, 1.0) < 1.0]
    runs: dict[str, dict] = {name: {n: {} for n in sizes} for name in orders}
    for n in sizes:
        scorers = {}
        for seed in range(a.tune_seeds):
            for name, order in orders.items():  # interleaved: every ordering at one seed, then the next seed
                t0 = time.perf_counter()
                reviewed = order[:n]
                rest = sorted(set(everything) - set(reviewed))
                thresholds = [base.threshold if p in pseudo_prompts else None for p in prompts]
                answers = confident_answers(sims, thresholds, per_prompt=a.pseudo, exclude=reviewed)
                run = folder / f"runs{mine}" / (f"{name}-{n}{kind}" + (f"-t{seed}" if seed else ""))
                path, reused = review(a, reviewed, world, prompts, start, run, source, proposals, seed=seed,
                                      answers=answers)
                tuned = scorers[name, seed] = Scorer(path, world, prompts)
                per_class = _per_class(tuned, rest, world, prompts)
                runs[name][n][seed] = record = {
                    "rest_images": len(rest), "accuracy_rest": tuned.accuracy(rest),
                    "start_accuracy_rest": base.accuracy(rest), "threshold": tuned.threshold,
                    "reviewed_objects": _objects(world, reviewed, prompts),
                    "start_errors_in_reviewed": int(sum(not h for i in reviewed for h in base.hits(i))),
                    "per_class_rest": per_class, "accuracy_rest_rare": _class_accuracy(tuned, rest, world, prompts, rare),
                    "pseudo_labels": len(answers), "pseudo_precision": _precision(answers, world),
                    "seconds": round(time.perf_counter() - t0, 1), "reused": reused}
                print(f"{name:>12} N={n:<4} seed {seed}  rest {record['accuracy_rest']:.1%} (start ranker on the same "
                      f"rest {record['start_accuracy_rest']:.1%}) [{record['seconds']} s{', reused' if reused else ''}]",
                      flush=True)
        common = sorted(set(everything) - set().union(*(set(order[:n]) for order in orders.values())))
        for (name, seed), scorer in scorers.items():
            runs[name][n][seed]["accuracy_common"] = scorer.accuracy(common)
            runs[name][n][seed]["common_images"] = len(common)
    record = _record(a, base, runs, sizes, job_classes, unseen, rare, start, world, load, started)
    if not a.no_requery:
        first = a.orders.split(",")[0]
        largest = folder / f"runs{mine}" / f"{first}-{max(sizes)}{kind}" / "ranker"
        record["requery_cost"] = requery_cost(a, source, start, largest, prompts)
        record["targets"]["requery_at_most_5_percent_of_first_pass_library"] = record["requery_cost"]["ratio_median"] <= 0.05
    record["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    _print_table(record)
    print(f"wrote {a.out}")
    return 0 if all(record["targets"].values()) else 1


def _source_key(a, job_classes) -> str:
    return f"job-{'-'.join(c.replace(' ', '_') for c in job_classes)}-s{a.job_seed}-p{a.job_per_class}-t{a.tile}"


def _job_key(a, job_classes) -> str:
    """The job's cache folder: its source dataset's, plus the class weights of a long-tailed job."""
    if not a.weights:
        return _source_key(a, job_classes)
    return _source_key(a, job_classes) + "-w" + "-".join(f"{k.replace(' ', '_')}{v:g}" for k, v in sorted(a.weights.items()))


def _pseudo_prompts(a, prompts, unseen) -> tuple[str, ...]:
    """The prompts ``--pseudo-prompts`` names (``seen``: the job's prompts the starting ranker learnt)."""
    if not a.pseudo_prompts:
        return tuple(prompts)
    if a.pseudo_prompts == "seen":
        return tuple(p for p in prompts if p not in unseen)
    named = tuple(n.strip() for n in a.pseudo_prompts.split(","))
    if not set(named) <= set(prompts):
        raise SystemExit(f"--pseudo-prompts: {', '.join(sorted(set(named) - set(prompts)))} not a prompt of the job")
    return tuple(p for p in prompts if p in named)


def _precision(answers, world) -> float | None:
    """Share of pseudo-labels (image, prompt, segment) that are right: the image holds the prompt's class and
    the segment is its object (IoU > 0.5); None without any."""
    if not answers:
        return None
    o, labels = world["offsets"], world["labels"]
    right = [p in labels[i] and bool(world["ious"][o[i] + j, list(labels[i]).index(p)] > 0.5) for i, p, j in answers]
    return float(np.mean(right))


def _objects(world, images, prompts) -> dict[str, int]:
    """Objects per class in ``images``."""
    counts = np.bincount(np.asarray([int(c) for i in images for c in world["labels"][i]], int), minlength=len(prompts))
    return {p: int(k) for p, k in zip(prompts, counts)}


def _per_class(scorer: Scorer, images, world, prompts) -> dict:
    hits: dict[str, list[bool]] = {p: [] for p in prompts}
    for i in images:
        for c, h in zip(world["labels"][i], scorer.hits(i)):
            hits[prompts[int(c)]].append(h)
    return {p: round(float(np.mean(v)), 4) if v else None for p, v in hits.items()}


def _class_accuracy(scorer: Scorer, images, world, prompts, classes) -> float | None:
    """Object-level accuracy over the objects of ``classes`` only (None without any)."""
    ids = {prompts.index(c) for c in classes}
    flags = [h for i in images for c, h in zip(world["labels"][i], scorer.hits(i)) if int(c) in ids]
    return float(np.mean(flags)) if flags else None


def _spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": len(values)}


def _pairs(mine, theirs) -> list[float]:
    """Per (mine, theirs) pair: 1 where mine is higher, 0.5 for a tie, 0 where lower."""
    return [(x > y) + 0.5 * (x == y) for x in mine for y in theirs]


def _share(pairs: list[float]) -> float | None:
    """The mean of :func:`_pairs` results (the share mine wins, ties counting half); None without pairs."""
    return float(np.mean(pairs)) if pairs else None


def _win_share(mine, theirs) -> float | None:
    """The share of (mine, theirs) pairs where mine is higher, ties counting half; None without pairs."""
    return _share(_pairs(mine, theirs))


def _record(a, base, runs, sizes, job_classes, unseen, rare, start, world, load, started) -> dict:
    arms = {name: [name] for name in runs if not name.startswith("random")}
    arms["random"] = [name for name in runs if name.startswith("random")]
    all_images = list(range(a.images))
    at_zero = {"accuracy_rest": base.accuracy(all_images),
               "accuracy_rest_rare": _class_accuracy(base, all_images, world, job_classes, rare)}

    def values(arm, n, key):
        return [r[key] for name in arms[arm] for r in runs[name][n].values()]

    summary = {}
    for key in ("accuracy_rest", "accuracy_common", "gain", "accuracy_rest_rare"):
        summary[key] = {arm: {} for arm in arms}
        for arm in arms:
            if key in at_zero:
                summary[key][arm]["0"] = _spread([at_zero[key]])
            for n in sizes:
                if key == "gain":
                    got = [r["accuracy_rest"] - r["start_accuracy_rest"] for name in arms[arm] for r in runs[name][n].values()]
                else:
                    got = values(arm, n, key)
                summary[key][arm][str(n)] = _spread(got)
    wins = {arm: {str(n): _win_share(values(arm, n, "accuracy_rest"), values("random", n, "accuracy_rest"))
                  for n in sizes} for arm in arms if arm != "random"}
    targets = {}
    rest = summary["accuracy_rest"]
    if "doubt" in arms and 50 in sizes:
        targets["doubt_50_gain_on_rest_at_least_10_points"] = summary["gain"]["doubt"]["50"]["median"] >= 0.10
    for n in (25, 50):
        if "doubt" in arms and n in sizes:
            targets[f"doubt_beats_random_at_{n}_rest_median"] = rest["doubt"][str(n)]["median"] > rest["random"][str(n)]["median"]
    return {
        "command": "python -m bench.review " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_start": load,
                    "load_average_end": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__},
        "job": {"images": a.images, "classes": list(job_classes), "unseen_by_start_ranker": list(unseen),
                "class_weights": a.weights, "rare_classes": rare, "objects": _objects(world, all_images, job_classes),
                "segments": int(len(world["ious"])), "sam_seconds_first_pass": float(world["sam_seconds"])},
        "start_ranker": {"path": str(start), "threshold": base.threshold,
                         "per_class_all": _per_class(base, all_images, world, job_classes)},
        "accuracy": "object-level: per class present in an image, the argmax segment of its prompt has IoU > 0.5 "
                    "with the object's true mask (slip.evaluate)",
        "arms": {"runs_per_arm": {arm: len(names) * a.tune_seeds for arm, names in arms.items()},
                 "what": "each arm's median, min and max over its runs: a rule = its ordering fine-tuned with each "
                         "seed; random = each random ordering fine-tuned with each seed (the same seeds)"},
        "curves_rest": summary["accuracy_rest"],
        "curves_common": summary["accuracy_common"],
        "gain_over_start_on_same_rest": summary["gain"],
        "curves_rest_rare": summary["accuracy_rest_rare"] if rare else None,
        "win_share_vs_random_rest": wins,
        "runs": {k: {str(n): {str(s): rec for s, rec in seeds.items()} for n, seeds in r.items()} for k, r in runs.items()},
        "targets": targets,
    }


def pool(files: list[Path], out: Path) -> int:
    """One record over results of the same job and orderings run with different starting rankers: each arm's
    runs pooled (medians, [min, max]), wins counted between runs of the same starting ranker only (the starting
    ranker is what both arms share), and per starting ranker its arms' medians. Writes ``out``."""
    records = [json.loads(Path(f).read_text()) for f in files]
    jobs = {json.dumps({k: r["job"][k] for k in ("images", "classes", "unseen_by_start_ranker", "class_weights")})
            for r in records}
    if len(jobs) != 1:
        raise SystemExit(f"--pool: the results are of different jobs ({', '.join(map(str, files))})")
    arm = lambda name: "random" if name.startswith("random") else name  # noqa: E731
    sizes = sorted({n for r in records for by_n in r["runs"].values() for n in by_n}, key=int)
    arms = sorted({arm(name) for r in records for name in r["runs"]}, key=lambda x: (x == "random", x))

    def runs(r, a_, n):
        return [rec for name, by_n in r["runs"].items() if arm(name) == a_ for rec in by_n.get(n, {}).values()]

    curves = {a_: {"0": _spread([r["curves_rest"]["random"]["0"]["median"] for r in records]),
                   **{n: _spread([x["accuracy_rest"] for r in records for x in runs(r, a_, n)]) for n in sizes}}
              for a_ in arms}
    gain = {a_: {n: _spread([x["accuracy_rest"] - x["start_accuracy_rest"] for r in records for x in runs(r, a_, n)])
                 for n in sizes} for a_ in arms}
    errors = {a_: {n: _spread([x.get("start_errors_in_reviewed") for r in records for x in runs(r, a_, n)])
                   for n in sizes} for a_ in arms}  # what reviewers correct: the starting ranker's misses they see
    wins = {}
    for a_ in arms[:-1]:
        wins[a_] = {}
        for n in sizes:
            wins[a_][n] = _share([p for r in records for p in _pairs([v["accuracy_rest"] for v in runs(r, a_, n)],
                                                                    [v["accuracy_rest"] for v in runs(r, "random", n)])])
    per_start = [{"file": str(f), "start_ranker": r["start_ranker"]["path"], "args_start_seed": r["args"].get("start_seed", "0"),
                  "machine": r["machine"], "accuracy_at_0": r["curves_rest"]["random"]["0"]["median"],
                  "medians": {a_: {n: _spread([x["accuracy_rest"] for x in runs(r, a_, n)])["median"] for n in sizes}
                              for a_ in arms}} for f, r in zip(files, records)]
    differences = {a_: {n: _difference(per_start, a_, n) for n in sizes} for a_ in arms[:-1]}
    targets = {}
    if "doubt" in arms:
        if "50" in sizes:
            targets["doubt_50_gain_on_rest_at_least_10_points"] = gain["doubt"]["50"]["median"] >= 0.10
        for n in ("25", "50"):
            if n in sizes:
                targets[f"doubt_beats_random_at_{n}_rest_median"] = curves["doubt"][n]["median"] > curves["random"][n]["median"]
    record = {
        "command": "python -m bench.review " + " ".join(sys.argv[1:]),
        "pooled": [str(f) for f in files],
        "job": records[0]["job"], "accuracy": records[0]["accuracy"],
        "arms": {"what": "each arm's runs over every starting ranker: a rule = its ordering (per starting ranker) fine-tuned "
                         "with each seed; random = each random ordering fine-tuned with each seed; median, min, max",
                 "runs_per_arm": {a_: curves[a_][sizes[0]]["runs"] for a_ in arms}},
        "curves_rest": curves, "gain_over_start_on_same_rest": gain,
        "start_errors_in_reviewed": errors,
        "start_errors_what": "objects of the reviewed images the starting ranker answered wrong (of 4 per image)",
        "win_share_vs_random_rest": wins,
        "win_share_what": "share of (rule run, random run) pairs of the same starting ranker the rule wins, ties half",
        "difference_vs_random": differences,
        "difference_what": f"per starting ranker, the rule's median minus random's (accuracy on the rest, points of 1.0); "
                           f"their mean and a 95 % bootstrap interval of it over the starting rankers ({BOOTSTRAP} "
                           f"resamples, seeded): does the rule beat random beyond the starting ranker's draw?",
        "per_start_ranker": per_start, "targets": targets,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    _print_table(record)
    print("the starting ranker's errors in the reviewed images (median): " + "; ".join(
        f"{a_} " + ", ".join(f"{n}: {v['median']:.0f}" for n, v in row.items() if v["median"] is not None)
        for a_, row in errors.items()))
    for a_, row in differences.items():
        print(f"{a_} minus random, mean over starting rankers [95 % bootstrap]: " + "; ".join(
            f"{n}: {d['mean']:+.1%} " + (f"[{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]" if d["ci95"] else "[too few rankers]")
            + f", above on {d['rankers_above']} of "
            f"{len(d['per_ranker'])}" for n, d in row.items() if d["mean"] is not None))
    for s_ in per_start:
        print(f"{s_['start_ranker']} ({s_['file']}): " + "; ".join(
            f"{a_} " + ", ".join(f"{n}: {v:.1%}" for n, v in row.items() if v is not None)
            for a_, row in s_["medians"].items() if any(v is not None for v in row.values())))
    print(f"wrote {out}")
    return 0 if all(targets.values()) else 1


BOOTSTRAP = 10_000  # resamples of the starting rankers for the interval of the mean difference
MIN_BOOTSTRAP = 3  # starting rankers an interval needs (resampling 1 or 2 values gives no interval worth the name)


def _difference(per_start: list[dict], arm: str, n: str) -> dict:
    """``arm``'s median minus random's at ``n`` per starting ranker that has both; their mean with a 95 % bootstrap
    interval over the starting rankers (percentiles of :data:`BOOTSTRAP` seeded resamples; None with fewer than
    :data:`MIN_BOOTSTRAP`); None values without any."""
    diffs = [s["medians"][arm][n] - s["medians"]["random"][n] for s in per_start
             if s["medians"][arm][n] is not None and s["medians"]["random"][n] is not None]
    if not diffs:
        return {"per_ranker": [], "mean": None, "ci95": None, "rankers_above": 0}
    values = np.asarray(diffs)
    means = values[np.random.default_rng(0).integers(0, len(values), (BOOTSTRAP, len(values)))].mean(1)
    ci95 = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))] if len(values) >= MIN_BOOTSTRAP else None
    return {"per_ranker": [round(float(d), 6) for d in diffs], "mean": float(values.mean()), "ci95": ci95,
            "rankers_above": int((values > 0).sum())}


def _print_table(record: dict) -> None:
    def cell(d):
        if d["median"] is None:
            return "-"
        return f"{d['median']:.1%}" + ("" if d["runs"] == 1 else f" [{d['min']:.1%}, {d['max']:.1%}]")

    for title, key in (("object-level accuracy on the unreviewed rest", "curves_rest"),
                       ("on the images no ordering reviewed", "curves_common"),
                       ("on the rare classes' objects of the rest", "curves_rest_rare")):
        table = record.get(key)
        if not table:
            continue
        sizes = sorted({s for arm in table.values() for s in arm}, key=int)
        print(f"\n{title}: median [min, max] over the runs")
        print(f"{'reviewed':>12} " + " ".join(f"{s:>24}" for s in sizes))
        for arm, row in table.items():
            print(f"{arm:>12} " + " ".join(f"{cell(row[s]) if s in row else '':>24}" for s in sizes))
    print("share of (rule run, random run) pairs the rule wins: " + "; ".join(
        f"{arm} " + ", ".join(f"N={n}: {v:.0%}" for n, v in row.items() if v is not None) for arm, row in record["win_share_vs_random_rest"].items()))
    cost = record.get("requery_cost")
    if cost:
        print(f"re-answer with the new ranker from cached proposals: {cost['requery']['median_s'] * 1000:.0f} ms per "
              f"image vs {cost['first_pass']['median_s'] * 1000:.0f} ms first pass ({cost['ratio_median']:.1%})")
    print("targets: " + ", ".join(f"{k}={v}" for k, v in record["targets"].items()))


if __name__ == "__main__":
    raise SystemExit(main())

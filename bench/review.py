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
    python -m bench.review --threads 1 --sizes 25,50 --no-requery --tune-seeds 3 --random-seeds 1 \
        --orders oracle-errors --start-seed 0 --out bench/results/review-start0-oracle.json
                                                # the diagnostic that reads the truth; --pool merges it with
                                                # review-start0.json (the same starting ranker) arm by arm
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
per prompt on unreviewed images trained on beside the review, :func:`bench.review_pseudo.confident_answers`;
``--balance``: every class drawn equally often in the fine-tune, ``TrainConfig.balance_classes``). Every
(ordering, N) is fine-tuned with ``--tune-seeds`` seeds (the seed of initialisation, data order,
augmentation and the train/validation split of the reviewed crops: the same seeds for every ordering), so
the comparison is not one fine-tune's luck. Orderings: ``doubt`` (the product's
:func:`slip.review.doubt_order` of the starting ranker's answers, what ``--order doubt`` exports), the
candidate rules of ``--orders`` (:data:`bench.review_rules.RULES`: how the rule was chosen; and the diagnostics
of :data:`bench.review_rules.ORACLES`, which read the truth: ``oracle-errors`` puts the starting ranker's errors
first, the most any doubt estimate could), and ``random``
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
from bench.review_pseudo import confident_answers, precision, write_pseudo
from bench.review_rules import ORACLES, RULES
from bench.review_summary import pool, print_table, spread, win_share
from slip.review import NEGATIVES, ReviewedImage, ReviewedObject, rle_of, write_labels
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
    p.add_argument("--orders", default="doubt", help=f"doubt rules to run besides random: {', '.join(RULES)}; "
                                                     f"diagnostics that read the truth: {', '.join(ORACLES)}")
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
    p.add_argument("--balance", action="store_true",
                   help="fine-tune with class-balanced draws (TrainConfig.balance_classes; the product's recipe: off)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--work", type=Path, default=Path("data/review-bench"), help="cache and work folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                   help="pool earlier results of the same job run with different starting rankers (--start-seed, or "
                        "another machine) into --out; runs nothing else")
    a = p.parse_args()
    a.weights = _weights(a.class_weights)
    unknown = [o for o in a.orders.split(",") if o not in RULES and o not in ORACLES]
    if unknown:
        p.error(f"unknown --orders {', '.join(unknown)}: use {', '.join([*RULES, *ORACLES])}")
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
    starting ranker's ``answers`` as pseudo-labels: :func:`bench.review_pseudo.confident_answers`), fine-tune
    ``start`` on it with ``seed`` (:func:`slip.train.finetune.fine_tune`), recalibrate. Returns the ranker and
    whether it was reused (the same review fine-tuned before: same images, start, seed, epochs and answers)."""
    from slip.threshold import write_threshold
    from slip.train.finetune import REVIEW_RECIPE, fine_tune

    done = run / "reviewed.json"
    marker = {"reviewed": reviewed, "start": str(start), "negatives": a.negatives, "tune_seed": seed, "epochs": a.epochs,
              "pseudo": [list(t) for t in answers], "balance": a.balance}
    earlier = {"tune_seed": 0, "epochs": None, "pseudo": [], "balance": False}  # what a marker without the key meant
    if done.is_file() and {**earlier, **json.loads(done.read_text())} == marker:
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
    write_pseudo(run / "labels", answers, source, proposals, first=len(items))
    config = replace(REVIEW_RECIPE, device="cpu", progress=False, epochs=a.epochs or REVIEW_RECIPE.epochs,
                     seed=seed, split_seed=seed, balance_classes=a.balance)
    result = fine_tune(run / "labels", run / "ranker", init=str(start), config=config)
    scorer = Scorer(result.out, world, prompts)
    point = best_threshold(scorer.probes(reviewed))
    write_threshold(result.out, {**point.to_json(), "calibrated_on": f"{len(reviewed)} reviewed images"})
    shutil.rmtree(run / "labels")  # ~2 MB per run; the ranker and the marker are what a rerun reuses
    done.write_text(json.dumps(marker))
    return result.out, False


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
    if a.pseudo and len(pseudo_prompts) < len(prompts):
        kind += "-" + "-".join(p.replace(" ", "_") for p in pseudo_prompts)
    kind += f"-n{a.negatives}" if a.negatives != NEGATIVES else ""  # and with another number of background crops
    kind += "-b" if a.balance else ""  # and with class-balanced draws
    thresholds = [base.threshold if p in pseudo_prompts else None for p in prompts]  # of the prompts pseudo-labelled
    proposals = Proposals(folder / f"proposals{mine}", source, base, prompts)
    everything = list(range(a.images))
    sims = [base.image(i)[0] for i in everything]
    misses = [sum(not h for h in base.hits(i)) for i in everything]  # the starting ranker's errors per image (truth)
    orders = {name: RULES[name](sims, base.threshold) if name in RULES else ORACLES[name](sims, base.threshold, misses)
              for name in a.orders.split(",")}
    for r in range(a.random_seeds):
        orders[f"random-{r}"] = [int(i) for i in np.random.default_rng([18, r]).permutation(a.images)]
    rare = [p for p in prompts if (a.weights or {}).get(p, 1.0) < 1.0]
    runs: dict[str, dict] = {name: {n: {} for n in sizes} for name in orders}
    for n in sizes:
        scorers = {}
        answers = {name: confident_answers(sims, thresholds, per_prompt=a.pseudo, exclude=order[:n])
                   for name, order in orders.items()}  # pseudo-labels depend on the reviewed images, not the seed
        for seed in range(a.tune_seeds):
            for name, order in orders.items():  # interleaved: every ordering at one seed, then the next seed
                t0 = time.perf_counter()
                reviewed = order[:n]
                rest = sorted(set(everything) - set(reviewed))
                run = folder / f"runs{mine}" / (f"{name}-{n}{kind}" + (f"-t{seed}" if seed else ""))
                path, reused = review(a, reviewed, world, prompts, start, run, source, proposals, seed=seed,
                                      answers=answers[name])
                tuned = scorers[name, seed] = Scorer(path, world, prompts)
                per_class = _per_class(tuned, rest, world, prompts)
                runs[name][n][seed] = record = {
                    "rest_images": len(rest), "accuracy_rest": tuned.accuracy(rest),
                    "start_accuracy_rest": base.accuracy(rest), "threshold": tuned.threshold,
                    "reviewed_objects": _objects(world, reviewed, prompts),
                    "start_errors_in_reviewed": int(sum(misses[i] for i in reviewed)),
                    "per_class_rest": per_class, "accuracy_rest_rare": _class_accuracy(tuned, rest, world, prompts, rare),
                    "pseudo_labels": len(answers[name]), "pseudo_precision": precision(answers[name], world),
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
    print_table(record)
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
                summary[key][arm]["0"] = spread([at_zero[key]])
            for n in sizes:
                if key == "gain":
                    got = [r["accuracy_rest"] - r["start_accuracy_rest"] for name in arms[arm] for r in runs[name][n].values()]
                else:
                    got = values(arm, n, key)
                summary[key][arm][str(n)] = spread(got)
    wins = {arm: {str(n): win_share(values(arm, n, "accuracy_rest"), values("random", n, "accuracy_rest"))
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


if __name__ == "__main__":
    raise SystemExit(main())

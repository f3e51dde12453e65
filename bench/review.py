"""A simulated review (issue 18): does reviewing the most doubtful images first teach the ranker the
classes it never learnt, and does it beat reviewing images at random?

    python -m bench.review                      # the full run: 1,000-image job (~60 min on 2 quiet cores, caches kept)
    python -m bench.review --images 100 --ranker-per-class 40 --ranker-epochs 6 --random-seeds 1 --sizes 25,50
                                                 # the small version (~3 min once the caches exist)

The world is the synthetic one (:mod:`slip.data.synth`). The job: ``--images`` 2x2 composites (tiles of
``--tile`` px) of ``--job-classes`` classes, drawn from a dataset generated with ``--job-seed`` (images no
ranker saw), queried with every class name as a prompt. The starting ranker is the bundled synth ranker's
recipe (:mod:`slip.train.synth_clip`) trained on the 22 catalogue classes that leave out ``--unseen`` of
the job's classes (the paper's case: names the ranker never learnt). SAM's proposals are the bundled synth
SAM's, computed once per image and kept (segment once, query many), as are each segment's crop; each
ranker re-embeds those crops only.

A review of N images takes the first N images of an ordering, corrects them from the ground truth (each
tile's object and its true mask: what a careful reviewer would draw), writes them as a labels folder
(:func:`slip.review.write_labels`, what ``slip labels import`` writes, with the SAM proposals the
reviewer rejected as background crops), fine-tunes the starting ranker on
it (:func:`slip.train.finetune.fine_tune`, what ``slip train-ranker --init`` runs), recalibrates the
threshold on the reviewed images, and scores the new ranker on the images nobody reviewed. Orderings:
``doubt`` (:func:`slip.review.doubt_order` of the starting ranker's answers: the prompts in turn, each
giving its least certain image) and
``random`` (``--random-seeds`` seeded shuffles; medians reported).

Accuracy is object-level, as in :mod:`slip.evaluate`: for each class present in an image, the argmax
segment of its prompt has IoU > 0.5 with the object's true mask. Reported per ordering and N: accuracy
on the unreviewed rest (the issue's curve), the starting ranker's accuracy on that same rest (the gain
is learning, not easier leftovers: doubt leaves the easy images behind), and accuracy on the images that
neither ordering reviewed (a common yardstick). Writes ``bench/results/review.json``. Caches (the
ranker, the proposals and crops of the job) live under ``--work`` (default ``data/review-bench``).
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
from slip.review import NEGATIVES, ReviewedImage, ReviewedObject, doubt_order, prompt_certainty, rle_of, write_labels
from slip.threshold import read_threshold

RESULTS = Path(__file__).parent / "results" / "review.json"
SEEN = ("circle", "square", "triangle", "star", "heart", "crescent", "cross", "arrow", "ring", "hexagon")
UNSEEN = ("fish", "bird", "cat", "butterfly", "house", "tree", "mushroom", "snowman", "turtle", "ghost")
CROP = 64  # crop side the bundled ranker recipe uses


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
    p.add_argument("--calibrate-composites", type=int, default=100, help="composites calibrating the starting ranker")
    p.add_argument("--sizes", default="25,50,100", help="reviewed images per curve point")
    p.add_argument("--random-seeds", type=int, default=3, help="random orderings (median reported)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the review recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--work", type=Path, default=Path("data/review-bench"), help="cache and work folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


# --- cached steps ------------------------------------------------------------------------------------


def starting_ranker(a, job_classes: tuple[str, ...], unseen: tuple[str, ...]) -> Path:
    """The synth ranker recipe on the catalogue minus ``unseen``, calibrated; cached."""
    from slip.calibrate import calibrate_rankers, save_calibration
    from slip.train.ranker import train_ranker
    from slip.train.synth_clip import SYNTH_CLIP_MODEL, SYNTH_CLIP_RECIPE

    classes = [c for c in CLASS_NAMES if c not in unseen]
    name = f"ranker-{len(classes)}-{'-'.join(sorted(c.replace(' ', '_') for c in unseen))}-p{a.ranker_per_class}-e{a.ranker_epochs}"
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
                                                                       device="cpu", progress=False))
    print("calibrating its threshold on composites of its own classes (SAM proposals)", flush=True)
    (run,) = calibrate_rankers(data, [str(work)], composites=a.calibrate_composites, proposals="sam", sam="synth", device="cpu")
    run = replace(run, directory=work)
    save_calibration(run)
    work.rename(out)
    return out


def job_world(a, job_classes: tuple[str, ...]) -> dict:
    """The job's composites, their SAM proposals, each proposal's crop and IoU with each tile's object; cached."""
    from slip.evaluate import composite_source, sam_proposer

    folder = a.work / _job_key(a, job_classes)
    data = folder / "source"
    cache = folder / f"world-{a.images}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    if not (data / "classes.json").is_file():
        generate_dataset(data, classes=list(job_classes), per_class=a.job_per_class, size=128, seed=a.job_seed)
    source = composite_source(data, seed=a.job_seed, split="all", tile_size=a.tile)
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
           proposals: Proposals) -> Path:
    """Correct ``reviewed`` from the truth, write the labels folder (with the rejected proposals), fine-tune
    ``start`` on it, recalibrate."""
    from slip.threshold import write_threshold
    from slip.train.finetune import REVIEW_RECIPE, fine_tune

    done = run / "reviewed.json"
    if done.is_file() and json.loads(done.read_text()) == {"reviewed": reviewed, "start": str(start), "negatives": NEGATIVES}:
        return run / "ranker"  # this review was fine-tuned before (same images, same start): reuse it
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
                 heldout_fraction=0.0)
    config = replace(REVIEW_RECIPE, device="cpu", progress=False, epochs=a.epochs or REVIEW_RECIPE.epochs)
    result = fine_tune(run / "labels", run / "ranker", init=str(start), config=config)
    scorer = Scorer(result.out, world, prompts)
    point = best_threshold(scorer.probes(reviewed))
    write_threshold(result.out, {**point.to_json(), "calibrated_on": f"{len(reviewed)} reviewed images"})
    done.write_text(json.dumps({"reviewed": reviewed, "start": str(start), "negatives": NEGATIVES}))
    return result.out


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
    from slip.evaluate import composite_source

    source = composite_source(a.work / _job_key(a, job_classes) / "source", seed=a.job_seed, split="all",
                              tile_size=a.tile)
    prompts = tuple(job_classes)
    base = Scorer(start, world, prompts)
    proposals = Proposals(a.work / _job_key(a, job_classes) / "proposals", source, base, prompts)
    everything = list(range(a.images))
    orders = {"doubt": doubt_order(np.array([base.certainties(i) for i in everything]))}
    for s in range(a.random_seeds):
        orders[f"random-{s}"] = [int(i) for i in np.random.default_rng([18, s]).permutation(a.images)]
    runs: dict[str, dict] = {name: {} for name in orders}
    for n in sizes:
        for name, order in orders.items():
            t0 = time.perf_counter()
            reviewed = order[:n]
            rest = sorted(set(everything) - set(reviewed))
            tuned = Scorer(review(a, reviewed, world, prompts, start, a.work / "runs" / f"{name}-{n}", source,
                                  proposals), world, prompts)
            runs[name][n] = {"rest_images": len(rest), "accuracy_rest": tuned.accuracy(rest),
                             "start_accuracy_rest": base.accuracy(rest), "threshold": tuned.threshold,
                             "unseen_reviewed_objects": _unseen_objects(world, reviewed, job_classes, unseen),
                             "start_errors_in_reviewed": int(sum(not h for i in reviewed for h in base.hits(i))),
                             "per_class_rest": _per_class(tuned, rest, world, prompts),
                             "seconds": round(time.perf_counter() - t0, 1), "_scorer": tuned, "_reviewed": set(reviewed)}
            print(f"{name:>9} N={n:<4} rest {runs[name][n]['accuracy_rest']:.1%} (start ranker on the same rest "
                  f"{runs[name][n]['start_accuracy_rest']:.1%}) [{runs[name][n]['seconds']} s]", flush=True)
        common = sorted(set(everything) - set().union(*(runs[k][n]["_reviewed"] for k in orders)))
        for name in orders:
            runs[name][n]["accuracy_common"] = runs[name][n].pop("_scorer").accuracy(common)
            runs[name][n]["common_images"] = len(common)
            del runs[name][n]["_reviewed"]
    record = _record(a, base, runs, sizes, job_classes, unseen, start, world, load, started)
    largest = a.work / "runs" / f"doubt-{max(sizes)}" / "ranker"
    record["requery_cost"] = requery_cost(a, source, start, largest, prompts)
    record["targets"]["requery_at_most_5_percent_of_first_pass_library"] = record["requery_cost"]["ratio_median"] <= 0.05
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    _print_table(record)
    print(f"wrote {a.out}")
    return 0 if all(record["targets"].values()) else 1


def _job_key(a, job_classes) -> str:
    return f"job-{'-'.join(c.replace(' ', '_') for c in job_classes)}-s{a.job_seed}-p{a.job_per_class}-t{a.tile}"


def _unseen_objects(world, reviewed, job_classes, unseen) -> int:
    ids = {job_classes.index(c) for c in unseen}
    return int(sum(int(c) in ids for i in reviewed for c in world["labels"][i]))


def _per_class(scorer: Scorer, images, world, prompts) -> dict:
    hits: dict[str, list[bool]] = {p: [] for p in prompts}
    for i in images:
        for c, h in zip(world["labels"][i], scorer.hits(i)):
            hits[prompts[int(c)]].append(h)
    return {p: round(float(np.mean(v)), 4) if v else None for p, v in hits.items()}


def _median(runs, names, n, key) -> float:
    return float(statistics.median(runs[k][n][key] for k in names))


def _record(a, base, runs, sizes, job_classes, unseen, start, world, load, started) -> dict:
    randoms = [k for k in runs if k.startswith("random")]
    all_images = list(range(a.images))
    curves = {"doubt": {"0": base.accuracy(all_images)}, "random": {"0": base.accuracy(all_images)}}
    common, gains = {"doubt": {}, "random": {}}, {"doubt": {}, "random": {}}
    for n in sizes:
        curves["doubt"][str(n)] = runs["doubt"][n]["accuracy_rest"]
        curves["random"][str(n)] = _median(runs, randoms, n, "accuracy_rest")
        common["doubt"][str(n)] = runs["doubt"][n]["accuracy_common"]
        common["random"][str(n)] = _median(runs, randoms, n, "accuracy_common")
        gains["doubt"][str(n)] = runs["doubt"][n]["accuracy_rest"] - runs["doubt"][n]["start_accuracy_rest"]
        gains["random"][str(n)] = float(statistics.median(
            runs[k][n]["accuracy_rest"] - runs[k][n]["start_accuracy_rest"] for k in randoms))
    targets = {}
    if 50 in sizes:
        targets["doubt_50_gain_on_rest_at_least_10_points"] = gains["doubt"]["50"] >= 0.10
    for n in (25, 50):
        if n in sizes:
            targets[f"doubt_beats_random_at_{n}_rest"] = curves["doubt"][str(n)] > curves["random"][str(n)]
            targets[f"doubt_beats_random_at_{n}_common"] = common["doubt"][str(n)] > common["random"][str(n)]
    return {
        "command": "python -m bench.review " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_start": load,
                    "load_average_end": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__},
        "job": {"images": a.images, "classes": list(job_classes), "unseen_by_start_ranker": list(unseen),
                "segments": int(len(world["ious"])), "sam_seconds_first_pass": float(world["sam_seconds"])},
        "start_ranker": {"path": str(start), "threshold": base.threshold,
                         "per_class_all": _per_class(base, all_images, world, job_classes)},
        "accuracy": "object-level: per class present in an image, the argmax segment of its prompt has IoU > 0.5 "
                    "with the object's true mask (slip.evaluate)",
        "curves_rest": curves,
        "curves_common": common,
        "gain_over_start_on_same_rest": gains,
        "runs": {k: {str(n): v for n, v in r.items()} for k, r in runs.items()},
        "targets": targets,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _print_table(record: dict) -> None:
    sizes = list(record["curves_rest"]["doubt"])
    print("\nobject-level accuracy on the unreviewed rest (common yardstick in brackets)")
    print(f"{'reviewed':>9} " + " ".join(f"{s:>15}" for s in sizes))
    for name in ("doubt", "random"):
        cells = [f"{record['curves_rest'][name][s]:.1%}" + (f" [{record['curves_common'][name][s]:.1%}]" if s != "0" else "")
                 for s in sizes]
        print(f"{name:>9} " + " ".join(f"{c:>15}" for c in cells))
    cost = record.get("requery_cost")
    if cost:
        print(f"re-answer with the new ranker from cached proposals: {cost['requery']['median_s'] * 1000:.0f} ms per "
              f"image vs {cost['first_pass']['median_s'] * 1000:.0f} ms first pass ({cost['ratio_median']:.1%})")
    print("targets: " + ", ".join(f"{k}={v}" for k, v in record["targets"].items()))


if __name__ == "__main__":
    raise SystemExit(main())

"""Queue commands for training and evaluation jobs::

    slip submit train DATASET --grid lr=1e-5,1e-4,1e-3 --grid proj_dim=128,512 [--wait] [--out DIR]
    slip submit evaluate DATASET --ranker SPEC [--ranker SPEC ...] [--proposals oracle|sam] [--wait]
    slip report JOB [JOB ...] --out report.html

Both are jobs like any other (:mod:`jobs`): a manifest whose units are the requests, one completion
record per unit, followed by ``slip status / wait / retry / jobs``. ``submit train`` has one unit per grid
cell (``slip.train``) and prints the paper's Table 1 (the best cell marked); ``submit evaluate`` one unit per
chunk of composites and ranker (``slip.evaluate``) and prints the accuracy per ranker. A ranker spec may be a hub id, ``synth``, ``tiny-random``, a local
directory (uploaded to the store), ``store:<prefix>`` or ``job:<train job id>`` (its best cell).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import List, Optional

import typer

from producer.common import client_from_env, queue_errors
from jobs.errors import ObjectNotFoundError
from slip.errors import ConfigError, InputError

GRID_KEYS = {"lr": float, "proj_dim": int, "image_lr": float, "text_lr": float}


# --- shared plumbing ------------------------------------------------------------------------------------


def parse_grid(specs: list[str]) -> list[dict]:
    """``["lr=1e-5,1e-4", "proj_dim=128,512"]`` -> the cells of their cartesian product, in order."""
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or name not in GRID_KEYS or not values.strip():
            raise ConfigError(f"--grid {spec!r}: use NAME=V1,V2 with NAME one of {', '.join(GRID_KEYS)}")
        try:
            axes[name] = [GRID_KEYS[name](v) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise ConfigError(f"--grid {spec!r}: {e}") from e
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] or [{}]


def load_job(store, job_id: str, kind: str):
    """The manifest of a ``kind`` job; a clear error when the job is not one."""
    from jobs.ledger import load_manifest

    try:
        manifest = load_manifest(store, job_id)
    except ObjectNotFoundError as e:
        raise InputError(f"no training or evaluation job {job_id!r} in store {store.url}") from e
    if manifest.kind != kind:
        raise InputError(f"job {job_id} is not a{'n' if kind[0] in 'ae' else ''} {kind} job (it is {manifest.kind})")
    return manifest


def job_requests(store, manifest) -> list[dict]:
    """The units' requests of a training or evaluation job, in order."""
    from jobs.status import iter_items

    return [item.request for item in iter_items(store, manifest)]


def unit_reasons(client, job_id: str) -> dict[int, str]:
    """Why each failed unit of a job failed (from its completion record)."""
    from jobs.status import chunk_records

    return {o.index: f"{o.error}: {o.reason}" for r in chunk_records(client.store, job_id) for o in r.items
            if o.state == "failed"}


def upload_dataset(client, dataset: Path) -> str:
    from jobs.training import upload_directory

    return upload_directory(client.store, dataset.expanduser())


def _resolve_ranker(client, spec: str) -> str:
    """A spec workers can load: local directories are uploaded, ``job:<id>`` is its best cell."""
    from jobs.training import STORE_SPEC, directory_manifest, put_directory
    from slip.request import digest

    if spec.startswith("job:"):
        rows = train_rows(client.store, spec[4:])
        finished = [r for r in rows if r.get("best_val_loss") is not None]
        if not finished:
            raise InputError(f"training job {spec[4:]} has no finished cell yet")
        return min(finished, key=lambda r: r["best_val_loss"])["checkpoint"]
    path = Path(spec).expanduser()
    if path.is_dir():
        prefix = f"rankers/{digest(directory_manifest(path))}"
        if not client.store.exists(f"{prefix}/config.json"):
            put_directory(client.store, path, prefix)
        return f"{STORE_SPEC}{prefix}"
    return spec


# --- slip submit train ------------------------------------------------------------------------------------


def submit_train(
    dataset: Path = typer.Argument(..., help="Labelled image folder: one sub-directory per class."),
    grid: List[str] = typer.Option([], "--grid", help="NAME=V1,V2,...; NAME: lr, proj_dim, image_lr, text_lr. Repeat."),
    image_backbone: str = typer.Option("resnet50", help="timm image backbone."),
    text_encoder: str = typer.Option("distilbert-base-uncased", help="HF id | DIR (on the workers) | minilm | tiny-random."),
    text_pooling: Optional[str] = typer.Option(None, help="cls | mean; default: mean for MiniLM, cls otherwise."),
    image_size: int = typer.Option(224, help="Crop side in pixels."),
    proj_dim: int = typer.Option(128, help="Projection dimension when the grid does not set it."),
    lr: float = typer.Option(1e-3, help="Heads learning rate when the grid does not set it."),
    image_lr: float = typer.Option(1e-4, help="Image backbone learning rate."),
    text_lr: float = typer.Option(1e-5, help="Text encoder learning rate."),
    epochs: int = typer.Option(10, help="Epochs per cell."),
    batch_size: int = typer.Option(64, help="Pairs per step."),
    seed: int = typer.Option(0, help="Training seed."),
    init: Optional[str] = typer.Option(None, help="Fine-tune this ranker instead (HF CLIP id, DIR, job:ID, store:PREFIX)."),
    pretrained_image: bool = typer.Option(True, "--pretrained-image/--random-image",
                                          help="Start the image backbone from its pretrained weights (the workers must "
                                               "have them: a missing file fails the cell in one line), or from random "
                                               "init on purpose."),
    pretrained_text: bool = typer.Option(True, "--pretrained-text/--random-text",
                                         help="Start the text encoder from its pretrained weights, or from random init "
                                              "on purpose."),
    wait: bool = typer.Option(False, "--wait", help="Show progress, then print the grid table."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="With --wait: copy the best checkpoint here."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop waiting after this many seconds."),
) -> None:
    """Fan out one training task per grid cell; prints the job id (then, with --wait, Table 1)."""
    from jobs.model import new_job_id
    from jobs.training import TrainRequest
    from producer.common import watch
    from slip.rankers.dual_encoder import MINILM_ALIASES, DualEncoderConfig
    from slip.train.ranker import TrainConfig

    with queue_errors():
        cells = parse_grid(grid)
        client = client_from_env()
        client.check_broker()
        digest = upload_dataset(client, dataset)
        job_id = new_job_id()
        pooling = text_pooling or ("mean" if text_encoder in MINILM_ALIASES else "cls")
        init_spec = _resolve_ranker(client, init) if init else None
        requests = []
        for i, cell in enumerate(cells):
            model = DualEncoderConfig(image_backbone=image_backbone, text_encoder=text_encoder, text_pooling=pooling,
                                      image_size=image_size, proj_dim=cell.get("proj_dim", proj_dim),
                                      pretrained_image=pretrained_image, pretrained_text=pretrained_text)
            train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=cell.get("lr", lr), seed=seed,
                                image_lr=cell.get("image_lr", image_lr), text_lr=cell.get("text_lr", text_lr))
            model_json = {k: v for k, v in model.__dict__.items()}
            train_json = {k: v for k, v in train.__dict__.items() if k not in ("device", "progress")}
            requests.append(TrainRequest(job_id=job_id, cell=i, dataset=digest, model={} if init_spec else model_json,
                                         train=train_json, init=init_spec))
        spec = {"dataset": digest, "dataset_path": str(dataset), "cells": cells}
        client.submit("train", spec, [r.model_dump(mode="json") for r in requests], job_id=job_id,
                      names=[" ".join(f"{k}={v}" for k, v in c.items()) or f"cell {i}" for i, c in enumerate(cells)],
                      on_job=typer.echo)
        if not wait:
            return
        watch(client, job_id, timeout, detail=lambda i: f"cell {i.get('cell')}: epoch {i.get('epoch')} "
                                                         f"val {i.get('val_loss', 0):.3f}")
        rows = train_rows(client.store, job_id, client=client)
        typer.echo(format_grid(rows))
        best = best_row(rows)
        if out is not None and best is not None:
            from jobs.training import get_directory

            get_directory(client.store, best["checkpoint"][len("store:"):], out)
            typer.echo(f"best checkpoint copied to {out} (use --clip {out})")
    raise typer.Exit(0 if rows and all(r.get("best_val_loss") is not None for r in rows) else 1)


def train_rows(store, job_id: str, *, client=None) -> list[dict]:
    """One row per cell: its result record, or its parameters and why it has none."""
    from jobs.training import cell_prefix

    requests = job_requests(store, load_job(store, job_id, "train"))
    reasons = unit_reasons(client, job_id) if client is not None else {}
    rows = []
    for i, request in enumerate(requests):
        try:
            rows.append(store.get_json(f"{cell_prefix(job_id, i)}/result.json"))
            continue
        except ObjectNotFoundError:
            pass
        rows.append({"cell": i, "lr": request["train"]["lr"], "proj_dim": request["model"].get("proj_dim"),
                     "best_val_loss": None, "reason": reasons.get(i, "not finished")})
    return rows


def best_row(rows: list[dict]) -> dict | None:
    finished = [r for r in rows if r.get("best_val_loss") is not None]
    return min(finished, key=lambda r: r["best_val_loss"]) if finished else None


def format_grid(rows: list[dict]) -> str:
    """The paper's Table 1: learning rate, projection dimension, validation loss; best marked."""
    best = best_row(rows)
    lines = [f"{'learning rate':>14} {'proj dim':>9} {'val loss':>10}", "-" * 36]
    for r in sorted(rows, key=lambda r: (r["lr"], r["proj_dim"] or 0)):
        loss = f"{r['best_val_loss']:.4f}" if r.get("best_val_loss") is not None else r.get("reason", "-")
        mark = "  <- best" if r is best else ""
        lines.append(f"{r['lr']:>14g} {r['proj_dim'] or '-':>9} {loss:>10}{mark}")
    return "\n".join(lines)


# --- slip submit evaluate ---------------------------------------------------------------------------------


def submit_evaluate(
    dataset: Path = typer.Argument(..., help="Labelled image folder (its held-out 20 % are composited)."),
    ranker: List[str] = typer.Option(..., "--ranker", "-r", help="Ranker spec; repeat to compare (DIR, job:ID, store:PREFIX, hub id)."),
    proposals: str = typer.Option("oracle", help="oracle (known segments + distractors) | sam (the workers' SAM)."),
    sam: Optional[str] = typer.Option(None, help="SAM spec for --proposals sam [default: the workers']."),
    composites: int = typer.Option(200, min=1, help="2x2 composites (4 queries each)."),
    chunk: int = typer.Option(20, min=1, help="Composites per task."),
    seed: int = typer.Option(0, help="Composite seed."),
    split_seed: int = typer.Option(0, help="Train/validation split seed, as in training."),
    split: str = typer.Option("val", help="val: the validation images of the training split (the seed as in training); all: every image of a dataset neither training nor checkpoint selection saw (a separately generated one) — the honest choice."),
    caption_template: str = typer.Option("{name}", help="Caption template; {name} is the class name."),
    tile_size: int = typer.Option(128, help="Side of each tile in pixels."),
    gallery: int = typer.Option(4, help="Gallery composites kept per ranker."),
    judge: Optional[str] = typer.Option(None, help="Classifier judge directory (slip train-judge): the paper's scoring too."),
    wait: bool = typer.Option(False, "--wait", help="Show progress, then print the accuracy table."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop waiting after this many seconds."),
) -> None:
    """Fan composites out to the workers for each ranker; prints the job id (then, with --wait, the table)."""
    from jobs.model import new_job_id
    from jobs.training import EvaluateRequest
    from producer.common import watch

    with queue_errors():
        if proposals not in ("oracle", "sam"):
            raise ConfigError(f"--proposals must be oracle or sam, got {proposals!r}")
        client = client_from_env()
        client.check_broker()
        digest = upload_dataset(client, dataset)
        specs = [_resolve_ranker(client, s) for s in ranker]
        judge_spec = _resolve_ranker(client, judge) if judge else None
        job_id = new_job_id()
        requests = []
        for r, spec in enumerate(specs):
            for c, start in enumerate(range(0, composites, chunk)):
                requests.append(EvaluateRequest(
                    job_id=job_id, ranker_index=r, ranker=spec, chunk=c, start=start, stop=min(start + chunk, composites),
                    dataset=digest, seed=seed, split_seed=split_seed, split=split, caption_template=caption_template,
                    tile_size=tile_size, proposals=proposals, sam=sam, judge=judge_spec,
                    gallery=max(0, min(start + chunk, composites, gallery) - start)))
        spec = {"dataset": digest, "dataset_path": str(dataset), "rankers": list(ranker), "specs": specs,
                "composites": composites}
        client.submit("evaluate", spec, [q.model_dump(mode="json") for q in requests], job_id=job_id,
                      names=[f"ranker {q.ranker_index} composites {q.start}..{q.stop - 1}" for q in requests],
                      on_job=typer.echo)
        if not wait:
            return
        status = watch(client, job_id, timeout)
        summaries = evaluation_summaries(client.store, job_id)
        typer.echo(format_evaluation(summaries))
    raise typer.Exit(0 if status.counts["done"] == status.manifest.total else 1)


def evaluation_chunks(store, job_id: str) -> list[list[dict]]:
    """Per ranker of the job: the chunk files found in the store."""
    from jobs.training import chunk_key

    manifest = load_job(store, job_id, "evaluate")
    chunks: list[list[dict]] = [[] for _ in manifest.spec["specs"]]
    for q in job_requests(store, manifest):
        try:
            chunks[q["ranker_index"]].append(store.get_json(chunk_key(job_id, q["ranker_index"], q["chunk"])))
        except ObjectNotFoundError:
            continue
    return chunks


def evaluation_summaries(store, job_id: str) -> list[dict]:
    """``[{"ranker", "summary", "composites_scored", "composites"}]``, aggregated from every chunk; also
    written to ``jobs/<job>/evaluation.json``."""
    from jobs.keys import job_prefix
    from slip.evaluate import QueryResult, summarize

    spec = load_job(store, job_id, "evaluate").spec
    out = []
    for name, chunks in zip(spec["rankers"], evaluation_chunks(store, job_id)):
        results = [QueryResult.from_json(r) for c in chunks for r in c["results"]]
        summary = summarize(results)
        out.append({"ranker": name, "summary": summary, "composites": spec["composites"],
                    "composites_scored": summary["plain"]["composites"]})
    store.put_json(f"{job_prefix(job_id)}/evaluation.json", out)
    return out


def format_evaluation(summaries: list[dict]) -> str:
    """Accuracy per ranker (plain and one-to-one), mean IoU, and the judge's accuracy when scored."""
    judged = any(s["summary"]["plain"].get("judge_accuracy") is not None for s in summaries)
    head = f"{'ranker':<44} {'composites':>10} {'accuracy':>9} {'1-to-1':>8} {'mean IoU':>9}" + (f" {'judge':>7}" if judged else "")
    lines = [head, "-" * len(head)]
    for s in summaries:
        plain, one = s["summary"]["plain"], s["summary"]["one_to_one"]
        iou = "-" if plain["mean_iou"] is None else f"{plain['mean_iou']:.3f}"
        name = s["ranker"] if len(s["ranker"]) <= 44 else "..." + s["ranker"][-41:]
        row = (f"{name:<44} {s['composites_scored']:>4}/{s['composites']:<5} {plain['accuracy']:>8.1%} "
               f"{one['accuracy']:>7.1%} {iou:>9}")
        if judged:
            judge = plain.get("judge_accuracy")
            row += f" {judge:>6.1%}" if judge is not None else f" {'-':>7}"
        lines.append(row)
    return "\n".join(lines)


# --- slip report ------------------------------------------------------------------------------------------


def report(
    jobs: List[str] = typer.Argument(..., help="Training and/or evaluation job ids."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="Where the HTML page goes."),
) -> None:
    """One self-contained HTML page: accuracy (Table 2), grid search (Table 1), curves, gallery."""
    from jobs.ledger import load_manifest
    from slip.report import GalleryItem, build_report

    with queue_errors():
        store = client_from_env().store
        evals, grid, curves, gallery = [], [], {}, []
        for job in jobs:
            try:
                kind = load_manifest(store, job).kind
            except ObjectNotFoundError as e:
                raise InputError(f"no training or evaluation job {job!r} in store {store.url}") from e
            if kind == "train":
                for row in train_rows(store, job):
                    grid.append({"lr": row["lr"], "proj_dim": row["proj_dim"], "val_loss": row.get("best_val_loss")})
                    if row.get("history"):
                        curves[f"{job} cell {row['cell']} (lr {row['lr']:g}, dim {row['proj_dim']})"] = {
                            "epochs": row["history"], "best_epoch": row["best_epoch"]}
            else:
                evals.extend(evaluation_summaries(store, job))
                gallery.extend(GalleryItem.from_json(g) for chunks in evaluation_chunks(store, job)
                               for c in chunks for g in c.get("gallery", []))
        page = build_report(evals, grid, curves, gallery, title="SLIP ranker report", subtitle="jobs: " + ", ".join(jobs))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(page)
        except OSError as e:
            raise InputError(f"cannot write {out}: {e.strerror or e}") from e
    typer.echo(f"wrote {out}")


__all__ = ["format_grid", "load_job", "parse_grid", "report", "submit_evaluate", "submit_train", "train_rows",
           "upload_dataset"]

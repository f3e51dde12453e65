"""Queue commands for training and evaluation jobs::

    slip submit train DATASET --grid lr=1e-5,1e-4,1e-3 --grid proj_dim=128,512 [--wait] [--out DIR]
    slip submit evaluate DATASET --ranker SPEC [--ranker SPEC ...] [--proposals oracle|sam] [--wait]
    slip report JOB [JOB ...] --out report.html

``submit train`` fans out one ``slip.train`` task per grid cell and prints the paper's Table 1 (the
best cell marked); ``submit evaluate`` fans composites out in chunks (``slip.evaluate``) and prints
the accuracy per ranker. A ranker spec may be a hub id, ``synth``, ``tiny-random``, a local
directory (uploaded to the store), ``store:<prefix>`` or ``job:<train job id>`` (its best cell).
"""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional

import typer

from producer.common import client_from_env, queue_errors
from slip.errors import ConfigError, InputError, ObjectNotFoundError

GRID_KEYS = {"lr": float, "proj_dim": int, "image_lr": float, "text_lr": float}
DONE_STATES = {"SUCCESS", "FAILURE", "REVOKED"}


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


def _ledger_key(job_id: str) -> str:
    from worker.store import job_prefix

    return f"{job_prefix(job_id)}/training.json"


def load_ledger(store, job_id: str) -> dict:
    """A training/evaluation job's ledger; a clear error when the job is not one."""
    try:
        return store.get_json(_ledger_key(job_id))
    except ObjectNotFoundError as e:
        raise InputError(f"no training or evaluation job {job_id!r} in store {store.url}") from e


def send_task(client, name: str, request: dict, describe: str) -> str:
    task_id = str(uuid.uuid4())
    client.app.backend.store_result(task_id, None, "SENT")
    client.app.send_task(name, kwargs={"request": request}, task_id=task_id, kwargsrepr=describe)
    return task_id


def enqueue(client, ledger: dict, task: str, requests: list[dict], describe: Callable[[int], str]) -> list[str]:
    """Write the job's ``ledger``, send one ``task`` per request (``describe(i)`` labels request ``i`` in the
    logs), record the task ids in the ledger and write it again; returns the task ids."""
    client.store.put_json(_ledger_key(ledger["job_id"]), ledger)
    for i, request in enumerate(requests):
        ledger["task_ids"].append(send_task(client, task, request, describe(i)))
    client.store.put_json(_ledger_key(ledger["job_id"]), ledger)
    return ledger["task_ids"]


def wait_tasks(client, task_ids: list[str], *, label: str, units: list[int], timeout: Optional[float],
          detail: Callable[[dict], str] | None = None) -> dict[str, str]:
    """Poll task states with a rich progress bar (``units[i]`` work units per task); final states."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    start, states = time.monotonic(), {}
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bar = progress.add_task(label, total=sum(units), info="")
        while True:
            results = [client.app.AsyncResult(t) for t in task_ids]
            states = {t: r.state for t, r in zip(task_ids, results)}
            done = sum(u for t, u in zip(task_ids, units) if states[t] in DONE_STATES)
            info = ""
            if detail:
                running = [r.info for r in results if r.state == "PROGRESS" and isinstance(r.info, dict)]
                info = "; ".join(detail(i) for i in running[:3])
            progress.update(bar, completed=done, info=info)
            if all(s in DONE_STATES for s in states.values()):
                return states
            if timeout is not None and time.monotonic() - start > timeout:
                return states
            time.sleep(0.5)


def upload_dataset(client, dataset: Path) -> str:
    from worker.train_tasks import upload_directory

    return upload_directory(client.store, dataset.expanduser())


def _resolve_ranker(client, spec: str) -> str:
    """A spec workers can load: local directories are uploaded, ``job:<id>`` is its best cell."""
    from worker.store import digest
    from worker.train_tasks import STORE_SPEC, directory_manifest, put_directory

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
    from producer.client import new_job_id, utc_now
    from slip.rankers.dual_encoder import MINILM_ALIASES, DualEncoderConfig
    from slip.train.ranker import TrainConfig
    from worker.train_tasks import TrainRequest

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
        ledger = {"kind": "train", "job_id": job_id, "created": utc_now(), "dataset": digest,
                  "dataset_path": str(dataset), "cells": cells, "requests": [r.model_dump(mode="json") for r in requests],
                  "task_ids": []}
        enqueue(client, ledger, "slip.train", ledger["requests"],
                 lambda i: f"job={job_id} cell={requests[i].cell} {cells[requests[i].cell]}")
        typer.echo(job_id)
        if not wait:
            return
        wait_tasks(client, ledger["task_ids"], label=f"train {job_id}", units=[1] * len(cells), timeout=timeout,
              detail=lambda i: f"cell {i.get('cell')}: epoch {i.get('epoch')} val {i.get('val_loss', 0):.3f}")
        rows = train_rows(client.store, job_id, client=client)
        typer.echo(format_grid(rows))
        best = best_row(rows)
        if out is not None and best is not None:
            from worker.train_tasks import get_directory

            get_directory(client.store, best["checkpoint"][len("store:"):], out)
            typer.echo(f"best checkpoint copied to {out} (use --clip {out})")
    raise typer.Exit(0 if rows and all(r.get("best_val_loss") is not None for r in rows) else 1)


def train_rows(store, job_id: str, *, client=None) -> list[dict]:
    """One row per cell: its result record, or its parameters and why it has none."""
    from worker.train_tasks import cell_prefix

    ledger = load_ledger(store, job_id)
    if ledger.get("kind") != "train":
        raise InputError(f"job {job_id} is not a training job")
    rows = []
    for i, request in enumerate(ledger["requests"]):
        try:
            rows.append(store.get_json(f"{cell_prefix(job_id, i)}/result.json"))
            continue
        except ObjectNotFoundError:
            pass
        reason = "not finished"
        if client is not None and i < len(ledger["task_ids"]):
            result = client.app.AsyncResult(ledger["task_ids"][i])
            reason = f"{result.state}: {result.info}" if result.state == "FAILURE" else result.state.lower()
        rows.append({"cell": i, "lr": request["train"]["lr"], "proj_dim": request["model"].get("proj_dim"),
                     "best_val_loss": None, "reason": reason})
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
    from producer.client import new_job_id, utc_now
    from worker.train_tasks import EvaluateRequest

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
        ledger = {"kind": "evaluate", "job_id": job_id, "created": utc_now(), "dataset": digest,
                  "dataset_path": str(dataset), "rankers": list(ranker), "specs": specs, "composites": composites,
                  "requests": [q.model_dump(mode="json") for q in requests], "task_ids": []}
        enqueue(client, ledger, "slip.evaluate", ledger["requests"],
                 lambda i: f"job={job_id} ranker={requests[i].ranker_index} "
                           f"composites={requests[i].start}..{requests[i].stop - 1}")
        typer.echo(job_id)
        if not wait:
            return
        states = wait_tasks(client, ledger["task_ids"], label=f"evaluate {job_id}", units=[q.stop - q.start for q in requests],
                       timeout=timeout)
        summaries = evaluation_summaries(client.store, job_id)
        typer.echo(format_evaluation(summaries))
    raise typer.Exit(0 if all(s == "SUCCESS" for s in states.values()) else 1)


def evaluation_chunks(store, job_id: str) -> list[list[dict]]:
    """Per ranker of the job: the chunk files found in the store."""
    from worker.train_tasks import chunk_key

    ledger = load_ledger(store, job_id)
    if ledger.get("kind") != "evaluate":
        raise InputError(f"job {job_id} is not an evaluation job")
    chunks: list[list[dict]] = [[] for _ in ledger["specs"]]
    for q in ledger["requests"]:
        try:
            chunks[q["ranker_index"]].append(store.get_json(chunk_key(job_id, q["ranker_index"], q["chunk"])))
        except ObjectNotFoundError:
            continue
    return chunks


def evaluation_summaries(store, job_id: str) -> list[dict]:
    """``[{"ranker", "summary", "composites_scored", "composites"}]``, aggregated from every chunk; also
    written to ``jobs/<job>/evaluation.json``."""
    from slip.evaluate import QueryResult, summarize

    ledger = load_ledger(store, job_id)
    out = []
    for name, chunks in zip(ledger["rankers"], evaluation_chunks(store, job_id)):
        results = [QueryResult.from_json(r) for c in chunks for r in c["results"]]
        summary = summarize(results)
        out.append({"ranker": name, "summary": summary, "composites": ledger["composites"],
                    "composites_scored": summary["plain"]["composites"]})
    store.put_json(f"{_ledger_key(job_id).rsplit('/', 1)[0]}/evaluation.json", out)
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
    from slip.report import GalleryItem, build_report

    with queue_errors():
        store = client_from_env().store
        evals, grid, curves, gallery = [], [], {}, []
        for job in jobs:
            kind = load_ledger(store, job).get("kind")
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


__all__ = ["enqueue", "format_grid", "parse_grid", "report", "submit_evaluate", "submit_train", "train_rows",
           "upload_dataset", "wait_tasks"]

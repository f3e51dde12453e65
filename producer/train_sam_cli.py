"""``slip submit train-sam``: SAM fine-tuning (or training from scratch) as one ``slip.train_sam`` task::

    slip submit train-sam IMAGES --coco instances.json --sam vit_b --freeze-image-encoder --wait --out sam-ft
    slip submit train-sam data/synth --arch synth-sam --epochs 12 --wait

A job like any other (:mod:`jobs`: one unit, followed by ``slip status / wait / retry / jobs``). The dataset
is uploaded content-addressed (the COCO file, wherever it lives, goes inside the upload); the worker writes the checkpoint to ``models/sam/<job>/`` in the store and the summary to
``jobs/<job>/result.json``. ``--wait`` shows per-epoch progress, prints the summary and, with ``--out``,
copies the checkpoint directory here (then ``--sam DIR`` loads it everywhere). ``--sam job:<id>``
fine-tunes the result of an earlier job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.errors import ObjectNotFoundError
from slip.errors import InputError


def _start_spec(client, spec: str) -> str:
    """A start spec workers can load: ``job:<id>`` is that job's checkpoint, a local directory is uploaded."""
    from jobs.training import STORE_SPEC, directory_manifest, put_directory, sam_prefix
    from slip.request import digest

    if spec.startswith("job:"):
        prefix = sam_prefix(spec[4:])
        if not client.store.exists(f"{prefix}/sam.pth"):
            raise InputError(f"SAM training job {spec[4:]} has no checkpoint in store {client.store.url} (yet)")
        return f"{STORE_SPEC}{prefix}"
    path = Path(spec).expanduser()
    if path.is_dir():
        prefix = f"models/sam/uploads/{digest(directory_manifest(path))}"
        if not client.store.exists(f"{prefix}/sam.pth"):
            put_directory(client.store, path, prefix)
        return f"{STORE_SPEC}{prefix}"
    return spec


def _upload(client, dataset: Path, coco: Optional[Path]) -> tuple[str, Optional[str]]:
    """The dataset's manifest digest and the COCO file's path inside the upload (None without ``coco``)."""
    from jobs.training import COCO_PATH, upload_directory
    from producer.training_cli import upload_dataset

    if coco is None:
        return upload_dataset(client, dataset), None
    coco = coco.expanduser()
    if not coco.is_file():
        raise InputError(f"COCO annotation file {coco} does not exist")
    return upload_directory(client.store, dataset.expanduser(), extra={COCO_PATH: coco}), COCO_PATH


def submit_train_sam(
    dataset: Path = typer.Argument(..., help="Mask folder (`slip data synth` layout), or the image directory of --coco."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO instances file (polygons or RLE); DATASET holds its images."),
    sam: Optional[str] = typer.Option(None, "--sam", help="Start checkpoint: vit_b | vit_l | vit_h | synth | tiny-random | "
                                      "DIR (uploaded) | job:ID | store:PREFIX | a path on the workers."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Train a new model from scratch: synth-sam | tiny-random "
                                       "(or an official size)."),
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate (default 1e-4 fine-tuning, 1e-3 from scratch)."),
    batch_images: int = typer.Option(8, help="Images per step."),
    prompts_per_image: int = typer.Option(8, help="Prompts sampled per image and step."),
    scenes_per_epoch: Optional[int] = typer.Option(None, help="Scenes per epoch (default: one per training image)."),
    val_fraction: float = typer.Option(0.1, help="Held-out share of the images."),
    val_scenes: int = typer.Option(48, help="Fixed validation scenes."),
    freeze_image_encoder: bool = typer.Option(False, "--freeze-image-encoder", help="Do not update the ViT "
                                              "(the usual decoder-only fine-tune of vit_b / vit_h)."),
    freeze_prompt_encoder: bool = typer.Option(False, "--freeze-prompt-encoder", help="Do not update the prompt encoder."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast for forward passes (recent GPUs)."),
    half: bool = typer.Option(False, "--half", help="Save fp16 weights (half the size)."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation, scenes and prompts."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (default: the worker's SLIP_DEVICE)."),
    wait: bool = typer.Option(False, "--wait", help="Show per-epoch progress, then print the summary."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="With --wait: copy the checkpoint directory here."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop waiting after this many seconds."),
) -> None:
    """Train a SAM on the workers (one task on the gpu queue); prints the job id (then, with --wait, the result)."""
    from jobs.model import new_job_id
    from slip.options import parse_model
    from jobs.training import SamTrainRequest, result_key, sam_prefix
    from producer.common import client_from_env, queue_errors, watch

    with queue_errors():
        fields = dict(epochs=epochs, lr=lr, batch_images=batch_images, prompts_per_image=prompts_per_image,
                      scenes_per_epoch=scenes_per_epoch, val_fraction=val_fraction, val_scenes=val_scenes,
                      freeze_image_encoder=freeze_image_encoder, freeze_prompt_encoder=freeze_prompt_encoder,
                      bf16=bf16, half=half, seed=seed, device=device)
        job_id = new_job_id()
        # 1. check the options before uploading anything
        parse_model(SamTrainRequest, {"job_id": job_id, "dataset": "0" * 64, "sam": sam, "arch": arch, **fields})
        client = client_from_env()
        client.check_broker()
        # 2. the start checkpoint and the dataset (and COCO file) to the store
        start = _start_spec(client, sam) if sam else None
        digest, coco_key = _upload(client, dataset, coco)
        request = parse_model(SamTrainRequest, {"job_id": job_id, "dataset": digest, "coco": coco_key, "sam": start,
                                                "arch": arch, **fields})
        # 3. the job: one unit
        spec = {"dataset": digest, "dataset_path": str(dataset), "coco_path": str(coco) if coco else None}
        client.submit("train-sam", spec, [request.model_dump(mode="json")], job_id=job_id,
                      names=[f"sam={sam or arch} epochs={epochs}"], on_job=typer.echo)
        if not wait:
            typer.echo(f"when the worker finishes: the checkpoint in store {client.store.url} under "
                       f"{sam_prefix(job_id)}/, the summary in {result_key(job_id)}", err=True)
            return
        status = watch(client, job_id, timeout, detail=_describe_epoch)
        if status.counts["done"] != 1:
            typer.echo(f"job {job_id}: {_unfinished(client, status, timeout)}", err=True)
            raise typer.Exit(1)
        summary = client.store.get_json(result_key(job_id))
        typer.echo(format_summary(summary, client.store))
        if out is not None:
            _copy_out(client, summary["store_prefix"], out)
            typer.echo(f"checkpoint copied to {out} (use --sam {out}, or SLIP_SAM={out} for workers)")


def _unfinished(client, status, timeout: Optional[float]) -> str:
    if status.counts["failed"]:
        (_, _, reason), = client.failed_units(status, limit=1)
        return f"SAM training failed: {reason}"
    from jobs.training import result_key

    return f"still running after {timeout} s; the summary will be in {result_key(status.manifest.job_id)}"


def _describe_epoch(info: dict) -> str:
    if "val_miou" not in info:
        return ""
    return f"epoch {info.get('epoch')}/{info.get('epochs')} val mIoU {info['val_miou']:.3f}"


def _copy_out(client, prefix: str, out: Path) -> None:
    from jobs.training import get_directory

    try:
        get_directory(client.store, prefix, out)
    except ObjectNotFoundError as e:
        raise InputError(f"the checkpoint of this job is missing from store {client.store.url}: {e}") from e
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from e


def format_summary(summary: dict, store) -> str:
    """Best epoch and mIoU, where the checkpoint is in ``store``, and how to use it."""
    prefix, job, store_url = summary["store_prefix"], summary["job_id"], store.url
    lines = [
        f"best validation mIoU {summary['best_val_miou']:.4f} at epoch {summary['best_epoch']}/{summary['epochs']} "
        f"(start {summary['start_val_miou']:.4f}; {summary['seconds']:.0f} s on {summary['worker']})",
        f"checkpoint: {store_url.rstrip('/')}/{prefix}/ ({', '.join(summary['files'])})",
        f"fine-tune it further: slip submit train-sam DATASET --sam job:{job}",
    ]
    if store.local:
        lines.append(f"use it: --sam {store.path(prefix)} (or SLIP_SAM=<that path> for workers that see this store)")
    else:
        lines.append(f"copy it out: python -c \"import fsspec; fs, root = fsspec.core.url_to_fs('{store_url}'); "
                     f"fs.get(root + '/{prefix}', 'sam-{job}', recursive=True)\", then --sam sam-{job}")
    return "\n".join(lines)


__all__ = ["format_summary", "submit_train_sam"]

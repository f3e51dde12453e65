"""``slip segment``: text-prompted segmentation of local images, no queue involved.

Its request options come from the one declaration (:mod:`slip.options`), its models from the model
settings (:mod:`slip.settings`: a flag > its ``SLIP_*`` variable > the default). Model code is imported
inside the command, so ``slip --help`` does not pay for torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional

import typer

from slip.cli.common import EXIT_PARTIAL, fail, synth_warning, user_errors
from slip.options import SegmentOptions, with_segment_options
from slip.settings import ModelSettings, configure_logging, model_flag

log = logging.getLogger("slip.segment")
USES = ("engine", "sam", "clip", "device", "dtype", "threads", "cache_dir", "points_per_batch", "batch_size", "log_level")


@with_segment_options(defaults={"render": True})
def segment(
    images: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (one folder per image)."),
    engine: Optional[str] = model_flag("engine"),
    sam: Optional[str] = model_flag("sam"),
    clip: Optional[str] = model_flag("clip"),
    device: Optional[str] = model_flag("device"),
    dtype: Optional[str] = model_flag("dtype"),
    options: SegmentOptions = SegmentOptions(),
) -> None:
    """Segment IMAGES and pick, for each --prompt, the segment(s) that match it."""
    from slip.inputs import expand_paths, relative_names, unique_folders

    with user_errors():
        models = ModelSettings.from_env(os.environ, USES, engine=engine, sam=sam, clip=clip, device=device,
                                        dtype=dtype)
        configure_logging(models.log_level)
        options.check_prompts(len(prompt))
        files = expand_paths(images)
        folders = unique_folders(out, relative_names(files))
        pipeline = _pipeline(models, options, prompt)
    synth_warning(models.sam, models.clip)
    failed = sum(not _segment_one(pipeline, path, folder, prompt, options) for path, folder in zip(files, folders))
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


def _pipeline(models: ModelSettings, options: SegmentOptions, prompts: list[str]):
    """The SLIP pipeline for the command's settings and options (models loaded once)."""
    from slip.config import SlipConfig, build_slip
    from slip.pipeline import validate_prompts

    validate_prompts(prompts)
    if models.threads is not None:
        import torch

        torch.set_num_threads(models.threads)
    pipeline = build_slip(SlipConfig(models=models, options=options))
    request = pipeline.request
    log.info("engine %s: sam %s (%s, sha256 %s...), ranker %s (%s, sha256 %s...), device %s, dtype %s",
             models.engine, request.sam.spec, request.sam.arch, request.sam.sha256[:12], request.ranker.spec,
             request.ranker.arch, request.ranker.sha256[:12], pipeline.device, request.dtype)
    return pipeline


def _segment_one(pipeline, path: Path, folder: Path, prompts: list[str], options: SegmentOptions) -> bool:
    """Segment one image and write its files; False (and one line on stderr) when the image is bad."""
    from slip.errors import InputError
    from slip.images import load_image
    from slip.outputs import render_outputs
    from slip.pipeline import validate_prompts

    prompts = validate_prompts(prompts)
    try:
        image = load_image(path, max_pixels=options.max_pixels)
        result = pipeline(image, prompts)
    except InputError as e:
        typer.echo(f"error: {path}: {e}", err=True)
        return False
    runtime = {"points_per_batch": pipeline.generator.points_per_batch}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in render_outputs(image, result, prompts, pipeline.request, runtime,
                                         render=options.render).items():
            (folder / name).write_bytes(data)
    except OSError as e:
        fail(f"cannot write {folder}: {e.strerror or e}")
    typer.echo(f"{path}: {len(result.proposals.segments)} segments; {_summary(result.matches)}; wrote {folder}")
    return True


def _summary(matches) -> str:
    parts = []
    for m in matches:
        if not m.instances:
            parts.append(f"{m.prompt!r} -> not found")
        else:
            chosen = ", ".join(f"{i} ({s:.3f})" for i, s in m.instances)
            parts.append(f"{m.prompt!r} -> {chosen}")
    return "; ".join(parts)

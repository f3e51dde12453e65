"""``slip segment``: text-prompted segmentation of local images, no queue involved.

Model code is imported inside the command, so ``slip --help`` does not pay for torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slip.cli.common import EXIT_PARTIAL, cache_dir_from_env, fail, synth_warning, thresholds, user_errors

DEFAULT_SAM = "vit_b"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_MAX_PIXELS = 64_000_000  # slip.images.DEFAULT_MAX_PIXELS, repeated here so --help stays light
RECOMMENDED_HELP = ("default: the SAM's recommended value (generator.json beside the checkpoint), "
                    "else SAM's default")
THRESHOLD_HELP = ("Similarity below which a segment is not an answer: one value, or one per --prompt (repeat); "
                  "default: the ranker's calibrated threshold.json, if any.")


def segment(
    images: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (one folder per image)."),
    sam: str = typer.Option(DEFAULT_SAM, help="SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | PATH | "
                            "Hugging Face SamModel dir or cached id."),
    clip: str = typer.Option(DEFAULT_CLIP, help="Ranker spec: HF hub id | DIR | synth | tiny-random."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("fp32", help="Compute precision: fp32 | bf16 (CPU and GPU) | fp16 (GPU)."),
    filters: Optional[str] = typer.Option(None, help="Filter chain, e.g. 'containment:0.8,min_area:50,disjoint' or "
                                          "'none'; default: the SAM's recommended chain (filters.json beside the "
                                          "checkpoint), else the paper's 'containment'."),
    crop_background: str = typer.Option("black", help="Background of segment crops: black | gray | blur | none."),
    crop_padding: float = typer.Option(0.0, help="Crop padding as a fraction of the box side."),
    square: bool = typer.Option(True, "--square/--no-square", help="Pad crops to a square before resizing."),
    points_per_side: Optional[int] = typer.Option(None, help=f"SAM point grid side; {RECOMMENDED_HELP} 32."),
    pred_iou_thresh: Optional[float] = typer.Option(None, help=f"SAM predicted-IoU threshold; {RECOMMENDED_HELP} 0.88."),
    stability_score_thresh: Optional[float] = typer.Option(None, help=f"SAM stability-score threshold; {RECOMMENDED_HELP} 0.95."),
    top_k: int = typer.Option(5, help="Candidates listed per prompt."),
    threshold: Optional[List[float]] = typer.Option(None, help=THRESHOLD_HELP),
    calibrated: bool = typer.Option(True, "--calibrated/--no-threshold",
                                    help="Without --threshold, use the ranker's calibrated threshold (or none)."),
    instances: str = typer.Option("one", help="one: the best segment per prompt; all: every segment above the "
                                  "threshold (deduplicated)."),
    one_to_one: bool = typer.Option(False, help="One-to-one assignment: prompts never share a segment."),
    render: bool = typer.Option(True, "--render/--no-render", help="Write mask_<i>.png and overlay_<i>.png."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Refuse images with more pixels than this."),
) -> None:
    """Segment IMAGES and pick, for each --prompt, the segment(s) that match it."""
    from slip.inputs import expand_paths, relative_names, unique_folders

    with user_errors():
        files = expand_paths(images)
        folders = unique_folders(out, relative_names(files))
        pipeline = _pipeline(locals())
    synth_warning(sam, clip)
    failed = sum(not _segment_one(pipeline, path, folder, prompt, max_pixels, render) for path, folder in zip(files, folders))
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


def _pipeline(args: dict):
    """The SLIP pipeline for the command's options (models loaded once)."""
    from slip.config import SlipConfig, build_slip
    from slip.crops import CropConfig
    from slip.pipeline import validate_prompts

    validate_prompts(args["prompt"])
    given = {name: args[name] for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh")
             if args[name] is not None}
    return build_slip(SlipConfig(
        sam=args["sam"], clip=args["clip"], device=args["device"], dtype=args["dtype"],
        cache_dir=cache_dir_from_env(), generator=given, filters=args["filters"],
        crop=CropConfig(background=args["crop_background"], padding=args["crop_padding"], square=args["square"]),
        top_k=args["top_k"], threshold=thresholds(args["threshold"]), calibrated=args["calibrated"],
        instances=args["instances"], one_to_one=args["one_to_one"],
    ))


def _segment_one(pipeline, path: Path, folder: Path, prompts: list[str], max_pixels: int, render: bool) -> bool:
    """Segment one image and write its files; False (and one line on stderr) when the image is bad."""
    from slip.errors import InputError
    from slip.images import load_image
    from slip.outputs import render_outputs
    from slip.pipeline import validate_prompts

    prompts = validate_prompts(prompts)
    try:
        image = load_image(path, max_pixels=max_pixels)
        result = pipeline(image, prompts)
    except InputError as e:
        typer.echo(f"error: {path}: {e}", err=True)
        return False
    runtime = {"points_per_batch": pipeline.generator.points_per_batch}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in render_outputs(image, result, prompts, pipeline.request, runtime, render=render).items():
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

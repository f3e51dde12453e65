"""``slip segment``: text-prompted segmentation of local images, no queue involved."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slip.cli.common import EXIT_PARTIAL, cache_dir_from_env, fail, user_errors
from slip.config import SlipConfig, build_slip
from slip.crops import CropConfig
from slip.errors import InputError
from slip.images import DEFAULT_MAX_PIXELS, load_image
from slip.outputs import render_outputs
from slip.pipeline import validate_prompts
from slip.rankers.loading import DEFAULT_CLIP

# SAM options left unset take the checkpoint's generator.json value, else segment_anything's default
RECOMMENDED_HELP = ("default: the SAM's recommended value (generator.json beside the checkpoint), "
                    "else SAM's default")


def _output_dirs(images: list[Path], out: Path) -> list[Path]:
    """One output folder per image, named after its stem (``name-2`` on a clash)."""
    seen: dict[str, int] = {}
    dirs = []
    for path in images:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        suffix = "" if seen[path.stem] == 1 else f"-{seen[path.stem]}"
        dirs.append(out / f"{path.stem}{suffix}")
    return dirs


def _given(**options) -> dict:
    """The options the user set (None = not given)."""
    return {name: value for name, value in options.items() if value is not None}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def segment(
    images: list[Path] = typer.Argument(..., help="Image files to segment."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (one folder per image)."),
    sam: str = typer.Option("vit_b", help="SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | PATH."),
    clip: str = typer.Option(DEFAULT_CLIP, help="Ranker spec: HF hub id | DIR | synth | tiny-random."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (half precision on GPU only)."),
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
    threshold: Optional[float] = typer.Option(None, help="Similarity below which a prompt gets 'no match'."),
    one_to_one: bool = typer.Option(False, help="One-to-one assignment: prompts never share a segment."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Refuse images with more pixels than this."),
) -> None:
    """Segment IMAGES and pick, for each --prompt, the segment that matches it best."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    with user_errors():
        prompts = validate_prompts(prompt)
        config = SlipConfig(
            sam=sam,
            clip=clip,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir_from_env(),
            generator=_given(  # explicit options win over the checkpoint's generator.json
                points_per_side=points_per_side,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
            ),
            filters=filters,  # an explicit chain wins over the checkpoint's filters.json
            crop=CropConfig(background=crop_background, padding=crop_padding, square=square),
            top_k=top_k,
            threshold=threshold,
            one_to_one=one_to_one,
        )
        pipeline = build_slip(config)
    failed = 0
    for path, folder in zip(images, _output_dirs(images, out)):
        try:
            image = load_image(path, max_pixels=max_pixels)
            result = pipeline(image, prompts)
        except InputError as e:
            failed += 1
            typer.echo(f"error: {path}: {e}", err=True)
            continue
        _write(folder, render_outputs(image, result, prompts, config.to_json() | pipeline.params()))
        best = ", ".join(f"{m.prompt!r} -> {m.index} ({m.score:.3f})" if m.matched else f"{m.prompt!r} -> none" for m in result.matches)
        typer.echo(f"{path}: {len(result.proposals.segments)} segments; {best}; wrote {folder}")
    if failed:
        raise typer.Exit(EXIT_PARTIAL)

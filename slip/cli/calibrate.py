"""``slip calibrate``: pick each ranker's (or engine's) "present" threshold on labelled composites (slip.calibrate)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from slip.cli.common import user_errors
from slip.settings import ModelSettings, configure_logging, model_flag

USES = ("engine", "sam", "clip", "device", "cache_dir", "log_level")


def calibrate(
    dataset: Path = typer.Argument(..., help="Labelled image folder (one sub-directory per class, >= 5 classes)."),
    ranker: Optional[List[str]] = typer.Option(None, "--ranker", "-r", help="Ranker spec to calibrate; repeat for "
                                               "several (default: $SLIP_CLIP; the slip and sam3-rank engines)."),
    engine: Optional[str] = model_flag("engine"),
    sam: Optional[str] = model_flag("sam"),
    proposals: str = typer.Option("sam", help="sam (SAM + its filters, as in use) | oracle (known segments + distractors)."),
    composites: int = typer.Option(200, help="2x2 composites to calibrate on (and as many held out)."),
    absent_fraction: float = typer.Option(0.5, help="Share of the queries that name a class absent from the composite."),
    seed: int = typer.Option(0, help="Composite seed of the calibration set."),
    split: str = typer.Option("val", help="Images of DATASET: val (the training split's validation part) | all."),
    split_seed: int = typer.Option(0, help="Seed of the train/validation split (as in training)."),
    heldout: Optional[Path] = typer.Option(None, help="Dataset of the held-out report (all its images); default: "
                                           "DATASET with composite seed --seed + 1."),
    caption_template: str = typer.Option("{name}", help="Caption template; {name} is the class name."),
    tile_size: int = typer.Option(128, help="Side of each composite tile in pixels."),
    out_json: Optional[Path] = typer.Option(None, "--out-json", help="Write every ranker's calibration here."),
    write: bool = typer.Option(False, "--write", help="Write threshold.json beside each ranker."),
    bundle: bool = typer.Option(False, "--bundle", help="Allow --write into a ranker bundled with the package."),
    device: Optional[str] = model_flag("device"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Pick the threshold of each ranker (or of the sam3 / sam3-rank engine's scores) that maximises the F1 of
    "the object is present (and this segment is it)", with absent classes queried too; report it on held-out
    composites."""
    from slip.calibrate import (calibrate_engine, calibrate_rankers, check_writable, engine_directory,
                                ranker_directory, save_calibration)

    with user_errors():
        models = ModelSettings.from_env(os.environ, USES, engine=engine, sam=sam, clip=(ranker or [None])[0],
                                        device=device)
        configure_logging(models.log_level)
        common = dict(composites=composites, seed=seed, split=split, split_seed=split_seed, heldout=heldout,
                      caption_template=caption_template, tile_size=tile_size, absent_fraction=absent_fraction,
                      progress=not quiet)
        if models.engine != "slip":
            if write:  # refuse before the (long) calibration, not after it
                check_writable(engine_directory(models), models.sam if models.engine == "sam3" else models.clip,
                               bundle=bundle)
            runs = [calibrate_engine(dataset, models, **common)]
        else:
            specs = ranker or [models.clip]
            for spec in specs if write else ():  # refuse before the (long) calibration, not after it
                check_writable(ranker_directory(spec, models.cache_dir), spec, bundle=bundle)
            runs = calibrate_rankers(dataset, specs, proposals=proposals, sam=models.sam, device=models.device,
                                     cache_dir=models.cache_dir, **common)
        typer.echo(_table(runs))
        if out_json is not None:
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps([r.record for r in runs], indent=2) + "\n")
        for run in runs:
            if write:
                typer.echo(f"wrote {save_calibration(run, bundle=bundle)}")
    if not write:
        typer.echo("(not written: pass --write to store threshold.json beside each ranker)")


def _table(runs) -> str:
    """One row per ranker: the threshold, then precision / recall / F1 / absent false matches, held out."""
    head = f"{'ranker':<40} {'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6} {'absent FM':>9}"
    lines = [head + "   (held-out composites)", "-" * len(head)]
    for run in runs:
        h = run.heldout
        name = run.spec if len(run.spec) <= 40 else "..." + run.spec[-37:]
        lines.append(f"{name:<40} {run.point.threshold:>9.4f} {h.precision:>9.1%} {h.recall:>7.1%} {h.f1:>6.3f} "
                     f"{h.absent_false_match_rate:>9.1%}")
    return "\n".join(lines)

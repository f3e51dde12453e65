"""The report of ``slip compare``: ``compare.json`` and one HTML page (a table, then side-by-side examples).

``compare.json``::

    {"format": "slip-compare", "version": 1, "created": ISO time, "command": [...], "truth": path,
     "scored_on": "masks" | "boxes" (a truth of boxes only),
     "prompts": [...], "images": N, "job_size": N, "workers": N, "machine": {...},
     "configs": [ConfigScore fields...]}

``index.html`` is self-contained but for the example PNGs in ``examples/``: one row per example image (the
truth, then each configuration's answer for the image's first true category), every text HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from slip.timing import utc_now

REPORT = "compare.json"
PAGE = "index.html"
EXAMPLES = "examples"
STYLE = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin-bottom:24px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td.name,td.spec{text-align:left}
td.best{background:#d8f0d8;font-weight:bold}figure{display:inline-block;margin:4px;text-align:center}
figure img{width:220px;image-rendering:pixelated;border:1px solid #999}figcaption{font-size:12px;max-width:220px}"""
COLUMNS = (("ap", "AP", "{:.3f}"), ("ap50", "AP50", "{:.3f}"), ("f1", "F1", "{:.3f}"), ("precision", "P", "{:.3f}"),
           ("recall", "R", "{:.3f}"), ("presence_accuracy", "here / not here", "{:.3f}"),
           ("seconds_p50", "s / image p50", "{:.3f}"), ("seconds_p90", "p90", "{:.3f}"),
           ("projected_hours", "projected h", "{:.2f}"))
HIGHER_IS_BETTER = {"ap", "ap50", "f1", "precision", "recall", "presence_accuracy"}


def write_report(out: Path, scores: Sequence, truth, shown: dict, *, truth_path: Path, job_size: int, workers: int,
                 command: Sequence[str]) -> tuple[Path, Path]:
    """Write ``compare.json``, the example PNGs and ``index.html`` into ``out``; returns both paths."""
    from slip.compare import score_record

    out = Path(out)
    (out / EXAMPLES).mkdir(parents=True, exist_ok=True)
    record = {
        "format": "slip-compare", "version": 1, "created": utc_now(), "command": list(command),
        "truth": str(truth_path), "scored_on": {"mask": "masks", "box": "boxes"}[truth.shape],
        "prompts": list(truth.prompts),
        "images": len(truth.images), "job_size": job_size,
        "workers": workers, "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                                        "python": platform.python_version()},
        "configs": [score_record(s) for s in scores],
    }
    report = out / REPORT
    report.write_text(json.dumps(record, indent=1))
    rows = _example_rows(out, truth, shown)
    page = out / PAGE
    page.write_text(_page(record, rows))
    return report, page


def _example_rows(out: Path, truth, shown: dict) -> list[list[tuple[str, str]]]:
    """Per example image: ``[(png path relative to out, caption)]`` — the truth first, then each config."""
    from slip.images import load_image
    from slip.outputs import overlay_image

    files = dict(truth.images)
    ids = [i for i in next(iter(shown.values()), {}) if i in files]
    rows = []
    for image_id in ids:
        image = load_image(files[image_id])
        anns = truth.coco.loadAnns(truth.coco.getAnnIds(imgIds=[image_id]))
        true = np.zeros(image.shape[:2], bool)
        for ann in anns[:1]:
            true |= truth.outline(ann)
        name = truth.coco.cats[anns[0]["category_id"]]["name"] if anns else "(no object)"
        cells = [(_save(out, f"{image_id}_truth.png", overlay_image(image, true, f"truth: {name}")), f"truth: {name}")]
        for config, answers in shown.items():
            mask, text = answers[image_id]
            cells.append((_save(out, f"{image_id}_{_safe(config)}.png", overlay_image(image, mask, text)),
                          f"{config}: {text}"))
        rows.append(cells)
    return rows


def _save(out: Path, name: str, image: Image.Image) -> str:
    image.save(out / EXAMPLES / name)
    return f"{EXAMPLES}/{name}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _page(record: dict, rows: list) -> str:
    configs = record["configs"]
    best = {key: (max if key in HIGHER_IS_BETTER else min)((c[key] for c in configs if c[key] is not None),
                                                           default=None) for key, _, _ in COLUMNS}
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in COLUMNS)
    body = []
    for c in configs:
        cells = "".join(
            f'<td class="{"best" if c[k] is not None and c[k] == best[k] and len(configs) > 1 else ""}">'
            f'{"-" if c[k] is None else fmt.format(c[k])}</td>' for k, _, fmt in COLUMNS)
        body.append(f'<tr><td class="name">{html.escape(c["name"])}</td><td class="spec">{html.escape(c["spec"])}'
                    f"</td>{cells}</tr>")
    figures = "".join(
        "<div>" + "".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(text)}"><figcaption>'
                          f"{html.escape(text)}</figcaption></figure>" for src, text in row) + "</div>"
        for row in rows)
    prompts = ", ".join(html.escape(p) for p in record["prompts"])
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>slip compare</title><style>{STYLE}</style>"
            f"</head><body><h1>slip compare</h1><p>{record['images']} images, prompts: {prompts}; scored on "
            f"{record['scored_on']}. Projected hours: "
            f"{record['job_size']} images on {record['workers']} workers at the p50 of this machine.</p>"
            f"<table><tr><th>config</th><th>spec</th>{head}</tr>{''.join(body)}</table>"
            f"<h2>Examples</h2>{figures}</body></html>")

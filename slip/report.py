"""One self-contained HTML page about rankers: accuracy, grid search, training curves, a gallery.

Everything is inline (CSS, PNGs as base64 data URIs), so the file can be mailed or opened offline.

Sections:

* accuracy table (object-level: the chosen segment is the prompted object; every query scored; like
  the paper's Table 2, whose figures are shown for reference), with and without one-to-one
  assignment, the lenient tile accuracy beside it, and per-class accuracy;
* grid search (the paper's Table 1: lr, projection dim, validation loss; the best cell marked);
* training curves (loss per epoch);
* gallery of composites with the chosen segment of each query overlaid, objects found green, misses red.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

PAPER_TABLE_2 = (("ResNet-18 (supervised classifier)", "97%"), ("Pretrained SLIP", "15.25%"), ("Fine-tuned SLIP", "69.75%"))
HIT, MISS = (40, 200, 80), (230, 50, 50)  # RGB of a correct / wrong choice


@dataclass(frozen=True)
class GalleryItem:
    """One composite with the segments a ranker chose."""

    title: str  # e.g. "composite 3 · runs/ranker"
    png: bytes  # the overlay image (PNG)
    lines: tuple[tuple[str, bool], ...]  # per query: (text, correct)

    def to_json(self) -> dict:
        return {"title": self.title, "png": base64.b64encode(self.png).decode(), "lines": [list(x) for x in self.lines]}

    @staticmethod
    def from_json(data: dict) -> "GalleryItem":
        return GalleryItem(data["title"], base64.b64decode(data["png"]), tuple((t, bool(c)) for t, c in data["lines"]))


def overlay(image: np.ndarray, masks: Sequence[np.ndarray | None], correct: Sequence[bool],
            tiles: np.ndarray | None = None, *, scale: int = 2) -> bytes:
    """PNG of ``image`` ``(H, W, 3) uint8`` with each chosen ``(H, W) bool`` mask tinted and outlined
    (green = correct, red = wrong) and numbered 1..K; ``tiles`` ``(T, 4)`` XYXY boxes drawn in white."""
    canvas = image.astype(np.float32)
    for mask, ok in zip(masks, correct):
        if mask is not None and mask.any():
            canvas[mask] = canvas[mask] * 0.55 + np.array(HIT if ok else MISS, np.float32) * 0.45
    for mask, ok in zip(masks, correct):
        if mask is not None and mask.any():
            canvas[mask & ~binary_erosion(mask, iterations=2)] = HIT if ok else MISS
    h, w = image.shape[:2]
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    if tiles is not None:
        for x0, y0, x1, y1 in np.asarray(tiles).tolist():
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(255, 255, 255), width=2)
    font = ImageFont.load_default(size=14 * scale // 2 + 6)
    for k, (mask, ok) in enumerate(zip(masks, correct)):
        if mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            xy = (float(xs.mean()) * scale, float(ys.mean()) * scale)
            draw.text(xy, str(k + 1), font=font, fill=(255, 255, 255), anchor="mm", stroke_width=3,
                      stroke_fill=HIT if ok else MISS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def gallery_item(ev, *, ranker: str, mode: str = "plain") -> GalleryItem:
    """A :class:`GalleryItem` from a :class:`slip.evaluate.CompositeEval` (queries of one ``mode``)."""
    rows = [r for r in ev.results if r.mode == mode]
    masks = [None if r.chosen is None else ev.masks[r.chosen] for r in rows]
    lines = tuple((f"{k + 1}. {r.prompt}" + ("" if r.chosen_kind in (None, "object", "proposal") else f" ({r.chosen_kind})")
                   + ("" if r.iou is None else f" IoU {r.iou:.2f}"), r.correct) for k, r in enumerate(rows))
    png = overlay(ev.composite.image, masks, [r.correct for r in rows], ev.composite.tile_boxes)
    return GalleryItem(title=f"composite {ev.composite.index} · {ranker}", png=png, lines=lines)


# --- HTML ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 4px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right;font-size:14px}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.best td{background:#e5f6e5;font-weight:600}
tr.ref td{color:#777;font-style:italic}.note{color:#666;font-size:13px}
.gallery{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #ddd;border-radius:6px;padding:6px;width:272px}
.card img{width:256px;image-rendering:pixelated}.card .t{font-size:12px;color:#555;margin-bottom:4px;word-break:break-all}
.hit{color:#1c8a3a}.miss{color:#c62828}.curves img{max-width:520px;margin-right:10px}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _accuracy_section(evals: Sequence[dict]) -> str:
    rows = []
    for e in evals:
        plain, one = e["summary"]["plain"], e["summary"]["one_to_one"]
        iou = "–" if plain.get("mean_iou") is None else f"{plain['mean_iou']:.3f}"
        rows.append(f"<tr><td>{html.escape(e['ranker'])}</td><td>{plain['composites']}</td><td>{plain['queries']}</td>"
                    f"<td>{_pct(plain['accuracy'])}</td><td>{_pct(one['accuracy'])}</td>"
                    f"<td>{_pct(plain.get('tile_accuracy'))}</td><td>{iou}</td>"
                    f"<td>{_pct(plain.get('judge_accuracy'))}</td></tr>")
    refs = "".join(f'<tr class="ref"><td>paper: {html.escape(n)}</td><td>–</td><td>–</td><td>–</td><td>–</td><td>–</td>'
                   f"<td>–</td><td>{v}</td></tr>" for n, v in PAPER_TABLE_2)
    table = ("<table><tr><th>ranker</th><th>composites</th><th>queries</th><th>object accuracy</th><th>one-to-one</th>"
             f"<th>tile accuracy</th><th>mean IoU</th><th>judge</th></tr>{''.join(rows)}{refs}</table>")
    note = ('<p class="note"><i>object accuracy</i>: the chosen segment is the prompted object (IoU &gt; 0.5 with its '
            "true mask; without masks the classifier judge, or the oracle's object segment); all 4 classes of every "
            "composite are queried. <i>tile accuracy</i>: the chosen segment lies mostly (&gt;50% of its area) in the "
            "prompted tile, which also accepts a background patch or part of the object there. <i>judge</i>: the "
            "paper's scoring, a ResNet-18 classifier (<code>slip train-judge</code>) names the chosen segment. The "
            "paper's figures (classifier judge, its own data) are shown for reference only.</p>")
    return "<h2>Accuracy</h2>" + table + note + _per_class_section(evals)


def _per_class_section(evals: Sequence[dict]) -> str:
    classes = sorted({c for e in evals for c in e["summary"]["plain"]["per_class"]})
    if not classes or not evals:
        return ""
    head = "".join(f"<th>{html.escape(e['ranker'][-28:])}</th>" for e in evals)
    rows = []
    for c in classes:
        cells = "".join(f"<td>{_pct(e['summary']['plain']['per_class'].get(c, {}).get('accuracy'))}</td>" for e in evals)
        rows.append(f"<tr><td>{html.escape(c)}</td>{cells}</tr>")
    return f"<details><summary>Per-class accuracy</summary><table><tr><th>class</th>{head}</tr>{''.join(rows)}</table></details>"


def _grid_section(grid: Sequence[dict]) -> str:
    if not grid:
        return ""
    finite = [g for g in grid if g.get("val_loss") is not None]
    best = min(finite, key=lambda g: g["val_loss"]) if finite else None
    rows = []
    for g in sorted(grid, key=lambda g: (g["lr"], g["proj_dim"] or 0)):
        mark = g is best
        loss = "failed" if g.get("val_loss") is None else f"{g['val_loss']:.4f}"
        dim = "–" if g["proj_dim"] is None else g["proj_dim"]
        rows.append(f'<tr class="{"best" if mark else ""}"><td>{g["lr"]:g}</td><td>{dim}</td><td>{loss}'
                    f'{" ★ best" if mark else ""}</td></tr>')
    return ("<h2>Grid search</h2><table><tr><th>learning rate</th><th>projection dim</th><th>validation loss</th></tr>"
            f"{''.join(rows)}</table>")


def _curves_section(curves: Mapping[str, dict | list]) -> str:
    from slip.train.ranker import plot_curve
    import tempfile
    from pathlib import Path

    imgs = []
    for name, curve in curves.items():
        history = curve["epochs"] if isinstance(curve, dict) else curve
        if not history:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "curve.png"
            plot_curve(history, path, best_epoch=curve.get("best_epoch") if isinstance(curve, dict) else None,
                       title=name[-48:])
            imgs.append(_img(path.read_bytes(), f"training curve of {name}"))
    return f'<h2>Training curves</h2><div class="curves">{"".join(imgs)}</div>' if imgs else ""


def _gallery_section(items: Sequence[GalleryItem]) -> str:
    if not items:
        return ""
    cards = []
    for item in items:
        lines = "".join(f'<div class="{"hit" if ok else "miss"}">{"✓" if ok else "✗"} {html.escape(t)}</div>' for t, ok in item.lines)
        cards.append(f'<div class="card"><div class="t">{html.escape(item.title)}</div>{_img(item.png, item.title)}{lines}</div>')
    return ('<h2>Gallery</h2><p class="note">Chosen segment of each query, numbered as listed; green = the prompted '
            f'object, red = anything else.</p><div class="gallery">{"".join(cards)}</div>')


def build_report(evals: Sequence[dict], grid: Sequence[dict] = (), curves: Mapping[str, dict | list] | None = None,
                 gallery: Sequence[GalleryItem] = (), *, title: str = "SLIP ranker report", subtitle: str = "") -> str:
    """The HTML page (a string).

    ``evals``: ``[{"ranker": spec, "summary": slip.evaluate.summarize(...)}]``; ``grid``:
    ``[{"lr", "proj_dim", "val_loss"}]`` (``val_loss`` None = failed cell); ``curves``: name ->
    ``curve.json`` content (or its ``epochs`` list); ``gallery``: :class:`GalleryItem` s.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        body.append(f'<p class="note">{html.escape(subtitle)}</p>')
    if evals:
        body.append(_accuracy_section(evals))
    body.append(_grid_section(grid))
    body.append(_curves_section(curves or {}))
    body.append(_gallery_section(gallery))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def report_from_runs(runs: Sequence, *, title: str = "SLIP ranker evaluation", grid: Sequence[dict] = ()) -> str:
    """A report from :class:`slip.evaluate.RankerRun` s (``slip evaluate-local --report``)."""
    evals = [{"ranker": r.spec, "summary": r.summary} for r in runs]
    curves = {r.spec: r.curve for r in runs if r.curve}
    gallery = [g for r in runs for g in r.gallery]
    return build_report(evals, grid, curves, gallery, title=title)

"""A self-contained HTML gallery of any job's results, with hit / miss marks where the truth is known.

Layout written by :func:`write_gallery`::

    OUT/index.html            one page, no external resources (inline CSS, SVG outlines)
    OUT/thumbs/<index>.jpg    each image downscaled smoothly (PIL LANCZOS) to at most THUMB_PX a side

Per image: the thumbnail with each prompt's chosen mask(s) outlined over it in the prompt's colour and
labelled with the prompt text (SVG in the image's pixel coordinates, so outlines stay sharp at any
zoom). A segment chosen by several prompts is outlined once in all their colours, dash by dash, under one
label naming each prompt in its colour. Below the picture, per prompt, the scores of its instances,
"not found" for an explicit empty answer (with the best score and the threshold), and, when ``truth``
knows the image, a mark: for an object that is there, hit (IoU of the union of the chosen masks with the
true mask > 0.5; of their boxes with the true boxes, for a truth of boxes) or miss; for an absent one,
correctly not found or wrongly found. Failed images show their reason. The summary (counts; hits on present
objects and correct "not found" on absent ones, reported apart) is written last but shown first.

``truth(name) -> {prompt: (H, W) bool mask} | None`` (None: nothing known about that image; a prompt
missing from the dict: not judged; an all-False mask: the object is absent). :func:`coco_truth` reads
one from a COCO ground-truth file (category name = prompt). The demo's scenes plug in the same way::

    def demo_truth(name):  # "scene_0003.png" -> the masks producer.demo.demo_scene(3) drew
        _, masks, names = demo_scene(int(Path(name).stem.split("_")[1]), tile=128)
        return dict(zip(names, masks))
"""

from __future__ import annotations

import contextlib
import html
import io
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from producer.exports_items import DONE, FAILED, Answer, ExportItem, answers, atomic_file, image_size, item_doc
from producer.exports_shapes import mask_polygons
from slip.errors import DatasetError, InputError, SlipError
from slip.images import load_image

THUMB_PX = 320  # longest side of a thumbnail
HIT_IOU = 0.5  # a chosen mask is a hit above this IoU with the true mask
DASHES = 12  # dashes of each colour around an outline shared by several prompts
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0092a8", "#f032e6", "#9a6324", "#808000",
           "#000075")  # prompt colours, in prompt order; further prompts get spread hues
Truth = Callable[[str], "Mapping[str, np.ndarray] | None"]

STYLE = """body{font-family:system-ui,sans-serif;margin:16px;display:flex;flex-direction:column;background:#f7f7f7;
color:#222}header{order:0}#summary{order:1;margin-bottom:12px}main{order:2;display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(300px,1fr))}h1{font-size:22px;margin:0 0 6px}
.legend span{display:inline-block;margin-right:10px}.swatch{display:inline-block;width:11px;height:11px;
border-radius:2px;background:var(--c);margin-right:4px;vertical-align:-1px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.frame{position:relative;width:100%;background:#e4e4e4;overflow:hidden}.frame img,.frame svg{position:absolute;
left:0;top:0;width:100%;height:100%}.frame .missing{position:absolute;padding:8px;color:#666}
.name{font-weight:600;margin:6px 0 2px;word-break:break-all}ul{list-style:none;padding:0;margin:0}
li{margin:2px 0}.none{color:#666;font-style:italic}.hit{color:#18794e;font-weight:600}
.miss{color:#c62828;font-weight:600}.failed{border-color:#e57373}.reason{color:#c62828}
svg text{font-family:system-ui,sans-serif;font-weight:700;paint-order:stroke;stroke:#fff}"""


def prompt_colour(category: int) -> str:
    """CSS colour of the prompt at ``category`` (index in the job's prompts)."""
    return PALETTE[category] if category < len(PALETTE) else f"hsl({(category * 137.5) % 360:.0f},70%,42%)"


def write_gallery(
    items: Iterable[ExportItem],
    *,
    out: Path,
    prompts: Sequence[str],
    job_id: str,
    title: str,
    note: str,
    truth: Truth | None = None,
    truth_boxes: bool = False,
    limit: int | None = None,
) -> Path:
    """Write ``OUT/index.html`` and ``OUT/thumbs/`` (module docstring) for the first ``limit`` done or
    failed items (all when None); returns the page's path. ``truth_boxes``: the truth's masks are filled boxes
    (detection labels), so each answer is judged by its instances' boxes. Raises :class:`InputError` when ``out``
    cannot be written, :class:`DatasetError` for a malformed result."""
    out, counts = Path(out), Counter()
    page = out / "index.html"
    try:
        (out / "thumbs").mkdir(parents=True, exist_ok=True)
        with atomic_file(page) as f:
            f.write(_head(title, note, job_id, prompts))
            for item in _shown(items, limit, counts):
                f.write(_card(item, out=out, prompts=prompts, truth=truth, boxes=truth_boxes, counts=counts))
            f.write(f"</main>\n{_summary(counts, limit)}\n</body></html>\n")
    except OSError as e:
        raise InputError(f"cannot write the gallery {e.filename or out}: {e.strerror or e}") from e
    return page


def _shown(items: Iterable[ExportItem], limit: int | None, counts: Counter) -> Iterator[ExportItem]:
    """Done and failed items, at most ``limit``; stops reading there."""
    for item in items:
        if limit is not None and counts["shown"] >= limit:
            counts["limited"] = 1
            return
        if item.state in (DONE, FAILED):
            counts["shown"] += 1
            yield item
        else:
            counts["other"] += 1


# --- page parts ------------------------------------------------------------------------------------


def _head(title: str, note: str, job_id: str, prompts: Sequence[str]) -> str:
    legend = "".join(f'<span style="--c:{prompt_colour(c)}"><i class="swatch"></i>{html.escape(p)}</span>'
                     for c, p in enumerate(prompts))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style></head>\n<body>\n<header><h1>{html.escape(title)}</h1>\n"
            f"<p>Job <code>{html.escape(job_id)}</code>. {html.escape(note)}</p>\n"
            f'<p class="legend">Prompts: {legend}</p></header>\n<main>\n')


def _summary(counts: Counter, limit: int | None) -> str:
    parts = [f"{counts['shown']} images shown: {counts['done']} done, {counts['failed']} failed"]
    if counts["other"]:
        parts.append(f"{counts['other']} not finished (not shown)")
    parts.append(f"{counts['found']} of {counts['asked']} prompt answers found something")
    if counts["present"]:
        parts.append(f"objects present: {counts['hit']} of {counts['present']} found "
                     f"({_percent(counts['hit'], counts['present'])}, IoU > {HIT_IOU})")
    if counts["absent"]:
        parts.append(f"objects absent: {counts['rejected']} of {counts['absent']} correctly not found "
                     f"({_percent(counts['rejected'], counts['absent'])})")
    if counts["limited"]:
        parts.append(f"stopped at the limit of {limit} images")
    return f'<section id="summary"><b>Summary:</b> {html.escape("; ".join(parts))}.</section>'


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%"


def _card(item: ExportItem, *, out: Path, prompts: Sequence[str], truth: Truth | None, boxes: bool,
          counts: Counter) -> str:
    thumb, problem = _thumbnail(item, out)
    name = f'<div class="name">{html.escape(item.name)}</div>'
    if item.state == FAILED:
        counts["failed"] += 1
        frame = _frame(thumb, problem, "", None)
        return (f'<figure class="card failed">{frame}<figcaption>{name}'
                f'<div class="reason">failed: {html.escape(str(item.reason))}</div></figcaption></figure>\n')
    counts["done"] += 1
    doc = item_doc(item)
    size = image_size(doc)
    found = answers(doc, prompts, name=item.name)
    expected = truth(item.name) if truth is not None else None
    lines = [_answer_line(a, _judge(a, expected, size, counts, boxes=boxes)) for a in found]
    counts["asked"] += len(found)
    counts["found"] += sum(bool(a.instances) for a in found)
    answered = {a.prompt for a in found}
    lines += [f'<li><b>{html.escape(p)}</b> <span class="none">not answered</span></li>' for p in prompts
              if p not in answered]
    frame = _frame(thumb, problem, _outlines(found, size), size)
    return f'<figure class="card">{frame}<figcaption>{name}<ul>{"".join(lines)}</ul></figcaption></figure>\n'


def _frame(thumb: str | None, problem: str | None, svg: str, size: tuple[int, int] | None) -> str:
    height, width = size or (3, 4)
    picture = (f'<img src="{thumb}" alt="" loading="lazy">' if thumb
               else f'<div class="missing">{html.escape(problem or "no image")}</div>')
    return f'<div class="frame" style="aspect-ratio:{width}/{height}">{picture}{svg}</div>'


def _answer_line(answer: Answer, mark: str) -> str:
    colour = prompt_colour(answer.category)
    if answer.instances:
        result = ", ".join(f"{i.score:.3f}" for i in answer.instances)
        result = f'<span class="score">{result}</span>' + (f" ({len(answer.instances)} instances)"
                                                            if len(answer.instances) > 1 else "")
    else:
        best = "" if answer.best is None else f"best {answer.best[1]:.3f}"
        limit = "" if answer.threshold is None else f"threshold {answer.threshold:.3f}"
        detail = ", ".join(filter(None, [best, limit]))
        result = '<span class="none">not found</span>' + (f" <small>({detail})</small>" if detail else "")
    return (f'<li class="answer" style="--c:{colour}"><i class="swatch"></i><b class="prompt">'
            f"{html.escape(answer.prompt)}</b> {result}{mark}</li>")


def _judge(answer: Answer, expected: Mapping[str, np.ndarray] | None, size: tuple[int, int], counts: Counter, *,
           boxes: bool = False) -> str:
    """The hit / miss mark of one answer ("" when the truth does not know it); with ``boxes``, the answer's
    instances count as their filled boxes (a truth of boxes)."""
    from slip.data.coco_truth import box_mask

    if expected is None or answer.prompt not in expected:
        return ""
    true = np.asarray(expected[answer.prompt], bool)
    if true.shape != size:
        return f' <span class="miss">? truth is {true.shape[1]}x{true.shape[0]}, result {size[1]}x{size[0]}</span>'
    chosen = np.zeros(size, bool)
    for inst in answer.instances:
        chosen |= box_mask(inst.bbox(), *size) if boxes else inst.mask()
    if not true.any():  # absent: right when nothing was chosen
        hit = not chosen.any()
        counts["absent"] += 1
        counts["rejected"] += hit
        text = "absent, correctly not found" if hit else "absent, but found"
    else:
        iou = int((chosen & true).sum()) / int((chosen | true).sum())
        hit = iou > HIT_IOU
        counts["present"] += 1
        counts["hit"] += hit
        text = f"{'hit' if hit else 'miss'}: IoU {iou:.2f}" if chosen.any() else "miss: not found"
    return f' <span class="{"hit" if hit else "miss"}">{"✓" if hit else "✗"} {text}</span>'


def _outlines(found: Sequence[Answer], size: tuple[int, int]) -> str:
    """SVG over the image: each chosen segment's outline in the colour of every prompt that chose it (several:
    dash by dash, so each stays visible), then one label above it naming those prompts (labels that would
    overlap are stacked downwards), in image pixel coordinates."""
    height, width = size
    epsilon = max(height, width) / THUMB_PX / 2  # simplify outlines to half a thumbnail pixel
    font = max(height, width) / 18
    by_segment: dict[int, list] = {}  # segment -> [(answer, instance)], in prompt order
    for answer in found:
        for inst in answer.instances:
            by_segment.setdefault(inst.segment, []).append((answer, inst))
    paths, labels, placed = [], [], []
    for choices in by_segment.values():
        inst = choices[0][1]
        d = " ".join(_svg_ring(ring, epsilon) for rings in mask_polygons(inst.mask()) for ring in rings)
        paths += [_outline(d, answer, chooser.score, k, len(choices)) for k, (answer, chooser) in enumerate(choices)]
        text = " ".join(a.prompt for a, _ in choices)
        x, y = _free_spot(inst.bbox(), placed, font, len(text))
        spans = " ".join(f'<tspan fill="{prompt_colour(a.category)}">{html.escape(a.prompt)}</tspan>'
                         for a, _ in choices)
        labels.append(f'<text x="{x:.0f}" y="{y:.0f}" font-size="{font:.1f}" stroke-width="{font / 6:.1f}">'
                      f"{spans}</text>")
    return (f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(paths + labels)}</svg>')


def _outline(d: str, answer: Answer, score: float, k: int, sharing: int) -> str:
    """One prompt's outline of a segment, the ``k``-th of ``sharing`` prompts that chose it: a full stroke
    alone, else every ``sharing``-th dash (``pathLength`` makes the dashes even whatever the outline's size)."""
    colour = prompt_colour(answer.category)
    dashes = ""
    if sharing > 1:
        dash = 100 / (DASHES * sharing)
        dashes = (f' pathLength="100" stroke-dasharray="{dash:.3f} {dash * (sharing - 1):.3f}" '
                  f'stroke-dashoffset="{-dash * k:.3f}"')
    fill = 0.15 / sharing
    return (f'<path d="{d}" fill="{colour}" fill-opacity="{fill:.3f}" fill-rule="evenodd" stroke="{colour}" '
            f'stroke-width="2.5" stroke-linejoin="round" vector-effect="non-scaling-stroke"{dashes}>'
            f"<title>{html.escape(answer.prompt)} {score:.3f}</title></path>")


def _free_spot(bbox: list[float], placed: list[tuple[float, float, float]], font: float,
               chars: int) -> tuple[float, float]:
    """Baseline of a label just above ``bbox``, moved down past labels already ``placed`` (x, y, width)."""
    x, y = bbox[0] + 1, max(bbox[1] - font * 0.25, font)
    width = 0.6 * font * chars
    while any(abs(y - py) < font and x < px + pw and px < x + width for px, py, pw in placed):
        y += font
    placed.append((x, y, width))
    return x, y


def _svg_ring(ring: np.ndarray, epsilon: float) -> str:
    points = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), epsilon, True).reshape(-1, 2)
    if len(points) < 3:
        points = ring
    return "M" + " L".join(f"{x + 0.5:.1f},{y + 0.5:.1f}" for x, y in points) + " Z"


def _thumbnail(item: ExportItem, out: Path) -> tuple[str | None, str | None]:
    """``(src relative to out, None)``, or ``(None, why there is no picture)``."""
    if item.image is None:
        return None, "no image"
    try:
        array = load_image(item.image())
    except SlipError as e:
        return None, f"image unavailable: {e}"
    picture = Image.fromarray(array)
    picture.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
    src = f"thumbs/{item.index:06d}.jpg"
    picture.save(out / src, quality=88)
    return src, None


# --- truth -----------------------------------------------------------------------------------------


class CocoTruth:
    """``truth(name)`` from a COCO ground-truth file: images by ``file_name``, prompts = category names;
    every category of a known image gets a mask (all False when it has no annotation there). A truth of boxes
    (``shape`` "box": some annotation has a bbox and no segmentation) gives each object's box, filled."""

    def __init__(self, path: Path) -> None:
        from pycocotools.coco import COCO

        from slip.data.coco_truth import truth_shape

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(path))
            self.ids = {str(i["file_name"]): int(i["id"]) for i in self.coco.dataset["images"]}
            self.names = {int(c["id"]): str(c["name"]) for c in self.coco.dataset["categories"]}
        except OSError as e:
            raise DatasetError(f"cannot read the ground truth {path}: {e.strerror or e}") from e
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise DatasetError(f"{path} is not a COCO annotation file: {type(e).__name__}: {e}") from e
        self.shape, self.boxed = truth_shape(path, self.coco.dataset.get("annotations", []))

    def bind(self, names: Sequence[str]) -> "CocoTruth":
        """Key the truth's images by the job's item ``names`` (its ``file_name``s as the labelling tool wrote
        them, matched by their ends: :func:`slip.inputs.keyed_by_names`); returns self."""
        from slip.inputs import keyed_by_names

        self.ids = keyed_by_names(self.ids, list(names))
        return self

    def __call__(self, name: str) -> dict[str, np.ndarray] | None:
        image_id = self.ids.get(name)
        if image_id is None:
            return None
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        masks = {n: np.zeros((height, width), bool) for n in self.names.values()}
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
            masks[self.names[ann["category_id"]]] |= self._region(ann, height, width)
        return masks

    def _region(self, ann: dict, height: int, width: int) -> np.ndarray:
        """An annotation's mask; for a truth of boxes, its box (a mask's own box where it has no bbox)."""
        from pycocotools import mask as mask_utils

        from slip.data.coco_truth import box_mask

        if self.shape == "mask":
            return self.coco.annToMask(ann).astype(bool)
        box = ann.get("bbox") or [float(v) for v in mask_utils.toBbox(self.coco.annToRLE(ann))]
        return box_mask(box, height, width)


def coco_truth(path: Path) -> CocoTruth:
    """A ``truth`` for :func:`write_gallery` from a COCO ground-truth file (e.g. ``slip data synth --coco``)."""
    return CocoTruth(Path(path))

"""``cvat``: a job's results as a "CVAT for images 1.1" XML file, for review in CVAT (or any tool that
reads the format: datumaro, CVAT's own dataset library, reads it back in the tests).

Layout (upload it to a CVAT task whose images are the submitted ones, same names: Actions -> Upload
annotations -> "CVAT 1.1")::

    <annotations>
      <version>1.1</version>
      <meta><task><name>SLIP job JOB</name><size>N</size><mode>annotation</mode>
        <labels><label><name>PROMPT</name><color>#rrggbb</color><type>any</type>
          <attributes><attribute><name>score</name><mutable>False</mutable><input_type>text</input_type>
          <default_value></default_value><values></values></attribute></attributes></label>...</labels>
      </task></meta>
      <image id="0" name="ITEM NAME" width="W" height="H">
        <mask label="PROMPT" source="auto" occluded="0" z_order="0" rle="c0,c1,..." left="x" top="y"
              width="w" height="h"><attribute name="score">0.53</attribute></mask>
        (or, with shape="polygon": <polygon label="PROMPT" source="auto" occluded="0" z_order="0"
              points="x0,y0;x1,y1;..."> one per outer ring, holes dropped)
      </image>
      ...
    </annotations>

Mask RLE (CVAT's): the run lengths of the mask inside its box (``left``, ``top``, ``width`` x ``height``
pixels, the tight box of the mask), row by row, starting with a run of background (possibly 0).
Image ids are positions in the file; CVAT matches images by ``name``. Done items only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence
from xml.sax.saxutils import quoteattr, escape

import numpy as np

from producer.exports_items import DONE, ExportItem, Instance, Tally, answers, atomic_file, image_size, item_doc
from producer.exports_shapes import mask_polygons
from slip.errors import ConfigError

SHAPES = ("mask", "polygon")  # mask: exact (RLE in the tight box); polygon: outlines, holes dropped


def mask_runs(mask: np.ndarray) -> tuple[list[int], tuple[int, int, int, int]]:
    """``(H, W) bool`` -> (CVAT run lengths, ``(left, top, width, height)`` of the tight box); an empty mask
    gives ``([1], (0, 0, 1, 1))`` (one background pixel)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [1], (0, 0, 1, 1)
    top, left = int(ys.min()), int(xs.min())
    box = mask[top : ys.max() + 1, left : xs.max() + 1].reshape(-1)
    edges = np.flatnonzero(box[1:] != box[:-1]) + 1
    lengths = np.diff(np.r_[0, edges, box.size]).tolist()
    if box[0]:
        lengths = [0] + lengths
    height, width = int(ys.max()) + 1 - top, int(xs.max()) + 1 - left
    return lengths, (left, top, width, height)


def runs_mask(runs: Sequence[int], box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`mask_runs`: ``(H, W) bool``; ValueError when the runs do not fill the box."""
    left, top, w, h = box
    if sum(runs) != w * h or min(runs, default=0) < 0 or left < 0 or top < 0 or left + w > width or top + h > height:
        raise ValueError(f"mask RLE of {sum(runs)} pixels does not fit its {w}x{h} box at ({left}, {top}) "
                         f"in a {width}x{height} image")
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    out = np.zeros((height, width), bool)
    out[top : top + h, left : left + w] = values.reshape(h, w)
    return out


def _meta(prompts: Sequence[str], job_id: str) -> str:
    from producer.gallery import prompt_colour

    score = ("<attributes><attribute><name>score</name><mutable>False</mutable><input_type>text</input_type>"
             "<default_value></default_value><values></values></attribute></attributes>")
    labels = "".join(f"<label><name>{escape(p)}</name><color>{prompt_colour(c)}</color><type>any</type>{score}</label>"
                     for c, p in enumerate(prompts))
    return (f"<meta><task><name>{escape(f'SLIP job {job_id}')}</name><mode>annotation</mode>"
            f"<labels>{labels}</labels></task></meta>")


def write_cvat(items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], job_id: str, tally: Tally,
               shape: str = "mask") -> None:
    """The XML file (module docstring), streamed."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown CVAT shape {shape!r}: use one of {', '.join(SHAPES)}")
    with atomic_file(out) as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n<version>1.1</version>\n')
        f.write(_meta(prompts, job_id) + "\n")
        for item in tally.keep(items, frozenset({DONE})):
            doc = item_doc(item)
            height, width = image_size(doc)
            shapes = [_shape(inst, a.prompt, shape) for a in answers(doc, prompts, name=item.name) for inst in a.instances]
            shapes = [s for s in shapes if s]
            f.write(f'<image id="{tally.written}" name={quoteattr(item.name)} width="{width}" height="{height}">\n'
                    + "".join(shapes) + "</image>\n")
            tally.written += 1
            tally.instances += len(shapes)
        f.write("</annotations>\n")


def _shape(inst: Instance, prompt: str, shape: str) -> str:
    common = f'label={quoteattr(prompt)} source="auto" occluded="0" z_order="0"'
    score = f'<attribute name="score">{inst.score:.6f}</attribute>'
    mask = inst.mask()
    if shape == "mask":
        runs, (left, top, w, h) = mask_runs(mask)
        return (f'  <mask {common} rle="{",".join(map(str, runs))}" left="{left}" top="{top}" width="{w}" '
                f'height="{h}">{score}</mask>\n')
    parts = []
    for rings in mask_polygons(mask):
        points = ";".join(f"{x:.2f},{y:.2f}" for x, y in rings[0].tolist())
        parts.append(f'  <polygon {common} points="{points}">{score}</polygon>\n')
    return "".join(parts)

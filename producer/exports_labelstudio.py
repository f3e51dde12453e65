"""``label-studio``: a job's results as Label Studio tasks with predictions (pre-annotations to review).

One JSON file, a list of tasks (import it in the project's Data Import, or ``POST /api/projects/<id>/import``)::

    [{"data": {"image": IMAGE_BASE + item name (URL-quoted), "slip_name": item name, "slip_index": index,
               "slip_job": job id},
      "predictions": [{"model_version": the result digest (segments.json "request_digest"),
                       "score": 1 - the image's doubt / prompts (producer.doubt; ascending: most doubtful first),
                       "result": [{"id", "type": "brushlabels", "from_name": "brush", "to_name": "image",
                                   "original_width": W, "original_height": H, "image_rotation": 0,
                                   "value": {"format": "rle", "rle": [int, ...], "brushlabels": [prompt]},
                                   "score": the instance's similarity}, ...]}]}, ...]

``shape="polygon"`` writes ``{"type": "polygonlabels", "from_name": "polygon", "value": {"points": [[x %,
y %], ...], "closed": true, "polygonlabels": [prompt]}}`` instead, one result per outer ring (Label Studio
polygons have no holes: a mask's holes are dropped there; brush keeps every pixel). A prompt with no
instance gives no result. Beside the tasks, ``<out>.label_config.xml`` is the project's labelling
interface (an ``Image`` named ``image``, ``BrushLabels`` named ``brush`` and ``PolygonLabels`` named
``polygon``, one label per prompt); create the project with it.

**Images.** ``image_base`` is put in front of each item name: ``/data/local-files/?d=DIR/`` for Label
Studio's local storage (start it with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` a parent of the submitted folder, DIR the submitted folder
relative to it, and add a Local Storage pointing there), or a URL prefix (``https://host/photos/``,
``s3://bucket/photos/`` with a cloud storage connected) where the submitted folder is served.

**Brush RLE.** Label Studio stores a brush mask as the RGBA image ``(H, W, 4)`` flattened, run-length
coded by thi.ng's ``rle-pack``: a 32-bit value count, the word size - 1 (5 bits), four run-length field
widths - 1 (4 bits each), then chunks of ``flag (1 bit), width index (2), run length - 1 (that width)``
followed by one word (flag 1: a run of that word) or run-length words (flag 0: literals); bits are
packed most significant first and the last byte is padded with zeros. :func:`brush_rle` writes every
run as a flagged run of 8-bit words (0 or 255 in all four channels), with field widths 3, 4, 8 and 16
bits (longer runs are split); :func:`brush_mask` reads any such stream (Label Studio's own included).
The tests check both against label-studio-sdk's decoder and a real Label Studio server.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import numpy as np

from producer.doubt import review_score
from producer.exports_items import DONE, ExportItem, Tally, answers, atomic_file, image_size, item_doc
from producer.exports_shapes import mask_polygons
from slip.errors import ConfigError, DatasetError

SHAPES = ("brush", "polygon")  # brush: exact masks (RLE); polygon: outlines, holes dropped
LOCAL_FILES = "/data/local-files/?d="  # Label Studio's local-storage URL prefix
RUN_WIDTHS = (3, 4, 8, 16)  # bits of the run-length fields (index 0..3)
CONFIG_SUFFIX = ".label_config.xml"


# --- brush RLE -------------------------------------------------------------------------------------


def brush_rle(mask: np.ndarray) -> list[int]:
    """``(H, W) bool`` -> Label Studio brush RLE bytes (module docstring), as a list of ints."""
    flat = np.repeat(np.asarray(mask, bool).reshape(-1), 4)  # RGBA: the same word in every channel
    total = flat.size
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.r_[0, edges]
    lengths = np.diff(np.r_[starts, total])
    words = np.where(flat[starts], 255, 0)
    # split runs longer than 2**16 into pieces of at most 2**16
    pieces = -(-lengths // (1 << 16))
    words, lengths = np.repeat(words, pieces), _split(lengths, pieces)
    index = np.searchsorted(np.array([1 << w for w in RUN_WIDTHS]), lengths)  # smallest field that holds length - 1
    widths = np.array(RUN_WIDTHS)[index]
    header_values = [total, 8 - 1, *(w - 1 for w in RUN_WIDTHS)]
    header_widths = [32, 5, 4, 4, 4, 4]
    n = len(lengths)
    values = np.empty(4 * n, np.int64)
    bits = np.empty(4 * n, np.int64)
    values[0::4], bits[0::4] = 1, 1  # flag: a run
    values[1::4], bits[1::4] = index, 2
    values[2::4], bits[2::4] = lengths - 1, widths
    values[3::4], bits[3::4] = words, 8
    values = np.r_[header_values, values]
    bits = np.r_[header_widths, bits]
    return np.packbits(_bits(values, bits)).tolist()


def _split(lengths: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Each length cut into ``pieces`` parts of 2**16 (the last one the rest)."""
    if (pieces == 1).all():
        return lengths
    out = np.full(int(pieces.sum()), 1 << 16, np.int64)
    last = np.cumsum(pieces) - 1
    out[last] = lengths - (pieces - 1) * (1 << 16)
    return out


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The fields ``values`` (each ``widths`` bits, most significant first) as one uint8 0/1 array."""
    owner = np.repeat(np.arange(len(values)), widths)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(widths) - widths, widths)
    shift = widths[owner] - 1 - offset
    return ((values[owner] >> shift) & 1).astype(np.uint8)


def brush_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> ``(H, W) bool`` (the alpha channel > 0); DatasetError when it is not one."""
    try:
        bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    except (ValueError, TypeError, OverflowError) as e:
        raise DatasetError(f"brush RLE is not a list of bytes: {e}") from e
    reader = _BitReader(bits)
    total, word = reader.read(32), reader.read(5) + 1
    widths = [reader.read(4) + 1 for _ in range(4)]
    if total != height * width * 4:
        raise DatasetError(f"brush RLE holds {total} values, not {height}x{width}x4 (the image's size)")
    out = np.zeros(total, np.uint32)
    i = 0
    while i < total:
        flag = reader.read(1)
        j = min(i + 1 + reader.read(widths[reader.read(2)]), total)
        if flag:
            out[i:j] = reader.read(word)
        else:
            for k in range(i, j):
                out[k] = reader.read(word)
        i = j
    return out.reshape(height, width, 4)[..., 3] > 0


class _BitReader:
    def __init__(self, bits: np.ndarray) -> None:
        self.bits, self.at = bits, 0

    def read(self, count: int) -> int:
        if self.at + count > self.bits.size:
            raise DatasetError("brush RLE ends early (truncated or not a brush mask)")
        chunk = self.bits[self.at : self.at + count]
        self.at += count
        return int("".join("1" if b else "0" for b in chunk) or "0", 2)


# --- the export ------------------------------------------------------------------------------------


def label_config(prompts: Sequence[str]) -> str:
    """The project's labelling interface: brush and polygon labels, one per prompt."""
    from producer.gallery import prompt_colour

    labels = "".join(f'    <Label value="{escape(p)}" background="{prompt_colour(c)}"/>\n' for c, p in enumerate(prompts))
    return (f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="brush" toName="image">\n{labels}  </BrushLabels>\n'
            f'  <PolygonLabels name="polygon" toName="image" strokeWidth="2">\n{labels}  </PolygonLabels>\n</View>\n')


def config_path(out: Path) -> Path:
    return out.with_name(out.name + CONFIG_SUFFIX)


def write_label_studio(items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], job_id: str, tally: Tally,
                       image_base: str = LOCAL_FILES, shape: str = "brush") -> None:
    """The tasks file and its labelling config (module docstring), streamed."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown Label Studio shape {shape!r}: use one of {', '.join(SHAPES)}")
    with atomic_file(out) as f:
        f.write("[\n")
        for item in tally.keep(items, frozenset({DONE})):
            task = _task(item, prompts=prompts, job_id=job_id, image_base=image_base, shape=shape)
            f.write(("" if tally.written == 0 else ",\n") + json.dumps(task))
            tally.written += 1
            tally.instances += len(task["predictions"][0]["result"])
        f.write("\n]\n")
    with atomic_file(config_path(out)) as f:
        f.write(label_config(prompts))


def _task(item: ExportItem, *, prompts: Sequence[str], job_id: str, image_base: str, shape: str) -> dict:
    doc = item_doc(item)
    height, width = image_size(doc)
    results = []
    for answer in answers(doc, prompts, name=item.name):
        for inst in answer.instances:
            base = {"original_width": width, "original_height": height, "image_rotation": 0, "to_name": "image",
                    "score": inst.score, "readonly": False}
            if shape == "brush":
                value = {"format": "rle", "rle": brush_rle(inst.mask()), "brushlabels": [answer.prompt]}
                results.append({"id": f"s{inst.segment}-{answer.category}", "type": "brushlabels",
                                "from_name": "brush", "value": value, **base})
                continue
            for k, rings in enumerate(mask_polygons(inst.mask())):
                points = [[100.0 * (x + 0.5) / width, 100.0 * (y + 0.5) / height] for x, y in rings[0].tolist()]
                value = {"points": points, "closed": True, "polygonlabels": [answer.prompt]}
                results.append({"id": f"s{inst.segment}-{answer.category}-{k}", "type": "polygonlabels",
                                "from_name": "polygon", "value": value, **base})
    digest = doc.get("request_digest")
    if not isinstance(digest, str):
        raise DatasetError(f"malformed segments.json for {item.name}: no request_digest")
    data = {"image": image_base + quote(item.name, safe="/"), "slip_name": item.name, "slip_index": item.index,
            "slip_job": job_id}
    return {"data": data, "predictions": [{"model_version": digest, "score": review_score(doc, prompts, name=item.name),
                                           "result": results}]}


# --- the review formats of producer.exports.write_export -------------------------------------------


REVIEW_FORMATS = ("label-studio", "cvat")  # the labelling tools' formats (this module and producer.exports_cvat)


def write_review_format(items: Iterable[ExportItem], *, format: str, out: Path, prompts: Sequence[str], job_id: str,
                        tally: Tally, image_base: str | None = None, shape: str | None = None) -> tuple[Path, ...]:
    """``label-studio`` (tasks + labelling config; ``shape`` brush | polygon, ``image_base``) or ``cvat``
    (``shape`` mask | polygon); returns the paths written."""
    if format == "label-studio":
        write_label_studio(items, out=out, prompts=prompts, job_id=job_id, tally=tally,
                           image_base=LOCAL_FILES if image_base is None else image_base, shape=shape or "brush")
        return out, config_path(out)
    if image_base is not None:
        raise ConfigError("--image-base applies to --format label-studio only (CVAT matches images by name)")
    from producer.exports_cvat import write_cvat

    write_cvat(items, out=out, prompts=prompts, job_id=job_id, tally=tally, shape=shape or "mask")
    return (out,)

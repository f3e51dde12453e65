"""Result exports stream: peak memory does not grow with the job.

    python -m bench.exports                  # every format at 2,000 and 20,000 items; ~3 min on 2 CPU cores

Each (format, item count) runs in a fresh subprocess: it builds a pool of synthetic segments.json v2
documents (``--size`` px images, ``--segments`` COCO RLE segments each, made with
``slip.outputs.encode_rle``; three prompts with one, two and no instances), exports a 50-item warm-up
(imports, OpenCV, pycocotools), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads
the resident size as the baseline, then exports the items, streamed from a generator that reuses the
pool's documents (so the input itself costs nothing per item), and reads the peak RSS (``VmHWM``).
``growth_mb`` = peak - baseline: what the export itself held at most.
A streamed exporter shows about the same growth at 2k and 20k items; one that keeps a list per item
shows ten times more, as the control ``coco-in-memory`` does (the whole COCO document built as lists,
then dumped: what the previous exporter did). Writes ``bench/results/exports.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "exports.json"
FORMATS = ("coco", "coco-results", "jsonl", "polygons", "yolo")
CONTROL = "coco-in-memory"  # not streamed: the control
PROMPTS = ("circle", "star", "moon")
POOL = 16  # distinct documents cycled through


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[2000, 20000], help="job sizes to export")
    p.add_argument("--formats", nargs="+", default=[*FORMATS, CONTROL], choices=[*FORMATS, CONTROL])
    p.add_argument("--size", type=int, default=256, help="image side, px")
    p.add_argument("--segments", type=int, default=12, help="segments per document")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=2, metavar=("FORMAT", "ITEMS"), help=argparse.SUPPRESS)
    return p.parse_args()


def _documents(size: int, segments: int) -> list[dict]:
    """``POOL`` segments.json v2 documents with random elliptic segments."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from slip.outputs import encode_rle

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    docs = []
    for _ in range(POOL):
        cy, cx = rng.uniform(0.2, 0.8, (2, segments)) * size
        ry, rx = rng.uniform(0.05, 0.25, (2, segments)) * size
        masks = ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 + \
                ((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 <= 1
        rles = encode_rle(masks)
        docs.append({
            "format_version": 2, "image_size": {"height": size, "width": size}, "prompts": list(PROMPTS),
            "segments": [{"id": i, "segmentation": r, "bbox": mask_utils.toBbox(r).tolist(),
                          "area": int(mask_utils.area(r))} for i, r in enumerate(rles)],
            "matches": [
                {"prompt": "circle", "threshold": 0.2, "instances": [{"segment": 0, "score": 0.41}],
                 "best": {"segment": 0, "score": 0.41}, "top_k": []},
                {"prompt": "star", "threshold": 0.2, "instances": [{"segment": 1, "score": 0.33},
                                                                   {"segment": 2, "score": 0.25}],
                 "best": {"segment": 1, "score": 0.33}, "top_k": []},
                {"prompt": "moon", "threshold": 0.2, "instances": [], "best": {"segment": 3, "score": 0.1},
                 "top_k": []}],
        })
    return docs


def _items(count: int, docs: list[dict]):
    from producer.exports import ExportItem

    for k in range(count):
        if k % 50 == 49:
            yield ExportItem(k, f"batch{k // 1000}/{k:06d}.jpg", "failed", None, "ImageError: truncated", None)
        else:
            yield ExportItem(k, f"batch{k // 1000}/{k:06d}.jpg", "done", docs[k % len(docs)], None, _image)


def _image() -> bytes:
    return b"\xff\xd8 not decoded by the exporters"


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Make the peak RSS (VmHWM) start again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _output_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _in_memory_coco(items, *, out: Path) -> tuple[int, int]:
    """The control: the whole COCO document as lists, then one dump."""
    from producer.exports import answers

    images, annotations = [], []
    for item in items:
        if item.state != "done":
            continue
        images.append({"id": item.index + 1, "file_name": item.name, "width": 0, "height": 0})
        for answer in answers(item.doc, PROMPTS):
            annotations += [{"id": len(annotations) + 1, "image_id": item.index + 1, "category_id": i.category + 1,
                             "segmentation": i.rle, "bbox": i.bbox(), "area": i.area(), "score": i.score}
                            for i in answer.instances]
    out.write_text(json.dumps({"images": images, "annotations": annotations}))
    return len(images), len(annotations)


def _export(format: str, items, out: Path) -> tuple[int, int]:
    from producer.exports import write_export

    if format == CONTROL:
        return _in_memory_coco(items, out=out)
    options = {"images": "copy"} if format == "yolo" else {}  # a YOLO dataset holds its images
    summary = write_export(items, format=format, out=out, prompts=PROMPTS, job_id="bench", **options)
    return summary.written, summary.instances


def child(format: str, count: int, args: argparse.Namespace) -> dict:
    """One export in this process; its memory and time figures."""
    docs = _documents(args.size, args.segments)
    with tempfile.TemporaryDirectory() as tmp:
        _export(format, _items(50, docs), Path(tmp) / "warm-up")
        _reset_peak()
        baseline = _status_mb("VmRSS")
        out = Path(tmp) / "export"
        start = time.perf_counter()
        written, instances = _export(format, _items(count, docs), out)
        seconds = time.perf_counter() - start
        peak = _status_mb("VmHWM")
        size = _output_bytes(out)
    return {"format": format, "items": count, "written": written, "instances": instances,
            "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - baseline, 1),
            "seconds": round(seconds, 2), "items_per_s": round(count / seconds), "output_mb": round(size / 2**20, 1)}


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    runs = []
    for format in args.formats:
        for count in args.items:
            command = [sys.executable, "-m", "bench.exports", "--child", format, str(count), "--size", str(args.size),
                       "--segments", str(args.segments)]
            line = subprocess.run(command, env=env, cwd=root, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(line.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    report = {
        "command": "python -m bench.exports " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "size": args.size, "segments": args.segments, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Ultralytics' own view of a YOLO export: ``check_det_dataset`` and its ``YOLODataset`` in a child process
(Ultralytics writes settings on import and keeps module state), with its config in a temporary folder and
every network lookup refused and recorded by an audit hook, so a test proves the load needs no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

ULTRALYTICS_CHECK = r"""
import json, sys
attempts = []
def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        attempts.append(f"{event} {args!r}"[:200])
        raise OSError(f"network blocked by the test: {event}")
sys.addaudithook(hook)
from ultralytics.data import YOLODataset
from ultralytics.data.utils import check_det_dataset
data = check_det_dataset(sys.argv[1], autodownload=False)
out = {"train": data["train"], "val": data["val"], "names": {int(k): v for k, v in data["names"].items()}}
for split in ("train", "val"):
    ds = YOLODataset(img_path=data[split], data=data, task="segment", augment=False, imgsz=64, batch_size=1)
    out[split] = {"images": sorted(ds.im_files), "instances": sum(len(l["cls"]) for l in ds.labels),
                  "classes": sorted({int(c) for l in ds.labels for c in l["cls"].reshape(-1)})}
out["attempts"] = attempts
print("RESULT " + json.dumps(out))
"""


def load_in_ultralytics(data_yaml: Path, config_dir: Path) -> dict:
    """What Ultralytics reads from ``data_yaml``: per split its image files, instance count and classes."""
    fonts = config_dir / "Ultralytics"  # check_det_dataset wants a font there, else it downloads one
    fonts.mkdir(parents=True, exist_ok=True)
    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        (fonts / name).write_bytes(dejavu.read_bytes())
    env = {**os.environ, "YOLO_CONFIG_DIR": str(config_dir), "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", ULTRALYTICS_CHECK, str(data_yaml)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["attempts"] == [], f"Ultralytics tried the network: {result['attempts']}"
    return result

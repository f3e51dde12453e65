"""How long ``slip --help`` takes to start (it imports no model code).

    python bench/cli_startup.py [--repeats 7] [--out bench/results/cli_startup.json]

Runs the installed console script (``<venv>/bin/slip --help``, falling back to ``python -m producer``)
once to warm the file cache, then ``--repeats`` times; reports the median with min/max and the load
average. For comparison it also times ``python -c "import torch"`` the same way (what every command
paid before the CLI stopped importing model code at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - start


def spread(runs: list[float]) -> dict:
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cli_startup.json")
    args = parser.parse_args()
    slip = shutil.which("slip", path=str(Path(sys.executable).parent)) or shutil.which("slip")
    help_command = [slip, "--help"] if slip else [sys.executable, "-m", "producer", "--help"]
    load_before = os.getloadavg()
    torch_command = [sys.executable, "-c", "import torch"]
    run_once(help_command), run_once(torch_command)  # warm the file cache
    help_runs, torch_runs = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        help_runs.append(run_once(help_command))
        torch_runs.append(run_once(torch_command))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/cli_startup.py " + " ".join(sys.argv[1:]),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
        "slip_help": {"command": " ".join(help_command), **spread(help_runs)},
        "import_torch": {"command": f"{sys.executable} -c 'import torch'", **spread(torch_runs)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    h, t = report["slip_help"], report["import_torch"]
    print(f"slip --help: median {h['median_s']:.2f} s (min {h['min_s']:.2f}, max {h['max_s']:.2f}); "
          f"import torch alone: median {t['median_s']:.2f} s; load {load_before[0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()

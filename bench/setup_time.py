"""Time the README's two commands' set-up from a clean clone with empty caches.

    python bench/setup_time.py [--out bench/results/setup.json] [--demo]

Each command runs in its own clone of this repository (its committed HEAD) in a new temporary folder, with
uv's and pip's caches pointed at empty folders inside it: ``bash scripts/setup.sh`` (what ``bash
scripts/test.sh`` and CI run before pytest) and, with ``--demo``, ``bash scripts/demo.sh`` (its set-up plus
the demo itself: the README's main command from nothing). Debian packages already on the machine are not
reinstalled (the JSON says which were); Redis is already answering when the machine has it. Writes the wall
times, the load average and each command's last lines as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``command`` in ``cwd``; its wall time (s), exit code and last output lines."""
    start = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"command": " ".join(command), "wall_s": round(seconds, 1), "exit_code": done.returncode,
            "apt_installed": [line for line in lines if "installing Debian packages" in line],
            "last_lines": lines[-6:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "setup.json")
    parser.add_argument("--demo", action="store_true", help="also time scripts/demo.sh (in a clone of its own)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    commands = {"setup": ["bash", "scripts/setup.sh"], **({"demo": ["bash", "scripts/demo.sh"]} if args.demo else {})}
    runs, commit = {}, ""
    for name, command in commands.items():
        with tempfile.TemporaryDirectory(prefix="slip-setup-") as tmp:
            clone = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            env = {**os.environ, "UV_CACHE_DIR": f"{tmp}/uv-cache", "PIP_CACHE_DIR": f"{tmp}/pip-cache",
                   "DEMO_OUT": f"{tmp}/demo-out"}
            runs[name] = timed(command, clone, env)
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    report = {"what": "each command in its own clean clone with empty uv and pip caches: scripts/setup.sh (what "
                      "scripts/test.sh and CI run before pytest) and scripts/demo.sh (its set-up and the demo)",
              "command": "python bench/setup_time.py " + " ".join(argv or sys.argv[1:]),
              "commit": commit.strip(), "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                                                     "loadavg_after": os.getloadavg()}, "runs": runs}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, run in runs.items():
        print(f"{name}: {run['wall_s']} s (exit {run['exit_code']})")
    return 0 if all(run["exit_code"] == 0 for run in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

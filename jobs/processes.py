"""Processes of this host, from Linux ``/proc`` (elsewhere: as far as ``os.kill`` can tell): whether one
runs, and which ones a process forked (a worker's pool). Used by the reaper (its pool processes) and the
store (whether the writer of a temporary file is gone)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except (OSError, IndexError):
        return True  # no /proc (not Linux), or not ours to signal: alive as far as we can tell


def children(pid: int) -> list[int]:
    """The processes ``pid`` forked (any of its threads); empty without ``/proc``."""
    found: set[int] = set()
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{thread}/children") as f:
                found.update(int(c) for c in f.read().split())
    except OSError:
        pass
    return sorted(found)

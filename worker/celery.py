"""The process edge of ``celery -A worker ...``: the one module that reads the environment.

Celery's ``-A worker`` looks for ``worker.app``, then ``worker.celery``, and takes its ``app``. Only the
``celery`` command imports this module; importing :mod:`worker` or any other module of it builds nothing.
A bad ``SLIP_*`` value stops the process with one line naming the variable.
"""

from __future__ import annotations

import os
import sys

from jobs.settings import Settings
from slip.errors import ConfigError
from worker.app import create_app

try:
    app = create_app(Settings.from_env(os.environ), worker=True)
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e

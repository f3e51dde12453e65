"""The library's command line (``slip segment``, ``slip weights``, data and training commands).

``producer.cli`` mounts this app and adds the queue commands; the console script ``slip`` points there.
"""

from slip.cli.app import app

__all__ = ["app"]

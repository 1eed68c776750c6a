"""One log format for every process of a run: ``PREFIX HH:MM:SS LEVEL logger: message``.

Each entry point calls ``configure`` with the name of its process (``rank 3``, ``produce``,
``launch``, ...), so that a line read in a log file, or next to another process's on a
terminal, says where it came from. kafka-python's own logs are kept at warnings and above:
its informational lines (every connection, every metadata refresh) would bury ours.
"""
from __future__ import annotations

import logging
import sys


def configure(prefix: str, level: int = logging.WARNING, stream=None) -> None:
    """Send every log record to ``stream`` (default stderr) as one line starting with
    ``prefix``; replaces any handler configured before."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"{prefix} %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))

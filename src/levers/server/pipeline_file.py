"""Which pipeline a command works on: its file, or without one, the version published on REDIS_URL.

The file is ``-f FILE``, else LEVERS_FILE, else ./pipeline.yaml (command line over environment
over default, as for every setting). Imports no Redis client: `levers get` of a setting in the
file needs none.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_FILE = "pipeline.yaml"


def pipeline_path(given: Path | None) -> Path:
    return given or Path(os.environ.get("LEVERS_FILE") or DEFAULT_FILE)


def published_only(given: Path | None) -> str | None:
    """REDIS_URL, when a command is to work on the pipeline published there: no pipeline file is
    named (-f, LEVERS_FILE) or found, and REDIS_URL is set. None: the pipeline file's."""
    url = os.environ.get("REDIS_URL")
    if given is not None or os.environ.get("LEVERS_FILE") or pipeline_path(None).exists() or not url:
        return None
    return url

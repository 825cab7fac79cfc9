"""JSON on stdout, what `--json` prints: part of ``levers.cli.console``, kept apart from its terminal
library (rich), so that a command answering in JSON (`levers status --json`) does not load it."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

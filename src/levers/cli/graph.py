"""Reaching the knowledge graph a pipeline writes, for `levers graph`.

levers never imports phase code up front: the graph phase's handler module is found through its
dotted path in pipeline.yaml and imported only when a graph command runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from levers.errors import LeversError, UsageError
from levers.pipeline.loading import ensure_importable_from, load_pipeline
from levers.server.project import pipeline_path

# The bundled pipeline's graph phase, found by default.
GRAPH_HANDLER = "phases.kg_ingest:ingest_graph"


def call_graph_phase(
    file: Path | None, phase: str | None, function: str, group: str | None, **kwargs: Any
) -> Any:
    """``function(state_dir=..., **kwargs)`` of the graph phase's handler module, with the phase's options."""
    loaded = load_pipeline(pipeline_path(file))
    phases = loaded.spec.phases
    name = phase or next((n for n, p in phases.items() if p.handler == GRAPH_HANDLER), None)
    if name not in phases:
        wanted = f"named {phase!r}" if phase else f"runs {GRAPH_HANDLER}"
        raise UsageError(
            f"no phase {wanted} in {loaded.path.name}", fix="name the graph's phase with --phase"
        )
    module_name = phases[name].handler.partition(":")[0]
    ensure_importable_from(loaded.project_dir)
    try:
        call = getattr(importlib.import_module(module_name), function, None)
    except Exception as exc:  # the phase's own code: whatever it raises is reported, not a traceback
        raise LeversError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    if not callable(call):
        raise UsageError(f"{module_name} (phase {name}'s handler module) has no {function}() function")
    options = phases[name].options
    group_id = group or options.get("group_id")
    extra = {"group_id": group_id} if group_id else {}
    extra |= {"url": options["falkordb_url"]} if options.get("falkordb_url") else {}
    try:
        return call(state_dir=loaded.state_dir, **extra, **kwargs)
    except ValueError as exc:  # the phase's word for bad input, such as a malformed group id
        raise UsageError(str(exc)) from None
    except LeversError:  # already a line for the user (its server is not running, say)
        raise
    except Exception as exc:
        raise LeversError(f"{module_name}.{function} failed: {type(exc).__name__}: {exc}") from None

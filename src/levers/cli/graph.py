"""Reaching the knowledge graph a pipeline writes, for `levers graph`.

levers never imports phase code up front: the graph phase's handler module is found through its
dotted path in pipeline.yaml and imported only when a graph command runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer

from levers.cli import console
from levers.cli.options import FileOption, JsonOption, reports_errors
from levers.errors import LeversError, UsageError

# The bundled pipeline's graph phase, found by default: it runs either handler (one document at a
# time, or batches).
GRAPH_HANDLER = "phases.kg_ingest:ingest_graph"
GRAPH_HANDLERS = (GRAPH_HANDLER, "phases.kg_ingest:ingest_graphs")


def call_graph_phase(
    file: Path | None, phase: str | None, function: str, group: str | None, **kwargs: Any
) -> Any:
    """``function(state_dir=..., **kwargs)`` of the graph phase's handler module, with the phase's options."""
    from levers.pipeline.loading import ensure_importable_from, load_pipeline
    from levers.server.pipeline_file import pipeline_path

    loaded = load_pipeline(pipeline_path(file))
    phases = loaded.spec.phases
    name = phase or next((n for n, p in phases.items() if p.handler in GRAPH_HANDLERS), None)
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
    url = options.get("graph") or options.get("falkordb_url")  # the bundled phase's (older) names
    extra |= {"url": url} if url else {}
    try:
        return call(state_dir=loaded.state_dir, **extra, **kwargs)
    except ValueError as exc:  # the phase's word for bad input, such as a malformed group id
        raise UsageError(str(exc)) from None
    except LeversError:  # already a line for the user (its server is not running, say)
        raise
    except Exception as exc:
        raise LeversError(f"{module_name}.{function} failed: {type(exc).__name__}: {exc}") from None


# `levers graph`: read the knowledge graph a phase writes. The phase's code does the reading: its
# handler's module provides search() and counts(), imported only when a graph command runs.
graph_app = typer.Typer(help="Search and count the knowledge graph a phase writes.", no_args_is_help=True)
GraphPhaseOption = Annotated[
    str | None,
    typer.Option(
        "--phase", "-p", help=f"The phase that writes the graph (default: the one running {GRAPH_HANDLER})."
    ),
]
GroupOption = Annotated[
    str | None, typer.Option("--group", help="The graph, by group id (default: the phase's group_id option).")
]


@graph_app.command("search")
@reports_errors
def graph_search(
    query: Annotated[str, typer.Argument(help="Words to look for (BM25 over facts and episodes).")],
    file: FileOption = None,
    group: GroupOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many results.")] = 10,
    phase: GraphPhaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """The facts and episodes of the knowledge graph that match QUERY, best first."""
    results = call_graph_phase(file, phase, "search", group, query=query, limit=limit)
    console.graph_results(query, results, as_json)


@graph_app.command("counts")
@reports_errors
def graph_counts(
    file: FileOption = None,
    group: GroupOption = None,
    phase: GraphPhaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many episodes, entities and edges the knowledge graph holds."""
    console.graph_counts(call_graph_phase(file, phase, "counts", group), as_json)

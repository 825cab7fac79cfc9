"""What `levers run` shows at the end of the bundled pipeline: chunks with contexts, and the graph.

Named by ``summary:`` in pipeline.yaml; levers calls it with every document of the run, their
phase outputs, the pipeline as a dict and the state directory, and prints the text it returns.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

# How much of a run to show: enough to see what the phases made, short enough to read.
DOCUMENTS_SHOWN = 2
CHUNKS_SHOWN = 2
TEXT_CHARS = 160


def describe(documents: list[dict[str, Any]], pipeline: dict[str, Any], state_dir: Path) -> str:
    lines = []
    chunked = [d for d in documents if "chunks" in d["outputs"].get("chunking", {})]
    for document in chunked[:DOCUMENTS_SHOWN]:
        chunking = document["outputs"]["chunking"]
        chunks = chunking["chunks"]
        lines.append(f"{document['name']}: {len(chunks)} chunks, contexts by {chunking.get('provider', '?')}")
        for chunk in chunks[:CHUNKS_SHOWN]:
            lines.append(f"  [{chunk['index']}] context: {chunk['context']}")
            text = textwrap.shorten(chunk["text"], TEXT_CHARS, placeholder=" ...")
            lines.append(f"      text:    {text}")
    graph = _graph_counts(pipeline, state_dir)
    if graph:
        lines.append(graph)
    return "\n".join(lines)


def _graph_counts(pipeline: dict[str, Any], state_dir: Path) -> str:
    handlers = ("phases.kg_ingest:ingest_graph", "phases.kg_ingest:ingest_graphs")
    kg = next((p for p in pipeline["phases"].values() if p["handler"] in handlers), None)
    if kg is None:
        return ""
    from phases import kg_ingest

    options = kg.get("options", {})
    group_id = str(options.get("group_id", kg_ingest.DEFAULT_GROUP_ID))
    counts = kg_ingest.counts(
        state_dir,
        group_id,
        kg_ingest.server_url(state_dir, options.get("graph") or options.get("falkordb_url")),
    )
    figures = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    hint = 'search it while `levers up` runs: levers graph search "..."'
    return f"knowledge graph {group_id!r}: {figures} ({hint})"

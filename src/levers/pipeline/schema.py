"""The JSON Schema of pipeline.yaml, for editors (yaml-language-server) and for `levers schema`.

A phase whose handler is one of the bundled ones gets its options' schema too (JSON Schema's
``if``/``then`` on the handler), so editors complete and check ``options:`` as they do the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from levers.pipeline.model import Pipeline
from levers.pipeline.options import options_model

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# The handlers levers ships (the `phases` package), whose options every schema describes.
BUNDLED_HANDLERS = (
    "phases.extraction:extract",
    "phases.ingest_extract:ingest",
    "phases.transcription:transcribe",
    "phases.chunking:chunk",
    "phases.kg_ingest:ingest_graph",
    "phases.kg_ingest:ingest_graphs",
)


def pipeline_schema(handlers: Sequence[str] = BUNDLED_HANDLERS) -> dict[str, Any]:
    schema = Pipeline.model_json_schema()
    defs = schema.setdefault("$defs", {})
    branches = [_options_branch(handler, defs) for handler in handlers]
    defs["Phase"]["allOf"] = [branch for branch in branches if branch is not None]
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "levers pipeline.yaml"}


def _options_branch(handler: str, defs: dict[str, Any]) -> dict[str, Any] | None:
    """``options`` as ``handler``'s module declares them, for a phase with that handler; its
    definitions go into ``defs`` under names of their own (every module's model is ``Options``)."""
    model = options_model(handler)
    if model is None:
        return None
    prefix = handler.replace(":", ".") + "."
    options = model.model_json_schema(ref_template=f"#/$defs/{prefix}{{model}}")
    defs.update({prefix + name: definition for name, definition in options.pop("$defs", {}).items()})
    defs[prefix + "Options"] = options
    return {
        "if": {"properties": {"handler": {"const": handler}}, "required": ["handler"]},
        "then": {"properties": {"options": {"$ref": f"#/$defs/{prefix}Options"}}},
    }

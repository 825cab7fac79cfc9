"""The JSON Schema of pipeline.yaml, for editors (yaml-language-server) and for `levers schema`."""

from __future__ import annotations

from typing import Any

from levers.pipeline.model import Pipeline

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def pipeline_schema() -> dict[str, Any]:
    schema = Pipeline.model_json_schema()
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "levers pipeline.yaml"}

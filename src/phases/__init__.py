"""The document pipeline's phase handlers: extraction, chunking and knowledge-graph ingest.

Each handler module exposes one handler ``(doc, ctx) -> output`` named in pipeline.yaml, and its
options as ``class Options``. Phases import only levers' public API: ``from levers import ...``.
"""

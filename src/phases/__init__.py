"""The document pipeline's phase handlers: extraction, chunking and knowledge-graph ingest.

Each module exposes one handler ``(doc, ctx) -> output`` named in pipeline.yaml. Phases import
only levers' public API (``levers.worker.phase_context`` and ``levers.server.embedded``).
"""
